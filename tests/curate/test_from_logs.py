"""`data from-logs`: request logs -> prompt or SFT rows, PII scrubbed, deduplicated, capped per user, every
removed row counted, and users kept apart by `data split --by user_id`."""

import json

from posttrain.cli import main
from posttrain.curate.from_logs import from_logs
from posttrain.curate.split import split


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


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
