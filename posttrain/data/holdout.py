"""How every reader holds rows out for evaluation (data.val_size): one seeded rule, so SFT, preference and KTO
runs split the same way. A fraction holds out at least one row, so a small val_size never silently disables
eval; holding out every row is an error."""

from __future__ import annotations

import numpy as np

from posttrain.errors import PosttrainError


def held_out(total: int, val_size: float, seed: int, what: str = "") -> np.ndarray:
    """(total,) bool mask of the rows held out: val_size < 1 is a fraction of `total`, >= 1 a count."""
    n_val = int(val_size) if val_size >= 1 else max(1, round(val_size * total))
    if n_val >= total:
        raise PosttrainError(f"data.val_size={val_size} holds out {n_val} of {total} {what}rows, leaving none to "
                             "train on")
    held = np.zeros(total, dtype=bool)
    held[np.random.default_rng([seed, 3]).choice(total, n_val, replace=False)] = True
    return held


def split_off(records: list, val_size: float, seed: int, what: str) -> tuple[list, list]:
    """(train, held out) records, by `held_out`."""
    held = held_out(len(records), val_size, seed, what + " ")
    return [r for r, h in zip(records, held) if not h], [r for r, h in zip(records, held) if h]
