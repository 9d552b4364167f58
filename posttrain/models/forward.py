"""Causal-LM forward that applies the LM head only where a loss is taken.

The decoder runs on every token, but the (hidden x vocabulary) head and the cross-entropy run
only on positions whose next token carries loss, in chunks (models/head_logps.py), so prompt and
padding positions never materialise full-vocabulary logits.

`FastPaths` switches the fast paths off: not config keys (every run takes them), but the reference
that tests and benchmarks/ measure them against, passed to a stage's `run(cfg, fast=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.losses import sft_loss, sft_loss_from_logps
from posttrain.models.config import PROMPT_METHODS
from posttrain.models.anatomy import lm_head_and_backbone, unwrap
from posttrain.models.packed_attention import packed_attention
from posttrain.models.head_logps import token_logps


@dataclass(frozen=True)
class FastPaths:
    """Same maths, fewer passes over memory; each False / "all" is the plain path it is measured against."""

    fused: bool = True  # fused LoRA linears, LM-head log-probs and packed rows; False: PEFT / autograd, padded rows
    head_positions: Literal["supervised", "all"] = "supervised"  # LM head where a loss is taken, or everywhere


def packs_rows(cfg, fused: bool = True) -> bool:
    """A micro-batch's sequences share one row (no padding) where attention keeps them apart per sample
    (DPO's responses, GRPO's groups): the fused paths with sdpa attention, and no virtual tokens."""
    # virtual-token methods ignore position ids, so packed sequences would see each other
    return fused and cfg.model.attn_implementation == "sdpa" and cfg.method.type not in PROMPT_METHODS


def supervised_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions t whose next token t+1 has weight != 0: (index (N, 2), target ids (N,), weights (N,))."""
    next_w = batch["weights"][:, 1:]  # (B, T-1) weight of predicting token t+1 from position t
    index = (next_w != 0).nonzero()  # (N, 2) rows (b, t)
    targets = batch["input_ids"][:, 1:][index[:, 0], index[:, 1]]  # (N,)
    return index, targets, next_w[index[:, 0], index[:, 1]]


def hidden_states(model, batch: dict, fused: bool = True, shared_prefix: bool = False) -> torch.Tensor:
    """Final hidden states (B, T, H); attention follows position ids (samples never see each other).

    fused: packed rows attend sample by sample (models/packed_attention.py) instead of through a
    block-diagonal mask over the whole row; shared_prefix: rows whose responses share a prompt copy.
    """
    backbone, _ = lm_head_and_backbone(model)
    with packed_attention(unwrap(model).config, enabled=fused, shared_prefix=shared_prefix):
        return backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"])


def sft_forward_all_positions(model, batch: dict, normalizer: float, fused: bool = False) -> tuple[torch.Tensor, dict]:
    """The naive reference: full-vocabulary logits at every position (as HF models compute them), then
    the same loss at the supervised ones. Kept for benchmarks (before/after) and equivalence tests."""
    _, head = lm_head_and_backbone(model)
    logits = head(hidden_states(model, batch, fused))  # (B, T, V)
    index, targets, weights = supervised_targets(batch)
    if index.shape[0] == 0:
        return logits.sum() * 0.0, {"nll_sum": 0.0, "tokens": 0.0}
    loss, metrics = sft_loss(logits[index[:, 0], index[:, 1]], targets, weights, normalizer)
    return loss, metrics


def sft_forward(model, batch: dict, normalizer: float, chunk: int = 1024, head_positions: str = "supervised",
                fused: bool = True) -> tuple[torch.Tensor, dict]:
    """Weighted next-token loss of a micro-batch, divided by the effective batch's token count."""
    if head_positions == "all":
        return sft_forward_all_positions(model, batch, normalizer, fused)
    return supervised_loss(model, hidden_states(model, batch, fused), batch, normalizer, chunk, fused)


def supervised_loss(model, hidden: torch.Tensor, batch: dict, normalizer: float, chunk: int = 1024,
                    fused: bool = True) -> tuple[torch.Tensor, dict]:
    """The SFT loss from final hidden states (B, T, H): the head runs only where the next token has weight."""
    _, head = lm_head_and_backbone(model)
    index, targets, weights = supervised_targets(batch)
    if index.shape[0] == 0:  # keep the graph connected so every process runs the same backward
        return hidden.sum() * 0.0, {"nll_sum": 0.0, "tokens": 0.0}
    logps = token_logps(head, hidden[index[:, 0], index[:, 1]], targets, chunk, fused)  # (N,)
    return sft_loss_from_logps(logps, weights, normalizer)
