"""Self-Instruct synth against a fake OpenAI-compatible server on 127.0.0.1, and ROUGE-L by hand."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from posttrain.curate import synth
from posttrain.errors import PosttrainError

PROPOSALS = [
    "Classify the sentiment of this movie review as positive or negative.",
    "Draw a map of the old town of Lyon.",  # heuristic filter: needs an image
    "Give three tips for staying healthy.",  # a seed: ROUGE-L 1.0
    "Explain how a refrigerator keeps food cold to a curious teenager.",
    "List the planets of the solar system ordered by their distance from the sun.",
    "Suggest a name for a bakery that sells only sourdough bread.",
    "Convert the temperature given in Celsius into Fahrenheit and show your working.",
    "Rewrite the sentence so that it sounds more polite when sent to a manager.",
]


class FakeTeacher(BaseHTTPRequestHandler):
    """Answers Self-Instruct's three prompt kinds; fails the first request with HTTP 500 (retries)."""

    calls = 0
    proposals = PROPOSALS
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        with FakeTeacher.lock:
            FakeTeacher.calls += 1
            first = FakeTeacher.calls == 1
        if first:
            self.send_response(500)
            self.end_headers()
            return
        if prompt.startswith("Come up with a series of tasks"):
            n = prompt.count("\nTask ")
            text = "\n".join(f"Task {n + i}: {p}" for i, p in enumerate(self.proposals))
        elif "classification task with finite output labels" in prompt:
            text = "Yes" if "sentiment" in prompt else "No"
        elif "Class label:" in prompt:
            text = "Class label: positive\nInput: A joyful film with a great cast."
        else:
            text = "Input: <noinput>\nOutput: Here is an answer."
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def teacher():
    FakeTeacher.calls, FakeTeacher.proposals = 0, PROPOSALS
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield synth.OpenAITeacher(f"http://127.0.0.1:{server.server_port}/v1", backoff=0.01)
    server.shutdown()


@pytest.fixture
def seeds(tmp_path):
    path = tmp_path / "seeds.jsonl"
    tasks = ["Give three tips for staying healthy.", "Write a short poem about autumn leaves falling.",
             "Find the odd one out among the given words."]
    path.write_text("".join(json.dumps({"instruction": t, "instances": []}) + "\n" for t in tasks))
    return path


def test_rouge_l_hand_values():
    assert synth.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert synth.rouge_l("a b c d", "a c e d") == pytest.approx(0.75)  # LCS a c d: P = R = 3/4
    assert synth.rouge_l("same words", "Same, words!") == 1.0 and synth.rouge_l("x", "y") == 0.0


def test_synth_filters_and_generates(teacher, seeds, tmp_path):
    out = tmp_path / "new" / "synth.jsonl"  # a folder that does not exist yet is created
    report = synth.synth(seeds, out, teacher, 5, concurrency=2, log=lambda m: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and report["heuristic"] >= 1 and report["similar"] >= 1
    assert "Draw a map of the old town of Lyon." not in {r["instruction"] for r in rows}
    cls = rows[0]
    assert cls["is_classification"] and cls["output"] == "positive" and cls["input"].startswith("A joyful")
    assert rows[1] == {"instruction": PROPOSALS[3], "input": "", "output": "Here is an answer.",
                       "is_classification": False}
    assert not (tmp_path / "new" / "synth.partial.jsonl").exists()
    for i, a in enumerate(rows):
        assert all(synth.rouge_l(a["instruction"], b["instruction"]) < 0.7 for b in rows[i + 1:])


def test_synth_resumes_from_partial(teacher, seeds, tmp_path):
    out = tmp_path / "synth.jsonl"
    done = {"instruction": "Name a fruit that is yellow and curved.", "input": "", "output": "Banana",
            "is_classification": False}
    (tmp_path / "synth.partial.jsonl").write_text(json.dumps(done) + "\n")
    report = synth.synth(seeds, out, teacher, 3, concurrency=1, log=lambda m: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report["resumed"] == 1 and rows[0] == done and len(rows) == 3


def test_synth_gives_up_but_keeps_progress(teacher, seeds, tmp_path):
    FakeTeacher.proposals = ["Give three tips for staying healthy."]  # never novel
    with pytest.raises(PosttrainError, match=r"0/2 rows after 2 rounds"):
        synth.synth(seeds, tmp_path / "s.jsonl", teacher, 2, concurrency=1, max_rounds=2, log=lambda m: None)
    assert (tmp_path / "s.partial.jsonl").exists() and not (tmp_path / "s.jsonl").exists()


def test_teacher_refusal_is_one_error(seeds, tmp_path):
    with pytest.raises(PosttrainError, match="failed 2 times"):
        synth.OpenAITeacher("http://127.0.0.1:9/v1", retries=1, backoff=0.01, timeout=2).complete("hi")
    with pytest.raises(Exception, match="field 'instruction' is missing"):
        bad = Path(tmp_path / "bad.jsonl")
        bad.write_text('{"name": "x"}\n')
        synth.load_seeds(bad)
