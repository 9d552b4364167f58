"""Candidate generation for the Annotate tab (no browser): engines, seeds, resume, drops, export with models."""

import json

import pytest

from posttrain.records import Message
from posttrain.errors import ConfigError, DataError
from posttrain.models.tiny import build_tiny
from posttrain.serve.api import load_engine
from posttrain.models.generate import generate_from_ids
from posttrain.serve.ui.annotate import AnnotationTask
from posttrain.serve.ui.candidates import CandidateJob, GenSettings, share
from posttrain.templates.render import encode_prompt

PROMPTS = ["Name a colour.", "hello " * 2500, "Who are you?", "What is 2+2?"]  # the second overruns 2048 tokens


@pytest.fixture(scope="module")
def engines(tiny_dir, tmp_path_factory):
    other = build_tiny(tmp_path_factory.mktemp("tiny-b") / "model-b", seed=1)
    out = {"a": load_engine(str(tiny_dir), name="a", device="cpu"),
           "b": load_engine(str(other), name="b", device="cpu")}
    yield out
    for engine in out.values():
        engine.close()


def run(job: CandidateJob) -> dict:
    job.thread.join(120)
    status = job.status()
    assert not status["running"] and status["error"] is None
    return status


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_share_spreads_k_over_models():
    assert share(1, 3) == [3] and share(2, 3) == [2, 1] and share(3, 5) == [2, 2, 1]


def test_candidates_come_from_the_engines_and_resume(engines, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    settings = GenSettings(k=3, temperature=1.0, max_tokens=8, seed=5)
    status = run(CandidateJob(prompts, engines, settings, tmp_path / "ui"))
    assert (status["done"], status["total"], status["dropped"], status["resumed"]) == (4, 4, {"too_long": 1}, 0)
    rows = read(tmp_path / status["out"])
    assert [r["id"] for r in rows] == ["p0", "p2", "p3"]
    for row in rows:
        index = int(row["id"][1:])
        assert sorted(row["models"]) == ["a", "a", "b"] and row["prompt"] == PROMPTS[index]
        want = {}
        for name, n in (("a", 2), ("b", 1)):  # what each engine's model samples for this prompt and seed
            e = engines[name]
            ids = encode_prompt([Message("user", row["prompt"])], e.tokenizer, system=e.system)
            want[name] = [g.text for g in generate_from_ids(e.model, e.tokenizer, [ids] * n, max_new_tokens=8,
                                                            temperature=1.0, seed=5 + index)]
        assert row["responses"] == [want[name].pop(0) for name in row["models"]]  # each model's, in its order
    assert len({tuple(r["models"]) for r in rows}) > 1  # shuffled per prompt: no position belongs to a model

    with open(status["out"], "a") as f:
        f.write('{"id": "p3", "prom')  # a crash in the middle of a line
    again = run(CandidateJob(prompts, engines, settings, tmp_path / "ui"))
    assert again["out"] == status["out"] and again["resumed"] == 3 and again["dropped"] == {"too_long": 1}
    assert read(tmp_path / again["out"]) == rows  # nothing generated twice, the cut line is gone

    task = AnnotationTask(status["out"], tmp_path / "ui")
    item, progress = task.next_item("ann")
    assert item.id == "p0" and item.models == rows[0]["models"] and progress["total"] == 3
    task.label("p0", "ann", "ranked", ranking=[3, 1, 2])
    exported = json.loads(open(task.export()["ranked"]).readline())
    assert exported["models"] == [rows[0]["models"][i] for i in (1, 2, 0)]
    assert exported["responses"] == [rows[0]["responses"][i] for i in (1, 2, 0)]


def test_bad_settings_and_prompts_are_refused(engines, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    with pytest.raises(ConfigError, match="temperature 0 is greedy"):
        CandidateJob(prompts, {"a": engines["a"]}, GenSettings(k=3, temperature=0.0), tmp_path)
    with pytest.raises(ConfigError, match="K must be 2..8"):
        CandidateJob(prompts, engines, GenSettings(k=1), tmp_path)
    with pytest.raises(ConfigError, match="K=2 candidates cannot include all 3 chosen models"):
        CandidateJob(prompts, {**engines, "c": engines["a"]}, GenSettings(k=2), tmp_path)
    with pytest.raises(ConfigError, match="at least one model"):
        CandidateJob(prompts, {}, GenSettings(), tmp_path)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                             {"role": "user", "content": "c"}]}) + "\n")
    with pytest.raises(DataError, match="one user turn; this prompt has 3 messages"):
        CandidateJob(chat, engines, GenSettings(), tmp_path)
    greedy = run(CandidateJob(prompts, engines, GenSettings(k=2, temperature=0.0, max_tokens=4), tmp_path))
    assert sorted(read(tmp_path / greedy["out"])[0]["models"]) == ["a", "b"]  # greedy: one answer per model is fine
