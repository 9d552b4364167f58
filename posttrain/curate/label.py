"""`posttrain data label CANDIDATES --judge RM_FOLDER|URL`: AI feedback -> ranked preference rows (RLAIF).

Each row of a candidates file ({"prompt", "responses", "models"?}, from `data candidates` or the UI) is
ranked by a judge and written in the ranked layout the rm and dpo stages read:
{"id", "prompt", "responses", "ranks" (0 = best, ties share a rank), "judge_scores", "judge", "models"?}.
- A reward model scores all K responses at once (K-way); responses within `epsilon` of their
  group's best reward tie (data/scores.py).
- An LLM behind an OpenAI-compatible URL judges every pair, each asked in both orders (eval/judges.py:
  a verdict that flips with the order is a tie); a response's score is its wins + half its ties.
  A reply without a verdict makes its prompt unranked: the prompt is left out, counted, and its
  verdicts written to `<out>.unparsed.jsonl`.
Prompts whose responses all tie give no preference: left out and counted (`all_tied`).
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations
from pathlib import Path

from posttrain.curate.stream import AtomicJsonl, side_path
from posttrain.data.reading import read_rows, source_of
from posttrain.data.scores import ranks_from_scores
from posttrain.errors import DataError
from posttrain.eval.judges import OpenAIJudge, RewardModelJudge
from posttrain.records import Message


def make_judge(spec: str, *, judge_model: str = "gpt-4o-mini", epsilon: float = 0.0, device: str | None = None,
               max_tokens: int | None = None):
    """An LLM judge for an http(s) URL, else a reward-model folder."""
    if spec.startswith(("http://", "https://")):
        return OpenAIJudge(spec, judge_model, max_tokens=max_tokens)
    return RewardModelJudge(spec, epsilon=epsilon, device=device)


def read_candidates(path: str | Path) -> list[dict]:
    rows = []
    for i, row in enumerate(read_rows(path)):
        prompt, responses = row.get("prompt"), row.get("responses")
        if not isinstance(prompt, str) or not isinstance(responses, list) or len(responses) < 2 \
                or not all(isinstance(r, str) for r in responses):
            raise DataError(f"{source_of(path, i)}: needs 'prompt' (text) and 'responses' (a list of 2 or more texts)")
        rows.append({"id": str(row.get("id") if row.get("id") is not None else i), "prompt": prompt,
                     "responses": responses, "models": row.get("models")})
    if not rows:
        raise DataError(f"{path}: no candidate rows")
    return rows


def pairwise_points(judge, messages: list[Message], responses: list[str]) -> tuple[list[float], list[dict]]:
    """(wins + half ties per response, the pairs whose verdict could not be parsed)."""
    points, unparsed = [0.0] * len(responses), []
    for i, j in combinations(range(len(responses)), 2):
        vote = judge.compare(messages, responses[i], responses[j])
        if vote["winner"] is None:
            unparsed.append({"pair": [i, j], "verdicts": vote.get("verdicts")})
        elif vote["winner"] == "tie":
            points[i] += 0.5
            points[j] += 0.5
        else:
            points[i if vote["winner"] == "model_a" else j] += 1.0
    return points, unparsed


def label(candidates: str | Path, out: str | Path, judge, epsilon: float = 0.0) -> dict:
    """Rank every candidates row with `judge`; report rows written and left out by reason."""
    rows = read_candidates(candidates)
    left, n_pairs = Counter(), 0
    with AtomicJsonl(out) as writer, AtomicJsonl(side_path(out, "unparsed")) as unparsed_out:
        for row in rows:
            messages = [Message("user", row["prompt"])]
            if isinstance(judge, RewardModelJudge):
                scores = [judge.reward(messages, r) for r in row["responses"]]
                ranks = ranks_from_scores(scores, epsilon)
            else:
                scores, unparsed = pairwise_points(judge, messages, row["responses"])
                n_pairs += len(row["responses"]) * (len(row["responses"]) - 1) // 2
                if unparsed:
                    left["unparsed"] += 1
                    unparsed_out.write({"id": row["id"], "prompt": row["prompt"], "unparsed": unparsed})
                    continue
                ranks = ranks_from_scores(scores, 0.0)
            if len(set(ranks)) == 1:
                left["all_tied"] += 1
                continue
            extra = {"models": row["models"]} if row["models"] else {}
            writer.write({"id": row["id"], "prompt": row["prompt"], "responses": row["responses"], "ranks": ranks,
                          "judge_scores": scores, "judge": judge.id, **extra})
    report = {"rows": len(rows), "written": writer.count, "left_out": dict(left), "judge": judge.id, "out": str(out)}
    if n_pairs:
        report |= {"pairs_judged": n_pairs, "unparsed_file": str(unparsed_out.path)}
    return report
