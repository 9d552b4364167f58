"""Decode-time packed linears (models/packed_linear.py): the same outputs as torch's linear on every layer, nothing
packed outside the block, with grad on or at other row counts, a changed or swapped weight is repacked."""

from __future__ import annotations

import pytest
import torch

from posttrain.models import packed_linear
from posttrain.models.packed_linear import PackedLinears
from posttrain.models.tiny import build_model, build_tokenizer

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="torch built without MKL (not x86)")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(build_tokenizer(), hidden_size=64, layers=2).eval()


def _logits(model, ids):
    return model(input_ids=ids).logits


def _counting(monkeypatch) -> list[int]:
    """Rows of every packed GEMM that runs."""
    calls, real = [], torch.ops.mkl._mkl_linear

    def spy(x, packed, weight, bias, rows):
        calls.append(rows)
        return real(x, packed, weight, bias, rows)
    monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", spy)
    return calls


def test_packed_decode_step_equals_plain_linear_on_every_layer(model, monkeypatch):
    ids = torch.randint(0, model.config.vocab_size, (8, 1))  # one decode step of 8 rows
    linears = PackedLinears(model)
    calls = _counting(monkeypatch)
    with torch.no_grad():
        want = _logits(model, ids)
        with linears.active(8):
            got = _logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # per layer: q, k, v, o, gate, up, down; plus the head
    assert len(calls) == 7 * model.config.num_hidden_layers + 1 and set(calls) == {8}
    assert all("forward" not in m.__dict__ for m in model.modules())  # nothing left patched


def test_grad_mode_and_other_row_counts_run_torch_linear_unchanged(model, monkeypatch):
    linears = PackedLinears(model)
    calls = _counting(monkeypatch)
    ids = torch.randint(0, model.config.vocab_size, (8, 1))
    with linears.active(8):
        want = _logits(model, ids)  # grad on: training code is never routed through the packs
    with torch.no_grad(), linears.active(8):
        prefill = _logits(model, torch.randint(0, model.config.vocab_size, (8, 5)))  # 40 rows per GEMM
    with torch.no_grad(), linears.active(1):
        _logits(model, ids[:1])
    assert calls == [] and want.requires_grad and prefill.shape[:2] == (8, 5)


def test_a_changed_weight_is_repacked(model, monkeypatch):
    torch.manual_seed(1)
    fresh = build_model(build_tokenizer(), hidden_size=64, layers=2).eval()
    ids = torch.randint(0, fresh.config.vocab_size, (6, 1))
    linears = PackedLinears(fresh)
    with torch.no_grad():
        with linears.active(6):
            before = _logits(fresh, ids)
        first = linears.packs
        fresh.model.layers[0].mlp.down_proj.weight.mul_(3.0)  # an optimizer step changes weights in place
        with linears.active(6):
            after = _logits(fresh, ids)
        want = _logits(fresh, ids)
    assert linears.packs is not first
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


def test_a_forward_someone_else_replaced_is_left_alone(model):
    head = model.lm_head
    own = head.forward.__func__.__get__(head)
    head.forward = own  # e.g. an accelerate hook
    try:
        linears = PackedLinears(model)
        with torch.no_grad(), linears.active(8):
            assert head.__dict__["forward"] is own
            _logits(model, torch.randint(0, model.config.vocab_size, (8, 1)))
        assert head.__dict__["forward"] is own and all(p.module is not head for p in linears.packs)
    finally:
        del head.forward


def test_weights_swapped_through_data_are_repacked_every_time():
    """rollout.merged_lora's pattern: a merged copy goes in through `.data`, the original comes back after; the
    freed copy's address is free for the next one, at version 0 again."""
    torch.manual_seed(2)
    fresh = build_model(build_tokenizer(), hidden_size=64, layers=2).eval()
    ids = torch.randint(0, fresh.config.vocab_size, (8, 1))
    linears, head = PackedLinears(fresh), fresh.lm_head
    original = head.weight.data
    with torch.no_grad():
        for k in range(4):
            head.weight.data = original + 0.1 * (k + 1)
            with linears.active(8):
                got = _logits(fresh, ids)
            torch.testing.assert_close(got, _logits(fresh, ids), rtol=1e-5, atol=1e-5)
            head.weight.data = original
