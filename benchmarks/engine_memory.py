"""Peak memory per process of full fine-tuning under each engine (train.distributed), with gradient
checkpointing on and off: SmolLM2-135M, 2 processes (torchrun, gloo on CPU), packed rows of up to `--length`
tokens, one row per process per step.

Each configuration runs the real SFT stage under torchrun for `--steps` optimizer steps; every process
records its peak RSS (and CUDA peak allocated on a GPU) just before the final weights are gathered for the
output (the gather itself holds a whole copy on rank 0, which is not what sharding is about). Writes
<out>.md and <out>.json and prints the command that reproduces them.

    python benchmarks/engine_memory.py --length 2048 --steps 2 --out benchmarks/results/engine_memory_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/engine_memory.py` from a checkout
    sys.path.insert(0, str(ROOT))

RUNS = {  # name -> overrides
    "ddp": ["train.distributed=ddp"],
    "fsdp": ["train.distributed=fsdp"],
    "zero2": ["train.distributed=deepspeed", "train.deepspeed.zero_stage=2"],
    "zero3": ["train.distributed=deepspeed", "train.deepspeed.zero_stage=3"],
    "ddp + checkpointing": ["train.distributed=ddp", "train.gradient_checkpointing=true"],
    "fsdp + checkpointing": ["train.distributed=fsdp", "train.gradient_checkpointing=true"],
}


def worker(out: Path, overrides: list[str]) -> None:
    """Under torchrun: train, noting this process's peak memory before the output is gathered."""
    import torch  # here: the driver process only launches, and must not count these libraries' memory

    from posttrain.cli import main
    from posttrain.train.engines.base import Engine

    def peak() -> dict:
        rss = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        return rss | ({"cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {})

    if any("deepspeed" in o for o in overrides):
        import posttrain.train.engines.zero  # noqa: F401  (lazily imported by the loop; its class is patched here)
    for cls in {Engine, *Engine.__subclasses__()}:
        real = cls.__dict__.get("plain_model")
        if real is not None:
            def plain_model(self, real=real):
                (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(peak()))
                return real(self)
            cls.plain_model = plain_model
    assert main(["train", *overrides, f"output.dir={out}"]) == 0


def run(name: str, args, config: Path, folder: Path) -> dict:
    out = folder / name.replace(" + ", "_")
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}",
           __file__, "--worker", str(out), str(config), *RUNS[name], f"train.max_steps={args.steps}"]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                   capture_output=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.processes)]
    summary = json.loads((out / "train_summary.json").read_text())
    return {"run": name, "ranks": ranks, "tokens_per_s": summary["tokens_per_s"], "loss": summary["final_train_loss"]}


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(Path(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--only", nargs="*", choices=list(RUNS), help="a subset of the runs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--append", action="store_true",
                        help="keep the other runs already in <out>.json (run the table in parts)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        words = " ".join(f"word{i % 97}" for i in range(args.length // 8))  # ~3 tokens a word: packs ~2 per row
        rows = [{"instruction": f"Repeat {k}.", "input": "", "output": words} for k in range(16)]
        (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = folder / "sft.yaml"
        config.write_text(json.dumps({
            "model": {"name_or_path": args.model}, "method": {"type": "full"},
            "data": {"datasets": [{"path": str(folder / "data.jsonl")}], "max_length": args.length, "packing": True},
            "train": {"micro_batch_size": 1, "grad_accum": 1, "log_every": 1}, "output": {"tensorboard": False}}))
        results = [run(name, args, config, folder) for name in args.only or RUNS]
    command = "python benchmarks/engine_memory.py " + shlex.join(sys.argv[1:])
    for r in results:
        r["command"] = command
    path = args.out.with_suffix(".json")
    if args.append and path.exists():
        new = {r["run"] for r in results}
        kept = [r for r in json.loads(path.read_text())["results"] if r["run"] not in new]
        results = sorted(kept + results, key=lambda r: list(RUNS).index(r["run"]))
    where = cpu()
    lines = [f"| run | peak RSS MB per process | tokens/s | loss after {args.steps} |", "|---|---|---|---|"]
    for r in results:
        rss = " / ".join(f"{x['peak_rss_mb']:.0f}" for x in r["ranks"])
        lines.append(f"| {r['run']} | {rss} | {r['tokens_per_s']:.0f} | {r['loss']:.4f} |")
    commands = sorted({r.get("command", command) for r in results})
    args.out.with_suffix(".md").write_text("\n".join(lines) + f"\n\nCPU: {where}\n\n"
                                           + "\n".join(f"`{c}`" for c in commands) + "\n")
    path.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "cpu": where, "results": results},
                               indent=2))
    print("\n".join(lines))
    print(command)


def cpu() -> str:
    """The CPU model, core count and the vector flags that change the numbers (AVX-512, BF16)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")), "unknown")
    flags = next((x.split(":", 1)[1].split() for x in info.splitlines() if x.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags {' '.join(wanted) or 'none of avx2/avx512'}"


if __name__ == "__main__":
    main()
