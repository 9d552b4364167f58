"""Logs -> data: serve logs each answered request only when asked, rotates by size, and
`data from-logs` scrubs, dedups, caps per user and keeps users apart through `data split --by user_id`."""

import json

import pytest

from inprocess import call
from posttrain.cli import _chat_log, build_parser, main
from posttrain.curate.from_logs import from_logs
from posttrain.curate.split import split
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


def record(user, prompt, reply="fine.", **extra):
    return {"time": "2026-12-02T08:00:00Z", "model": "m", "user": user, "endpoint": "chat",
            "messages": [{"role": "user", "content": prompt}], "responses": [reply], "finish_reasons": ["stop"]} | extra


def write_logs(folder):
    folder.mkdir()
    old = [record("alice", "Mail me at alice@example.com"), record("alice", "what is 2+2"),
           record("alice", "What is  2+2"),  # a duplicate once case and spaces are folded
           record("alice", "a third question")]  # over alice's cap of 2
    lines = [json.dumps(r) for r in old] + ["{not json", json.dumps({"messages": "hi"})]
    (folder / "chat-000001.jsonl").write_text("\n".join(lines) + "\n")
    new = [record("bob", "Call +1 415 555 0100 please", reply=""), record(None, "hello"),
           {"model": "m", "user": "carl", "endpoint": "completions", "prompt": "Once upon", "responses": ["a time"]},
           record("dan", "   ")]
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in new))


def test_from_logs_scrubs_dedups_caps_and_counts_every_removed_row(tmp_path):
    write_logs(tmp_path / "logs")
    report = from_logs(tmp_path / "logs", tmp_path / "prompts.jsonl", per_user=2)
    rows = read(tmp_path / "prompts.jsonl")
    assert [r["prompt"] for r in rows] == ["Mail me at <email>", "what is 2+2", "Call <phone> please", "hello",
                                           "Once upon"]
    assert (report["records"], report["malformed"], report["kept"]) == (8, 2, 5)
    assert report["removed"] == {"duplicate": 1, "user_cap": 1, "empty_prompt": 1}
    assert report["pii_scrubbed"] == 2 and report["pii_matches"] == {"email": 1, "phone": 1}
    assert report["malformed_lines"][0].endswith("chat-000001.jsonl line 5")
    assert report["records"] + report["malformed"] == 10  # every line accounted for
    assert sum(report["removed"].values()) == len(read(tmp_path / "prompts.removed.jsonl"))
    ids = {r["prompt"]: r["user_id"] for r in rows}
    assert ids["hello"] == "anonymous" and ids["Mail me at <email>"] == ids["what is 2+2"] != "alice"
    assert "alice" not in (tmp_path / "prompts.jsonl").read_text()  # hashed: raw ids stay out of the data

    sft = from_logs(tmp_path / "logs", tmp_path / "sft.jsonl", mode="sft", per_user=2, keep_user_ids=True)
    assert sft["removed"] == {"duplicate": 1, "user_cap": 1, "empty_prompt": 1, "empty_response": 1}
    first = read(tmp_path / "sft.jsonl")[0]
    assert first["messages"][-1] == {"role": "assistant", "content": "fine."} and first["user_id"] == "alice"


def test_split_by_user_id_keeps_each_user_in_one_split(tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "chat.jsonl").write_text("".join(json.dumps(record(f"user{u}", f"question {u}-{i}")) + "\n"
                                               for u in range(12) for i in range(5)))
    assert main(["data", "from-logs", str(folder), "--out", str(tmp_path / "p.jsonl"), "--per-user", "3"]) == 0
    report = split(tmp_path / "p.jsonl", tmp_path / "split", val=0.3, by="user_id", seed=1)
    users = {s: {r["user_id"] for r in read(tmp_path / "split" / f"{s}.jsonl")} for s in ("train", "val")}
    assert report["rows"]["train"] + report["rows"]["val"] == 36 and users["train"] and users["val"]
    assert not users["train"] & users["val"]


def test_from_logs_bad_folder_is_one_clear_error(tmp_path, capsys):
    assert main(["data", "from-logs", str(tmp_path), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "no chat.jsonl" in capsys.readouterr().err


def test_logging_is_off_unless_asked_for():
    for argv in (["serve", "tiny-random"], ["ui"]):
        assert _chat_log(build_parser().parse_args(argv)) is None
    args = build_parser().parse_args(["ui", "--log-dir", "x", "--log-max-mb", "0"])
    with pytest.raises(PosttrainError, match="--log-max-mb must be > 0"):
        _chat_log(args)
