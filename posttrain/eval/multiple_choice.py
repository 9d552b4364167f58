"""Multiple-choice accuracy by option-letter log-probabilities (C-Eval, CMMLU, MMLU, JSONL).

Each question becomes a k-shot prompt ending in an answer cue ("答案：" / "Answer:"); one forward
pass gives the next-token log-probabilities and the option letter with the highest one is the
prediction (the MMLU / C-Eval standard). Per-item results are cached in the output folder, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import torch

from posttrain.errors import TemplateError
from posttrain.eval.mc_data import LETTERS, MCItem, load_split
from posttrain.eval.progress import Progress
from posttrain.models.anatomy import lm_head_and_backbone

log = logging.getLogger(__name__)

HEADERS = {
    "zh": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。",
    "en": "The following are multiple choice questions (with answers) about {subject}.",
}
CUES = {"zh": "答案：", "en": "Answer:"}
# C-Eval's subject -> category map, checked against hkust-nlp/ceval subject_mapping.json (52 subjects).
CEVAL_CATEGORIES = {
    "STEM": "computer_network operating_system computer_architecture college_programming college_physics "
            "college_chemistry advanced_mathematics probability_and_statistics discrete_mathematics "
            "electrical_engineer metrology_engineer high_school_mathematics high_school_physics "
            "high_school_chemistry high_school_biology middle_school_mathematics middle_school_biology "
            "middle_school_physics middle_school_chemistry veterinary_medicine".split(),
    "Social Science": "college_economics business_administration marxism mao_zedong_thought education_science "
                      "teacher_qualification high_school_politics high_school_geography middle_school_politics "
                      "middle_school_geography".split(),
    "Humanities": "modern_chinese_history ideological_and_moral_cultivation logic law "
                  "chinese_language_and_literature art_studies professional_tour_guide legal_professional "
                  "high_school_chinese high_school_history middle_school_history".split(),
    "Other": "civil_servant sports_science plant_protection basic_medicine clinical_medicine "
             "urban_and_rural_planner accountant fire_engineer environmental_impact_assessment_engineer "
             "tax_accountant physician".split(),
}
_CJK = re.compile(r"[\u4e00-\u9fff]")


def pick_language(items: list[MCItem], setting: str) -> str:
    if setting != "auto":
        return setting
    return "zh" if any(_CJK.search(it.question) for it in items[:20]) else "en"


def letter_text(cue: str, letter: str) -> str:
    """The letter as it follows the cue: ' A' after an ASCII cue ('Answer:'), 'A' after '答案：'."""
    return (" " if cue and cue[-1].isascii() and not cue[-1].isspace() else "") + letter


def question_block(item: MCItem, cue: str) -> str:
    options = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(item.options))
    return f"{item.question}\n{options}\n{cue}"


def build_prompt(item: MCItem, shots: list[MCItem], header: str, cue: str) -> str:
    """Header line, k solved examples, then the question ending at the answer cue."""
    parts = [header.format(subject=item.subject.replace("_", " ")) + "\n\n"] if header else []
    parts += [question_block(s, cue) + letter_text(cue, s.answer) + "\n\n" for s in shots]
    parts.append(question_block(item, cue))
    return "".join(parts)


def letter_token_ids(tokenizer, context: str, letters: str) -> tuple[list[int], list[int]]:
    """(shared ids, letter ids): the tokens every letter adds after `context` in common (a lone space
    in some tokenizers, usually none), which go into the prompt, then each letter's first own token."""
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    fulls = []
    for letter in letters:
        full = tokenizer(context + letter_text(context, letter), add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) == len(base):
            raise TemplateError(f"the tokenizer merges option letter {letter!r} into the answer cue {context!r}; "
                                "set eval.mc.answer_cue to one ending in a separator")
        fulls.append(full[len(base):])
    shared = 0
    while all(len(f) > shared + 1 and f[shared] == fulls[0][shared] for f in fulls):
        shared += 1
    ids = [f[shared] for f in fulls]
    if len(set(ids)) != len(ids):
        raise TemplateError(f"option letters {letters} share a first token after {context!r}")
    return fulls[0][:shared], ids


def encode_item(item: MCItem, shots: list[MCItem], tokenizer, mc_cfg, header: str, cue: str,
                shared: list[int] = ()) -> list[int]:
    """Prompt ids (+ the letters' shared tokens), dropping shots from the end until it fits mc_cfg.max_length."""
    from posttrain.records import Message
    from posttrain.templates.render import encode_prompt

    shots = list(shots)
    while True:
        if mc_cfg.prompt == "chat":  # the question is the user turn; the reply starts with the cue
            text = build_prompt(item, shots, header, cue)[: -len(cue)].rstrip()
            ids = encode_prompt([Message("user", text)], tokenizer)
            ids += tokenizer(cue, add_special_tokens=False)["input_ids"]
        else:  # special tokens on: a base model gets its BOS
            ids = tokenizer(build_prompt(item, shots, header, cue), add_special_tokens=True)["input_ids"]
        ids = list(ids) + list(shared)
        if len(ids) <= mc_cfg.max_length or not shots:
            return list(ids[-mc_cfg.max_length:])
        shots.pop()


@torch.no_grad()
def letter_logps(model, prompts: list[list[int]], letter_ids: list[int], pad_id: int) -> torch.Tensor:
    """(B, L) log-probabilities of each letter token as the next token after each prompt."""
    backbone, head = lm_head_and_backbone(model)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T) right-padded
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    for b, ids in enumerate(prompts):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
    hidden = backbone(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))  # (B, T, H)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)  # (B,)
    logits = head(hidden[torch.arange(len(prompts), device=device), last]).float()  # (B, V)
    return logits.log_softmax(-1)[:, letter_ids].cpu()  # (B, L)


def _item_key(prompt_ids: list[int], letter_ids: list[int]) -> str:
    """Cache key: the exact tokens scored, so any change of data, shots, wording or tokenizer misses."""
    return hashlib.sha256(json.dumps([prompt_ids, letter_ids]).encode()).hexdigest()[:20]


def _load_cache(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["key"]] = row
    return out


def score_items(model, tokenizer, todo: list[tuple[str, list[int], MCItem]], letter_ids: dict[int, list[int]],
                batch_size: int, cache_file: Path, progress: Progress) -> list[dict]:
    """Score (key, prompt ids, item) triples in length-sorted batches, appending each result to the cache."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    todo = sorted(todo, key=lambda t: (len(t[2].options), len(t[1])))  # similar lengths pad less
    results = []
    with cache_file.open("a", encoding="utf-8") as cache:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i: i + batch_size]
            groups: dict[int, list] = {}
            for entry in chunk:  # one letter set per option count
                groups.setdefault(len(entry[2].options), []).append(entry)
            for n_opt, entries in groups.items():
                logps = letter_logps(model, [e[1] for e in entries], letter_ids[n_opt], pad_id)
                for (key, _, item), row in zip(entries, logps.tolist()):
                    pred = LETTERS[max(range(n_opt), key=lambda j: row[j])]
                    result = {"key": key, "subject": item.subject, "answer": item.answer, "pred": pred,
                              "correct": pred == item.answer, "logps": row}
                    cache.write(json.dumps(result, ensure_ascii=False) + "\n")
                    results.append(result)
            cache.flush()
            progress.update(len(chunk))
    return results


def summarize(results: list[dict], categories: dict[str, list[str]]) -> dict:
    """Accuracy per subject, per category (subjects in no category go to 'uncategorized') and overall."""
    by_subject: dict[str, list[bool]] = {}
    for r in results:
        by_subject.setdefault(r["subject"], []).append(bool(r["correct"]))
    subjects = {s: {"n": len(v), "accuracy": sum(v) / len(v)} for s, v in sorted(by_subject.items())}
    cat_of = {s: c for c, subs in categories.items() for s in subs}
    cats: dict[str, list[bool]] = {}
    for s, v in by_subject.items():
        cats.setdefault(cat_of.get(s, "uncategorized"), []).extend(v)
    total = [c for v in by_subject.values() for c in v]
    return {
        "subjects": subjects,
        "categories": {c: {"n": len(v), "accuracy": sum(v) / len(v)} for c, v in sorted(cats.items())},
        "overall": {"n": len(total), "accuracy": sum(total) / max(len(total), 1),
                    "macro_accuracy": sum(s["accuracy"] for s in subjects.values()) / max(len(subjects), 1)},
    }


def run(cfg) -> dict:
    """Score cfg.eval.mc with cfg.eval.model; write results.json; return the summary.

    Results already in the output folder's cache (same model weights, same prompt tokens) are
    reused, so an interrupted run, or a larger one after a smaller one, only scores what is new.
    """
    from posttrain.models.load import pick_device
    from posttrain.models.run import load_model_for_inference, model_stamp

    ev, mc = cfg.eval, cfg.eval.mc
    out_dir = Path(ev.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = load_split(mc.data, mc.split, mc.subjects or None)
    # A JSONL benchmark has no dev split to draw shots from: it is scored zero-shot.
    with_shots = mc.shots and Path(mc.data).is_dir()
    shots_by_subject = load_split(mc.data, mc.shots_split, mc.subjects or None) if with_shots else {}
    model, tokenizer, _ = load_model_for_inference(ev.model, device=str(pick_device(ev.device)))
    language = pick_language([it for items in split.values() for it in items], mc.language)
    header = HEADERS[language] if mc.header is None else mc.header
    cue = CUES[language] if mc.answer_cue is None else mc.answer_cue
    stamp = hashlib.sha256(model_stamp(ev.model).encode()).hexdigest()[:12]
    cache_file = out_dir / f"items-{stamp}.jsonl"
    cached = _load_cache(cache_file)
    letters = {n: letter_token_ids(tokenizer, cue, LETTERS[:n])
               for n in {len(it.options) for items in split.values() for it in items}}
    todo, results = [], []
    for subject, items in split.items():
        shots = shots_by_subject.get(subject, [])[: mc.shots]
        for item in items[: mc.max_per_subject]:
            shared, ids = letters[len(item.options)]
            prompt = encode_item(item, shots, tokenizer, mc, header, cue, shared)
            key = _item_key(prompt, ids)
            if key in cached:  # the pick depends on the tokens only; subject and answer key come from the data
                pred = cached[key]["pred"]
                results.append({**cached[key], "subject": item.subject, "answer": item.answer,
                                "correct": pred == item.answer})
            else:
                todo.append((key, prompt, item))
    letter_ids = {n: ids for n, (_, ids) in letters.items()}
    log.info("%d questions in %d subjects (%d cached), %d-shot, %s prompt, language %s",
             len(todo) + len(results), len(split), len(results), mc.shots, mc.prompt, language)
    start = time.time()
    with Progress(len(todo) + len(results), "multiple choice", "question", done=len(results)) as progress:
        results += score_items(model, tokenizer, todo, letter_ids, ev.batch_size, cache_file, progress)
    summary = summarize(results, mc.categories or CEVAL_CATEGORIES)
    summary["settings"] = {"model": ev.model, "shots": mc.shots, "prompt": mc.prompt, "language": language,
                           "split": mc.split, "data": mc.data, "scored": len(todo), "cached": len(results) - len(todo),
                           "seconds": round(time.time() - start, 1)}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return summary


def format_table(summary: dict) -> str:
    """Per-subject, per-category and overall accuracy as an aligned text table."""
    lines = [f"{'subject':44} {'n':>5} {'acc':>7}"]
    lines += [f"{s:44} {v['n']:5d} {100 * v['accuracy']:6.1f}%" for s, v in summary["subjects"].items()]
    lines.append("-" * 58)
    lines += [f"[{c}]".ljust(44) + f" {v['n']:5d} {100 * v['accuracy']:6.1f}%"
              for c, v in summary["categories"].items()]
    o = summary["overall"]
    lines.append(f"{'overall (micro)':44} {o['n']:5d} {100 * o['accuracy']:6.1f}%")
    lines.append(f"{'overall (mean of subjects)':44} {'':5} {100 * o['macro_accuracy']:6.1f}%")
    return "\n".join(lines)
