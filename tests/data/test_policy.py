"""One data policy for every reader (data/policy.py): structural problems are fatal with file/line/field;
content problems in a row of otherwise valid data are dropped and counted by reason; data.strict
(--strict) makes them fatal. Checked for the SFT, preference, PPO-prompt and eval-prompt readers,
`posttrain score` and the data commands."""

import json
import logging

import pytest

from posttrain.cli import main
from posttrain.data.config import DataConfig, DatasetConfig
from posttrain.templates.config import TemplateConfig
from posttrain.curate import convert, dedup, filter, mix, stats, validate
from posttrain.data.pipeline import build_sft_data
from posttrain.data.preference import build_preference_data
from posttrain.errors import DataError
from posttrain.data.prompts import load_prompts, read_prompts

LONG = "word " * 200
SFT_ROWS = [{"instruction": "Say hi.", "output": "Hi!"},
            {"instruction": "Say hello.", "output": ""},  # line 2: empty response
            {"instruction": "Name a fruit.", "output": "Apple."},
            {"instruction": "Tell a long story.", "output": LONG},  # line 4: too long for max_length 64
            {"instruction": "  ", "output": "Blank question."}]  # line 5: empty prompt
PREF_ROWS = [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},
             {"prompt": "Say hello.", "chosen": "", "rejected": "No."},  # line 2: empty chosen
             {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Apple."},  # line 3: chosen == rejected
             {"prompt": "Count.", "chosen": "1 2 3", "rejected": "3 2 1"},
             {"prompt": "Tell a story.", "chosen": LONG, "rejected": "No."}]  # line 5: too long


def _jsonl(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(path, **kw):
    return DataConfig(datasets=[DatasetConfig(path=str(path))], max_length=64, **kw)


def test_sft_drops_content_problems_by_reason(tmp_path, tiny_tokenizer):
    data = build_sft_data(_data(_jsonl(tmp_path, "sft.jsonl", SFT_ROWS)), TemplateConfig(), tiny_tokenizer, seed=0)
    assert len(data.train) == 2 and data.n_rows == 5
    assert data.drops == {"empty_response": 1, "too_long": 1, "empty_prompt": 1}


@pytest.mark.parametrize("rows, message", [
    (SFT_ROWS[:2], r"sft.jsonl line 2: field 'output' is empty \[empty_response\]; data.strict"),
    ([SFT_ROWS[0], SFT_ROWS[3]], r"sft.jsonl line 2: too long \(\d+ tokens > 64\) \[too_long\]; data.strict"),
])
def test_sft_strict_makes_them_fatal(tmp_path, tiny_tokenizer, rows, message):
    with pytest.raises(DataError, match=message):
        build_sft_data(_data(_jsonl(tmp_path, "sft.jsonl", rows), strict=True), TemplateConfig(), tiny_tokenizer, 0)


@pytest.mark.parametrize("row, message", [
    ({"instruction": "x", "output": 5}, r"line 2: field 'output' must be a string"),  # wrong type
    ({"messages": [{"role": "robot", "content": "x"}]}, r"line 2: field 'messages\[0\].role' has unknown role"),
])
def test_structural_problems_stay_fatal_without_strict(tmp_path, tiny_tokenizer, row, message):
    path = _jsonl(tmp_path, "bad.jsonl", [SFT_ROWS[0] if "instruction" in row else
                                          {"messages": [{"role": "user", "content": "hi"}]}, row])
    with pytest.raises(DataError, match=message):
        build_sft_data(_data(path), TemplateConfig(), tiny_tokenizer, seed=0)


def test_missing_column_stays_fatal(tmp_path, tiny_tokenizer):
    path = _jsonl(tmp_path, "p.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match="p.jsonl line 1: not a preference row"):
        build_preference_data(_data(path), TemplateConfig(), tiny_tokenizer, seed=0)


def test_preference_drops_content_problems_by_reason(tmp_path, tiny_tokenizer):
    data = build_preference_data(_data(_jsonl(tmp_path, "p.jsonl", PREF_ROWS)), TemplateConfig(), tiny_tokenizer, 0)
    assert len(data.train) == 2 and data.n_rows == 5
    assert data.drops == {"empty_response": 1, "chosen_equals_rejected": 1, "too_long": 1}
    with pytest.raises(DataError, match=r"p.jsonl line 2: field 'chosen' is empty \[empty_response\]; data.strict"):
        build_preference_data(_data(tmp_path / "p.jsonl", strict=True), TemplateConfig(), tiny_tokenizer, 0)


def test_ppo_prompts_drop_and_count(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Hi"}]}, {"messages": [{"role": "user", "content": ""}]},
            {"messages": [{"role": "user", "content": LONG}]}]
    path = _jsonl(tmp_path, "prompts.jsonl", rows)
    prompts, drops = load_prompts(_data(path), TemplateConfig(), tiny_tokenizer, max_new_tokens=16)
    assert len(prompts) == 1 and drops == {"empty_prompt": 1, "too_long": 1}
    with pytest.raises(DataError, match=r"prompts.jsonl line 2: field 'messages\[0\].content' is empty"):
        load_prompts(_data(path, strict=True), TemplateConfig(), tiny_tokenizer, max_new_tokens=16)


def test_eval_prompts_drop_count_and_log(tmp_path, caplog):
    path = _jsonl(tmp_path, "q.jsonl", [{"prompt": "What is 2+2?"}, {"prompt": ""}, {"prompt": "Name a colour."}])
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        items = read_prompts(path)
    assert [it.id for it in items] == ["0", "2"]
    assert "dropped 1 prompts (empty_prompt=1)" in caplog.text
    with pytest.raises(DataError, match=r"q.jsonl line 2: field 'prompt' is empty"):
        read_prompts(path, strict=True)


def test_data_validate_and_convert_report_drops_and_take_strict(tmp_path, capsys):
    path = _jsonl(tmp_path, "sft.jsonl", SFT_ROWS)
    report = validate.validate(path)
    assert (report["valid"], report["invalid"], report["dropped"]) == (3, 0, {"empty_response": 1, "empty_prompt": 1})
    assert validate.validate(path, strict=True)["invalid"] == 2
    assert main(["data", "validate", str(path), "--strict"]) == 1
    assert "line 2: field 'output' is empty [empty_response]" in capsys.readouterr().out
    out = convert.convert(path, tmp_path / "o.jsonl", "openai")
    assert out["written"] == 3 and out["rejected"] == {"empty_response": 1, "empty_prompt": 1}
    assert main(["data", "convert", str(path), "--to", "openai", "--out", str(tmp_path / "s.jsonl"), "--strict"]) == 2
    assert "sft.jsonl line 2: field 'output' is empty" in capsys.readouterr().err
    assert not (tmp_path / "s.jsonl").exists()


def test_other_data_commands_set_content_problems_aside(tmp_path):
    """A blank reply ('  ' passed the old parser) is rejected / removed / left out by reason, never fatal."""
    path = _jsonl(tmp_path, "sft.jsonl", [SFT_ROWS[0], {"instruction": "Say hello.", "output": "  "}, SFT_ROWS[2]])
    (tmp_path / "rules.yaml").write_text("rules:\n  - empty_output: true\n")
    report = filter.filter_file(path, tmp_path / "f.jsonl", tmp_path / "rules.yaml")
    assert (report["kept"], report["dropped"]) == (2, {"empty_response": 1})
    report = dedup.dedup(path, tmp_path / "d.jsonl")
    assert (report["kept"], report["removed"]) == (2, {"empty_response": 1})
    assert stats.collect(path)["dropped"] == {"empty_response": 1}
    (tmp_path / "mix.yaml").write_text(f"sources:\n  - path: {path}\n")
    assert mix.mix(tmp_path / "mix.yaml", tmp_path / "m.jsonl")["rejected"] == {"empty_response": 1}
    for run in (lambda: filter.filter_file(path, tmp_path / "g.jsonl", tmp_path / "rules.yaml", strict=True),
                lambda: dedup.dedup(path, tmp_path / "e.jsonl", strict=True),
                lambda: stats.collect(path, strict=True),
                lambda: mix.mix(tmp_path / "mix.yaml", tmp_path / "n.jsonl", strict=True)):
        with pytest.raises(DataError, match=r"sft.jsonl line 2: field 'output' is empty \[empty_response\]"):
            run()


def test_score_counts_drops_and_strict_stops(tmp_path, tiny_dir, capsys):
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.load import load_tokenizer

    rm = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1).save_pretrained(rm)
    load_tokenizer(str(tiny_dir)).save_pretrained(rm)
    prefs = _jsonl(tmp_path, "p.jsonl", PREF_ROWS[:4])
    assert main(["score", str(rm), "--data", str(prefs)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] == 2 and result["dropped"] == {"empty_response": 1, "chosen_equals_rejected": 1}
    assert main(["score", str(rm), "--data", str(prefs), "--strict"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "p.jsonl line 2: field 'chosen' is empty [empty_response]; data.strict / --strict is on; turn it off to "
        "drop and count such rows instead")


def test_kto_rows_follow_the_policy_in_data_validate(tmp_path):
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rows = [{"messages": turn, "label": True},
            {"messages": [turn[0], {"role": "assistant", "content": " "}], "label": False},  # blank reply
            {"messages": turn[:1], "label": True},  # nothing to label
            {"messages": turn, "label": "yes"}]  # structural: not a bool
    report = validate.validate(_jsonl(tmp_path, "kto.jsonl", rows))
    assert report["formats"] == {"kto": 1} and report["dropped"] == {"empty_response": 1, "no_final_reply": 1}
    assert report["invalid"] == 1 and report["errors"][0].endswith(
        "kto.jsonl line 4: field 'label' must be true or false (is the final reply desirable?), got 'yes'")
    assert validate.validate(tmp_path / "kto.jsonl", strict=True)["invalid"] == 3


@pytest.mark.parametrize("command", [["eval", "generate", "--model", "tiny-random", "--out", "o.jsonl", "--data"],
                                     ["eval", "compare", "--models", "a,b", "--judge", "reference", "--out", "c",
                                      "--prompts"]])
def test_eval_prompt_commands_take_strict(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    path = _jsonl(tmp_path, "q.jsonl", [{"prompt": "What is 2+2?"}, {"prompt": " "}])
    assert main([*command, str(path), "--strict"]) == 2  # before any model loads
    assert "q.jsonl line 2: field 'prompt' is empty [empty_prompt]; data.strict" in capsys.readouterr().err
