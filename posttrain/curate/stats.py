"""`posttrain data stats`: counts, length/turn distributions, script and source mix, duplicate rate, images
(rows with them, per row, distinct), and a verb-noun view of instructions, as stats.json, stats.md and PNG plots.

The verb-noun view follows the Self-Instruct paper's figure (root verb + its first noun)
with heuristics instead of a parser. English: the first word of the instruction (instructions
are mostly imperatives) and the first later word that is not a function word. Chinese: jieba's
part-of-speech tagger (optional extra `zh`): the first verb among the first four words (skipping
请, 给定 and other auxiliaries) and the first noun after it. Plots render CJK labels with Noto
Sans SC (OFL-1.1) from the `zh` extra, or a CJK font the system has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

from posttrain.curate.dedup import exact_key
from posttrain.curate.lang import CJK_CHAR, is_cjk, script_of
from posttrain.curate.stream import FileParser, conversation_text, iter_rows, progress, prompt_text, response_text
from posttrain.data.images import resolve
from posttrain.data.policy import ContentProblem, count_problem
from posttrain.errors import DataError
from posttrain.models.load import load_tokenizer
from posttrain.models.sources import resolve_model

FUNCTION_WORDS = set("""a an the this that these those of to in on for with from by at as and or but if is are be
was were it its me my you your i we our us they their them some any all each every one two three following given
new short few about into out up how what which who whom whose why when where there here please than then so
very more most also just not no do does can could would should will may might""".split())


ZH_AUXILIARIES = set("请 给定 根据 是 有 能 能够 可以 要 需要 应该 会 让 使用 用".split())
NO_JIEBA = "install posttrain[zh] (jieba) for Chinese verb-noun pairs"


def _pos_tagger():
    """jieba.posseg.lcut, or None when the optional extra is not installed."""
    try:
        import jieba  # optional extra posttrain[zh]
        import jieba.posseg  # optional extra posttrain[zh]
    except ImportError:
        return None
    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict" lines in the report output
    return jieba.posseg.lcut


def verb_noun_zh(instruction: str, tag) -> tuple[str, str] | None:
    """First verb in the first four words (auxiliaries skipped) and the first noun after it."""
    words = [(p.word, p.flag) for p in tag(instruction) if p.word.strip()]
    verb = next((i for i, (w, f) in enumerate(words[:4]) if f.startswith("v") and w not in ZH_AUXILIARIES), None)
    if verb is None:
        return None
    noun = next((w for w, f in words[verb + 1:] if f.startswith("n")), None)
    return (words[verb][0], noun) if noun else None


def verb_noun(instruction: str) -> tuple[str, str] | None:
    words = re.findall(r"[a-z]+", instruction.lower())
    if len(words) < 2 or words[0] in FUNCTION_WORDS:
        return None  # questions ("what is...") have no imperative root verb
    noun = next((w for w in words[1:] if w not in FUNCTION_WORDS and len(w) > 2), None)
    return (words[0], noun) if noun else None


def collect(path: str | Path, fmt: str = "auto", tokenizer=None, group_by: str = "source",
            strict: bool = False) -> dict:
    """One streaming pass: per-row lengths go into int arrays, everything else into counters.

    Rows with content problems (data/policy.py) are left out and counted in `dropped`, or fatal when strict."""
    lengths: dict[str, list[int]] = {"prompt_chars": [], "response_chars": []}
    if tokenizer is not None:
        lengths.update(prompt_tokens=[], response_tokens=[])
    turns, scripts, groups, pairs, hashes = Counter(), Counter(), Counter(), Counter(), set()
    rows = dups = untagged = 0
    dropped: Counter = Counter()
    per_row_images: Counter = Counter()  # images in a row -> rows
    distinct_images: set[str] = set()
    parse = FileParser(fmt, images=True)
    tag = _pos_tagger()
    for source, row in progress(iter_rows(path), "stats"):
        try:
            conv = parse(row, source)
        except ContentProblem as problem:
            count_problem(dropped, problem, strict)
            continue
        rows += 1
        per_row_images[len(conv.images)] += 1
        distinct_images.update(image_key_text(resolve(ref, Path(path).parent)) for ref in conv.images)
        prompt, response = prompt_text(conv), response_text(conv)
        lengths["prompt_chars"].append(len(prompt))
        lengths["response_chars"].append(len(response))
        if tokenizer is not None:
            lengths["prompt_tokens"].append(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
            lengths["response_tokens"].append(len(tokenizer(response, add_special_tokens=False)["input_ids"]))
        turns[sum(m.role in ("user", "assistant") for m in conv.messages)] += 1
        text = conversation_text(conv)
        scripts[script_of(text)] += 1
        groups[str(row.get(group_by, "(none)"))] += 1
        if not is_cjk(prompt):
            vn = verb_noun(prompt)
        elif tag is not None:
            vn = verb_noun_zh(prompt, tag)
        else:
            vn, untagged = None, untagged + 1
        if vn is not None:
            pairs[vn] += 1
        key = exact_key(text)
        dups += key in hashes
        hashes.add(key)
    if rows == 0:
        raise DataError(f"{path}: no rows")
    return {"file": str(path), "rows": rows, "dropped": dict(dropped), "duplicate_rate": dups / rows,
            "lengths": {k: _summary(np.array(v)) for k, v in lengths.items()},
            "turns": dict(sorted(turns.items())), "scripts": dict(scripts.most_common()),
            "images": {"total": sum(k * v for k, v in per_row_images.items()),
                       "rows_with_images": rows - per_row_images[0], "distinct": len(distinct_images),
                       "per_row": dict(sorted(per_row_images.items()))},
            group_by: dict(groups.most_common(50)),
            "verb_noun": [[v, n, c] for (v, n), c in pairs.most_common(50)],
            "verb_noun_rows": sum(pairs.values()),
            **({"verb_noun_skipped": f"{untagged} Chinese instructions: {NO_JIEBA}"} if untagged else {}),
            "_arrays": {k: np.array(v) for k, v in lengths.items()}}


def image_key_text(ref: str) -> str:
    """What makes two image references the same for counting: the path, or a data URL's hash (not its bytes)."""
    return "data:" + hashlib.sha256(ref.encode()).hexdigest() if ref.startswith("data:") else ref


def _summary(a: np.ndarray) -> dict:
    if not len(a):
        return {}
    q = np.percentile(a, [50, 90, 99])
    return {"mean": round(float(a.mean()), 1), "p50": round(float(q[0]), 1), "p90": round(float(q[1]), 1),
            "p99": round(float(q[2]), 1), "max": int(a.max())}


def plot(stats: dict, out_dir: Path) -> list[Path]:
    import matplotlib  # heavy: matplotlib, ~1 s

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt  # heavy: matplotlib, ~1 s

    fonts = cjk_fonts()
    plt.rcParams["font.family"] = ["DejaVu Sans"] + fonts  # per-glyph fallback to the CJK font
    if not fonts and any(CJK_CHAR.search(v + n) for v, n, _ in stats["verb_noun"]):
        stats["plot_note"] = "no CJK font found, Chinese labels show as boxes: install posttrain[zh]"
    paths = []
    arrays = stats["_arrays"]
    unit = "tokens" if "prompt_tokens" in arrays else "chars"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, part in zip(axes, ("prompt", "response")):
        ax.hist(arrays[f"{part}_{unit}"], bins=50, color="#4477aa")
        ax.set(title=f"{part} length", xlabel=unit, ylabel="rows")
    fig.tight_layout()
    paths.append(out_dir / "lengths.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    axes[0].bar(list(stats["turns"]), list(stats["turns"].values()), color="#66aa55")
    axes[0].set(title="user+assistant turns per row", xlabel="turns", ylabel="rows", xticks=list(stats["turns"]))
    top = stats["verb_noun"][:20][::-1]
    axes[1].barh([f"{v} {n}" for v, n, _ in top], [c for _, _, c in top], color="#cc6677")
    axes[1].set(title="top verb-noun pairs in instructions", xlabel="rows")
    fig.tight_layout()
    paths.append(out_dir / "turns_verbs.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def cjk_fonts() -> list[str]:
    """Families with CJK glyphs that matplotlib can use: Noto Sans SC from the `zh` extra, else system fonts."""
    from matplotlib import font_manager, ft2font  # matplotlib loads only when plotting (start-up time)

    try:  # optional extra `zh`
        from justmytype_intl_cjk import get_font_pack  # optional extra posttrain[zh]
    except ImportError:
        get_font_pack = None
    if get_font_pack is not None:
        path = get_font_pack().get_font_directories()[0] / "ofl" / "notosanssc" / "NotoSansSC[wght].ttf"
        if path.is_file() and not any(f.fname == str(path) for f in font_manager.fontManager.ttflist):
            fonts = font_manager.fontManager.ttflist
            fonts.append(dataclasses.replace(font_manager.ttfFontProperty(ft2font.FT2Font(str(path))), weight=400))
            # ^ a variable font's default instance reads as weight 100: call it normal, or every lookup warns
    known = {f.name for f in font_manager.fontManager.ttflist}
    return [name for name in ("Noto Sans SC", "Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
                              "WenQuanYi Micro Hei") if name in known]


def markdown(stats: dict, group_by: str, plots: list[Path]) -> str:
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(stats["dropped"].items())) or "none"
    lines = [f"# Data stats: `{stats['file']}`", "", f"- rows: {stats['rows']} (left out, content problems: {dropped})",
             f"- exact duplicate rate: {stats['duplicate_rate']:.2%}",
             f"- images: {stats['images']['total']} in {stats['images']['rows_with_images']} rows "
             f"({stats['images']['distinct']} distinct; rows by image count {stats['images']['per_row']})", "",
             "| length | mean | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|"]
    for name, s in stats["lengths"].items():
        cells = " | ".join(str(s.get(k)) for k in ("mean", "p50", "p90", "p99", "max"))
        lines.append(f"| {name} | {cells} |")
    for title, table in (("turns per row", stats["turns"]), ("script", stats["scripts"]), (group_by, stats[group_by])):
        lines += ["", f"| {title} | rows |", "|---|---|"] + [f"| {k} | {v} |" for k, v in table.items()]
    lines += ["", f"Verb-noun pairs found in {stats['verb_noun_rows']} of {stats['rows']} instructions.",
              *([f"Skipped: {stats['verb_noun_skipped']}."] if "verb_noun_skipped" in stats else []),
              "", "| verb | noun | rows |", "|---|---|---|"]
    lines += [f"| {v} | {n} | {c} |" for v, n, c in stats["verb_noun"][:20]]
    lines += [""] + ([f"Note: {stats['plot_note']}.", ""] if "plot_note" in stats else [])
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def stats(path: str | Path, report_dir: str | Path, fmt: str = "auto", tokenizer: str | None = None,
          group_by: str = "source", strict: bool = False) -> dict:
    tok = None
    if tokenizer:
        tok = load_tokenizer(resolve_model(tokenizer))
    result = collect(path, fmt, tok, group_by, strict)
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(result, out)
    result.pop("_arrays")
    (out / "stats.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    (out / "stats.md").write_text(markdown(result, group_by, plots))
    return {**result, "report": str(out / "stats.md"), "plots": [str(p) for p in plots]}
