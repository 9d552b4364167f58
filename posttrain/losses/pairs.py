"""The pair-weighted mean shared by the pairwise losses (reward model, DPO family)."""

from collections.abc import Callable

import torch


def pair_weighted(per_pair: torch.Tensor, pair_weight: torch.Tensor,
                  normalizer: float | torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], float]]:
    """The loss sum(per_pair * pair_weight) / normalizer, and `mean(x)`: the same weighting for a metric."""
    loss = (per_pair * pair_weight).sum() / normalizer
    w = (pair_weight / normalizer).detach()

    def mean(x: torch.Tensor) -> float:
        return float((x.detach() * w).sum())

    return loss, mean
