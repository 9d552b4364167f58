"""examples/instructgpt/run.py --smoke: the whole InstructGPT chain (data, SFT, candidates, ranks, K-way RM,
PPO-ptx on that RM, three-way comparison) runs on the tiny random model, each stage leaves its output, and a
rerun resumes (every step skipped)."""

import importlib.util
import json
from pathlib import Path

import yaml

RUN = Path(__file__).resolve().parents[1] / "examples" / "instructgpt" / "run.py"


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_smoke_chain_writes_every_stage_and_compares_three_models(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("instructgpt_run", RUN)
    chain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chain)
    w = tmp_path / "ig"
    assert chain.main(["--smoke", "--work", str(w)]) == 0

    for split in ("split/train", "split/val", "split/test", "sft/train", "sft/val"):
        assert read(w / "data" / f"{split}.jsonl"), split
    assert (w / "sft" / "config.json").is_file() and (w / "sft-lora" / "adapter_config.json").is_file()
    candidates = read(w / "candidates.jsonl")
    assert candidates and all(len(row["responses"]) == 3 for row in candidates)  # K = 3 from the SFT model
    ranked = read(w / "ranked.jsonl")
    assert ranked and all(row["judge"].startswith(f"reward_model:{w / 'judge-rm'}") for row in ranked)
    rm = json.loads((w / "rm" / "train_summary.json").read_text())
    assert rm["train_pairs"] >= 3 * rm["train_prompts"] > 0 and "reward_offset" in rm  # all C(3,2) pairs per prompt
    ppo_cfg = yaml.safe_load((w / "ppo" / "config.yaml").read_text())
    assert ppo_cfg["reward"] == {**ppo_cfg["reward"], "type": "model", "model": str(w / "rm")}
    assert ppo_cfg["ppo"]["ptx_coef"] > 0 and read(w / "ppo" / "logs" / "metrics.jsonl")

    judges = {"reference": "reference:", "labeller": "reward_model:", "chain-rm": "reward_model:"}
    for name, prefix in judges.items():
        ratings = json.loads((w / f"compare-{name}" / "ratings.json").read_text())
        assert ratings["judge"].startswith(prefix) and sorted(ratings["models"]) == ["ppo", "sft", "tiny-random"]
        assert sorted(r["model"] for r in ratings["elo"]) == ["ppo", "sft", "tiny-random"]
        report = (w / f"compare-{name}" / "report.md").read_text()
        assert all(f"`{m}`" in report for m in ("ppo", "sft", "tiny-random"))
    summary = json.loads((w / "summary.json").read_text())
    assert set(summary["judges"]) == set(judges) and summary["stages"]["ppo"]["steps"] == 2

    capsys.readouterr()
    assert chain.main(["--smoke", "--work", str(w)]) == 0  # a rerun resumes: nothing runs again
    assert "$ posttrain" not in capsys.readouterr().out
