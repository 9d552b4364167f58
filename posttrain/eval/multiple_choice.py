"""Multiple-choice accuracy (C-Eval, CMMLU, MMLU, JSONL) under one of three scorings (eval.mc.scoring).

  letter      the option letter with the highest next-token log-probability after the answer cue
              (the MMLU / C-Eval standard; for a small model it mostly measures a letter prior).
  cloze       the option whose text, scored as the continuation of the question (options not listed),
              has the highest log-probability per character of the option text (lighteval's
              `acc_norm_nospace`: the space after "Answer:" is not counted).
  calibrated  letter log-probability minus that letter's log-probability after a content-free prompt:
              the same template, shots and header with "N/A" as question and every option (Zhao et
              al. 2021, "Calibrate before use", with one content-free input).
Questions sharing a header and shots, and a question's options, are scored after one shared copy of
their prefix (mc_scoring.py). Per-item results are cached in the output folder under keys of the exact
tokens and the scoring, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from posttrain.errors import DataError
from posttrain.eval.config import EvalConfig
from posttrain.eval.mc_categories import choose_categories
from posttrain.eval.mc_data import LETTERS, MCItem, detect_layout, load_split
from posttrain.eval.mc_prompts import (CLOZE_HEADERS, CUES, HEADERS, QUESTION_LABELS, build_cloze_prompt,
                                       build_prompt, encode_item, letter_token_ids, option_token_ids, pick_language)
from posttrain.eval.mc_scoring import can_pack, continuation_logps, next_token_logps, split_common_prefix
from posttrain.eval.progress import Progress
from posttrain.models.load import pick_device
from posttrain.models.run import load_model_for_inference, model_stamp
from posttrain.models.onednn_linear import onednn_linears

log = logging.getLogger(__name__)

CONTENT_FREE = "N/A"
NORMALIZATION = {"letter": "none (one token per option)", "calibrated": "none (one token per option)",
                 "cloze": "summed option-token log-prob / characters of the option text (leading space not counted)"}


@dataclass
class Entry:
    """One question as scored: the prompt ids and what is scored after them."""

    scoring: str
    item: MCItem
    prompt: list[int]  # ids up to the answer (letter scorings: + the letters' shared tokens)
    targets: list  # letter ids (letter, calibrated) or each option's ids (cloze; [] for an empty option)
    prior: list[int] | None = None  # calibrated: the content-free prompt (same subject, shots, options)

    @property
    def key(self) -> str:
        """Cache key: the exact tokens scored and the scoring, so a change of data, shots, wording, tokenizer
        or scoring misses. Letter keys keep their earlier form, so caches written before stay valid."""
        if self.scoring == "letter":
            payload = [self.prompt, self.targets]
        elif self.scoring == "calibrated":
            payload = ["calibrated", self.prompt, self.targets, self.prior]
        else:  # the normaliser (characters per option) decides the pick as well as the tokens
            payload = ["cloze", self.prompt, self.targets, [len(o) for o in self.item.options]]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:20]


def prepare_entries(split: dict[str, list[MCItem]], shots_by_subject: dict[str, list[MCItem]], tokenizer, mc,
                    language: str) -> list[Entry]:
    """Prompt ids (and letter ids, option ids or content-free prompt) of every question to score."""
    cue = CUES[language] if mc.answer_cue is None else mc.answer_cue
    if mc.scoring == "cloze":
        header = CLOZE_HEADERS[language] if mc.header is None else mc.header
        build = partial(build_cloze_prompt, header=header, label=QUESTION_LABELS[language], cue=cue)
    else:
        header = HEADERS[language] if mc.header is None else mc.header
        build = partial(build_prompt, header=header, cue=cue)
    counts = {len(it.options) for items in split.values() for it in items}
    letters = {} if mc.scoring == "cloze" else {n: letter_token_ids(tokenizer, cue, LETTERS[:n]) for n in counts}
    entries = []
    for subject, items in split.items():
        shots, priors = shots_by_subject.get(subject, [])[: mc.shots], {}
        for item in items[: mc.max_per_subject]:
            if mc.scoring == "cloze":
                options = option_token_ids(tokenizer, item, cue)
                if not any(options):
                    raise DataError(f"{item.source}: every option is empty; cloze scoring needs option text")
                prompt = encode_item(item, shots, tokenizer, mc, build, cue, reserve=max(map(len, options)))
                entries.append(Entry("cloze", item, prompt, options))
                continue
            n = len(item.options)
            shared, ids = letters[n]
            if mc.scoring == "calibrated" and n not in priors:
                blank = MCItem(CONTENT_FREE, [CONTENT_FREE] * n, "A", subject, "content-free prompt")
                priors[n] = encode_item(blank, shots, tokenizer, mc, build, cue, shared)
            prompt = encode_item(item, shots, tokenizer, mc, build, cue, shared)
            entries.append(Entry(mc.scoring, item, prompt, ids, priors.get(n)))
    return entries


def _row(entry: Entry, scores: list[float | None], extra: dict) -> dict:
    best = max((j for j, s in enumerate(scores) if s is not None), key=lambda j: scores[j])
    pred = LETTERS[best]
    return {"key": entry.key, "subject": entry.item.subject, "answer": entry.item.answer, "pred": pred,
            "correct": pred == entry.item.answer, "scoring": entry.scoring, "scores": scores, **extra}


def _score_letters(model, entries: list[Entry], packed: bool, pad_id: int, priors: dict) -> list[dict]:
    """Letter and calibrated scoring: a subject's prompts (and its content-free prompts not yet in
    `priors`, the run's memo: content-free prompt -> letter log-probs) share one prefix."""
    by_subject: dict[str, list[Entry]] = {}
    for e in entries:
        by_subject.setdefault(e.item.subject, []).append(e)
    plan, groups, token_ids = [], [], []
    for group in by_subject.values():
        new = {tuple(e.prior): e.targets for e in group if e.prior is not None and tuple(e.prior) not in priors}
        plan.append((group, list(new)))
        groups.append(split_common_prefix([e.prompt for e in group] + [list(p) for p in new]))
        token_ids += [e.targets for e in group] + list(new.values())
    flat = iter(next_token_logps(model, groups, token_ids, packed, pad_id))
    rows = []
    for group, new in plan:
        logps = [next(flat) for _ in group]
        priors.update({p: next(flat) for p in new})
        for e, lp in zip(group, logps):
            if e.prior is None:
                rows.append(_row(e, lp, {"logps": lp}))
                continue
            prior = priors[tuple(e.prior)]
            rows.append(_row(e, [a - b for a, b in zip(lp, prior)], {"logps": lp, "prior": prior}))
    return rows


def _score_cloze(model, entries: list[Entry], packed: bool, pad_id: int) -> list[dict]:
    """Cloze scoring: each question's prompt once, then its options as continuations."""
    groups = [(e.prompt, [o for o in e.targets if o]) for e in entries]
    flat = iter(continuation_logps(model, groups, packed, pad_id))
    rows = []
    for e in entries:
        sums = [sum(next(flat)) if o else None for o in e.targets]
        chars = [len(text) for text in e.item.options]
        scores = [s / c if s is not None else None for s, c in zip(sums, chars)]
        rows.append(_row(e, scores, {"logps": sums, "chars": chars, "tokens": [len(o) for o in e.targets]}))
    return rows


def score_batch(model, entries: list[Entry], packed: bool, pad_id: int, priors: dict) -> list[dict]:
    """One batch of questions (one forward) -> their result rows, as the cache stores them."""
    if entries[0].scoring == "cloze":
        return _score_cloze(model, entries, packed, pad_id)
    return _score_letters(model, entries, packed, pad_id, priors)


def score_items(model, todo: list[Entry], packed: bool, pad_id: int, batch_size: int, cache_file: Path,
                progress: Progress) -> list[dict]:
    """Score entries in batches, appending each result to the cache. Packed batches follow the subjects
    (their questions share a prefix); padded ones are length-sorted (similar lengths pad less)."""
    if packed:
        todo = sorted(todo, key=lambda e: (e.item.subject, len(e.prompt)))
    else:
        todo = sorted(todo, key=lambda e: (len(e.item.options), len(e.prompt)))
    results, priors = [], {}  # calibrated: each content-free prompt is scored once per run
    with cache_file.open("a", encoding="utf-8") as cache:
        for i in range(0, len(todo), batch_size):
            rows = score_batch(model, todo[i: i + batch_size], packed, pad_id, priors)
            for row in rows:
                cache.write(json.dumps(row, ensure_ascii=False) + "\n")
            cache.flush()
            results += rows
            progress.update(len(rows))
    return results


def _load_cache(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["key"]] = row
    return out


def summarize(results: list[dict], categories: dict[str, list[str]]) -> dict:
    """Accuracy per subject, per category (a subject counts in each of its categories; subjects in none
    go to 'uncategorized', listed) and overall, with the predicted and the correct letters counted."""
    by_subject: dict[str, list[bool]] = {}
    for r in results:
        by_subject.setdefault(r["subject"], []).append(bool(r["correct"]))
    subjects = {s: {"n": len(v), "accuracy": sum(v) / len(v)} for s, v in sorted(by_subject.items())}
    cats_of: dict[str, list[str]] = {}
    for c, subs in categories.items():
        for s in subs:
            cats_of.setdefault(s, []).append(c)
    cats: dict[str, list[bool]] = {}
    for s, v in by_subject.items():
        for c in cats_of.get(s, ["uncategorized"]):
            cats.setdefault(c, []).extend(v)
    total = [c for v in by_subject.values() for c in v]
    return {
        "subjects": subjects,
        "categories": {c: {"n": len(v), "accuracy": sum(v) / len(v)} for c, v in sorted(cats.items())},
        "overall": {"n": len(total), "accuracy": sum(total) / max(len(total), 1),
                    "macro_accuracy": sum(s["accuracy"] for s in subjects.values()) / max(len(subjects), 1)},
        "uncategorized_subjects": sorted(s for s in by_subject if s not in cats_of),
        "categories_overlap": any(len(c) > 1 for s, c in cats_of.items() if s in by_subject),
        "predictions": dict(sorted(Counter(r["pred"] for r in results).items())),
        "answers": dict(sorted(Counter(r["answer"] for r in results).items())),
    }


def _cached_and_todo(entries: list[Entry], cached: dict[str, dict]) -> tuple[list[dict], list[Entry]]:
    """Rows already in the cache (subject and answer key refreshed from the data) and entries to score."""
    results, todo = [], []
    for e in entries:
        row = cached.get(e.key)
        if row is None:
            todo.append(e)
            continue
        # the pick depends on the tokens only; subject and answer key come from the data
        results.append({**row, "scoring": e.scoring, "subject": e.item.subject, "answer": e.item.answer,
                        "correct": row["pred"] == e.item.answer})
    return results, todo


def run(ev: EvalConfig) -> dict:
    """Score ev.mc with ev.model; write results.json; return the summary.

    Results already in the output folder's cache (same model weights, same prompt tokens, same scoring)
    are reused, so an interrupted run, or a larger one after a smaller one, only scores what is new.
    """
    mc = ev.mc
    out_dir = Path(ev.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = load_split(mc.data, mc.split, mc.subjects or None)
    # A JSONL benchmark has no dev split to draw shots from: it is scored zero-shot.
    with_shots = mc.shots and Path(mc.data).is_dir()
    shots_by_subject = load_split(mc.data, mc.shots_split, mc.subjects or None) if with_shots else {}
    layout = detect_layout(mc.data, mc.split)
    map_name, categories = choose_categories(mc.category_map, layout, list(split), mc.categories)
    model, tokenizer, _ = load_model_for_inference(ev.model, device=str(pick_device(ev.device)))
    language = pick_language([it for items in split.values() for it in items], mc.language)
    stamp = hashlib.sha256(model_stamp(ev.model).encode()).hexdigest()[:12]
    cache_file = out_dir / f"items-{stamp}.jsonl"
    results, todo = _cached_and_todo(prepare_entries(split, shots_by_subject, tokenizer, mc, language),
                                     _load_cache(cache_file))
    packed = mc.shared_prefix and can_pack(model)
    if mc.shared_prefix and not packed:
        log.info("this model's attention cannot run packed rows with shared prefixes: one padded row per prompt")
    log.info("%d questions in %d subjects (%d cached), %d-shot, %s prompt, language %s, %s scoring, layout %s",
             len(todo) + len(results), len(split), len(results), mc.shots, mc.prompt, language, mc.scoring, layout)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = time.time()
    with Progress(len(todo) + len(results), "multiple choice", "question", done=len(results)) as progress, \
            onednn_linears(model):  # no-grad forwards of fixed weights (models/onednn_linear.py)
        results += score_items(model, todo, packed, pad_id, ev.batch_size, cache_file, progress)
    seconds = time.time() - start
    summary = summarize(results, categories)
    if summary["uncategorized_subjects"]:
        log.warning("%d subject(s) in no category of the %s map (reported as 'uncategorized'): %s",
                    len(summary["uncategorized_subjects"]), map_name, ", ".join(summary["uncategorized_subjects"]))
    summary["settings"] = {
        "model": ev.model, "shots": mc.shots, "prompt": mc.prompt, "language": language, "split": mc.split,
        "data": mc.data, "scoring": mc.scoring, "normalization": NORMALIZATION[mc.scoring], "layout": layout,
        "category_map": map_name, "path": "packed" if packed else "padded", "batch_size": ev.batch_size,
        "scored": len(todo), "cached": len(results) - len(todo), "seconds": round(seconds, 1),
        "questions_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else None}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return summary


def letter_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def format_table(summary: dict) -> str:
    """Per-subject, per-category and overall accuracy as an aligned text table, then how it was scored."""
    lines = [f"{'subject':44} {'n':>5} {'acc':>7}"]
    lines += [f"{s:44} {v['n']:5d} {100 * v['accuracy']:6.1f}%" for s, v in summary["subjects"].items()]
    lines.append("-" * 58)
    lines += [f"[{c}]".ljust(44) + f" {v['n']:5d} {100 * v['accuracy']:6.1f}%"
              for c, v in summary["categories"].items()]
    o = summary["overall"]
    lines.append(f"{'overall (micro)':44} {o['n']:5d} {100 * o['accuracy']:6.1f}%")
    lines.append(f"{'overall (mean of subjects)':44} {'':5} {100 * o['macro_accuracy']:6.1f}%")
    s = summary.get("settings", {})
    if s:
        overlap = "; a subject may count in two categories" if summary.get("categories_overlap") else ""
        lines.append(f"scoring: {s['scoring']}; categories: {s['category_map']} map{overlap}")
    lines.append(f"predicted letters: {letter_counts(summary['predictions'])} "
                 f"(correct letters: {letter_counts(summary['answers'])})")
    if summary["uncategorized_subjects"]:
        lines.append(f"uncategorized subjects ({len(summary['uncategorized_subjects'])}): "
                     + ", ".join(summary["uncategorized_subjects"]))
    return "\n".join(lines)
