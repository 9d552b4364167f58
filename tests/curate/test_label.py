"""RLAIF: `data candidates` writes what the UI's generation writes; `data label` ranks candidates with a reward
model (K-way) or an LLM judge (pairwise, both orders), counts unparsed and all-tied prompts, and its rows
train the rm stage."""

import json

import pytest
import torch
import yaml

from posttrain.cli import main
from posttrain.curate.label import label
from posttrain.eval.judges import OpenAIJudge, RewardModelJudge
from posttrain.models.tiny import build_tiny
from posttrain.records import Message
from posttrain.serve.api import load_engine
from posttrain.serve.ui.candidates import CandidateJob, GenSettings

PROMPTS = ["Name a colour.", "hello " * 2500, "Who are you?"]  # the second overruns the 2048-token context


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path).read().splitlines()]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_candidates_equal_the_ui_generation(tiny_dir, tmp_path, capsys):
    other = build_tiny(tmp_path / "model-b", seed=1)
    prompts = write(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    args = ["data", "candidates", str(prompts), "--models", f"{tiny_dir},{other}", "--out", str(tmp_path / "c.jsonl"),
            "--k", "3", "--temperature", "1.0", "--max-tokens", "8", "--seed", "5", "--device", "cpu"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["prompts"], report["written"], report["dropped"]) == (3, 2, {"too_long": 1})
    rows = read(tmp_path / "c.jsonl")
    assert [r["id"] for r in rows] == ["p0", "p2"] and all(sorted(r["models"]) == ["model", "model", "model-b"]
                                                           for r in rows)
    engines = {"model": load_engine(str(tiny_dir), name="model", device="cpu"),
               "model-b": load_engine(str(other), name="model-b", device="cpu")}
    try:
        job = CandidateJob(prompts, engines, GenSettings(k=3, temperature=1.0, max_tokens=8, seed=5), tmp_path / "ui")
        job.thread.join(120)
        assert read(job.out) == rows  # same texts, same blind order
    finally:
        for engine in engines.values():
            engine.close()


@pytest.fixture
def reward_model(tiny_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm"


def test_reward_model_ranks_all_k_and_the_rows_train_the_rm_stage(reward_model, tiny_dir, tmp_path):
    rows = [{"id": f"q{i}", "prompt": f"Question {i}?", "responses": [f"Answer {i}.", "No idea", "Hmm, well"],
             "models": ["a", "b", "a"]} for i in range(3)]
    rows.append({"id": "same", "prompt": "Echo", "responses": ["x", "x"]})  # equal rewards: all tied
    write(tmp_path / "c.jsonl", rows)
    assert main(["data", "label", str(tmp_path / "c.jsonl"), "--judge", str(reward_model),
                 "--out", str(tmp_path / "ranked.jsonl")]) == 0
    ranked = read(tmp_path / "ranked.jsonl")
    assert len(ranked) == 3 and ranked[0]["judge"].startswith("reward_model:")
    judge = RewardModelJudge(str(reward_model))
    for row in ranked:
        rewards = [judge.reward([Message("user", row["prompt"])], r) for r in row["responses"]]
        assert row["judge_scores"] == pytest.approx(rewards)
        best_first = sorted(range(3), key=lambda i: -rewards[i])
        assert [row["ranks"][i] for i in best_first] == [0, 1, 2] and row["models"] == ["a", "b", "a"]
    report = label(tmp_path / "c.jsonl", tmp_path / "r2.jsonl", judge)
    assert (report["rows"], report["written"], report["left_out"]) == (4, 3, {"all_tied": 1})

    cfg = {"stage": "rm", "model": {"name_or_path": str(tiny_dir)},
           "data": {"datasets": [{"path": str(tmp_path / "ranked.jsonl")}], "max_length": 64},
           "method": {"type": "lora"}, "lora": {"r": 4}, "train": {"max_steps": 1, "micro_batch_size": 3},
           "output": {"dir": str(tmp_path / "rm-run"), "tensorboard": False}}
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "rm.yaml")]) == 0
    summary = json.loads((tmp_path / "rm-run" / "train_summary.json").read_text())
    assert summary["train_prompts"] == 3 and summary["train_pairs"] == 9


def _judge(body, headers) -> str:
    """Prefers the answer with more '+' signs; says nothing parseable when an answer holds 'mute'."""
    text = body["messages"][0]["content"]
    a = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n")[0]
    b = text.split("[The Start of Assistant B's Answer]\n")[1].split("\n")[0]
    verdict = "A" if a.count("+") > b.count("+") else "B" if b.count("+") > a.count("+") else "C"
    return "I cannot say." if "mute" in a + b else f"So: [[{verdict}]]"


def test_llm_judge_pairwise_counts_unparsed_and_tied_prompts(fake_openai, tmp_path):
    rows = [{"id": "a", "prompt": "q", "responses": ["+", "+++", "++", "+"]},
            {"id": "b", "prompt": "q", "responses": ["++", "mute"]},
            {"id": "c", "prompt": "q", "responses": ["+", "+"]}]
    write(tmp_path / "c.jsonl", rows)
    judge = OpenAIJudge(fake_openai(_judge), "j")
    report = label(tmp_path / "c.jsonl", tmp_path / "ranked.jsonl", judge)
    assert (report["written"], report["left_out"], report["pairs_judged"]) == (1, {"unparsed": 1, "all_tied": 1}, 8)
    (row,) = read(tmp_path / "ranked.jsonl")
    assert row["ranks"] == [2, 0, 1, 2] and row["judge_scores"] == [0.5, 3.0, 2.0, 0.5]
    (bad,) = read(report["unparsed_file"])
    assert bad["id"] == "b" and bad["unparsed"] == [{"pair": [0, 1], "verdicts": ["unparsed", "unparsed"]}]
