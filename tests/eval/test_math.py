"""Pure-math eval pieces: BLEU/ROUGE on hand-computed strings, win rates, Elo/Bradley-Terry, MC data files."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from rouge_score import rouge_scorer
from rouge_score.tokenizers import Tokenizer

from posttrain.errors import DataError
from posttrain.eval import ratings
from posttrain.eval.mc_data import load_split, read_csv_items
from posttrain.eval.metrics import reference_scores, tokenize
from posttrain.eval.judges import ReferenceJudge
from posttrain.eval.multiple_choice import build_prompt, summarize
from posttrain.eval.mc_categories import CEVAL_CATEGORIES

from conftest import SHARED_ASSETS


def test_tokenize_is_rouge_score_plus_cjk_characters():
    assert tokenize("The cat, sat!") == ["the", "cat", "sat"]  # rouge-score's own tokenization
    assert tokenize("我爱北京 ok", segment="char") == ["我", "爱", "北", "京", "ok"]
    assert tokenize("我爱北京天安门", segment="jieba") == ["我", "爱", "北京", "天安门"]


CORPUS = [  # (prediction, reference): Chinese, mixed and English rows
    ("我爱上海的天安门。", "我爱北京天安门。"),
    ("今天天气很好，我们去公园散步吧。", "今天天气不错，我们一起去公园散步。"),
    ("将85华氏度转换为摄氏度约为29.4度。", "85华氏度约等于29.4摄氏度。"),
    ("小问是西南财经大学开发的助手。", "我是小问，由SWUFE开发的AI助手。"),
    ("The cat is on the mat.", "The cat sat on the mat."),
    ("Paris is the capital.", "The capital of France is Paris."),
]


def _sacrebleu_cli(tmp_path, preds, refs, tok):
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    (tmp_path / "hyp.txt").write_text("\n".join(preds) + "\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"),
                          "-tok", tok, "-w", "6"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("rows,tok", [(CORPUS, "zh"), (CORPUS[4:], "13a")])
def test_bleu_equals_sacrebleu_command_line(tmp_path, rows, tok):
    preds, refs = [p for p, _ in rows], [r for _, r in rows]
    cli = _sacrebleu_cli(tmp_path, preds, refs, tok)
    scores = reference_scores(preds, refs)
    assert scores["bleu4"] == pytest.approx(cli["score"], abs=1e-6) and cli["score"] > 0
    assert scores["bleu_signature"] == cli["signature"] and f"tok:{tok}" in cli["signature"]


NO_PUNCT = str.maketrans("", "", "。，")


class _Whitespace(Tokenizer):
    def tokenize(self, text):
        return text.split()


def test_rouge_equals_rouge_score():
    english = CORPUS[4:]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])  # the library's defaults
    ours = reference_scores([p for p, _ in english], [r for _, r in english])
    for key in ("rouge1", "rouge2", "rougeL"):
        lib = 100 * sum(scorer.score(r, p)[key].fmeasure for p, r in english) / len(english)
        assert ours[key] == pytest.approx(lib, abs=1e-9)
    # all-Chinese rows: punctuation dropped (as rouge-score's tokenizer does), characters spaced out by
    # hand, then rouge-score with a whitespace tokenizer
    chinese = CORPUS[:2]
    spaced = [(" ".join(p.translate(NO_PUNCT)), " ".join(r.translate(NO_PUNCT))) for p, r in chinese]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Whitespace())
    ours = reference_scores([p for p, _ in chinese], [r for _, r in chinese])
    for key in ("rouge1", "rouge2", "rougeL"):
        lib = 100 * sum(scorer.score(r, p)[key].fmeasure for p, r in spaced) / len(spaced)
        assert ours[key] == pytest.approx(lib, abs=1e-9) and 0 < lib < 100
    hand = reference_scores(["我爱北京"], ["我爱上海"], segment="char")
    assert hand["rouge1"] == pytest.approx(50.0) and hand["rouge2"] == pytest.approx(100 / 3)


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
    assert judge.compare([], "I am Aria", "I am Aria!", reference=ref)["winner"] == "tie"  # 6/7 both ('!' is no token)
    with pytest.raises(DataError, match="reference answer"):
        judge.compare([], "a", "b", reference=None)
