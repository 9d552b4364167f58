"""Measure every fine-tuning method on the same model, data, batch and length.

Each method trains in its own process (so peak RSS is its own) through the real SFT stage for a
fixed number of optimizer steps, and the table reports trainable parameters (LISA: per step),
peak memory (RSS; CUDA peak allocated when a GPU trains), trained tokens/s and the loss after N
steps. Learning rates differ per method (each at a usual value for it); everything else is equal.

    python benchmarks/peft_memory.py --steps 5 --out benchmarks/results/peft_memory_cpu.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# method name -> (config overrides, learning rate)
METHODS = {
    "full": ({"method.type": "full"}, 2e-5),
    "freeze": ({"method.type": "freeze", "freeze.trainable_layers": 2}, 1e-4),
    "lora": ({"method.type": "lora"}, 1e-3),
    "dora": ({"method.type": "lora", "lora.use_dora": True}, 1e-3),
    "qlora": ({"method.type": "qlora"}, 1e-3),
    "lisa": ({"method.type": "lisa", "lisa.layers": 2, "lisa.interval": 2}, 5e-5),
    "prompt": ({"method.type": "prompt", "prompt.num_virtual_tokens": 20,
                "prompt.init_text": "You are a helpful assistant."}, 1e-2),
    "prefix": ({"method.type": "prefix", "prompt.num_virtual_tokens": 20}, 1e-2),
}


def child(method: str, args: argparse.Namespace) -> dict:
    """Train one method in this process and return the run summary."""
    from posttrain.config import load_config
    from posttrain.train import sft

    overrides, lr = METHODS[method]
    tree = {
        "model.name_or_path": args.model, "data.datasets": [{"path": str(ROOT / "examples/data/identity.json")}],
        "data.variables": {"name": "Aria", "author": "the posttrain team"}, "data.max_length": args.length,
        "data.packing": False, "train.max_steps": args.steps, "train.micro_batch_size": args.batch,
        "train.grad_accum": 1, "optim.lr": lr, "optim.scheduler": "constant", "output.tensorboard": False,
        "output.dir": str(Path(args.work) / method), **overrides,
    }
    summary = sft.run(load_config(None, [], **tree))
    return summary | {"lr": lr}


def row(method: str, s: dict) -> str:
    mem = s.get("cuda_peak_allocated_mb")
    mem_txt = f"{s['peak_rss_mb']:.0f}" + (f" / {mem:.0f}" if mem is not None else "")
    return (f"| {method} | {s['trainable_params']:,} | {100 * s['trainable_params'] / s['total_params']:.2f}% | "
            f"{mem_txt} | {s['tokens_per_s']:.0f} | {s['final_train_loss']:.3f} | {s['lr']:g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="")
    parser.add_argument("--work", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="peft-bench-")
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return
    lines = [f"model {args.model}, {args.steps} steps of batch {args.batch} x up to {args.length} tokens "
             f"(identity data, no packing)", "",
             "| method | trainable params | trainable | peak RSS MB (/ CUDA MB) | tokens/s | loss after N | lr |",
             "|---|---|---|---|---|---|---|"]
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method, "--model", args.model, "--steps", str(args.steps),
               "--batch", str(args.batch), "--length", str(args.length), "--work", args.work]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            lines.append(f"| {method} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
        else:
            lines.append(row(method, json.loads(found[-1][7:])))
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
