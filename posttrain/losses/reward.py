"""Reward-model losses: Bradley-Terry on pairs, and ranked lists as weighted pairs.

A ranked list of K responses becomes its C(K,2) ordered (better, worse) pairs (ties skipped),
each weighted 1/n_pairs so that every prompt counts once (InstructGPT, Ouyang et al. 2022, eq. 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.losses.moments import moment_sums
from posttrain.losses.pairs import pair_weighted


def bradley_terry(
    chosen_rewards: torch.Tensor,  # (P,) r(x, y_chosen)
    rejected_rewards: torch.Tensor,  # (P,) r(x, y_rejected)
    margin: torch.Tensor | float = 0.0,  # (P,) or scalar: required gap (Llama 2 paper, eq. 2)
) -> torch.Tensor:
    """Per-pair -log sigmoid(r_c - r_r - margin), shape (P,)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin)


def pairwise_reward_loss(
    rewards: torch.Tensor,  # (R,) one reward per response row of the micro-batch
    better: torch.Tensor,  # (P,) row index of the preferred response of each pair
    worse: torch.Tensor,  # (P,) row index of the other response
    margin: torch.Tensor,  # (P,) required reward gap per pair (0 when the data gives none)
    pair_weight: torch.Tensor,  # (P,) 1 / (pairs of the pair's prompt): each prompt sums to 1
    normalizer: float,  # prompts in the effective batch (all micro-batches, all processes)
    center_coef: float = 0.0,  # coef x (r_c + r_r)^2 keeps rewards centred at 0 (Eisenstein et al. 2023)
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry over pairs, averaged per prompt, divided by the effective batch's prompt count.

    Metrics are sums already divided by `normalizer`, so summing them over micro-batches gives
    the effective batch's per-prompt mean (the loop sums every metric key); the reward moments
    are raw sums that the loop folds into the mean and std over every response row.
    """
    r_better, r_worse = rewards[better].float(), rewards[worse].float()  # (P,)
    per_pair = bradley_terry(r_better, r_worse, margin)
    if center_coef:
        per_pair = per_pair + center_coef * (r_better + r_worse) ** 2
    loss, mean = pair_weighted(per_pair, pair_weight, normalizer)
    with torch.no_grad():
        metrics = {
            "accuracy": mean((r_better > r_worse).float()),
            "margin": mean(r_better - r_worse),
            "rewards/chosen": mean(r_better),
            "rewards/rejected": mean(r_worse),
            "tokens": float(pair_weight.sum()),  # prompts in this micro-batch: the eval averaging unit
            **moment_sums("rewards", rewards),  # -> rewards/mean and rewards/std over every response
        }
    return loss, metrics
