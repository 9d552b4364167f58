"""Reward models on Anthropic hh-rlhf's raw harmless-base transcripts: the README's efficacy figure.

    python scripts/hh_rlhf_rm_efficacy.py --hh harmless-base/test.jsonl.gz --work outputs/hh [--train-pairs 200]

hh-rlhf (github.com/anthropics/hh-rlhf, MIT) is read as it comes: no conversion. The first
--eval-rows rows of the file are the held-out pairs; training rows come after them, skipping any
row whose first human turn also opens a held-out row (disjoint prompts). Two reward models, the
same recipe (examples/rm_lora.yaml: SmolLM2-135M-Instruct, LoRA r=8, 1 epoch, max_length 256),
differ only in their data: the shipped style pairs (examples/data/prefs_train.jsonl) vs
--train-pairs hh-rlhf rows. Both are scored with `posttrain score` on the held-out rows; the
figures go to WORK/results.json. A model already trained (WORK/rm-shipped, WORK/rm-hh-N for N
training rows) is scored again, not retrained.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "rm_lora.yaml"


def first_human_turn(transcript: str) -> str:
    return transcript.split("\n\nHuman:", 2)[1].split("\n\nAssistant:", 1)[0].strip()


def split(hh: Path, work: Path, eval_rows: int, train_pairs: int) -> tuple[Path, Path, dict]:
    opener = gzip.open if hh.suffix == ".gz" else open
    with opener(hh, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    held = rows[:eval_rows]
    seen = {first_human_turn(r["chosen"]) for r in held}
    rest = [r for r in rows[eval_rows:] if first_human_turn(r["chosen"]) not in seen]
    train = rest[:train_pairs]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hh", required=True, type=Path, help="harmless-base/test.jsonl(.gz) from hh-rlhf")
    ap.add_argument("--work", default=Path("outputs/hh"), type=Path)
    ap.add_argument("--eval-rows", type=int, default=200, help="held-out rows at the start of the file")
    ap.add_argument("--train-pairs", type=int, default=200, help="hh-rlhf rows to train on (after the held-out)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    held, train, info = split(args.hh, args.work, args.eval_rows, args.train_pairs)
    runs = {"shipped (examples/data/prefs_train.jsonl)": (args.work / "rm-shipped", []),
            f"hh-rlhf harmless-base ({info['train_rows']} rows)": (args.work / f"rm-hh-{info['train_rows']}",
                                                                   [f"data.datasets=[{{path: {train}}}]"])}
    results = {"data": info, "models": {}}
    for name, (out, overrides) in runs.items():
        if not (out / "train_summary.json").is_file():
            posttrain("train", str(RECIPE), f"output.dir={out}", *overrides)
        summary = json.loads((out / "train_summary.json").read_text())
        scored = json.loads(posttrain("score", str(out), "--data", str(held)))
        results["models"][name] = {"train_prompts": summary.get("train_prompts"), "steps": summary["steps"],
                                   "wall_time_s": round(summary["wall_time_s"]), **scored}
        print(f"{name}: accuracy {scored['accuracy']:.3f} on {scored['pairs']} pairs, dropped {scored['dropped']}")
    (args.work / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
