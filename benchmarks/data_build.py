"""Near-dedup recall on planted duplicates, then throughput (rows/s) and peak memory of
`posttrain data dedup` and `filter` on a generated file.

    PYTHONPATH=. python benchmarks/data_build.py --rows 1000000 --work /tmp/databench

Recall: 600 rows of ~70 unrelated words (English) or 2-character words (Chinese): 500 distinct,
50 case/whitespace variants, 50 copies with one output word changed; `data dedup --near 0.8`
must remove the variants as exact duplicates and find the copies whose true Jaccard of
shingles is >= 0.85, and nothing else. Throughput: alpaca JSON lines (10% exact duplicates, 5%
near duplicates with one word changed), each command in its own process so each peak RSS is
its own. Timing is wall clock on whatever machine runs it; the numbers in the README say which.
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

from posttrain.curate.dedup import shingles
from posttrain.curate.stream import conversation_text, iter_rows, parse

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


def planted(path: Path, lang: str, seed: int = 0) -> dict[int, int]:
    """The recall file; returns {line of a one-word copy: line of its original}."""
    rng = random.Random(seed)
    if lang == "en":
        word = lambda: "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 8)))  # noqa: E731
    else:
        word = lambda: "".join(chr(rng.randrange(0x4E00, 0x4E00 + 3000)) for _ in range(2))  # noqa: E731
    sep = " " if lang == "en" else ""
    rows = [{"instruction": sep.join(word() for _ in range(10)), "input": "",
             "output": [word() for _ in range(60)]} for _ in range(500)]
    picks = rng.sample(range(500), 100)
    # case/whitespace variants: equal to their original after normalising (lower case, collapsed spaces)
    variants = [{**rows[i], "output": ["  " + w.upper() if lang == "en" else w for w in rows[i]["output"]] + [" \n"]}
                for i in picks[:50]]
    copies = []
    for i in picks[50:]:
        out = list(rows[i]["output"])
        out[rng.randrange(len(out))] = word()
        copies.append({**rows[i], "output": out})
    lines = rows + variants + copies
    path.write_text("".join(json.dumps({**r, "output": sep.join(r["output"])}, ensure_ascii=False) + "\n"
                            for r in lines), encoding="utf-8")
    return {551 + k: i + 1 for k, i in enumerate(picks[50:])}


def recall(work: Path) -> None:
    """Print one table row per language: what `data dedup --near 0.8` removed of the planted rows."""
    print("| language | exact removed (of 50 variants) | one-word copies: true Jaccard | found at J >= 0.85 "
          "| other rows removed |\n|---|---|---|---|---|")
    for lang in ("en", "zh"):
        data = work / f"planted_{lang}.jsonl"
        pairs = planted(data, lang)
        texts = {int(s.rsplit(" ", 1)[1]): conversation_text(parse(r, s)) for s, r in iter_rows(data)}
        jac = {c: len(shingles(texts[c]) & shingles(texts[o])) / len(shingles(texts[c]) | shingles(texts[o]))
               for c, o in pairs.items()}
        out = work / f"planted_{lang}.dedup.jsonl"
        subprocess.run([sys.executable, "-m", "posttrain.cli", "data", "dedup", str(data), "--out", str(out),
                        "--near", "0.8"], check=True, stdout=subprocess.DEVNULL)
        removed = [json.loads(line) for line in out.with_name(out.stem + ".removed.jsonl").open(encoding="utf-8")]
        near = {int(r["source"].rsplit(" ", 1)[1]) for r in removed if r["reason"] == "near"}
        high = [c for c, j in jac.items() if j >= 0.85]
        print(f"| {lang} | {sum(r['reason'] == 'exact' for r in removed)} | {min(jac.values()):.3f}-"
              f"{max(jac.values()):.3f} | {len(near & set(high))}/{len(high)} | {len(near - set(pairs))} |", flush=True)


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
    ap.add_argument("--recall-only", action="store_true", help="only the planted-duplicate recall table")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recall(work)
    if args.recall_only:
        return
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
