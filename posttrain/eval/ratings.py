"""Ratings from pairwise votes: win/tie/loss rates, online Elo and Bradley-Terry, bootstrap intervals.

A vote is a dict {"model_a", "model_b", "winner": "model_a" | "model_b" | "tie"} (the JSONL
records judges and, later, human annotators write). Ratings are on the Elo scale (400 points =
10x odds) anchored at mean 1000, as Chatbot Arena reports them. Pure numpy, no model code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

WINNERS = ("model_a", "model_b", "tie")
SCALE = 400.0 / math.log(10.0)  # Elo points per natural-log unit of strength
BASE = 1000.0


def models_of(votes: Sequence[dict]) -> list[str]:
    return sorted({v["model_a"] for v in votes} | {v["model_b"] for v in votes})


def _score_a(vote: dict) -> float:
    """1 when model_a won, 0 when it lost, 0.5 for a tie."""
    winner = vote["winner"]
    if winner not in WINNERS:
        raise ValueError(f"vote winner must be one of {WINNERS}, got {winner!r}")
    return {"model_a": 1.0, "model_b": 0.0, "tie": 0.5}[winner]


def _arrays(votes: Sequence[dict], names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = {m: i for i, m in enumerate(names)}
    a = np.array([index[v["model_a"]] for v in votes], dtype=np.int64)
    b = np.array([index[v["model_b"]] for v in votes], dtype=np.int64)
    s = np.array([_score_a(v) for v in votes], dtype=np.float64)
    return a, b, s


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (better than p +- z*se near 0 and 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rates(votes: Sequence[dict]) -> list[dict]:
    """Per ordered pair (x, y): wins, ties, losses of x against y, rates and 95% Wilson intervals."""
    names = models_of(votes)
    rows = []
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            w = t = lo = 0
            for v in votes:
                if {v["model_a"], v["model_b"]} != {x, y}:
                    continue
                if v["winner"] == "tie":
                    t += 1
                elif v[v["winner"]] == x:
                    w += 1
                else:
                    lo += 1
            n = w + t + lo
            if n == 0:
                continue
            rows.append({"model": x, "opponent": y, "n": n, "wins": w, "ties": t, "losses": lo,
                         "win_rate": w / n, "tie_rate": t / n, "loss_rate": lo / n,
                         "win_ci": wilson_interval(w, n), "tie_ci": wilson_interval(t, n),
                         "loss_ci": wilson_interval(lo, n)})
    return rows


def win_matrix(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """matrix[x][y]: x's win rate against y (ties count for neither, so matrix[x][y] + matrix[y][x] <= 1)."""
    names = sorted({r["model"] for r in rows} | {r["opponent"] for r in rows})
    matrix: dict[str, dict[str, float]] = {m: {} for m in names}
    for r in rows:
        matrix[r["model"]][r["opponent"]] = r["win_rate"]
        matrix[r["opponent"]][r["model"]] = r["loss_rate"]
    return matrix


def elo(votes: Sequence[dict], names: list[str] | None = None, k: float = 4.0) -> np.ndarray:
    """Online Elo in vote order (Chatbot Arena's K=4): order-dependent, hence the bootstrap."""
    names = names or models_of(votes)
    rating = np.full(len(names), BASE)
    a, b, s = _arrays(votes, names)
    for i, j, score in zip(a, b, s):
        expected = 1.0 / (1.0 + 10.0 ** ((rating[j] - rating[i]) / 400.0))
        rating[i] += k * (score - expected)
        rating[j] -= k * (score - expected)
    return rating


def bradley_terry(votes: Sequence[dict], names: list[str] | None = None, iters: int = 1000,
                  tol: float = 1e-10, prior: float = 0.1) -> np.ndarray:
    """Bradley-Terry maximum likelihood (Zermelo / Hunter 2004 MM updates), on the Elo scale.

    P(i beats j) = p_i / (p_i + p_j); a tie counts half a win each way. `prior` adds that many
    virtual ties between every pair, so a model that never lost still gets a finite rating.
    """
    names = names or models_of(votes)
    a, b, s = _arrays(votes, names)
    m = len(names)
    wins = np.zeros((m, m))  # wins[i, j]: (half-)wins of i over j
    np.add.at(wins, (a, b), s)
    np.add.at(wins, (b, a), 1.0 - s)
    wins += prior * 0.5 * (1 - np.eye(m))
    games = wins + wins.T  # (m, m) comparisons per pair
    total_wins = wins.sum(axis=1)
    p = np.ones(m)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = total_wins / np.maximum(denom, 1e-300)
        new /= np.exp(np.log(np.maximum(new, 1e-300)).mean())  # geometric mean 1: the scale is free
        if np.max(np.abs(new - p)) < tol:
            p = new
            break
        p = new
    log_p = np.log(np.maximum(p, 1e-300))
    return BASE + SCALE * (log_p - log_p.mean())


def bootstrap(votes: Sequence[dict], method: str = "bt", rounds: int = 200, seed: int = 0,
              level: float = 0.95) -> list[dict]:
    """Ratings with percentile intervals from `rounds` resamples of the votes (with replacement)."""
    names = models_of(votes)
    fit = {"bt": bradley_terry, "elo": elo}[method]
    rng = np.random.default_rng(seed)
    point = fit(votes, names)
    samples = np.empty((rounds, len(names)))
    for r in range(rounds):
        pick = rng.integers(0, len(votes), len(votes))
        samples[r] = fit([votes[i] for i in pick], names)
    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    order = np.argsort(-point)
    return [{"model": names[i], "rating": float(point[i]), "lower": float(lo[i]), "upper": float(hi[i]),
             "rank": rank + 1} for rank, i in enumerate(order)]


def ratings_from_votes(votes: list[dict], rounds: int = 200, seed: int = 0,
                       categories: dict[str, str] | None = None) -> dict:
    """Win/tie/loss with intervals, the win-rate matrix, BT and Elo with bootstrap intervals, and
    win rates per prompt category when the prompts have categories. Only votes with a winner are
    rated; those whose judge gave no verdict (winner None) are counted as no_verdict."""
    decided = [v for v in votes if v["winner"] is not None]
    result = {"votes": len(decided), "no_verdict": len(votes) - len(decided)}
    if not decided:
        return {**result, "win_rates": [], "win_matrix": {}, "bradley_terry": [], "elo": []}
    rows = win_rates(decided)
    result.update(win_rates=rows, win_matrix=win_matrix(rows), bradley_terry=bootstrap(decided, "bt", rounds, seed),
                  elo=bootstrap(decided, "elo", rounds, seed))
    if categories and any(categories.values()):
        by_cat: dict[str, list[dict]] = {}
        for v in decided:
            by_cat.setdefault(categories.get(v["prompt_id"]) or "(none)", []).append(v)
        result["by_category"] = {c: win_rates(vs) for c, vs in sorted(by_cat.items())}
    return result
