"""Measure every fine-tuning method on the same model, data, batch and length.

Each method trains in its own process (so peak RSS is its own) through the real SFT stage for a
fixed number of optimizer steps, and the table reports trainable parameters (LISA: per step),
peak memory (RSS; CUDA peak allocated when a GPU trains), trained tokens/s and the loss after N
steps. Each method runs at its default learning rate (config.METHOD_LR, the one place it is
set); everything else is equal. Writes <out>.md (the table) and <out>.json (every summary,
machine and versions), and prints the command that reproduces them.

    python benchmarks/peft_memory.py --steps 5 --out benchmarks/results/peft_memory_cpu
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/peft_memory.py` from a checkout
    sys.path.insert(0, str(ROOT))

# method name -> config overrides (the lr is the method's default, config.METHOD_LR)
METHODS = {
    "full": {"method.type": "full"},
    "freeze": {"method.type": "freeze", "freeze.trainable_layers": 2},
    "lora": {"method.type": "lora"},
    "dora": {"method.type": "lora", "lora.use_dora": True},
    "qlora": {"method.type": "qlora"},
    "lisa": {"method.type": "lisa", "lisa.layers": 2, "lisa.interval": 2},
    "prompt": {"method.type": "prompt", "prompt.num_virtual_tokens": 20,
               "prompt.init_text": "You are a helpful assistant."},
    "prefix": {"method.type": "prefix", "prompt.num_virtual_tokens": 20},
}
HEADERS = ["method", "trainable params", "trainable", "peak RSS MB (/ CUDA MB)", "tokens/s", "loss after N", "lr"]


def child(method: str, args: argparse.Namespace) -> dict:
    """Train one method in this process and return the run summary (with the lr it ran at)."""
    from posttrain.train.config import load_config
    from posttrain.train import sft

    tree = {
        "model.name_or_path": args.model, "data.datasets": [{"path": str(ROOT / "examples/data/identity.json")}],
        "data.variables": {"name": "Aria", "author": "the posttrain team"}, "data.max_length": args.length,
        "data.packing": False, "train.max_steps": args.steps, "train.micro_batch_size": args.batch,
        "train.grad_accum": 1, "optim.scheduler": "constant", "output.tensorboard": False,
        "output.dir": str(Path(args.work) / method), **METHODS[method],
    }
    cfg = load_config(None, [], **tree)
    return sft.run(cfg) | {"lr": cfg.optim.lr}


def row(method: str, s: dict) -> list[str]:
    mem = s.get("cuda_peak_allocated_mb")
    mem_txt = f"{s['peak_rss_mb']:.0f}" + (f" / {mem:.0f}" if mem is not None else "")
    return [method, f"{s['trainable_params']:,}", f"{100 * s['trainable_params'] / s['total_params']:.2f}%",
            mem_txt, f"{s['tokens_per_s']:.0f}", f"{s['final_train_loss']:.3f}", f"{s['lr']:g}"]


def run_method(method: str, args: argparse.Namespace) -> dict:
    """One method in a fresh process; its summary, or {"error": last stderr line}."""
    cmd = [sys.executable, __file__, "--child", method, "--model", args.model, "--steps", str(args.steps),
           "--batch", str(args.batch), "--length", str(args.length), "--work", args.work]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(found[-1][len("RESULT "):])


def reproduce_command(args: argparse.Namespace) -> str:
    parts = ["python", "benchmarks/peft_memory.py", "--model", args.model, "--steps", str(args.steps),
             "--batch", str(args.batch), "--length", str(args.length), "--methods", args.methods]
    return " ".join(shlex.quote(p) for p in parts + (["--out", args.out] if args.out else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="", help="path stem: writes <out>.md and <out>.json")
    parser.add_argument("--work", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="peft-bench-")
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return
    from benchmarks.common import machine, markdown_table, versions

    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    results, rows = {}, []
    for method in args.methods.split(","):
        results[method] = run_method(method, args)
        err = results[method].get("error")
        rows.append([method, f"failed: {err}"] + [""] * (len(HEADERS) - 2) if err else row(method, results[method]))
        print("| " + " | ".join(rows[-1]) + " |", flush=True)
    command = reproduce_command(args)
    text = (f"model {args.model}, {args.steps} steps of batch {args.batch} x up to {args.length} tokens "
            f"(identity data, no packing), each method at its default lr\n\n"
            f"{markdown_table(HEADERS, rows)}\n\nreproduce: `{command}`\n")
    print("\n" + text)
    if args.out:
        out = Path(args.out).with_suffix("") if args.out.endswith((".md", ".json")) else Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text, encoding="utf-8")
        record = {"command": command, "machine": machine(),
                  "versions": versions("torch", "transformers", "peft", "bitsandbytes", "posttrain"),
                  "args": {k: getattr(args, k) for k in ("model", "steps", "batch", "length", "methods")},
                  "results": results}
        out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
