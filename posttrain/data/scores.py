"""Scores as preferences: responses rated on a continuous scale (UltraFeedback's per-response ratings, a
reward model's rewards) -> the ranks and pair margins the preference stages read.

A ranked row may give `scores` (higher is better) instead of `ranks`:
    {"prompt": ..., "responses": [r1, r2, r3, r4], "scores": [4.5, 2.0, 4.4, 1.0]}
Ranks: responses sorted by score, best first; a response within `epsilon` of the best score of the
current group joins that group (a tie: no pair between them); the next one starts a new group. With
epsilon 0.5 the row above ranks [0, 1, 0, 2]. A row whose scores all tie gives no pair and is dropped
and counted (`all_ranks_tied`) like a ranked row with equal ranks.
Margins (optional, `margin_scale` > 0): each (better, worse) pair requires a reward gap of
margin_scale * (score_better - score_worse), as Llama 2 derives its margin from the rating gap.
"""

from __future__ import annotations

import math


def ranks_from_scores(scores: list[float], epsilon: float = 0.0) -> list[int]:
    """0 = best; responses within `epsilon` of their group's best score share its rank."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks, rank, anchor = [0] * len(scores), -1, math.inf
    for i in order:
        if scores[i] < anchor - epsilon:
            rank, anchor = rank + 1, scores[i]
        ranks[i] = rank
    return ranks


def pair_margins(scores: list[float], pairs: list[tuple[int, int]], scale: float) -> list[float]:
    """The required reward gap of each (better, worse) pair: scale * score gap."""
    return [scale * (scores[better] - scores[worse]) for better, worse in pairs]


def row_ranks(row, k: int, epsilon: float, ctx) -> tuple[list, list[float] | None]:
    """(ranks as given or from `scores`, the scores or None); ctx.fail names the field of a bad row."""
    ranks, scores = row.get("ranks"), row.get("scores")
    if scores is None:
        return ranks, None
    if ranks is not None:
        raise ctx.fail("scores", "give ranks or scores, not both")
    if not isinstance(scores, list) or len(scores) != k:
        raise ctx.fail("scores", f"must be a list of {k} numbers (one per response, higher is better), "
                       f"got {scores!r:.80}")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
        raise ctx.fail("scores", f"must hold finite numbers only, got {scores!r:.80}")
    return ranks_from_scores(scores, epsilon), scores
