"""Peak memory per process of full fine-tuning under each engine (train.distributed), with gradient
checkpointing on and off: SmolLM2-135M, 2 processes (torchrun, gloo on CPU), packed rows of up to `--length`
tokens, one row per process per step.

Each configuration runs the real SFT stage under torchrun for `--steps` optimizer steps; every process
records its peak RSS (and CUDA peak allocated on a GPU) just before the final weights are gathered for the
output (the gather itself holds a whole copy on rank 0, which is not what sharding is about). The processes run
with a fixed glibc mmap threshold (MALLOC_ENV below) so that RSS measures live memory. Writes <out>.md and
<out>.json and prints the command that reproduces them.

`--phases` also traces where the peak happens: each engine call (prepare, attach, forward, backward,
clip_and_step) records the process's RSS after it and the high-water mark since the previous record (the
kernel's peak is reset after each record through /proc/self/clear_refs; `prepare`'s covers loading the
model), written as <out>_phases.md.

    python benchmarks/engine_memory.py --length 2048 --steps 3 --phases --out benchmarks/results/engine_memory_cpu
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
    "zero3, live_parameters=1e9": ["train.distributed=deepspeed", "train.deepspeed.zero_stage=3",
                                   "train.deepspeed.live_parameters=1000000000"],
    "ddp + checkpointing": ["train.distributed=ddp", "train.gradient_checkpointing=true"],
    "fsdp + checkpointing": ["train.distributed=fsdp", "train.gradient_checkpointing=true"],
    "zero2 + checkpointing": ["train.distributed=deepspeed", "train.deepspeed.zero_stage=2",
                              "train.gradient_checkpointing=true"],
    "zero3 + checkpointing": ["train.distributed=deepspeed", "train.deepspeed.zero_stage=3",
                              "train.gradient_checkpointing=true"],
}
# glibc's malloc raises its mmap threshold as large blocks are freed (up to 32 MB), after which freed tensors stay
# in the heap and RSS holds memory no tensor uses (0.7-1.1 GB per process here, varying by run). A fixed threshold
# returns every block over 128 KB on free, so RSS follows the live tensors. --glibc-default measures without it.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


PHASES = ("prepare", "attach", "forward", "backward", "clip_and_step")


def status_mb() -> dict:
    """This process's RSS now and its high-water mark since the last reset, in MB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "hwm_mb": int(fields["VmHWM"].split()[0]) / 1024}


def trace_phases(cls, out: Path) -> list[dict]:
    """Wrap the engine's calls to record (phase, RSS after, peak since the previous record) into
    out/phases<rank>.jsonl; returns the records, which grow as the run goes."""
    log = out / f"phases{os.environ['RANK']}.jsonl"
    records: list[dict] = []

    def record(phase: str) -> None:
        records.append({"phase": phase} | status_mb())
        with log.open("a") as f:
            f.write(json.dumps(records[-1]) + "\n")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM and ru_maxrss alike

    record("start")
    for name in PHASES:
        real = getattr(cls, name)

        def traced(self, *args, real=real, name=name):
            result = real(self, *args)
            record(name)
            return result
        setattr(cls, name, traced)
    return records


def worker(out: Path, overrides: list[str]) -> None:
    """Under torchrun: train, noting this process's peak memory before the output is gathered."""
    import torch  # here: the driver process only launches, and must not count these libraries' memory

    from posttrain.cli import main
    from posttrain.train.engines.base import Engine

    phases = overrides[0] == "--phases"
    overrides = overrides[phases:]
    records: list[dict] = []

    def peak() -> dict:
        now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rss = {"peak_rss_mb": max([now] + [r["hwm_mb"] for r in records])}
        return rss | ({"cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {})

    if any("deepspeed" in o for o in overrides):
        import posttrain.train.engines.zero  # noqa: F401  (lazily imported by the loop; its class is patched here)
    if phases:
        chosen = next(o.split("=", 1)[1] for o in [*overrides, "train.distributed=none"]
                      if o.startswith("train.distributed="))
        engine = next(c for c in {Engine, *Engine.__subclasses__()} if c.name == chosen)
        records = trace_phases(engine, out)
    for cls in {Engine, *Engine.__subclasses__()}:
        real = cls.__dict__.get("plain_model")
        if real is not None:
            def plain_model(self, real=real):
                (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(peak()))
                return real(self)
            cls.plain_model = plain_model
    assert main(["train", *overrides, f"output.dir={out}"]) == 0


def run(name: str, args, config: Path, folder: Path) -> dict:
    out = folder / name.replace(" + ", "_").replace(", ", "_").replace("=", "")
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}",
           __file__, "--worker", str(out), *["--phases"] * args.phases, str(config), *RUNS[name],
           f"train.max_steps={args.steps}"]
    malloc = {} if args.glibc_default else MALLOC_ENV
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **malloc},
                   capture_output=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.processes)]
    if args.phases:
        for r, rank in enumerate(ranks):
            rank["phases"] = [json.loads(x) for x in (out / f"phases{r}.jsonl").read_text().splitlines()]
    summary = json.loads((out / "train_summary.json").read_text())
    return {"run": name, "ranks": ranks, "tokens_per_s": summary["tokens_per_s"], "loss": summary["final_train_loss"]}


def phase_table(results: list[dict]) -> str:
    """Per run: each engine call's RSS after it and the peak since the previous record, per rank, in MB."""
    parts = []
    for r in results:
        ranks = [x["phases"] for x in r["ranks"] if "phases" in x]
        if not ranks:
            continue
        head = " | ".join(f"rank {i} RSS after | rank {i} peak since previous" for i in range(len(ranks)))
        lines = [f"**{r['run']}**", "", f"| phase | {head} |", "|---" * (1 + 2 * len(ranks)) + "|"]
        for row in zip(*ranks):
            cells = " | ".join(f"{x['rss_mb']:.0f} | {x['hwm_mb']:.0f}" for x in row)
            lines.append(f"| {row[0]['phase']} | {cells} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


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
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc's dynamic mmap threshold on (RSS then includes freed, unreturned memory)")
    parser.add_argument("--phases", action="store_true", help="also trace memory per engine call (<out>_phases.md)")
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
    if args.phases:
        args.out.with_name(args.out.name + "_phases.md").write_text(
            phase_table(results) + f"\n\nCPU: {where}\n\n`{command}`\n")
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
