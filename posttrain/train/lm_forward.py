"""Causal-LM forward that applies the LM head only where a loss is taken.

The decoder runs on every token, but the (hidden x vocabulary) head and the cross-entropy run
only on positions whose next token carries loss, in chunks, so prompt and padding positions
never materialise full-vocabulary logits.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from posttrain.losses import sft_loss
from posttrain.models.methods import lm_head_and_backbone


def supervised_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions t whose next token t+1 has weight != 0: (index (N, 2), target ids (N,), weights (N,))."""
    next_w = batch["weights"][:, 1:]  # (B, T-1) weight of predicting token t+1 from position t
    index = (next_w != 0).nonzero()  # (N, 2) rows (b, t)
    targets = batch["input_ids"][:, 1:][index[:, 0], index[:, 1]]  # (N,)
    return index, targets, next_w[index[:, 0], index[:, 1]]


def hidden_states(model, batch: dict) -> torch.Tensor:
    """Final hidden states (B, T, H); attention follows position ids (block-diagonal when packed)."""
    backbone, _ = lm_head_and_backbone(model)
    return backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"])


def sft_forward_all_positions(model, batch: dict, normalizer: float) -> tuple[torch.Tensor, dict]:
    """The naive reference: full-vocabulary logits at every position (as HF models compute them), then
    the same loss at the supervised ones. Kept for benchmarks (before/after) and equivalence tests."""
    _, head = lm_head_and_backbone(model)
    logits = head(hidden_states(model, batch))  # (B, T, V)
    index, targets, weights = supervised_targets(batch)
    if index.shape[0] == 0:
        return logits.sum() * 0.0, {"nll_sum": 0.0, "tokens": 0.0}
    loss, metrics = sft_loss(logits[index[:, 0], index[:, 1]], targets, weights, normalizer)
    return loss, metrics


def sft_forward(model, batch: dict, normalizer: float, chunk: int = 1024,
                head_positions: str = "supervised") -> tuple[torch.Tensor, dict]:
    """Weighted next-token loss of a micro-batch, divided by the effective batch's token count."""
    if head_positions == "all":
        return sft_forward_all_positions(model, batch, normalizer)
    _, head = lm_head_and_backbone(model)
    hidden = hidden_states(model, batch)  # (B, T, H)
    index, targets, weights = supervised_targets(batch)
    selected = hidden[index[:, 0], index[:, 1]]  # (N, H)
    total = hidden.new_zeros(())
    nll_sum = 0.0
    n = selected.shape[0]
    if n == 0:  # keep the graph connected so every process runs the same backward
        return hidden.sum() * 0.0, {"nll_sum": 0.0, "tokens": 0.0}

    def chunk_loss(h, t, w):
        loss, metrics = sft_loss(head(h), t, w, normalizer)
        return loss, torch.tensor(metrics["nll_sum"])

    for start in range(0, n, chunk):
        args = (selected[start:start + chunk], targets[start:start + chunk], weights[start:start + chunk])
        if n > chunk:  # recompute each chunk's logits in backward instead of keeping them all
            loss, nll = checkpoint(chunk_loss, *args, use_reentrant=False)
        else:
            loss, nll = chunk_loss(*args)
        total = total + loss
        nll_sum += float(nll)
    return total, {"nll_sum": nll_sum, "tokens": float(n)}
