"""Eval runs resume from their per-item caches: a rerun after a partial run computes only the missing
items and ends with the same results as an uninterrupted run (multiple choice, generation, compare)."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from posttrain.cli import main
from posttrain.eval.config import load_eval_config
from posttrain.data.prompts import read_prompts
from posttrain.errors import DataError
from posttrain.eval import compare, generation, multiple_choice, ratings
from posttrain.eval.judges import ReferenceJudge
from posttrain.models.run import load_model_for_inference

from conftest import REPO, SHARED_ASSETS


@pytest.fixture(scope="module")
def other_tiny(tiny_dir, tmp_path_factory) -> Path:
    """A second tiny model: tiny_dir's files with perturbed weights, so its answers differ."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("other") / "other"
    shutil.copytree(tiny_dir, out)
    gen = torch.Generator().manual_seed(1)
    weights = load_file(out / "model.safetensors")
    weights = {k: v + v.std() * torch.randn(v.shape, generator=gen) if v.dim() == 2 else v for k, v in weights.items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture
def counted(monkeypatch):
    """Counts what really runs: MC prompts scored, conversations generated, judge calls."""
    counts = {"scored": 0, "generated": 0, "judged": 0, "loads": 0}
    real_score, real_gen, real_judge = multiple_choice.score_batch, generation.generate_batch, ReferenceJudge.compare

    def score(model, entries, *args, **kwargs):
        counts["scored"] += len(entries)
        return real_score(model, entries, *args, **kwargs)

    def gen(model, tokenizer, convs, **kwargs):
        counts["generated"] += len(convs)
        return real_gen(model, tokenizer, convs, **kwargs)

    def judge(self, *args, **kwargs):
        counts["judged"] += 1
        return real_judge(self, *args, **kwargs)

    monkeypatch.setattr(multiple_choice, "score_batch", score)
    monkeypatch.setattr(generation, "generate_batch", gen)
    monkeypatch.setattr(ReferenceJudge, "compare", judge)
    return counts


def _bench(tmp_path) -> Path:
    """A C-Eval-layout folder: 2 subjects, 4 val and 2 dev questions each."""
    for split, n in (("val", 4), ("dev", 2)):
        folder = tmp_path / "bench" / split
        folder.mkdir(parents=True)
        for subject in ("law", "logic"):
            rows = ["id,question,A,B,C,D,answer"]
            rows += [f"{i},{subject} {split} 问题 {i}？,a{i},b{i},c{i},d{i},{'ABCD'[i % 4]}" for i in range(n)]
            (folder / f"{subject}_{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return tmp_path / "bench"


def _mc_cfg(tiny_dir, bench, out, **extra):
    keys = {"eval.model": str(tiny_dir), "eval.output_dir": str(out), "eval.device": "cpu", "eval.batch_size": 3,
            "eval.mc.data": str(bench), "eval.mc.shots": 1, **extra}
    return load_eval_config(None, [], **keys).eval


def _cache_rows(out: Path) -> dict:
    (path,) = out.glob("items-*.jsonl")
    return {r["key"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def test_mc_resume_scores_only_missing_and_matches_uninterrupted(tiny_dir, tmp_path, counted, caplog):
    bench = _bench(tmp_path)
    with caplog.at_level(logging.INFO, logger="posttrain.eval.progress"):
        whole = multiple_choice.run(_mc_cfg(tiny_dir, bench, tmp_path / "whole"))
    assert counted["scored"] == 8
    assert "multiple choice: 8/8 questions" in caplog.text  # no TTY under pytest: log lines show progress

    counted["scored"] = 0
    multiple_choice.run(_mc_cfg(tiny_dir, bench, tmp_path / "resumed", **{"eval.mc.max_per_subject": 2}))
    assert counted["scored"] == 4  # the "interrupted" run: half of each subject
    resumed = multiple_choice.run(_mc_cfg(tiny_dir, bench, tmp_path / "resumed"))
    assert counted["scored"] == 8  # only the 4 missing questions were scored
    assert resumed["settings"]["cached"] == 4 and resumed["settings"]["scored"] == 4
    for key in ("subjects", "categories", "overall"):
        assert resumed[key] == whole[key]
    a, b = _cache_rows(tmp_path / "whole"), _cache_rows(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["pred"] == b[key]["pred"]
        assert a[key]["logps"] == pytest.approx(b[key]["logps"], abs=1e-5)

    counted["scored"] = 0
    assert multiple_choice.run(_mc_cfg(tiny_dir, bench, tmp_path / "resumed"))["settings"]["cached"] == 8
    assert counted["scored"] == 0
    multiple_choice.run(_mc_cfg(tiny_dir, bench, tmp_path / "resumed", **{"eval.mc.shots": 0}))
    assert counted["scored"] == 8  # other prompts: the cache does not answer for them


def _prompts(tmp_path, n: int, name: str) -> Path:
    rows = [{"id": f"p{i}", "prompt": f"question number {i}?", "reference": f"answer {i}",
             "category": "even" if i % 2 == 0 else "odd"} for i in range(n)]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_generation_resume_and_stale_cache_errors(tiny_dir, tmp_path, counted):
    loads = []

    def load():
        loads.append(1)
        return load_model_for_inference(str(tiny_dir), device="cpu")[:2]

    full, part = (read_prompts(_prompts(tmp_path, n, f"p{n}.jsonl")) for n in (4, 2))
    kwargs = {"model_ref": str(tiny_dir), "batch_size": 1, "max_new_tokens": 4}  # batch 1: no padding effects
    whole = generation.generate_file(load, full, tmp_path / "whole.jsonl", **kwargs)
    assert counted["generated"] == 4
    generation.generate_file(load, part, tmp_path / "resumed.jsonl", **kwargs)
    resumed = generation.generate_file(load, full, tmp_path / "resumed.jsonl", **kwargs)
    assert counted["generated"] == 4 + 2 + 2
    assert [r["prediction"] for r in resumed] == [r["prediction"] for r in whole]

    loads.clear()
    again = generation.generate_file(load, full, tmp_path / "resumed.jsonl", **kwargs)
    assert again == resumed and not loads and counted["generated"] == 8  # nothing to do: no model loaded
    with pytest.raises(DataError, match="max_new_tokens"):
        generation.generate_file(load, full, tmp_path / "resumed.jsonl", **{**kwargs, "max_new_tokens": 7})
    changed = read_prompts(_prompts(tmp_path, 4, "changed.jsonl"))
    changed[1].messages[-1].content = "a different question"
    with pytest.raises(DataError, match="'p1' has changed"):
        generation.generate_file(load, changed, tmp_path / "resumed.jsonl", **kwargs)


def _compare_cfg(models, prompts, out, **extra):
    keys = {"eval.task": "compare", "eval.output_dir": str(out), "eval.device": "cpu", "eval.batch_size": 4,
            "eval.compare.models": [str(m) for m in models], "eval.compare.prompts": str(prompts),
            "eval.compare.judge": "reference", "eval.compare.max_new_tokens": 3, "eval.compare.rounds": 30, **extra}
    return load_eval_config(None, [], **keys).eval


RATED = ("votes", "win_rates", "win_matrix", "bradley_terry", "elo", "by_category")


def test_compare_resume_generates_and_judges_only_missing(tiny_dir, other_tiny, tmp_path, counted):
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")  # a third model, answering like the first
    models = [tiny_dir, other_tiny, copy]
    full, part = _prompts(tmp_path, 4, "p4.jsonl"), _prompts(tmp_path, 2, "p2.jsonl")
    whole = compare.run(_compare_cfg(models, full, tmp_path / "whole"))
    assert (counted["generated"], counted["judged"], whole["votes"]) == (12, 12, 12)

    compare.run(_compare_cfg(models, part, tmp_path / "resumed"))
    resumed = compare.run(_compare_cfg(models, full, tmp_path / "resumed"))
    assert counted["generated"] == 12 + 6 + 6 and counted["judged"] == 12 + 6 + 6
    assert {k: resumed[k] for k in RATED} == {k: whole[k] for k in RATED}  # Elo too: votes in a fixed order

    # Further reruns through the pieces of run() (no plots): reversed model order, then another judge.
    prompts, out = read_prompts(full), tmp_path / "resumed"
    names = compare.model_names([str(m) for m in models[::-1]])
    answers = compare.generate_answers([str(m) for m in models[::-1]], names, prompts, out, batch_size=4,
                                       max_new_tokens=3)
    reordered = compare.judge_pairs(ReferenceJudge(), names, prompts, answers, out / "votes.jsonl")
    assert counted["generated"] == 24 and counted["judged"] == 24  # all cached; votes reused in either orientation
    assert ratings.ratings_from_votes(reordered)["win_rates"] == whole["win_rates"]
    other = compare.judge_pairs(ReferenceJudge(epsilon=0.5), names, prompts, answers, out / "votes.jsonl")
    assert counted["judged"] == 36 and len(other) == 12  # another judge: its own 12 votes
    assert len(compare.read_votes(out / "votes.jsonl")) == 12 + 12  # both judges' votes kept in the file
    assert all(v["winner"] == "tie" for v in other + reordered if {v["model_a"], v["model_b"]} == {"model", "copy"})


def test_eval_ceval_example_on_two_subjects(tiny_dir, tmp_path, capsys):
    """examples/eval_ceval.yaml with the tiny model on 2 real C-Eval subjects, 3 questions each."""
    if not (SHARED_ASSETS / "data" / "ceval" / "val").is_dir():
        pytest.skip("C-Eval data not present")
    code = main(["eval", str(REPO / "examples" / "eval_ceval.yaml"), f"eval.model={tiny_dir}", "eval.device=cpu",
                 f"eval.output_dir={tmp_path}", "eval.mc.subjects=[law,college_physics]", "eval.mc.max_per_subject=3"])
    assert code == 0
    table = capsys.readouterr().out
    for line in ("law ", "college_physics ", "[Humanities]", "[STEM]", "overall (micro)"):
        assert line in table
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert results["overall"]["n"] == 6 and set(results["categories"]) == {"Humanities", "STEM"}
    assert (tmp_path / "report.md").is_file() and (tmp_path / "accuracy.png").is_file()


def test_compare_identity_example_end_to_end(tiny_dir, other_tiny, tmp_path, capsys):
    """examples/compare_identity.yaml (its 24 prompts, reference judge) with two tiny models, then the
    same comparison through `eval compare` flags, which finds everything cached."""
    out = tmp_path / "cmp"
    code = main(["eval", str(REPO / "examples" / "compare_identity.yaml"), f"eval.output_dir={out}",
                 f"eval.compare.models=[{tiny_dir}, {other_tiny}]", "eval.compare.max_new_tokens=4",
                 "eval.compare.rounds=20", "eval.device=cpu", "eval.batch_size=24"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["votes"] == 24 and set(printed["by_category"]) == {"general", "identity"}
    for name in ("report.md", "ratings.json", "ratings_bt.png", "ratings_elo.png", "win_matrix.png",
                 "votes.jsonl", "answers/model.jsonl", "answers/other.jsonl"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "Win-rate matrix" in report and "Prompt category `identity`" in report and "(win_matrix.png)" in report
    code = main(["eval", "compare", "--models", f"{tiny_dir},{other_tiny}", "--out", str(out), "--judge", "reference",
                 "--prompts", str(REPO / "examples" / "data" / "compare_prompts.jsonl"), "--epsilon", "0.02",
                 "--max-new-tokens", "4", "--rounds", "20", "--device", "cpu", "--batch-size", "24"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["bradley_terry"] == printed["bradley_terry"]
    assert len(compare.read_votes(out / "votes.jsonl")) == 24  # all 24 votes reused
