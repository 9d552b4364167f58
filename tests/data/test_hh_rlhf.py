"""Anthropic hh-rlhf's raw transcripts read directly: turns, shared prompt, drops counted, strict, auto-detected.

tests/data/fixtures/hh_rlhf_raw.jsonl is hand-written in the exact raw layout (each side a whole
"\\n\\nHuman: ... \\n\\nAssistant: ..." transcript), with the cases the real files hold: several
turns, an empty final reply, "Human:" inside a reply, prompts that differ, a reply split by a
repeated "Assistant:" marker, and chosen == rejected.
"""

import json
from pathlib import Path

import pytest

from posttrain.data.config import DataConfig, DatasetConfig
from posttrain.templates.config import TemplateConfig
from posttrain.curate.validate import validate
from posttrain.data.row_context import RowContext
from posttrain.data.policy import ContentProblem
from posttrain.data.preference import build_preference_data, read_preferences, row_to_preference
from posttrain.data.transcripts import split_transcript
from posttrain.errors import DataError

RAW = Path(__file__).parent / "fixtures" / "hh_rlhf_raw.jsonl"


def _rows():
    return [json.loads(line) for line in RAW.read_text().splitlines()]


def _turns(messages):
    return [(m.role, m.content) for m in messages]


def test_transcript_splits_at_markers_after_a_blank_line_only():
    text = _rows()[3]["chosen"]
    assert _turns(split_transcript(text, RowContext("x", {}), "chosen")) == [
        ("user", "What does the label Human: mean in a transcript?"),
        ("assistant", "It marks who speaks, as in Human: hi. Assistant: hello.")]


def test_multi_turn_row_shares_its_history_as_the_prompt():
    rec = row_to_preference(_rows()[1], source="hh.jsonl line 2")
    assert _turns(rec.prompt) == [("user", "Can you help me plan a trip?"),
                                  ("assistant", "Sure. Where would you like to go?"),
                                  ("user", "Somewhere warm in May.")]
    assert [m.content for m in rec.responses] == ["Southern Spain is warm in May and not yet crowded.",
                                                  "I do not plan trips."]
    assert rec.pairs() == [(0, 1)]


def test_a_reply_split_by_a_repeated_marker_is_one_turn():
    rec = row_to_preference(_rows()[5], source="hh.jsonl line 6")
    assert _turns(rec.prompt) == [("user", "Count to two.")]
    assert [m.content for m in rec.responses] == ["One.\n\nTwo.", "Three."]


@pytest.mark.parametrize("index, reason, field", [(2, "empty_response", "'chosen'"),
                                                  (4, "prefix_differs", "'chosen'")])
def test_content_problems_name_line_field_and_reason(index, reason, field):
    with pytest.raises(ContentProblem, match=f"hh.jsonl line {index + 1}: field {field}") as err:
        row_to_preference(_rows()[index], source=f"hh.jsonl line {index + 1}")
    assert err.value.reason == reason


def test_file_reads_directly_and_counts_what_it_drops(tiny_tokenizer):
    cfg = DataConfig(datasets=[DatasetConfig(path=str(RAW))], max_length=128)
    data = build_preference_data(cfg, TemplateConfig(), tiny_tokenizer, seed=0)
    assert data.n_rows == 7 and len(data.train) == 4
    assert data.drops == {"empty_response": 1, "prefix_differs": 1, "chosen_equals_rejected": 1}
    assert [s.source.rsplit(" ", 1)[-1] for s in data.train] == ["1", "2", "4", "6"]


def test_strict_makes_the_first_content_problem_fatal():
    with pytest.raises(DataError, match=r"hh_rlhf_raw.jsonl line 3: field 'chosen' has an empty final "
                                        r"Assistant turn \[empty_response\]; data.strict"):
        read_preferences(DatasetConfig(path=str(RAW)), strict=True)


def test_plain_strings_without_a_prompt_are_a_structural_error():
    with pytest.raises(DataError, match=r"line 1: field 'chosen' is a string but not a Human/Assistant transcript") \
            as err:
        row_to_preference({"chosen": "Paris.", "rejected": "Rome."}, source="p.jsonl line 1")
    assert not isinstance(err.value, ContentProblem)  # fatal even without data.strict
    with pytest.raises(DataError, match=r"field 'rejected' must be a transcript string like the other side, got int"):
        row_to_preference({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": 3}, source="p.jsonl line 1")


def test_data_validate_reads_the_raw_file_as_preference_rows():
    report = validate(RAW)
    assert report["formats"] == {"preference": 4} and report["invalid"] == 0
    assert report["dropped"] == {"empty_response": 1, "prefix_differs": 1, "chosen_equals_rejected": 1}
    strict = validate(RAW, strict=True)
    assert strict["invalid"] == 3 and "hh_rlhf_raw.jsonl line 3: field 'chosen'" in strict["errors"][0]


def test_the_gzipped_file_as_hh_rlhf_ships_it_reads_the_same_with_line_numbers(tmp_path, tiny_tokenizer):
    import gzip

    gz = tmp_path / "test.jsonl.gz"
    gz.write_bytes(gzip.compress(RAW.read_bytes()))
    cfg = DataConfig(datasets=[DatasetConfig(path=str(gz))], max_length=128)
    data = build_preference_data(cfg, TemplateConfig(), tiny_tokenizer, seed=0)
    assert data.drops == {"empty_response": 1, "prefix_differs": 1, "chosen_equals_rejected": 1}
    assert [s.source for s in data.train] == [f"{gz} line {n}" for n in (1, 2, 4, 6)]
    assert validate(gz)["formats"] == {"preference": 4}
    gz.write_bytes(gzip.compress(RAW.read_bytes() + b'{"chosen": \n'))
    with pytest.raises(DataError, match=r"test.jsonl.gz line 8: not valid JSON"):
        read_preferences(DatasetConfig(path=str(gz)))
