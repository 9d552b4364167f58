"""Reward models on held-out preference pairs of other sources: the README's efficacy figures.

    python scripts/hh_rlhf_rm_efficacy.py --hh harmless-base/test.jsonl.gz --work outputs/hh --train-pairs 800 \
        --out benchmarks/results/hh_rlhf_rm_800.json

hh-rlhf (github.com/anthropics/hh-rlhf, MIT) is read as it comes: no conversion. The first
--eval-rows rows of harmless-base/test are the held-out pairs; training rows come after them,
skipping any row whose first human turn also opens a held-out row (disjoint prompts). Three reward
models, all from examples/rm_lora.yaml (SmolLM2-135M-Instruct):
  style  the recipe before issue 19: LoRA r=8, lr 5e-4, max_length 256, on the style pairs
         examples/data/prefs_train.jsonl (terse "Answer: ..." over hedging filler);
  broad  the shipped recipe as it is (freeze: last 4 blocks + head, lr 3e-4, 3 epochs, max_length 384) on
         its broad data (examples/data/prefs_broad*.jsonl + prefs_demo_en_zh.jsonl), no hh-rlhf
         (--broad-set KEY=VALUE changes it, --broad-name names the variant);
  hh-N   the shipped recipe on --train-pairs hh-rlhf rows instead (max_length 256).
Each is scored with `posttrain score` on the held-out hh-rlhf rows, on
examples/data/prefs_helpful_heldout.jsonl (hand-written, kept out of every training set), on
examples/data/hh_helpful_dove_val.jsonl (363 single-turn hh-rlhf *helpful* prompts and replies with
gpt-3.5-turbo-0125 preference labels, from github.com/Hritikbansal/dove, MIT: other people's prompts,
replies and labels, about helpfulness) and on any --eval NAME=FILE given. Against
`style`, each model's accuracy difference on the same pairs gets an exact McNemar test (two-sided
binomial on the pairs only one model ranks right) and a paired bootstrap 95% interval. A model
already trained (WORK/rm-NAME/train_summary.json) is scored again, not retrained.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "rm_lora.yaml"
HELPFUL = ROOT / "examples" / "data" / "prefs_helpful_heldout.jsonl"
DOVE = ROOT / "examples" / "data" / "hh_helpful_dove_val.jsonl"
STYLE = ["method.type=lora", "lora.r=8", "lora.alpha=16", "optim.lr=5e-4", "data.max_length=256",
         f"data.datasets=[{{path: {ROOT / 'examples' / 'data' / 'prefs_train.jsonl'}}}]"]


def first_human_turn(transcript: str) -> str:
    return transcript.split("\n\nHuman:", 2)[1].split("\n\nAssistant:", 1)[0].strip()


def split(hh: Path, work: Path, eval_rows: int, train_pairs: int) -> tuple[Path, Path, dict]:
    opener = gzip.open if hh.suffix == ".gz" else open
    with opener(hh, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    held = rows[:eval_rows]
    seen = {first_human_turn(r["chosen"]) for r in held}
    rest = [r for r in rows[eval_rows:] if first_human_turn(r["chosen"]) not in seen]
    train = rest[:train_pairs] if train_pairs else rest
    paths = (work / "hh_eval.jsonl", work / "hh_train.jsonl")
    for path, part in zip(paths, (held, train)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    info = {"file": str(hh), "rows": len(rows), "eval_rows": len(held), "train_rows": len(train),
            "skipped_shared_prompt": len(rows) - eval_rows - len(rest)}
    return *paths, info


def posttrain(*args: str) -> str:
    cmd = [sys.executable, "-m", "posttrain.cli", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p: under H0 each discordant pair is A's or B's with probability 1/2."""
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def compare(a: dict[str, bool], b: dict[str, bool], resamples: int = 10000) -> dict:
    """Model a vs b on the pairs both scored: accuracy difference, McNemar p, paired bootstrap 95% CI."""
    keys = sorted(a.keys() & b.keys())
    diffs = [int(a[k]) - int(b[k]) for k in keys]
    rng = random.Random(0)
    boot = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(resamples))
    only_a, only_b = diffs.count(1), diffs.count(-1)
    return {"pairs": len(keys), "difference": sum(diffs) / len(diffs), "only_this_right": only_a,
            "only_baseline_right": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b),
            "bootstrap_95": [boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]]}


def score(run: Path, data: Path, work: Path) -> tuple[dict, dict[str, bool]]:
    """`posttrain score` figures and, per pair (pairwise files: chosen first), whether it ranked it right."""
    per_pair = work / f"scores-{run.name}-{data.stem}.jsonl"
    result = json.loads(posttrain("score", str(run), "--data", str(data), "--out", str(per_pair)))
    rows = [json.loads(line) for line in per_pair.read_text(encoding="utf-8").splitlines()]
    return result, {r["source"]: r["rewards"][0] > r["rewards"][1] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hh", required=True, type=Path, help="harmless-base/test.jsonl(.gz) from hh-rlhf")
    ap.add_argument("--work", default=Path("outputs/hh"), type=Path)
    ap.add_argument("--eval-rows", type=int, default=200, help="held-out rows at the start of the file")
    ap.add_argument("--train-pairs", type=int, default=800,
                    help="hh-rlhf rows to train on (after the held-out; 0 = all of them)")
    ap.add_argument("--hh-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for the hh-N model's recipe (repeatable), e.g. method.type=full optim.lr=2e-5")
    ap.add_argument("--broad-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for the broad model's recipe (repeatable); its name becomes --broad-name")
    ap.add_argument("--broad-name", default="broad", help="name of the broad model (broad-...) in the results")
    ap.add_argument("--models", default="style,broad,hh", help="which of style, broad, hh to train and score")
    ap.add_argument("--eval", action="append", default=[], metavar="NAME=FILE",
                    help="another held-out preference file to score every model on (repeatable)")
    ap.add_argument("--out", type=Path, help="results JSON (default WORK/results.json)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    held, train, info = split(args.hh, args.work, args.eval_rows, args.train_pairs)
    hh_data = [f"data.datasets=[{{path: {train}}}]", "data.val_size=0", "data.max_length=256", *args.hh_set]
    hh_name = "-".join([f"hh-{info['train_rows']}", *(v.split("=")[-1] for v in args.hh_set)])
    runs = {name: overrides for name, overrides in
            {"style": STYLE, args.broad_name: args.broad_set, hh_name: hh_data}.items()
            if name.split("-")[0] in args.models.split(",")}
    evals = {"hh-rlhf harmless-base held-out": held, "hand-written helpful held-out": HELPFUL,
             "hh-rlhf helpful (DOVE val, gpt-3.5 labels)": DOVE}
    for item in args.eval:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            ap.error(f"--eval {item!r}: expected NAME=FILE with an existing file")
        evals[name] = Path(path)
    results = {"data": info, "models": {}, "vs_style": {}}
    correct: dict[tuple[str, str], dict[str, bool]] = {}
    for name, overrides in runs.items():
        out = args.work / f"rm-{name}"
        if not (out / "train_summary.json").is_file():
            posttrain("train", str(RECIPE), f"output.dir={out}", *overrides)
        summary = json.loads((out / "train_summary.json").read_text())
        entry = results["models"][name] = {
            "overrides": overrides, "method": summary["method"], "train_prompts": summary["train_prompts"],
            "train_pairs": summary.get("train_pairs"), "steps": summary["steps"],
            "wall_time_s": round(summary["wall_time_s"]), "final_train_loss": summary["final_train_loss"]}
        for label, data in evals.items():
            scored, correct[name, label] = score(out, data, args.work)
            entry[label] = scored
            print(f"{name} on {label}: accuracy {scored['accuracy']:.3f} ({scored['pairs']} pairs), "
                  f"reward/length spearman {scored['length_correlation']['spearman']}", flush=True)
    for name in runs:
        if name != "style" and "style" in runs:
            results["vs_style"][name] = {label: compare(correct[name, label], correct["style", label])
                                         for label in evals}
    text = json.dumps(results, indent=2)
    (args.out or args.work / "results.json").write_text(text + "\n", encoding="utf-8")
    print(json.dumps(results["vs_style"], indent=2))


if __name__ == "__main__":
    main()
