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


def test_export_writes_polished_or_top_answers_that_train_sft(tmp_path, tiny_dir):
    items = [{"id": f"q{i}", "prompt": f"Question {i}?", "responses": [f"Answer: {i}.", f"Well, maybe {i}", "Hmm"],
              "models": ["m1", "m2", "m3"]} for i in range(4)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    task = AnnotationTask(tmp_path / "items.jsonl", tmp_path / "ui")
    task.label("q0", "ann", "ranked", ranking=[2, 1, 3], edits={"0": "Answer: zero.", "2": "Hmm, no idea."})
    task.label("q1", "ann", "ranked", ranking=[1, 2, 3])  # nothing polished
    task.label("q2", "ann", "flagged", edits={"0": "Fixed."})  # not ranked: never exported
    task.label("q3", "ann", "ranked", ranking=[3, 2, 1], edits={"1": "Well, surely 3"})

    polished = task.export()
    rows = [json.loads(x) for x in open(polished["sft"]).read().splitlines()]
    assert polished["sft_rows"] == 2 and polished["items"] == 3
    # q0: of the two edits, the better-ranked one (rank 2, "Answer: zero."); q3: its one edit, ranked 2nd
    assert [(r["id"], r["messages"][1]["content"], r["rank"], r["polished"], r["model"]) for r in rows] == [
        ("q0", "Answer: zero.", 1, True, "m1"), ("q3", "Well, surely 3", 1, True, "m2")]
    assert rows[0]["messages"][0] == {"role": "user", "content": "Question 0?"}

    top = task.export(sft="top")
    rows = [json.loads(x) for x in open(top["sft"]).read().splitlines()]
    assert [(r["id"], r["messages"][1]["content"], r["polished"]) for r in rows] == [
        ("q0", "Well, maybe 0", False), ("q1", "Answer: 1.", False), ("q3", "Hmm", False)]

    cfg = {"stage": "sft", "model": {"name_or_path": str(tiny_dir)}, "data": {"datasets": [{"path": top["sft"]}],
           "max_length": 64}, "method": {"type": "lora"}, "lora": {"r": 4}, "train": {"max_steps": 2},
           "output": {"dir": str(tmp_path / "sft"), "tensorboard": False}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "sft.yaml")]) == 0
    assert json.loads((tmp_path / "sft" / "train_summary.json").read_text())["steps"] == 2
