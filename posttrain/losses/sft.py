"""Supervised fine-tuning loss: token cross-entropy weighted per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(
    logits: torch.Tensor,  # (N, V) logits at the N positions that carry loss
    target_ids: torch.Tensor,  # (N,) the next token at each of those positions
    weights: torch.Tensor,  # (N,) per-token loss weight (1.0 normally; a message's loss_weight otherwise)
    normalizer: float,  # supervised tokens in the whole effective batch (all micro-batches, all processes)
) -> tuple[torch.Tensor, dict[str, float]]:
    """sum_i w_i * -log p(y_i) / normalizer.

    Dividing by the supervised-token count of the *effective* batch (not of each micro-batch)
    makes gradient accumulation exact: 8 micro-batches of 1 give the gradient of 1 batch of 8.
    """
    nll = F.cross_entropy(logits.float(), target_ids, reduction="none")  # (N,)
    return sft_loss_from_logps(-nll, weights, normalizer)


def sft_loss_from_logps(
    token_logps: torch.Tensor,  # (N,) log p(y_i) at the N positions that carry loss
    weights: torch.Tensor,  # (N,) per-token loss weight
    normalizer: float,  # supervised tokens in the whole effective batch
) -> tuple[torch.Tensor, dict[str, float]]:
    """The same loss from log-probs already gathered (the fused LM-head path never forms logits)."""
    weighted = -(token_logps * weights).sum()
    metrics = {"nll_sum": float(-token_logps.detach().sum()), "tokens": float(token_logps.numel())}
    return weighted / normalizer, metrics
