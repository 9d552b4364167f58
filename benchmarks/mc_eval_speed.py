"""Multiple-choice eval speed on C-Eval val with SmolLM2-135M-Instruct: questions/s before/after shared-prefix
scoring, fp32 on CPU.

    PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/mc_eval_speed.py   # 2 alternating runs
    python benchmarks/mc_eval_speed.py --repeats 1 --cases letter:0 --subjects accountant   # a quick look

Each case (scoring:shots) runs two sides on the same questions, batch size and model:
  before  eval.mc.shared_prefix=false: one right-padded row per prompt (letter, calibrated) or per
          option (cloze), length-sorted batches (the letter path is the algorithm of the code before it)
  after   eval.mc.shared_prefix=true (the default): a batch of questions in one packed row, a subject's
          header and shots stored once for its questions, a question's prompt once for its options.
Every run is its own process with a fresh output folder (no cache); sides alternate (before, after,
before, after ...) and medians are reported. Questions/s counts scoring time only (eval's own timer:
no imports or model load). Both sides must pick the same letters (checked per question).
Writes benchmarks/results/<name>.{json,md}. C-Eval is CC BY-NC-SA 4.0.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    ASSETS, machine, markdown_table, matmul_peak_gflops, median_of, peak_rss_mb, run_worker, versions, write_results)

DATA = str(ASSETS / "data" / "ceval")
# The first five C-Eval val subjects in file order, all their questions (153): realistic per-subject batches.
SUBJECTS = "accountant,advanced_mathematics,art_studies,basic_medicine,business_administration"
SIDES = {"before": False, "after": True}  # side -> eval.mc.shared_prefix


def cpu_flags() -> str:
    """The CPU features that decide fp32/bf16 speed on these machines (AVX2, AVX-512, BF16, AMX)."""
    text = Path("/proc/cpuinfo").read_text()
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return " ".join(f for f in wanted if f in flags)


def worker(spec: dict, side: str) -> dict:
    from posttrain.eval.config import load_eval_config
    from posttrain.eval import multiple_choice

    out = Path(spec["tmp"]) / "eval"
    cfg = load_eval_config(None, [], **{
        "eval.model": "smollm2-135m-instruct", "eval.output_dir": str(out), "eval.device": "cpu",
        "eval.batch_size": spec["batch_size"], "eval.mc.data": spec["data"], "eval.mc.split": "val",
        "eval.mc.subjects": spec["subjects"], "eval.mc.shots": spec["shots"], "eval.mc.scoring": spec["scoring"],
        "eval.mc.shared_prefix": SIDES[side]}).eval
    summary = multiple_choice.run(cfg)
    (cache,) = out.glob("items-*.jsonl")
    picks = {r["key"]: r["pred"] for r in map(json.loads, cache.read_text(encoding="utf-8").splitlines())}
    s = summary["settings"]
    return {"questions": s["scored"], "seconds": s["seconds"], "questions_per_s": s["questions_per_s"],
            "path": s["path"], "accuracy": summary["overall"]["accuracy"], "predictions": summary["predictions"],
            "picks": picks, "peak_rss_mb": peak_rss_mb()}


def run_case(script: Path, base: dict, case: str, repeats: int) -> dict:
    scoring, shots = case.split(":")
    spec = {**base, "scoring": scoring, "shots": int(shots)}
    runs: dict[str, list[dict]] = {}
    for side in ["before", "after"] * repeats:
        result = run_worker(script, side, spec, timeout=3600)
        runs.setdefault(side, []).append(result)
        print(f"{case} {side}: {result['questions']} questions in {result['seconds']} s = "
              f"{result['questions_per_s']:.2f} q/s ({result['path']}), accuracy {result['accuracy']:.3f}", flush=True)
    picks = [r.pop("picks") for rs in runs.values() for r in rs]
    same = sum(all(p[k] == picks[0][k] for p in picks) for k in picks[0])
    medians = {side: {k: median_of(rs, k) for k in ("questions_per_s", "seconds", "peak_rss_mb", "accuracy")}
               for side, rs in runs.items()}
    return {"case": case, "runs": runs, "medians": medians, "same_picks": f"{same}/{len(picks[0])}",
            "speedup": medians["after"]["questions_per_s"] / medians["before"]["questions_per_s"]}


def render(result: dict) -> str:
    m = result["machine"]
    rows = []
    for c in result["cases"]:
        b, a = c["medians"]["before"], c["medians"]["after"]
        rows.append([c["case"], c["runs"]["after"][0]["questions"], b["questions_per_s"], a["questions_per_s"],
                     f"**{c['speedup']:.2f}x**", f"{b['peak_rss_mb']:,.0f} / {a['peak_rss_mb']:,.0f}",
                     f"{100 * a['accuracy']:.1f}%", c["same_picks"]])
    table = markdown_table(["scoring:shots", "questions", "before q/s", "after q/s", "after/before",
                            "peak RSS MB before / after", "accuracy", "same picks"], rows)
    return (f"{m['date']}, {m['cpu']} ({result['cpu_flags']}), {m['cores']} cores, torch {result['versions']['torch']}"
            f" ({m['torch_threads']} threads); matmul peak {result['matmul_gflops_before']:.1f} GFLOP/s before, "
            f"{result['matmul_gflops_after']:.1f} after. Subjects: {result['spec']['subjects']}; batch "
            f"{result['spec']['batch_size']}; medians of {result['repeats']} alternating runs per side.\n\n{table}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for hidden in ("--worker", "--spec", "--out"):  # the worker process's side of run_worker
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=DATA, help="C-Eval folder (default: %(default)s)")
    ap.add_argument("--subjects", default=SUBJECTS, help="comma-separated val subjects (default: %(default)s)")
    ap.add_argument("--cases", default="letter:0,cloze:0,letter:5", help="scoring:shots cases (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="questions per forward (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per side (default: %(default)s)")
    ap.add_argument("--name", default="mc_eval_speed", help="results file stem (default: %(default)s)")
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        Path(args.out).write_text(json.dumps(worker(spec, args.worker)))
        return
    base = {"data": args.data, "subjects": args.subjects.split(","), "batch_size": args.batch_size}
    before = matmul_peak_gflops()
    cases = [run_case(Path(__file__).resolve(), base, case, args.repeats) for case in args.cases.split(",")]
    result = {"machine": machine(), "cpu_flags": cpu_flags(), "versions": versions("torch", "transformers"),
              "spec": base, "repeats": args.repeats, "matmul_gflops_before": before,
              "matmul_gflops_after": matmul_peak_gflops(), "cases": cases}
    write_results(args.name, result, render)


if __name__ == "__main__":
    main()
