"""`posttrain data synth` and the eval LLM judge pointed at a real `posttrain serve` (tiny-random, subprocess).

Tiny-random writes gibberish, so most proposals are filtered and the judge never writes "[[A]]": what
these tests hold the clients to is that every proposed instruction and every judge reply is
accounted for (kept, or counted under a reason), and that the server speaks their protocol.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from test_api import free_port

from posttrain.cli import main
from posttrain.curate import synth
from posttrain.eval.compare import read_votes

SEEDS = ["Give three tips for staying healthy.", "Translate the sentence into French.",
         "Write a haiku about the sea in autumn.", "Summarize the paragraph in one sentence.",
         "List five animals that live in the desert.", "Explain why the sky looks blue.",
         "Suggest a name for a small bakery.", "Classify the review as positive or negative."]
DROP_REASONS = ("heuristic", "similar", "no_instance", "surplus")


@pytest.fixture(scope="module")
def endpoint(tiny_dir, tmp_path_factory):
    """`posttrain serve TINY --port P --name tiny` as its own process; yields its /v1 base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", str(tiny_dir), "--port", str(port),
                                 "--name", "tiny"], stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}/v1"
    while True:  # the server imports torch and loads the model first; the test's own timeout bounds this
        assert proc.poll() is None, f"posttrain serve exited: {log_path.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(url + "/models", timeout=5) as resp:
                assert [m["id"] for m in json.loads(resp.read())["data"]] == ["tiny"]
                break
        except OSError:
            time.sleep(0.5)
    yield url
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the graceful shutdown path
    assert proc.wait(60) == 0, log_path.read_text()[-2000:]


def test_synth_against_posttrain_serve(endpoint, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": s}) + "\n" for s in SEEDS))
    teacher = synth.OpenAITeacher(endpoint, "tiny", retries=0, max_tokens=24)
    replies = []
    complete = teacher.complete
    teacher.complete = lambda *a, **k: replies.append(complete(*a, **k)) or replies[-1]
    out = tmp_path / "synth.jsonl"
    try:
        report = synth.synth(seeds, out, teacher, 1, concurrency=2, max_rounds=2, log=lambda m: None)
        rows_path = out
    except synth.SynthIncomplete as err:  # the tiny model rarely gets a proposal through every filter
        report, rows_path = err.report, tmp_path / "synth.partial.jsonl"
    assert len(replies) >= 2 and all(isinstance(r, str) for r in replies)  # each round asked 2 proposals
    assert report["proposed"] == report["kept"] + sum(report[r] for r in DROP_REASONS), report
    kept = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert len(kept) == report["kept"] == report["rows"] <= 1


def test_llm_judge_against_posttrain_serve(endpoint, tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": "Who are you?"}\n')
    out = tmp_path / "cmp"
    rc = main(["eval", "compare", "--models", f"{tiny_dir},{tiny_dir}/", "--prompts", str(prompts), "--out", str(out),
               "--judge", endpoint, "--judge-model", "tiny", "--judge-max-tokens", "16", "--max-new-tokens", "8",
               "--rounds", "5", "--device", "cpu"])
    assert rc == 0
    votes = read_votes(out / "votes.jsonl")
    assert [(v["prompt_id"], v["model_a"], v["model_b"]) for v in votes] == [("0", "model", "model-2"),
                                                                           ("1", "model", "model-2")]
    for vote in votes:  # both orders asked; a reply without "[[X]]" is recorded, and its vote has no winner
        assert len(vote["verdicts"]) == 2 and set(vote["verdicts"]) <= {"model_a", "model_b", "tie", "unparsed"}
        assert (vote["winner"] is None) == ("unparsed" in vote["verdicts"])
    ratings = json.loads((out / "ratings.json").read_text())
    no_verdict = sum(v["winner"] is None for v in votes)
    assert (ratings["votes"], ratings["no_verdict"]) == (2 - no_verdict, no_verdict)
    printed = json.loads(capsys.readouterr().out)
    assert printed["no_verdict"] == no_verdict
    # greedy replies of a random 2-layer model never hold the verdict format: every vote is counted as such
    assert no_verdict == 2 and "2 judged pairs got a judge reply without a verdict" in (out / "report.md").read_text()
