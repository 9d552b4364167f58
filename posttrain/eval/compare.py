"""Pairwise comparison: answers from 2+ models on one prompt set, judged pair by pair, then ratings.

Outputs in one folder: answers/<model>.jsonl (cached per prompt), votes.jsonl (one vote per
prompt, pair and judge, cached too, in the format human votes can use), ratings.json and a
Markdown report with plots. Votes whose LLM judge gave no verdict are kept, cached and counted
as no_verdict, but not rated. A rerun only generates and judges what is missing, and its results
equal those of an uninterrupted run: votes are rated in a fixed (pair, prompt) order.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from pathlib import Path

from posttrain.errors import DataError
from posttrain.eval.config import CompareConfig, EvalConfig
from posttrain.eval.progress import Progress
from posttrain.models.sources import model_names
from posttrain.eval.judges import DEFAULT_JUDGE_PROMPT, OpenAIJudge, ReferenceJudge, RewardModelJudge
from posttrain.eval.generation import generate_file
from posttrain.models.run import load_model_for_inference, run_config_of
from posttrain.eval.ratings import ratings_from_votes
from posttrain.data.prompts import read_prompts
from posttrain.eval.report import write_compare_report
from posttrain.models.load import pick_device

log = logging.getLogger(__name__)


def make_judge(cmp_cfg: CompareConfig, device: str | None = None):
    """The judge named by eval.compare.judge: 'reference', an http(s) URL, or a reward-model folder."""
    if cmp_cfg.judge == "reference":
        return ReferenceJudge(epsilon=cmp_cfg.epsilon)
    if cmp_cfg.judge.startswith(("http://", "https://")):
        return OpenAIJudge(cmp_cfg.judge, cmp_cfg.judge_model, prompt=cmp_cfg.judge_prompt or DEFAULT_JUDGE_PROMPT,
                           max_tokens=cmp_cfg.judge_max_tokens)
    return RewardModelJudge(cmp_cfg.judge, epsilon=cmp_cfg.epsilon, device=device)


def generate_answers(refs: list[str], names: list[str], prompts, out_dir: Path, *, device: str | None = None,
                     **gen_kwargs) -> dict[str, dict]:
    """name -> {prompt id -> answer row}; one model in memory at a time, loaded only if answers are missing."""
    answers = {}
    for ref, name in zip(refs, names):
        cfg, loaded = run_config_of(ref), []

        def load(ref=ref, loaded=loaded):
            loaded.append(ref)
            return load_model_for_inference(ref, device=device)[:2]

        rows = generate_file(load, prompts, out_dir / "answers" / f"{name}.jsonl", model_ref=ref,
                             system=cfg.template.system if cfg is not None else None, **gen_kwargs)
        answers[name] = {r["id"]: r for r in rows}
        if loaded:  # that model is garbage now: free it (cycles included) before the next one loads
            gc.collect()
    return answers


def read_votes(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _vote_key(prompt_id: str, a: str, b: str, judge_id: str, hash_a: str, hash_b: str) -> tuple:
    """The same key for (a, b) and (b, a): a vote is reused in either orientation."""
    return (prompt_id, judge_id, *sorted([(a, hash_a), (b, hash_b)]))


def judge_pairs(judge, names: list[str], prompts, answers: dict[str, dict], votes_path: Path) -> list[dict]:
    """This judge's vote on every (pair, prompt), in that fixed order; only missing votes are asked for
    and appended to votes_path. A cached vote counts only if both answers are still the ones judged.
    A vote without a verdict (winner None) is cached too: the same judge at temperature 0 would most
    likely reply the same. To ask again, change the judge (judge_max_tokens is part of its id) or
    delete those lines from votes.jsonl."""
    cached = {}
    for v in read_votes(votes_path):
        if "answer_hashes" in v:  # human or foreign votes without them are never reused here
            cached[_vote_key(v["prompt_id"], v["model_a"], v["model_b"], v.get("judge"), *v["answer_hashes"])] = v
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    out, todo = [], []
    for a, b in pairs:
        for item in prompts:
            hashes = (_text_hash(answers[a][item.id]["prediction"]), _text_hash(answers[b][item.id]["prediction"]))
            vote = cached.get(_vote_key(item.id, a, b, judge.id, *hashes))
            out.append(vote)
            if vote is None:
                todo.append((len(out) - 1, a, b, item, hashes))
    with votes_path.open("a", encoding="utf-8") as f, \
            Progress(len(out), f"judge ({judge.name})", "vote", done=len(out) - len(todo)) as progress:
        for slot, a, b, item, hashes in todo:
            verdict = judge.compare(item.messages, answers[a][item.id]["prediction"],
                                    answers[b][item.id]["prediction"], reference=item.reference)
            vote = {"prompt_id": item.id, "model_a": a, "model_b": b, "judge": judge.id, **verdict,
                    "answer_hashes": list(hashes)}
            f.write(json.dumps(vote, ensure_ascii=False) + "\n")
            f.flush()
            out[slot] = vote
            progress.update()
    return out


def run(ev: EvalConfig) -> dict:
    """Answers, votes, ratings.json and report.md for ev.compare, in ev.output_dir."""
    cmp = ev.compare
    out = Path(ev.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = model_names(cmp.models)
    prompts = read_prompts(cmp.prompts, strict=cmp.strict)
    if not prompts:
        raise DataError(f"{cmp.prompts}: no prompts")
    device = str(pick_device(ev.device))
    judge = make_judge(cmp, device)  # before generating: a judge that cannot load fails fast
    answers = generate_answers(cmp.models, names, prompts, out, device=device, batch_size=ev.batch_size,
                               max_new_tokens=cmp.max_new_tokens)
    votes = judge_pairs(judge, names, prompts, answers, out / "votes.jsonl")
    result = {"models": dict(zip(names, cmp.models)), "prompts": cmp.prompts, "judge": judge.id,
              **ratings_from_votes(votes, cmp.rounds, cmp.seed, {it.id: it.category for it in prompts})}
    (out / "ratings.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    result["report"] = str(write_compare_report(out, result))
    return result
