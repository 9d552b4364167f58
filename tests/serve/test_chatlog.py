"""Request logs: serve logs each answered request only when asked (streamed or not), rotates by size, and
logging is off unless --log-dir is given."""

import json

import pytest

from inprocess import call
from posttrain.cli import _chat_log, build_parser
from posttrain.errors import PosttrainError
from posttrain.serve.api import Models, create_app, load_engine
from posttrain.serve.chatlog import ChatLog


@pytest.fixture(scope="module")
def engine(tiny_dir):
    engine = load_engine(str(tiny_dir), name="tiny", device="cpu")
    yield engine
    engine.close()


def post(app, path: str, body: dict):
    return call(app, "POST", path, headers={"Content-Type": "application/json"}, body=json.dumps(body).encode())


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_requests_are_logged_only_with_a_log_dir(engine, tmp_path):
    log = ChatLog(tmp_path / "logs")
    app = create_app(Models({"tiny": engine}), chat_log=log)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 8,
            "temperature": 0}
    plain = post(app, "/v1/chat/completions", chat | {"user": "alice"}).json()
    streamed = post(app, "/v1/chat/completions", chat | {"stream": True}).body.decode()
    completion = post(app, "/v1/completions", {"model": "tiny", "prompt": "Once", "max_tokens": 4, "user": "bob"})
    records = read(tmp_path / "logs" / "chat.jsonl")
    assert [(r["endpoint"], r["user"]) for r in records] == [("chat", "alice"), ("chat", None), ("completions", "bob")]
    assert records[0]["responses"] == [plain["choices"][0]["message"]["content"]]
    assert records[0]["messages"] == chat["messages"] and records[0]["model"] == "tiny" and records[0]["time"]
    pieces = [json.loads(e[6:]) for e in streamed.split("\n\n") if e.startswith("data: {")]
    assert records[1]["responses"] == ["".join(p["choices"][0]["delta"].get("content", "") for p in pieces
                                               if p["choices"])]
    assert records[2]["prompt"] == "Once" and records[2]["responses"] == [completion.json()["choices"][0]["text"]]
    # the control: the same requests to an app without a log write nothing anywhere
    quiet = create_app(Models({"tiny": engine}))
    assert post(quiet, "/v1/chat/completions", chat).status == 200
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["chat.jsonl"]


def test_log_rotates_by_size_and_keeps_every_record(tmp_path):
    log = ChatLog(tmp_path, max_bytes=400)
    for i in range(12):
        log.write({"model": "m", "user": "u", "endpoint": "chat", "messages": [{"role": "user", "content": f"q{i}"}],
                   "responses": ["x" * 40], "finish_reasons": ["stop"]})
    files = sorted(tmp_path.glob("chat-*.jsonl")) + [tmp_path / "chat.jsonl"]
    assert len(files) > 2 and all(f.stat().st_size <= 400 for f in files)
    texts = [r["messages"][0]["content"] for f in files for r in read(f)]
    assert texts == [f"q{i}" for i in range(12)]  # oldest file first, nothing lost


def test_logging_is_off_unless_asked_for():
    for argv in (["serve", "tiny-random"], ["ui"]):
        assert _chat_log(build_parser().parse_args(argv)) is None
    args = build_parser().parse_args(["ui", "--log-dir", "x", "--log-max-mb", "0"])
    with pytest.raises(PosttrainError, match="--log-max-mb must be > 0"):
        _chat_log(args)
