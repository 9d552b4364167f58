"""The table of scripts/gpu_check.sh: tokens/s, MFU and peak CUDA memory per run, and a non-zero exit when an
engine's logged losses leave the ddp run's of the same method (bf16: 2% per step) or a run is missing."""

import argparse
import json
import sys
from pathlib import Path

ENGINES = ("ddp", "fsdp", "zero2", "zero3")
PARAMS = 134.5e6  # SmolLM2-135M
# FLOPs per token: forward 2N; backward 2N for input gradients, + 2N weight gradients when every weight trains
# (LoRA: only the adapters', ~0); + 2N for the forward recomputed by gradient checkpointing
FLOPS_PER_TOKEN = {"full": 8 * PARAMS, "lora": 6 * PARAMS}


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--peak-tflops", type=float, required=True)
    args = parser.parse_args()
    bad = 0
    print("| method | engine | tokens/s | MFU | peak CUDA MB / process | max loss diff vs ddp |")
    print("|---|---|---|---|---|---|")
    for method in ("lora", "full"):
        for engine in ENGINES:
            run = args.out / f"{method}-{engine}"
            if not (run / "train_summary.json").exists():
                print(f"| {method} | {engine} | missing | | | |")
                bad += 1
                continue
            s = json.loads((run / "train_summary.json").read_text())
            tps = s["tokens_per_s"]
            mfu = tps * FLOPS_PER_TOKEN[method] / (args.processes * args.peak_tflops * 1e12)
            ref, mine = losses(args.out / f"{method}-ddp"), losses(run)
            diff = max(abs(a - b) / abs(a) for a, b in zip(ref, mine, strict=True))
            bad += diff > 0.02
            print(f"| {method} | {engine} | {tps:.0f} | {mfu:.1%} | {s.get('cuda_peak_allocated_mb', 0):.0f} | "
                  f"{diff:.2%} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
