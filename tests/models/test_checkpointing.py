"""train.gradient_checkpointing: recomputing each block in backward gives the plain gradients, also for packed
rows and for DPO rows that share one copy of their prompt (the packed-attention state is re-entered); and
train.precision=bf16: the fused paths stay as close to float32 as the plain ones."""

import functools

import pytest
import torch
import torch.utils.checkpoint

from posttrain.data.collate import collate
from posttrain.data.preference_batch import collate_preferences
from posttrain.models import packed_attention
from posttrain.models.anatomy import find_layers
from posttrain.models.checkpointing import enable_gradient_checkpointing
from posttrain.models.forward import sft_forward
from posttrain.train.dpo import response_logps
from conftest import make_data
from test_fast_paths import assert_same, grads_of, lora_model, preference_samples


def sft_loss(model):
    ids, weights = make_data(6)
    batch = collate([[0, 1, 2], [3, 4, 5]], ids, weights, pad_id=0)  # packed: 3 samples per row
    return sft_forward(model, batch, 20.0)[0]


def dpo_loss(model):
    samples = preference_samples(5)
    batch = collate_preferences([[0], [1, 2]], samples, pad_id=0, pack=True, share_prompt=True)
    logps, _ = response_logps(model, batch, chunk=5, fused=True)
    return (logps * torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0])).sum()


def block_calls(model) -> list[int]:
    """Counts forward calls of the first block's attention (a recompute in backward calls it again; the block's
    own hooks stay outside the checkpoint)."""
    calls = [0]
    find_layers(model)[1][0].self_attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("loss", [sft_loss, dpo_loss], ids=["sft_packed", "dpo_shared_prompt"])
def test_checkpointed_gradients_equal_plain(tiny_dir, tmp_path, loss):
    model = lora_model(tiny_dir, tmp_path).train()
    calls = block_calls(model)
    plain = grads_of(model, functools.partial(loss, model), fast=True)
    assert calls[0] == 1
    assert enable_gradient_checkpointing(model) == 1
    checkpointed = grads_of(model, functools.partial(loss, model), fast=True)
    assert calls[0] == 3  # forward, then the recompute during backward
    assert_same(plain, checkpointed, tol=1e-6)


def test_recompute_outside_the_packed_attention_state_is_wrong(tiny_dir, tmp_path, monkeypatch):
    """The control: without re-entering the forward's state, the recompute of shared-prompt rows attends
    differently, and the gradients are wrong (so the test above can fail)."""
    model = lora_model(tiny_dir, tmp_path).train()
    plain = grads_of(model, functools.partial(dpo_loss, model), fast=True)
    monkeypatch.setattr(packed_attention, "_reenter", lambda snapshot: packed_attention.nullcontext())
    enable_gradient_checkpointing(model)
    # torch notices the other attention path (it saves other tensors) or the gradients differ
    with pytest.raises((AssertionError, torch.utils.checkpoint.CheckpointError)):
        assert_same(plain, grads_of(model, functools.partial(dpo_loss, model), fast=True), tol=1e-3)


def relative_error(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).norm() / b[n].norm()) for n in b)


def test_bf16_fused_paths_are_as_close_to_fp32_as_the_plain_ones(tiny_dir, tmp_path):
    model = lora_model(tiny_dir, tmp_path).train()
    loss = functools.partial(sft_loss, model)
    fp32 = grads_of(model, loss, fast=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, plain = grads_of(model, loss, fast=True), grads_of(model, loss, fast=False)
    assert all(g.dtype == torch.float32 for g in fused[1].values())  # gradients of the float32 master weights
    err_fused, err_plain = relative_error(fused[1], fp32[1]), relative_error(plain[1], fp32[1])
    assert 0 < err_plain < 0.1  # bf16 really ran (8 mantissa bits), and stays near float32
    assert err_fused < 2 * err_plain, (err_fused, err_plain)
    assert abs(fused[0] - fp32[0]) < 2 * abs(plain[0] - fp32[0]) + 1e-3 * abs(fp32[0])
