"""Resuming a run whose last checkpoint is its final step: every stage says "already complete" in one
line, exits 0 and leaves train_summary.json as it was; a run cut after its final checkpoint but before
its summary finishes the tail instead (summary written, final loss from the logged steps)."""

import json
import shutil

import pytest
import yaml

from posttrain.cli import main

SFT_ROWS = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(6)]
PREF_ROWS = [{"prompt": f"Question {i}?", "chosen": "Yes. Yes.", "rejected": "No, no no."} for i in range(6)]
PROMPT_ROWS = [{"messages": [{"role": "user", "content": f"Say thing {i}."}]} for i in range(4)]
RULE = "def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n"


def write_config(tmp_path, tiny_dir, stage: str):
    rows = {"sft": SFT_ROWS, "rm": PREF_ROWS, "dpo": PREF_ROWS, "ppo": PROMPT_ROWS}[stage]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"stage": stage, "model": {"name_or_path": str(tiny_dir)},
           "data": {"datasets": [{"path": "data.jsonl"}], "max_length": 64},
           "train": {"max_steps": 2, "micro_batch_size": 2, "save_every": 1},
           "output": {"dir": str(tmp_path / "run"), "tensorboard": False}}
    if stage == "ppo":
        (tmp_path / "rule.py").write_text(RULE)
        cfg["reward"] = {"function": "rule.py:length"}
        cfg["ppo"] = {"rollout_batch_size": 2, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 3}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
def test_resume_of_a_finished_run_says_already_complete(tmp_path, tiny_dir, stage, capsys):
    config = write_config(tmp_path, tiny_dir, stage)
    assert main(["train", str(config)]) == 0
    summary = tmp_path / "run" / "train_summary.json"
    before, mtime = summary.read_bytes(), summary.stat().st_mtime_ns
    assert json.loads(before)["final_train_loss"] is not None
    capsys.readouterr()
    assert main(["train", str(config), "train.resume=auto"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "already complete" in line]
    assert len(err) == 1 and "2 of 2 steps" in err[0], err
    assert summary.read_bytes() == before and summary.stat().st_mtime_ns == mtime


def test_run_cut_after_its_last_checkpoint_writes_its_summary_on_resume(tmp_path, tiny_dir, capsys):
    config = write_config(tmp_path, tiny_dir, "sft")
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    first = json.loads((run / "train_summary.json").read_text())
    (run / "train_summary.json").unlink()  # as if the process died after the final checkpoint
    shutil.rmtree(run / "checkpoints" / "step-1")
    assert main(["train", str(config), "train.resume=auto"]) == 0
    again = json.loads((run / "train_summary.json").read_text())
    assert again["steps"] == 2 and again["final_train_loss"] == first["final_train_loss"]
    assert "already complete" not in capsys.readouterr().err
