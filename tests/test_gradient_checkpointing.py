"""train.gradient_checkpointing: recomputing each block in backward gives the plain gradients, also for packed
rows and for DPO rows that share one copy of their prompt (the packed-attention state is re-entered)."""

import functools

import pytest
import torch

from posttrain.data.collate import collate
from posttrain.data.preference import collate_preferences
from posttrain.models import packed_attention
from posttrain.models.anatomy import find_layers
from posttrain.models.checkpointing import enable_gradient_checkpointing
from posttrain.models.forward import sft_forward
from posttrain.train.dpo import response_logps
from test_fast_paths import assert_same, grads_of, lora_model, preference_samples
from test_loop import make_data


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
    """Counts forward calls of the first decoder block (a recompute in backward calls it again)."""
    calls = [0]
    find_layers(model)[1][0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
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
    broken = grads_of(model, functools.partial(dpo_loss, model), fast=True)
    with pytest.raises(AssertionError):
        assert_same(plain, broken, tol=1e-3)
