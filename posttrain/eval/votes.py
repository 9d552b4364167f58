"""Votes -> ratings: `posttrain eval ratings VOTES.jsonl [...]`, from people, judges or both.

One vote format for every voter, one JSON object per line:
    {"prompt_id", "model_a", "model_b", "winner": "model_a" | "model_b" | "tie" | null, "judge",
     "prompt"?, "response_a"?, "response_b"?, "annotator"?, "time"?}
`judge` names who voted: "human:<annotator>" for a person in the UI's arena (ui-data/votes.jsonl),
the judge's id for a model (`eval compare`'s votes.jsonl: "reward_model:...", "llm:...").
UI votes written before `judge` existed count as "human:<annotator>". `winner: null` is a judge
reply without a verdict (counted as no_verdict, not rated).
The ratings and the report are `eval compare`'s own (ratings.ratings_from_votes, report.py).
Nothing is dropped silently: malformed lines, votes naming a model outside `--models`, votes of a
model against itself and votes of other judges are counted by reason; ties are counted and rated.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from posttrain.data.votes import human_vote, prompt_id  # noqa: F401 (the vote format, re-exported)
from posttrain.errors import DataError
from posttrain.eval.ratings import WINNERS, ratings_from_votes
from posttrain.eval.report import write_compare_report

MAX_LOCATIONS = 20  # malformed lines listed by place; all are counted


def _vote(value) -> dict | None:
    """The vote in the one format, or None when the line is not a vote."""
    if not isinstance(value, dict):
        return None
    a, b, winner = value.get("model_a"), value.get("model_b"), value.get("winner")
    if not (isinstance(a, str) and a.strip() and isinstance(b, str) and b.strip()) or \
            (winner is not None and winner not in WINNERS):
        return None
    judge = value.get("judge")
    if not isinstance(judge, str) or not judge:
        annotator = value.get("annotator")
        judge = f"human:{annotator}" if isinstance(annotator, str) and annotator.strip() else "human"
    pid = value.get("prompt_id")
    pid = str(pid) if pid is not None else prompt_id(str(value.get("prompt") or ""))
    return {**value, "model_a": a.strip(), "model_b": b.strip(), "judge": judge, "prompt_id": pid}


def read_vote_files(paths: list[str | Path], malformed: list[str]) -> list[dict]:
    """Every vote of every file in order; the place of each line that is not a vote goes to `malformed`."""
    votes = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"vote file not found: {path}")
        with path.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    vote = _vote(json.loads(line))
                except ValueError:
                    vote = None
                if vote is None:
                    malformed.append(f"{path} line {number}")
                else:
                    votes.append(vote)
    return votes


def select(votes: list[dict], judges: list[str], models: list[str]) -> tuple[list[dict], Counter]:
    """(votes kept, left out by reason). judges: prefixes of `judge` to keep (none: all); models: the
    models to rate (none: every model named)."""
    kept, left = [], Counter()
    for v in votes:
        if judges and not any(v["judge"].startswith(j) for j in judges):
            left["other_judge"] += 1
        elif models and not {v["model_a"], v["model_b"]} <= set(models):
            left["unknown_model"] += 1
        elif v["model_a"] == v["model_b"]:
            left["same_model"] += 1
        else:
            kept.append(v)
    return kept, left


def rate_votes(paths: list[str | Path], out: str | Path, *, judges: list[str] = (), annotators: list[str] = (),
               models: list[str] = (), rounds: int = 200, seed: int = 0) -> dict:
    """ratings.json and report.md in `out`, as `eval compare` writes them, from the vote files."""
    malformed: list[str] = []
    votes = read_vote_files(paths, malformed)
    wanted = [*judges, *(f"human:{a}" for a in annotators)]
    kept, left = select(votes, wanted, list(models))
    if malformed:
        left["malformed"] = len(malformed)
    by_judge = Counter(v["judge"] for v in kept)
    result = {"models": {m: m for m in sorted({v[k] for v in kept for k in ("model_a", "model_b")})},
              "prompts": ", ".join(map(str, paths)), "prompts_label": "Vote files",
              "judge": ", ".join(f"{j} ({n})" for j, n in by_judge.items()),
              "read": len(votes) + len(malformed), "left_out": dict(left), "malformed_lines": malformed[:MAX_LOCATIONS],
              "ties": sum(v["winner"] == "tie" for v in kept), "by_judge": dict(by_judge),
              **ratings_from_votes(kept, rounds, seed)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ratings.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    result["report"] = str(write_compare_report(out, result))
    return result
