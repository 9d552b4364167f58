"""Labels made in the annotation UI train a reward model as they are exported, and are counted in its log."""

import json

import yaml

from posttrain.cli import main
from posttrain.serve.ui.annotate import AnnotationTask


def test_exported_rankings_train_a_reward_model(tmp_path, tiny_dir):
    items = [{"id": f"q{i}", "prompt": f"Question {i}?", "responses": [f"Answer: {i}.", f"Well, maybe {i}", "Hmm"]}
             for i in range(4)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    task = AnnotationTask(tmp_path / "items.jsonl", tmp_path / "ui")
    for i in range(3):
        task.label(f"q{i}", "ann", "ranked", ranking=[1, 2, 3])
    task.label("q3", "ann", "skipped")
    exported = task.export()
    assert exported["items"] == 3 and exported["pairs"] == 9

    cfg = {"stage": "rm", "model": {"name_or_path": str(tiny_dir)},
           "data": {"datasets": [{"path": exported["ranked"]}], "max_length": 64},
           "method": {"type": "lora"}, "lora": {"r": 4}, "train": {"max_steps": 2, "micro_batch_size": 3},
           "output": {"dir": str(tmp_path / "rm"), "tensorboard": False}}
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "rm.yaml")]) == 0
    summary = json.loads((tmp_path / "rm" / "train_summary.json").read_text())
    assert summary["stage"] == "rm" and summary["train_prompts"] == 3 and summary["train_pairs"] == 9
    # each step trains the 3 prompts (micro-batch 3): pair weights of 1/3 must count as whole prompts
    assert summary["loss_tokens"] == 3 * summary["steps"]
