"""Votes -> ratings: `eval ratings` reads human (UI) and judge (eval compare) votes in one format, filters by
judge or annotator, counts what it leaves out, and writes eval compare's own report."""

import json

from posttrain.cli import main
from posttrain.eval.ratings import ratings_from_votes
from posttrain.eval.votes import human_vote


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def human_votes(path):
    votes = [human_vote("a", "b", "model_a", "alice", f"q{i}") for i in range(3)]
    votes += [human_vote("b", "a", "tie", "alice", "q3"), human_vote("b", "a", "model_a", "bob", "q4"),
              {"model_a": "a", "model_b": "b", "winner": "model_a", "annotator": "carol", "prompt": "q5"},  # old UI
              human_vote("a", "zeta", "model_b", "bob", "q6"), human_vote("a", "a", "tie", "bob", "q7"),
              "{not json", {"model_a": "a", "winner": "tie"}, {"model_a": "a", "model_b": "b", "winner": "A"}]
    return write(path, votes)


def judge_votes(path):
    judge = "llm:m@http://127.0.0.1:9/v1/chat/completions:prompt=0"
    return write(path, [{"prompt_id": "0", "model_a": "a", "model_b": "b", "judge": judge, "winner": "model_b",
                         "verdicts": ["model_b", "model_b"]},
                        {"prompt_id": "1", "model_a": "a", "model_b": "b", "judge": judge, "winner": None,
                         "verdicts": ["unparsed", "model_a"]}])


def ratings(out):
    return json.loads((out / "ratings.json").read_text())


def test_human_and_judge_votes_rated_together_and_every_left_out_vote_counted(tmp_path, capsys):
    files = [str(human_votes(tmp_path / "votes.jsonl")), str(judge_votes(tmp_path / "judge.jsonl"))]
    assert main(["eval", "ratings", *files, "--out", str(tmp_path / "all"), "--models", "a,b", "--rounds", "20"]) == 0
    r = ratings(tmp_path / "all")
    assert r["read"] == 13 and r["left_out"] == {"unknown_model": 1, "same_model": 1, "malformed": 3}
    assert r["malformed_lines"][0].endswith("votes.jsonl line 9")
    assert (r["votes"], r["no_verdict"], r["ties"]) == (7, 1, 1)
    (row,) = r["win_rates"]  # a against b: wins q0-q2, carol's; tie q3; losses: bob's and the judge's
    assert (row["model"], row["opponent"], row["wins"], row["ties"], row["losses"]) == ("a", "b", 4, 1, 2)
    assert r["by_judge"] == {"human:alice": 4, "human:bob": 1, "human:carol": 1,
                             "llm:m@http://127.0.0.1:9/v1/chat/completions:prompt=0": 2}
    report = (tmp_path / "all" / "report.md").read_text()
    assert "13 vote lines read; left out: malformed 3, same_model 1, unknown_model 1." in report
    assert all((tmp_path / "all" / png).is_file() for png in ("ratings_bt.png", "ratings_elo.png", "win_matrix.png"))
    printed = json.loads(capsys.readouterr().out)
    assert printed["bradley_terry"] == r["bradley_terry"] and printed["left_out"] == r["left_out"]
    # the same votes through eval compare's rating function give the same ratings
    decided = [json.loads(x) for x in open(files[0]).read().splitlines()[:6]] + [json.loads(open(files[1]).readline())]
    for v in decided:
        v.setdefault("prompt_id", "x")
    assert ratings_from_votes(decided, rounds=20)["bradley_terry"] == r["bradley_terry"]


def test_filter_by_annotator_or_judge(tmp_path):
    files = [str(human_votes(tmp_path / "votes.jsonl")), str(judge_votes(tmp_path / "judge.jsonl"))]
    assert main(["eval", "ratings", *files, "--out", str(tmp_path / "alice"), "--annotator", "alice"]) == 0
    r = ratings(tmp_path / "alice")
    assert r["by_judge"] == {"human:alice": 4} and r["left_out"]["other_judge"] == 6
    assert (r["win_rates"][0]["wins"], r["win_rates"][0]["ties"], r["win_rates"][0]["losses"]) == (3, 1, 0)
    assert main(["eval", "ratings", *files, "--out", str(tmp_path / "llm"), "--judge", "llm:"]) == 0
    r = ratings(tmp_path / "llm")
    assert (r["votes"], r["no_verdict"], r["win_rates"][0]["losses"]) == (1, 1, 1)
