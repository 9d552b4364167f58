"""Mean and std metrics that survive the training loop's summing over micro-batches and processes.

The loop sums every metric a loss reports; a std cannot be summed, but its moments can. A loss
reports `moment_sums(name, x)` (`name:n`, `name:sum`, `name:sumsq`), and the loop's
`fold_moments` turns the summed values into `name/mean` and `name/std` over every element seen.
"""

from __future__ import annotations

import math

import torch

_PARTS = ("n", "sum", "sumsq")


def moment_sums(name: str, x: torch.Tensor) -> dict[str, float]:
    """Count, sum and sum of squares of `x` (float64), keyed `name:n|sum|sumsq`."""
    x = x.detach().double()
    return {f"{name}:n": float(x.numel()), f"{name}:sum": float(x.sum()), f"{name}:sumsq": float((x * x).sum())}


def is_moment(key: str) -> bool:
    """True for the keys `moment_sums` writes (the loop must not divide them by its normaliser)."""
    return ":" in key and key.rpartition(":")[2] in _PARTS


def fold_moments(metrics: dict[str, float]) -> dict[str, float]:
    """Replace each summed `name:n|sum|sumsq` triple by `name/mean` and `name/std` (unbiased, as torch.std)."""
    out = {k: v for k, v in metrics.items() if not is_moment(k)}
    for key in metrics:
        if not key.endswith(":n"):
            continue
        name, n = key[:-2], metrics[key]
        mean = metrics[f"{name}:sum"] / n if n else 0.0
        var = max(metrics[f"{name}:sumsq"] - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
        out[f"{name}/mean"], out[f"{name}/std"] = mean, math.sqrt(var)
    return out
