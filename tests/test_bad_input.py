"""Bad input to `posttrain train` (and the data commands): one line naming file / line / field, exit 2;
content problems in single rows are dropped and counted by reason, never trained on silently."""

import json
import logging

import pytest
import yaml

from posttrain.cli import main
from posttrain.train.config import load_config
from posttrain.errors import ConfigError, ModelSourceError
from posttrain.models import sources
from posttrain.models.sources import resolve_model

ROWS = [{"instruction": "Who are you?", "input": "", "output": "I am Aria."},
        {"instruction": "Say hi.", "input": "", "output": "Hi there!"}] * 3


@pytest.fixture()
def config(tmp_path, tiny_dir):
    (tmp_path / "data.json").write_text(json.dumps(ROWS))
    cfg = {"model": {"name_or_path": str(tiny_dir)}, "data": {"datasets": [{"path": "data.json"}], "max_length": 64},
           "train": {"max_steps": 2, "micro_batch_size": 2}, "output": {"dir": str(tmp_path / "run"),
                                                                        "tensorboard": False}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_line_error(capsys, *argv) -> str:
    """Run the CLI; it must exit 2 with a single `posttrain: error:` line on stderr. Returns that line."""
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("posttrain: error:") and "Traceback" not in "\n".join(err), err
    return err[-1]


def with_data(tmp_path, name: str, content: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return f"data.datasets=[{{path: {path}}}]"


# ---------------------------------------------------------------- config


def test_yaml_syntax_error_names_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name_or_path: tiny-random\ntrain:\n  max_steps: 2: 3\n")
    err = one_line_error(capsys, "train", str(path))
    assert f"{path}: not valid YAML at line 4 column 15: mapping values are not allowed here" in err


def test_override_that_is_not_yaml_is_a_config_error(config, capsys):
    err = one_line_error(capsys, "train", str(config), "optim.betas=[0.9")
    assert "optim.betas=[0.9" in err and "column" in err


def test_training_needs_model_name_or_path(tmp_path, capsys):
    path = tmp_path / "nomodel.yaml"
    path.write_text("data:\n  datasets: [{path: data.json}]\ntrain: {max_steps: 2}\n")
    err = one_line_error(capsys, "train", str(path))
    assert "model.name_or_path" in err and "tiny-random" in err


def test_empty_model_name_is_an_error_not_the_current_directory(config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "model.name_or_path" in one_line_error(capsys, "train", str(config), "model.name_or_path=")
    with pytest.raises(ModelSourceError, match="empty"):
        resolve_model("")
    assert "empty" in one_line_error(capsys, "chat", "", "--prompt", "hi")


def test_tiny_random_by_name_still_trains(config, capsys):
    assert main(["train", str(config), "model.name_or_path=tiny-random", "train.max_steps=1"]) == 0


@pytest.mark.parametrize("override, key", [("train.max_steps=-5", "train.max_steps"),
                                           ("train.epochs=-1", "train.epochs")])
def test_negative_steps_or_epochs_are_errors(config, capsys, override, key):
    assert key in one_line_error(capsys, "train", str(config), override)
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override, "model.name_or_path=tiny-random"], **{"data.datasets": [{"path": "x.jsonl"}]})


# ---------------------------------------------------------------- data files


def test_latin1_file_names_file_and_line(config, tmp_path, capsys):
    good = json.dumps({"instruction": "hi", "input": "", "output": "hello"}) + "\n"
    bad = '{"instruction": "caf\u00e9", "input": "", "output": "ol\u00e9"}\n'.encode("latin-1")
    err = one_line_error(capsys, "train", str(config), with_data(tmp_path, "latin.jsonl", (good * 2).encode() + bad))
    assert f"{tmp_path / 'latin.jsonl'} line 3" in err and "UTF-8" in err


def test_latin1_csv_names_file_and_line(config, tmp_path, capsys):
    content = "instruction,output\nhi,hello\ncaf\u00e9,ol\u00e9\n".encode("latin-1")
    err = one_line_error(capsys, "train", str(config), with_data(tmp_path, "latin.csv", content))
    assert f"{tmp_path / 'latin.csv'} line 3" in err and "UTF-8" in err


def test_blank_lines_only_file(config, tmp_path, capsys):
    err = one_line_error(capsys, "train", str(config), with_data(tmp_path, "blank.jsonl", "\n\n  \n"))
    assert err.endswith(f"{tmp_path / 'blank.jsonl'}: no rows (the file is empty or only blank lines)")


def test_json_object_file_says_which_layout_is_expected(config, tmp_path, capsys):
    content = json.dumps({"a": {"instruction": "x", "output": "y"}, "b": {"instruction": "x", "output": "y"}})
    err = one_line_error(capsys, "train", str(config), with_data(tmp_path, "obj.json", content))
    assert str(tmp_path / "obj.json") in err and "__posttrain_row" not in err
    assert "JSON array" in err and "one object per line" in err


def test_image_rows_are_an_error_naming_the_field(config, tmp_path, capsys):
    turns = [{"role": "user", "content": "<image>Who is this?"}, {"role": "assistant", "content": "A cat"}]
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": turns, "images": ["cat.jpg"]}]
    err = one_line_error(capsys, "train", str(config),
                         with_data(tmp_path, "mllm.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert f"{tmp_path / 'mllm.jsonl'} line 2: field 'images'" in err and "multimodal" in err


def test_image_preference_rows_are_an_error_naming_the_field(config, tmp_path, capsys):
    row = {"prompt": "<image>Which?", "chosen": "A cat", "rejected": "A dog", "images": ["cat.jpg"]}
    err = one_line_error(capsys, "train", str(config), "stage=dpo",
                         with_data(tmp_path, "mllm_dpo.jsonl", json.dumps(row) + "\n"))
    assert f"{tmp_path / 'mllm_dpo.jsonl'} line 1: field 'images'" in err


def test_conversation_ending_with_a_user_turn_is_dropped_and_counted(config, tmp_path, caplog):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    open_ended = {"messages": [*ok["messages"], {"role": "user", "content": "and then?"}]}
    data = with_data(tmp_path, "turns.jsonl", "".join(json.dumps(r) + "\n" for r in [ok, ok, open_ended]))
    assert main(["train", str(config), data, "train.max_steps=1"]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["dropped"] == {"no_final_reply": 1} and summary["train_samples"] == 2
    assert "no_final_reply=1" in caplog.text


# ---------------------------------------------------------------- data commands


def test_filter_rule_says_it_will_download_before_building_the_tokenizer(tmp_path, monkeypatch, caplog):
    from posttrain.curate.filter import load_rules

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(sources.WHEEL_ENV, raising=False)

    def no_download(work):  # stands in for the real build, which would fetch the wheel from PyPI
        raise ModelSourceError("not downloading in tests")

    monkeypatch.setitem(sources._BUILDERS, "smollm2-135m-instruct", no_download)
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - length: {field: response, unit: tokens, max: 20}\n")
    with caplog.at_level(logging.WARNING), pytest.raises(ModelSourceError, match="not downloading"):
        load_rules(rules)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("smollm2-135m-instruct" in m and "93 MB" in m and "PyPI" in m for m in warned), warned


def test_score_on_a_folder_without_a_reward_model_says_what_is_missing(tmp_path, tiny_dir, capsys):
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}) + "\n")
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    (empty / "notes.txt").write_text("no model here")
    err = one_line_error(capsys, "score", str(empty), "--data", str(prefs))
    assert err == (f"posttrain: error: no model weights / config in {empty}; expected a reward-model run or an "
                   "HF sequence-classification folder")
    # a causal LM folder is a model, but not a reward model: scoring it would read a random head
    err = one_line_error(capsys, "score", str(tiny_dir), "--data", str(prefs))
    assert "without a one-label sequence-classification head" in err and str(tiny_dir) in err
