"""Pairwise comparison: answers from 2+ models on one prompt set, judged pair by pair, then ratings.

Outputs in one folder: answers/<model>.jsonl (cached per prompt), votes.jsonl (one vote per
prompt and pair, cached too, and the same format human votes will use), ratings.json and a
Markdown report with plots. Rerunning with more models only does the new work.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

from posttrain.errors import ConfigError

log = logging.getLogger(__name__)


def model_names(refs: list[str]) -> list[str]:
    """Short unique names for model references: the folder or built-in name, numbered on clashes."""
    names = []
    for ref in refs:
        base = Path(ref.rstrip("/")).name or ref
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def generate_answers(refs: list[str], names: list[str], prompts, out_dir: Path, **gen_kwargs) -> dict[str, dict]:
    """name -> {prompt id -> answer row}; one model in memory at a time."""
    from posttrain.eval.generation import generate_file
    from posttrain.models.run import load_model_for_inference

    answers = {}
    for ref, name in zip(refs, names):
        log.info("answers from %s (%s)", name, ref)
        model, tokenizer, cfg = load_model_for_inference(ref, device=gen_kwargs.pop("device", None))
        system = cfg.template.system if cfg is not None else None
        rows = generate_file(model, tokenizer, prompts, out_dir / "answers" / f"{name}.jsonl", system=system,
                             **gen_kwargs)
        answers[name] = {r["id"]: r for r in rows}
        del model
        gc.collect()
    return answers


def read_votes(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def judge_pairs(judge, names: list[str], prompts, answers: dict[str, dict], votes_path: Path) -> list[dict]:
    """A vote for every prompt and model pair, appending new ones to votes_path (JSONL)."""
    votes = read_votes(votes_path)
    seen = {(v["prompt_id"], v["model_a"], v["model_b"], v.get("judge")) for v in votes}
    with votes_path.open("a", encoding="utf-8") as f:
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                for item in prompts:
                    if (item.id, a, b, judge.name) in seen:
                        continue
                    verdict = judge.compare(item.messages, answers[a][item.id]["prediction"],
                                            answers[b][item.id]["prediction"])
                    vote = {"prompt_id": item.id, "model_a": a, "model_b": b, "judge": judge.name, **verdict}
                    f.write(json.dumps(vote, ensure_ascii=False) + "\n")
                    votes.append(vote)
                f.flush()
                log.info("judged %s vs %s", a, b)
    return [v for v in votes if v["model_a"] in names and v["model_b"] in names]


def ratings_from_votes(votes: list[dict], rounds: int = 200, seed: int = 0) -> dict:
    """Ratings from the votes that have a winner; votes whose judge gave no verdict are counted apart."""
    from posttrain.eval.ratings import WINNERS, bootstrap, win_rates

    decided = [v for v in votes if v["winner"] in WINNERS]
    no_verdict = len(votes) - len(decided)
    if not decided:
        return {"votes": 0, "no_verdict": no_verdict, "win_rates": [], "bradley_terry": [], "elo": []}
    return {"votes": len(decided), "no_verdict": no_verdict, "win_rates": win_rates(decided),
            "bradley_terry": bootstrap(decided, "bt", rounds, seed), "elo": bootstrap(decided, "elo", rounds, seed)}


def run(refs: list[str], prompts_path: str, out_dir: str, judge, *, batch_size: int = 8, max_new_tokens: int = 256,
        rounds: int = 200, device: str | None = None) -> dict:
    """Answers, votes, ratings.json and report.md for `refs` on the prompt file."""
    from posttrain.eval.generation import read_prompts
    from posttrain.eval.report import write_compare_report

    if len(refs) < 2:
        raise ConfigError("compare needs at least two models (--models a,b)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = model_names(refs)
    prompts = read_prompts(prompts_path)
    answers = generate_answers(refs, names, prompts, out, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               device=device)
    votes = judge_pairs(judge, names, prompts, answers, out / "votes.jsonl")
    result = {"models": dict(zip(names, refs)), "prompts": prompts_path, "judge": judge.name,
              **ratings_from_votes(votes, rounds)}
    (out / "ratings.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    write_compare_report(out, result)
    return result
