"""Throughput (rows/s) and peak memory of `posttrain data dedup` and `filter` on a generated file.

    PYTHONPATH=. python benchmarks/data_build.py --rows 1000000 --work /tmp/databench

Generates alpaca JSON lines (10% exact duplicates, 5% near duplicates with one word changed),
then runs each command in its own process so each peak RSS is its own. Timing is wall clock
on whatever machine runs it; the numbers in the README say which.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("data model train token loss batch step layer value reward policy sample prompt answer query score "
         "graph node edge label split mix filter dedup rule shard cache batch epoch check").split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    made: list[dict] = []
    with path.open("w") as f:
        for i in range(rows):
            roll = rng.random()
            if made and roll < 0.10:
                row = rng.choice(made)  # exact duplicate
            elif made and roll < 0.15:
                base = rng.choice(made)
                words = base["output"].split()
                words[rng.randrange(len(words))] = "changed"
                row = {**base, "output": " ".join(words)}  # near duplicate
            else:
                row = {"instruction": f"Task {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(5, 20))),
                       "input": "", "output": " ".join(rng.choices(WORDS, k=rng.randint(20, 80)))}
                if len(made) < 10_000:
                    made.append(row)
            f.write(json.dumps(row) + "\n")


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one command run in a child process."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--work", default="/tmp/posttrain-databench")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "rows.jsonl"
    generate(data, args.rows)
    rules = work / "rules.yaml"
    rules.write_text("rules:\n  - pii: {scrub: [email, phone]}\n  - empty_output: true\n"
                     "  - length: {field: response, unit: chars, min: 2, max: 4000}\n  - refusal: true\n"
                     "  - repetition: {n: 3, max_ratio: 0.5}\n  - script: {allow: [latin]}\n")
    cli = [sys.executable, "-m", "posttrain.cli", "data"]
    jobs = {"dedup exact": cli + ["dedup", str(data), "--out", str(work / "exact.jsonl")],
            "dedup exact+near 0.8": cli + ["dedup", str(data), "--out", str(work / "near.jsonl"), "--near", "0.8"],
            "filter (6 rules)": cli + ["filter", str(data), "--out", str(work / "filtered.jsonl"), "--rules",
                                       str(rules)]}
    print(f"| command ({args.rows:,} rows, {data.stat().st_size / 2**20:.0f} MiB) | rows/s | wall s | peak RSS MiB |")
    print("|---|---|---|---|")
    for name, cmd in jobs.items():
        # ru_maxrss over children is the max so far: run each job from a fresh helper process
        wall, peak = json.loads(subprocess.run(
            [sys.executable, __file__, "--_one", json.dumps(cmd)], check=True, capture_output=True, text=True).stdout)
        print(f"| {name} | {args.rows / wall:,.0f} | {wall:.1f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_one":
        print(json.dumps(run(json.loads(sys.argv[2]))))
    else:
        main()
