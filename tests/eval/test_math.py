"""Pure-math eval pieces: BLEU/ROUGE on hand-computed strings, win rates, Elo/Bradley-Terry, MC data files."""

import math

import numpy as np
import pytest

from posttrain.errors import DataError
from posttrain.eval import ratings
from posttrain.eval.mc_data import load_split, read_csv_items
from posttrain.eval.metrics import corpus_bleu, reference_scores, rouge_l, rouge_n, tokenize
from posttrain.eval.judges import ReferenceJudge
from posttrain.eval.multiple_choice import build_prompt, summarize
from posttrain.eval.mc_categories import CEVAL_CATEGORIES

from conftest import SHARED_ASSETS


def test_tokenize_words_and_chinese_characters():
    assert tokenize("The cat, sat!") == ["the", "cat", ",", "sat", "!"]
    assert tokenize("我爱北京 ok", segment="char") == ["我", "爱", "北", "京", "ok"]


def test_bleu_hand_computed():
    hyp = "the cat sat on the mat".split()
    ref = "the cat is on the mat".split()
    # clipped matches 1..4-gram: 5/6, 3/5, 1/4, 0/3 -> BLEU 0 (no smoothing)
    assert corpus_bleu([hyp], [ref]) == 0.0
    hyp2 = "a b c d e f".split()
    ref2 = "a b c d e f g h".split()
    # all precisions 1, brevity penalty exp(1 - 8/6)
    assert corpus_bleu([hyp2], [ref2]) == pytest.approx(100 * math.exp(1 - 8 / 6), abs=1e-9)
    assert corpus_bleu([ref2], [ref2]) == pytest.approx(100.0)


def test_rouge_hand_computed():
    hyp = "the cat sat on the mat".split()
    ref = "the cat is on the mat".split()
    assert rouge_n(hyp, ref, 1) == pytest.approx(5 / 6)  # p = r = 5/6
    assert rouge_n(hyp, ref, 2) == pytest.approx(3 / 5)  # the cat, on the, the mat
    assert rouge_l(hyp, ref) == pytest.approx(5 / 6)  # LCS the cat on the mat
    scores = reference_scores(["我爱北京"], ["我爱上海"], segment="char")
    assert scores["rouge1"] == pytest.approx(50.0)
    assert scores["rouge2"] == pytest.approx(100 / 3)


def _votes(strengths: dict, n: int, rng) -> list[dict]:
    names = list(strengths)
    out = []
    for _ in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        pa = strengths[names[a]] / (strengths[names[a]] + strengths[names[b]])
        out.append({"model_a": names[a], "model_b": names[b],
                    "winner": "model_a" if rng.random() < pa else "model_b"})
    return out


def test_win_rates_and_wilson():
    votes = [{"model_a": "x", "model_b": "y", "winner": w} for w in ("model_a", "model_a", "tie", "model_b")]
    votes.append({"model_a": "y", "model_b": "x", "winner": "model_b"})  # x wins from the other side
    row = ratings.win_rates(votes)[0]
    assert (row["model"], row["wins"], row["ties"], row["losses"], row["n"]) == ("x", 3, 1, 1, 5)
    lo, hi = row["win_ci"]
    assert lo < 0.6 < hi


def test_bradley_terry_recovers_two_player_odds():
    # x beats y 3 of 4 times: MLE odds 3, rating gap 400*log10(3) (tiny prior aside)
    votes = [{"model_a": "x", "model_b": "y", "winner": "model_a"}] * 300 + \
            [{"model_a": "x", "model_b": "y", "winner": "model_b"}] * 100
    r = ratings.bradley_terry(votes, prior=0.0)
    assert r[0] - r[1] == pytest.approx(400 * math.log10(3), abs=1e-3)
    assert r.mean() == pytest.approx(1000.0)


def test_ratings_recover_ranking_and_intervals_cover_truth():
    strengths = {"a": 1.0, "b": 2.0, "c": 4.0}
    truth = 400 * np.log10(list(strengths.values()))
    truth = truth - truth.mean() + 1000
    rng = np.random.default_rng(0)
    covered = 0
    trials = 20
    for t in range(trials):
        votes = _votes(strengths, 300, rng)
        rows = {r["model"]: r for r in ratings.bootstrap(votes, "bt", rounds=100, seed=t)}
        assert [r for r in sorted(rows, key=lambda m: -rows[m]["rating"])] == ["c", "b", "a"]
        covered += sum(rows[m]["lower"] <= tr <= rows[m]["upper"] for m, tr in zip(strengths, truth))
    assert covered / (3 * trials) >= 0.8  # nominal 0.95; loose bound for 60 intervals
    elo_rows = ratings.bootstrap(_votes(strengths, 600, rng), "elo", rounds=20)
    assert elo_rows[0]["model"] == "c" and elo_rows[-1]["model"] == "a"


CEVAL = "id,question,A,B,C,D,answer\n0,1+1=?,1,2,3,4,B\n1,2+2=?,4,5,6,7,A\n"
MMLU = "What is 1+1?,1,2,3,4,B\n\"Pick, carefully\",x,y,z,w,D\n"
CMMLU = ",Question,A,B,C,D,Answer\n0,问题,甲,乙,丙,丁,C\n"


def test_csv_layouts(tmp_path):
    for name, text, answers in (("c.csv", CEVAL, ["B", "A"]), ("m.csv", MMLU, ["B", "D"]), ("z.csv", CMMLU, ["C"])):
        (tmp_path / name).write_text(text, encoding="utf-8")
        items = read_csv_items(tmp_path / name, "s")
        assert [it.answer for it in items] == answers
    assert read_csv_items(tmp_path / "m.csv", "s")[1].question == "Pick, carefully"
    assert read_csv_items(tmp_path / "c.csv", "s")[0].options == ["1", "2", "3", "4"]
    (tmp_path / "bad.csv").write_text("q,1,2,3,4,E\n", encoding="utf-8")
    with pytest.raises(DataError, match="bad.csv row 1"):
        read_csv_items(tmp_path / "bad.csv", "s")


def test_split_folders_and_jsonl(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "math_val.csv").write_text(CEVAL, encoding="utf-8")
    assert list(load_split(tmp_path, "val")) == ["math"]
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"question": "q", "choices": ["a", "b"], "answer": 1, "subject": "s"}\n', encoding="utf-8")
    assert load_split(jsonl, "val")["s"][0].answer == "B"


def test_prompt_golden_zero_and_k_shot(tmp_path):
    (tmp_path / "c.csv").write_text(CEVAL, encoding="utf-8")
    q, shot = read_csv_items(tmp_path / "c.csv", "high_school_math")
    header = "About {subject}."
    assert build_prompt(q, [], header, "Answer:") == "About high school math.\n\n1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    assert build_prompt(q, [shot], header, "答案：") == (
        "About high school math.\n\n2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\n答案：A\n\n1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")


def test_summarize_subjects_categories_overall():
    results = [{"subject": "law", "correct": True, "pred": "A", "answer": "A"},
               {"subject": "law", "correct": False, "pred": "A", "answer": "B"},
               {"subject": "logic", "correct": True, "pred": "C", "answer": "C"},
               {"subject": "x", "correct": False, "pred": "A", "answer": "D"}]
    s = summarize(results, {"Humanities": ["law", "logic"]})
    assert s["subjects"]["law"]["accuracy"] == 0.5
    assert s["categories"]["Humanities"] == {"n": 3, "accuracy": 2 / 3}
    assert s["categories"]["uncategorized"]["n"] == 1 and "Other" not in s["categories"]
    assert s["overall"]["accuracy"] == 0.5 and s["overall"]["macro_accuracy"] == pytest.approx(0.5)


def test_ceval_categories_match_the_official_mapping():
    """hkust-nlp/ceval subject_mapping.json: 52 subjects, STEM 20, Social Science 10, Humanities 11,
    Other 11 (a few assignments that are easy to misremember are checked by name)."""
    counts = {c: len(s) for c, s in CEVAL_CATEGORIES.items()}
    assert counts == {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}
    category = {s: c for c, subjects in CEVAL_CATEGORIES.items() for s in subjects}
    assert len(category) == 52  # no subject in two categories
    assert category["veterinary_medicine"] == "STEM" and category["clinical_medicine"] == "Other"
    assert category["logic"] == "Humanities" and category["teacher_qualification"] == "Social Science"
    assert category["civil_servant"] == "Other" and category["modern_chinese_history"] == "Humanities"
    val = SHARED_ASSETS / "data" / "ceval" / "val"
    if not val.is_dir():
        pytest.skip("C-Eval data not present")
    assert set(load_split(val.parent, "val")) == set(category)


def test_win_matrix_from_win_rates():
    votes = [{"model_a": "x", "model_b": "y", "winner": w} for w in ("model_a", "model_a", "tie", "model_b")]
    votes += [{"model_a": "y", "model_b": "z", "winner": "model_a"}]
    m = ratings.win_matrix(ratings.win_rates(votes))
    assert m == {"x": {"y": 0.5}, "y": {"x": 0.25, "z": 1.0}, "z": {"y": 0.0}}


def test_reference_judge_hand_computed():
    judge = ReferenceJudge(epsilon=0.15, segment="char")
    # ref 4 words; a: LCS 3 of 3 words -> F1 2*1*0.75/1.75; b: LCS 1 of 2 -> F1 2*0.5*0.25/0.75
    ref = "I am Aria today"
    assert judge.score("I am Aria", ref) == pytest.approx(6 / 7)
    assert judge.score("I SmolLM", ref) == pytest.approx(1 / 3)
    vote = judge.compare([], "I SmolLM", "I am Aria", reference=ref)
    assert vote["winner"] == "model_b" and vote["score_b"] == pytest.approx(6 / 7)
    assert judge.compare([], "I am Aria", "I am Aria!", reference=ref)["winner"] == "tie"  # 6/7 vs 3/4: within 0.15
    with pytest.raises(DataError, match="reference answer"):
        judge.compare([], "a", "b", reference=None)
