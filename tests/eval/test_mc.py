"""Multiple-choice eval: category maps per layout (C-Eval, MMLU, CMMLU), the three scorings against naive
per-option computations on the tiny model, the packed shared-prefix path against one row per prompt or
option, and the per-item cache keyed by scoring. Tiny CSV fixtures only (no /work/shared)."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from posttrain.eval.config import load_eval_config
from posttrain.errors import ConfigError, DataError
from posttrain.eval import multiple_choice
from posttrain.eval.mc_categories import CMMLU_CATEGORIES, MMLU_CATEGORIES, choose_categories
from posttrain.eval.mc_data import MCItem, detect_layout
from posttrain.eval.mc_prompts import option_token_ids
from posttrain.eval.mc_scoring import continuation_logps, next_token_logps, split_common_prefix
from posttrain.eval.report import write_mc_report

QUESTIONS = [("What is two plus two?", ["three", "four", "five apples", "a tree"], "B"),
             ("Which animal barks?", ["cat", "the dog", "fish", "a small bird"], "B"),
             ("What colour is the sky?", ["green", "red", "blue", ""], "C"),
             ("Pick the largest number.", ["1", "10", "100", "1000"], "D")]


def _csv_rows(layout: str, rows: list[tuple[str, list[str], str]]) -> str:
    if layout == "mmlu":  # headerless
        lines = []
    elif layout == "cmmlu":
        lines = [",Question,A,B,C,D,Answer"]
    else:
        lines = ["id,question,A,B,C,D,answer"]
    for i, (q, opts, ans) in enumerate(rows):
        cells = [q, *opts, ans] if layout == "mmlu" else [str(i), q, *opts, ans]
        lines.append(",".join(f'"{c}"' for c in cells))
    return "\n".join(lines) + "\n"


def _bench(root: Path, layout: str, subjects: list[str], split: str = "test") -> Path:
    """A benchmark folder in `layout` with the 4 QUESTIONS per subject in `split` and 1 in dev."""
    for part, rows in ((split, QUESTIONS), ("dev", QUESTIONS[3:])):
        (root / part).mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            name = f"{subject}.csv" if layout == "cmmlu" else f"{subject}_{part}.csv"
            (root / part / name).write_text(_csv_rows(layout, rows), encoding="utf-8")
    return root


def _cfg(model_dir, bench, out, **extra):
    """Chinese wording by default: the tiny tokenizer splits ' A' but not ' B' after 'Answer:'."""
    keys = {"eval.model": str(model_dir), "eval.output_dir": str(out), "eval.device": "cpu", "eval.batch_size": 3,
            "eval.mc.data": str(bench), "eval.mc.split": "test", "eval.mc.shots": 1, "eval.mc.language": "zh",
            **extra}
    return load_eval_config(None, [], **keys).eval


def _rows(out: Path) -> dict:
    (path,) = out.glob("items-*.jsonl")
    return {r["key"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def _next_logps(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)


def test_mmlu_and_cmmlu_maps_as_released():
    mmlu = {c: len(s) for c, s in MMLU_CATEGORIES.items()}
    assert mmlu == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}  # 57 subjects
    cat = {s: c for c, subs in MMLU_CATEGORIES.items() for s in subs}
    assert len(cat) == 57  # no subject in two categories
    assert cat["high_school_statistics"] == "STEM" and cat["computer_security"] == "STEM"
    assert cat["world_religions"] == "humanities" and cat["formal_logic"] == "humanities"
    assert cat["human_sexuality"] == "social sciences" and cat["econometrics"] == "social sciences"
    assert cat["professional_accounting"] == "other" and cat["global_facts"] == "other"
    assert cat["anatomy"] == "other" and cat["management"] == "other"

    main = {c: s for c, s in CMMLU_CATEGORIES.items() if c != "China specific"}
    assert {c: len(s) for c, s in main.items()} == {"STEM": 17, "Humanities": 13, "Social Science": 22, "Other": 15}
    of = {}
    for c, subs in main.items():
        for s in subs:
            of.setdefault(s, []).append(c)
    assert len(of) == 67 and all(len(v) == 1 for v in of.values())  # the four main ones partition 67 subjects
    china = CMMLU_CATEGORIES["China specific"]
    assert len(china) == 15 and set(china) <= set(of)
    assert of["ancient_chinese"] == ["Social Science"] and "ancient_chinese" in china
    assert of["chinese_history"] == ["Humanities"] and of["agronomy"] == ["Other"]
    assert of["college_medical_statistics"] == ["STEM"] and of["logical"] == ["Humanities"]
    assert "world_history" not in china and of["computer_security"] == ["Other"]


def test_layout_detection_picks_the_map(tmp_path):
    for layout in ("ceval", "cmmlu", "mmlu"):
        bench = _bench(tmp_path / layout, layout, ["anatomy"])
        assert detect_layout(bench, "test") == layout
        assert choose_categories("auto", layout, ["anatomy"], {})[0] == layout
    other = tmp_path / "other" / "test"
    other.mkdir(parents=True)
    (other / "x.csv").write_text("question,A,B,answer\nq,a,b,A\n", encoding="utf-8")
    assert detect_layout(other.parent, "test") == "csv"
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("{}\n", encoding="utf-8")
    assert detect_layout(jsonl, "test") == "jsonl"
    # no file layout to go by: the map holding the most subjects; none when no subject is known
    assert choose_categories("auto", "jsonl", ["formal_logic", "virology", "zzz"], {})[0] == "mmlu"
    assert choose_categories("auto", "jsonl", ["ethnology", "agronomy"], {})[0] == "cmmlu"
    assert choose_categories("auto", "csv", ["zzz"], {}) == ("none", {})
    assert choose_categories("cmmlu", "mmlu", [], {})[0] == "cmmlu"
    assert choose_categories("auto", "mmlu", [], {"mine": ["zzz"]}) == ("custom", {"mine": ["zzz"]})


def test_mmlu_and_cmmlu_runs_report_their_categories(tiny_dir, tmp_path, capsys):
    bench = _bench(tmp_path / "mmlu", "mmlu", ["abstract_algebra", "world_religions", "made_up_subject"])
    summary = multiple_choice.run(_cfg(tiny_dir, bench, tmp_path / "out-mmlu"))
    assert summary["settings"]["layout"] == "mmlu" and summary["settings"]["category_map"] == "mmlu"
    assert {c: v["n"] for c, v in summary["categories"].items()} == {"STEM": 4, "humanities": 4, "uncategorized": 4}
    assert summary["uncategorized_subjects"] == ["made_up_subject"] and not summary["categories_overlap"]
    table = multiple_choice.format_table(summary)
    assert "uncategorized subjects (1): made_up_subject" in table and "categories: mmlu map" in table

    bench = _bench(tmp_path / "cmmlu", "cmmlu", ["ancient_chinese", "agronomy"])
    summary = multiple_choice.run(_cfg(tiny_dir, bench, tmp_path / "out-cmmlu"))
    assert summary["settings"]["category_map"] == "cmmlu" and summary["categories_overlap"]
    assert {c: v["n"] for c, v in summary["categories"].items()} == {
        "China specific": 4, "Other": 4, "Social Science": 4}  # ancient_chinese counts in two categories
    assert summary["overall"]["n"] == 8 and summary["uncategorized_subjects"] == []


def test_cloze_golden_against_naive_per_option_logprobs(tiny, tiny_dir, tmp_path):
    """Each cached cloze score equals sum log p(option tokens | hand-built prompt) / characters."""
    model, tok = tiny
    bench = _bench(tmp_path / "b", "mmlu", ["anatomy"])
    out = tmp_path / "out"
    summary = multiple_choice.run(_cfg(tiny_dir, bench, out, **{"eval.mc.scoring": "cloze", "eval.mc.language": "en"}))
    assert summary["settings"]["scoring"] == "cloze" and "characters" in summary["settings"]["normalization"]
    rows = list(_rows(out).values())
    assert len(rows) == 4
    shot = "Question: Pick the largest number.\nAnswer: 1000\n\n"
    by_chars = {tuple(r["chars"]): r for r in rows}  # the questions' option lengths all differ
    for question, options, answer in QUESTIONS:
        text = f"The following are questions about anatomy.\n{shot}Question: {question}\nAnswer:"
        prompt = tok(text)["input_ids"]
        expected = []
        for option in options:
            if not option:
                expected.append(None)
                continue
            cont = tok(" " + option, add_special_tokens=False)["input_ids"]
            logps = _next_logps(model, prompt + cont)
            total = sum(float(logps[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))
            expected.append(total / len(option))
        row = by_chars[tuple(len(o) for o in options)]
        assert [s is None for s in row["scores"]] == [e is None for e in expected]
        assert [s for s in row["scores"] if s is not None] == pytest.approx([e for e in expected if e is not None],
                                                                            abs=1e-5)
        best = max((j for j, e in enumerate(expected) if e is not None), key=lambda j: expected[j])
        assert row["pred"] == "ABCD"[best] and row["correct"] == (row["pred"] == answer)


def test_calibrated_golden_letter_minus_content_free_prior(tiny, tiny_dir, tmp_path, monkeypatch):
    model, tok = tiny
    bench = _bench(tmp_path / "b", "mmlu", ["anatomy"])
    out = tmp_path / "out"
    prompts_scored = []
    real = multiple_choice.next_token_logps
    monkeypatch.setattr(multiple_choice, "next_token_logps",
                        lambda m, groups, ids, *a: prompts_scored.append(len(ids)) or real(m, groups, ids, *a))
    multiple_choice.run(_cfg(tiny_dir, bench, out, **{"eval.mc.scoring": "calibrated"}))
    assert prompts_scored == [3 + 1, 1]  # 2 batches of one subject: its content-free prompt scored once
    rows = list(_rows(out).values())
    header = "以下是中国关于anatomy考试的单项选择题，请选出其中的正确答案。\n\n"
    shot = "Pick the largest number.\nA. 1\nB. 10\nC. 100\nD. 1000\n答案：D\n\n"

    def letter_logps(question, options):
        text = header + shot + question + "\n" + "".join(f"{L}. {o}\n" for L, o in zip("ABCD", options)) + "答案："
        prompt = tok(text)["input_ids"]
        ids = []
        for letter in "ABCD":
            full = tok(text + letter)["input_ids"]
            assert full[: len(prompt)] == prompt and len(full) == len(prompt) + 1
            ids.append(full[-1])
        return _next_logps(model, prompt)[-1, ids]

    prior = letter_logps("N/A", ["N/A"] * 4)
    expected = {tuple(letter_logps(q, o).tolist()): letter_logps(q, o) - prior for q, o, _ in QUESTIONS}
    assert len(rows) == 4
    for row in rows:
        assert row["prior"] == pytest.approx(prior.tolist(), abs=1e-5)
        (match,) = [v for k, v in expected.items() if k == pytest.approx(row["logps"], abs=1e-5)]
        assert row["scores"] == pytest.approx(match.tolist(), abs=1e-5)
        assert row["pred"] == "ABCD"[int(match.argmax())]


@pytest.mark.parametrize("scoring,prompt", [("letter", "plain"), ("cloze", "plain"), ("calibrated", "plain"),
                                            ("cloze", "chat"), ("calibrated", "chat")])
def test_packed_shared_prefix_run_equals_one_row_per_prompt(tiny_dir, tmp_path, scoring, prompt):
    bench = _bench(tmp_path / "b", "ceval", ["law", "logic"])
    keys = {"eval.mc.scoring": scoring, "eval.mc.prompt": prompt}
    packed = multiple_choice.run(_cfg(tiny_dir, bench, tmp_path / "packed", **keys))
    padded = multiple_choice.run(_cfg(tiny_dir, bench, tmp_path / "padded", **keys, **{"eval.mc.shared_prefix": False}))
    assert packed["settings"]["path"] == "packed" and padded["settings"]["path"] == "padded"
    a, b = _rows(tmp_path / "packed"), _rows(tmp_path / "padded")
    assert a.keys() == b.keys() and len(a) == 8
    for key in a:
        assert a[key]["pred"] == b[key]["pred"]
        assert [s for s in a[key]["scores"] if s is not None] == pytest.approx(
            [s for s in b[key]["scores"] if s is not None], abs=1e-5)


def test_shared_prefix_forwards_equal_naive_rows(tiny):
    """next_token_logps / continuation_logps: packed (prefix once) == padded == one forward per row."""
    model, tok = tiny
    prompts = [tok(f"Header line.\n\nQuestion {i}: {q}\nAnswer:")["input_ids"] for i, (q, _, _) in enumerate(QUESTIONS)]
    group = split_common_prefix(prompts)
    assert len(group[0]) > 0 and all(len(c) >= 1 for c in group[1])
    ids = [[5, 6, 7]] * len(prompts)
    packed = next_token_logps(model, [group], ids, packed=True)
    padded = next_token_logps(model, [group], ids, packed=False)
    for p, a, b in zip(prompts, packed, padded):
        naive = _next_logps(model, p)[-1, [5, 6, 7]].tolist()
        assert a == pytest.approx(naive, abs=1e-5) and b == pytest.approx(naive, abs=1e-5)

    item = MCItem(*QUESTIONS[0][:2], "B", "s", "src")
    groups = [(prompts[0], option_token_ids(tok, item, "Answer:")), (prompts[1], [[9], [10, 11]])]
    packed = continuation_logps(model, groups, packed=True)
    padded = continuation_logps(model, groups, packed=False)
    for (prefix, conts), start in zip(groups, (0, len(groups[0][1]))):
        for k, cont in enumerate(conts):
            logps = _next_logps(model, prefix + cont)
            naive = [float(logps[len(prefix) - 1 + j, t]) for j, t in enumerate(cont)]
            assert packed[start + k] == pytest.approx(naive, abs=1e-5)
            assert padded[start + k] == pytest.approx(naive, abs=1e-5)


def test_cache_is_keyed_by_scoring(tiny_dir, tmp_path, monkeypatch):
    scored = []
    real = multiple_choice.score_batch
    monkeypatch.setattr(multiple_choice, "score_batch", lambda m, e, *a: scored.append(len(e)) or real(m, e, *a))
    bench = _bench(tmp_path / "b", "ceval", ["law"])
    out = tmp_path / "out"
    runs = {}
    for scoring in ("letter", "cloze", "calibrated", "letter", "cloze", "calibrated"):
        scored.clear()
        runs.setdefault(scoring, []).append(multiple_choice.run(_cfg(tiny_dir, bench, out,
                                                                     **{"eval.mc.scoring": scoring})))
        first = len(runs[scoring]) == 1
        assert sum(scored) == (4 if first else 0), scoring  # another scoring never answers from the cache
        assert runs[scoring][-1]["settings"]["cached"] == (0 if first else 4)
    for first, again in runs.values():
        assert first["overall"] == again["overall"] and first["predictions"] == again["predictions"]
    assert Counter(r["scoring"] for r in _rows(out).values()) == {"calibrated": 4, "cloze": 4, "letter": 4}


def test_letter_cache_key_unchanged_from_earlier_caches():
    item = MCItem("q", ["a", "b"], "A", "s", "src")
    entry = multiple_choice.Entry("letter", item, [1, 2, 3], [7, 8])
    assert entry.key == hashlib.sha256(json.dumps([[1, 2, 3], [7, 8]]).encode()).hexdigest()[:20]
    assert multiple_choice.Entry("calibrated", item, [1, 2, 3], [7, 8], [1, 4]).key != entry.key


def test_report_says_scoring_and_letter_counts(tiny_dir, tmp_path):
    bench = _bench(tmp_path / "b", "ceval", ["law"])
    summary = multiple_choice.run(_cfg(tiny_dir, bench, tmp_path, **{"eval.mc.scoring": "calibrated"}))
    assert sum(summary["predictions"].values()) == 4 and summary["answers"] == {"B": 2, "C": 1, "D": 1}
    text = write_mc_report(tmp_path, summary).read_text(encoding="utf-8")
    assert "Scoring: **calibrated**" in text and "| letter | predicted | correct answer |" in text
    assert "| B |" in text and "the ceval map" in text


def test_scoring_key_is_checked_and_empty_cloze_options_fail(tiny_dir, tmp_path):
    with pytest.raises(ConfigError):
        _cfg(tiny_dir, tmp_path, tmp_path / "o", **{"eval.mc.scoring": "bogus"})
    bench = tmp_path / "b"
    (bench / "test").mkdir(parents=True)
    (bench / "test" / "x_test.csv").write_text('"q","","","A"\n', encoding="utf-8")
    with pytest.raises(DataError, match="x_test.csv row 1: every option is empty"):
        multiple_choice.run(_cfg(tiny_dir, bench, tmp_path / "o", **{"eval.mc.scoring": "cloze",
                                                                      "eval.mc.shots": 0}))
