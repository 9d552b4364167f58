"""The UI's arena vote route writes the shared vote format, which `eval ratings` reads."""

import json

from inprocess import call
from posttrain.cli import main
from posttrain.serve.ui.app import create_ui_app

TOKEN = "ratings-test-token-0123456789"


def ratings(out):
    return json.loads((out / "ratings.json").read_text())


def test_ui_arena_vote_is_written_in_the_shared_format(tmp_path):
    app = create_ui_app(tmp_path / "ui", token=TOKEN)
    body = {"model_a": "a", "model_b": "b", "winner": "model_b", "annotator": "alice", "prompt": "hi",
            "response_a": "x", "response_b": "y"}
    reply = call(app, "POST", "/ui/vote", headers={"Content-Type": "application/json",
                                                   "Authorization": f"Bearer {TOKEN}"}, body=json.dumps(body).encode())
    assert reply.status == 200
    vote = json.loads((tmp_path / "ui" / "votes.jsonl").read_text())
    assert vote["judge"] == "human:alice" and vote["prompt_id"].startswith("p-") and vote["winner"] == "model_b"
    assert main(["eval", "ratings", str(tmp_path / "ui" / "votes.jsonl"), "--out", str(tmp_path / "r")]) == 0
    assert ratings(tmp_path / "r")["win_rates"][0]["losses"] == 1  # a lost to b
    blank = call(app, "POST", "/ui/vote", headers={"Content-Type": "application/json",
                                                   "Authorization": f"Bearer {TOKEN}"},
                 body=json.dumps(body | {"model_b": ""}).encode())
    assert blank.status == 200  # saved as given; rating counts it
    assert main(["eval", "ratings", str(tmp_path / "ui" / "votes.jsonl"), "--out", str(tmp_path / "r2")]) == 0
    assert ratings(tmp_path / "r2")["left_out"] == {"malformed": 1}
