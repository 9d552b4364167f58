"""`posttrain data arith`: seeded, disjoint splits, answers that check out, clear errors."""

import json

import pytest

from posttrain.curate.arith import arith
from posttrain.errors import DataError


def test_arith_is_seeded_disjoint_and_answers_check_out(tmp_path):
    counts = arith(tmp_path / "a", train=60, test=20, seed=3, langs=["en", "zh"], ops=["add", "sub", "mul"])
    arith(tmp_path / "b", train=60, test=20, seed=3, langs=["en", "zh"], ops=["add", "sub", "mul"])
    arith(tmp_path / "c", train=60, test=20, seed=4, langs=["en", "zh"], ops=["add", "sub", "mul"])
    read = {d: {s: (tmp_path / d / f"{s}.jsonl").read_text() for s in ("train", "test")} for d in "abc"}
    assert read["a"] == read["b"] and read["a"] != read["c"]
    rows = {s: [json.loads(x) for x in read["a"][s].splitlines()] for s in ("train", "test")}
    assert len(rows["train"]) == 60 and len(rows["test"]) == 20 and counts["train"] == 60
    questions = {s: {r["messages"][0]["content"] for r in rows[s]} for s in rows}
    assert not questions["train"] & questions["test"] and len(questions["train"]) == 60
    for row in rows["train"] + rows["test"]:
        work, answer = row["messages"][1]["content"].split("\n")
        a, sign, b, _, result = work.split()
        apply = {"+": int.__add__, "-": int.__sub__, "x": int.__mul__}[sign]
        assert apply(int(a), int(b)) == int(result) == int(answer.removeprefix("#### "))
        assert int(result) >= 0
    assert {k.split("/")[0] for k in counts["by_language_and_operation"]} == {"en", "zh"}
    with pytest.raises(DataError, match="operations from"):
        arith(tmp_path / "d", ops=["div"])
    with pytest.raises(DataError, match="distinct problems"):
        arith(tmp_path / "e", train=5000, test=0, langs=["zh"], ops=["mul"])


def test_arith_difficulty_and_the_format_request_are_options(tmp_path):
    arith(tmp_path / "easy", train=30, test=10, seed=1, max_operand=9, ask=False)
    text = (tmp_path / "easy" / "train.jsonl").read_text() + (tmp_path / "easy" / "test.jsonl").read_text()
    rows = [json.loads(x) for x in text.splitlines()]
    for row in rows:
        a, sign, b, _, result = row["messages"][1]["content"].split("\n")[0].split()
        assert (int(a) <= 9 and int(b) <= 9) if sign == "+" else int(a) <= 13
        assert "####" not in row["messages"][0]["content"] and row["messages"][1]["content"].endswith(f"#### {result}")
    arith(tmp_path / "default", train=30, test=10, seed=1)
    assert "'#### <number>'" in (tmp_path / "default" / "test.jsonl").read_text()
    with pytest.raises(DataError, match="max operand >= 2"):
        arith(tmp_path / "bad", max_operand=1)
