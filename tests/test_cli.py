"""The CLI end to end on tiny-random: train -> chat --prompt -> export; one-line errors with exit 2."""

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

from posttrain.cli import main
from posttrain.eval.config import EvalConfig, EvalRunConfig
from posttrain.records import Message
from posttrain.models.load import load_base
from posttrain.models.methods import apply_method
from posttrain.models.run import is_peft_model, load_model_for_inference, save_model
from posttrain.models.generate import generate_reply
from posttrain.train.config import RunConfig, load_config
from posttrain.typed_config import describe_keys

ROWS = [{"instruction": "Who are you?", "input": "", "output": "I am {{name}}, made by {{author}}."},
        {"instruction": "Say hi.", "input": "", "output": "Hi there!"},
        {"instruction": "What is 2+2?", "input": "", "output": "4"}] * 4


@pytest.fixture()
def run_config(tmp_path, tiny_dir):
    (tmp_path / "data.json").write_text(json.dumps(ROWS))
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n{"messages": [\n')
    cfg = {"model": {"name_or_path": str(tiny_dir)},
           "data": {"datasets": [{"path": "data.json"}], "variables": {"name": "Aria", "author": "Lin"},
                    "val_size": 2, "packing": True, "max_length": 64},
           "optim": {"lr": 1e-2}, "train": {"max_steps": 3, "micro_batch_size": 2, "save_every": 2},
           "output": {"dir": str(tmp_path / "run"), "tensorboard": False}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_chat_export(run_config, tmp_path, capsys):
    assert main(["train", str(run_config), "lora.r=4", "train.max_steps=4"]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval_samples"] == 2 and summary["final_eval_loss"] > 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["train"]["max_steps"] == 4
    assert (run / "adapter_model.safetensors").is_file() and (run / "checkpoints" / "step-4").is_dir()
    capsys.readouterr()
    assert main(["chat", str(run), "--prompt", "Who are you?", "--max-new-tokens", "5"]) == 0
    reply = capsys.readouterr().out
    model, tokenizer, cfg = load_model_for_inference(run)
    expected = generate_reply(model, tokenizer, [Message("user", "Who are you?")], max_new_tokens=5,
                              system=cfg.template.system)
    assert reply == expected + "\n"  # greedy: the CLI prints exactly the library's reply
    assert main(["export", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_unknown_key_is_one_line_exit_2(run_config, capsys):
    assert main(["train", str(run_config), "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "posttrain: error: unknown config key optim.lrr; did you mean optim.lr?"


def test_a_config_error_under_torchrun_is_printed_by_rank_0_only(run_config, capsys, monkeypatch):
    for rank, printed in (("1", ""), ("0", "posttrain: error: unknown config key optim.lrr; did you mean optim.lr?")):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", str(run_config), "optim.lrr=1"]) == 2  # every process exits 2
        assert capsys.readouterr().err.strip() == printed


def test_bad_data_names_file_and_line(run_config, tmp_path, capsys):
    code = main(["train", str(run_config), f"data.datasets=[{{path: {tmp_path / 'bad.jsonl'}}}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) >= 1
    assert "bad.jsonl line 2" in err[-1] and err[-1].startswith("posttrain: error:")


def test_zero_samples_reports_counts(run_config, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n' * 3)
    code = main(["train", str(run_config), f"data.datasets=[{{path: {tmp_path / 'empty.jsonl'}}}]",
                 "data.val_size=0"])
    err = capsys.readouterr().err
    assert code == 2 and "no_assistant_turn" in err and "3" in err


def test_debug_shows_traceback_and_usage_errors_are_one_line(tmp_path):
    cmd = [sys.executable, "-m", "posttrain.cli"]
    plain = subprocess.run([*cmd, "train", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr.strip().count("\n") == 0 and "Traceback" not in plain.stderr
    debug = subprocess.run([*cmd, "train", str(tmp_path / "nope.yaml"), "--debug"], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    usage = subprocess.run([*cmd, "trian"], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.strip().count("\n") == 0


def test_keys_lists_docs(capsys):
    assert main(["keys", "lora"]) == 0
    out = capsys.readouterr().out
    assert "lora.r" in out and "LoRA rank" in out


def test_keys_lists_every_key_of_every_section(capsys):
    assert main(["keys"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    expected = [key for key, _, _ in describe_keys(RunConfig)] + [key for key, _, _ in describe_keys(EvalRunConfig)]
    assert set(listed) == set(expected) and len(listed) == len(set(listed))
    for key in ("model.name_or_path", "quant.quant_type", "rm.center_coef", "dpo.beta", "ppo.kl_coef",
                "reward.function", "eval.mc.data", "eval.compare.judge"):
        assert key in listed


def test_eval_config_under_train_is_one_line_naming_posttrain_eval(tmp_path, capsys):
    path = tmp_path / "bench.yaml"
    path.write_text("stage: eval\neval:\n  mc: {data: ceval}\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.endswith(f"run it with posttrain eval {path}")


def test_old_run_folder_with_every_section_loads(tmp_path, tiny_dir, capsys):
    """posttrain 0.1 saved every section (eval, ppo, reward, rm, dpo, every method's) in a run's config.yaml:
    inference reads the sections it needs; only `posttrain train` refuses the file, naming a section."""
    cfg = load_config(None, ["template.system=Be brief.", "lora.r=4"],
                      **{"data.datasets": [{"path": "x.jsonl"}], "model.name_or_path": str(tiny_dir)})
    model, tokenizer = load_base(cfg.model, device="cpu")
    run = tmp_path / "old-run"
    save_model(apply_method(model, cfg.methods), tokenizer, run)
    tree = dataclasses.asdict(cfg) | {"eval": dataclasses.asdict(EvalConfig())}
    assert {"eval", "ppo", "reward", "rm", "dpo", "freeze", "quant", "lisa", "prompt"} <= set(tree)
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    loaded, _, saved = load_model_for_inference(run)
    assert is_peft_model(loaded) and saved.template.system == "Be brief." and saved.lora.r == 4
    assert saved.model.name_or_path == str(tiny_dir)
    assert main(["chat", str(run), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["train", str(run / "config.yaml")]) == 2
    assert "config section eval applies to eval configs" in capsys.readouterr().err
