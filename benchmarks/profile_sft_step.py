"""Where posttrain's SFT-LoRA step spends its time: torch.profiler over a few real steps.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/profile_sft_step.py --steps 2 --micro 2

Same model, data and settings as benchmarks/sft_lora_vs_trl.py (SmolLM2-135M-Instruct fp32,
alpaca slice, packed 512-token rows, LoRA r=8 on every linear). One warm-up step, then `--steps`
profiled optimizer steps; prints the ops with the most self CPU time and a breakdown by phase
(collate, forward, backward, optimizer). Extra `--set key=value` overrides try variants (`fast.fused=false`,
`fast.head_positions=all`: the plain paths, benchmarks/common.py split_fast).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import split_fast  # noqa: E402
from benchmarks.sft_lora_vs_trl import DEFAULT_DATA, FALLBACK_DATA, load_rows  # noqa: E402


def build(rows: list[dict], tmp: str, micro: int, variant: list[str]):
    """(loop, plans) exactly as `posttrain train` builds them for the benchmark's settings."""
    import functools

    from posttrain.train.config import load_config
    from posttrain.data.pipeline import build_sft_data
    from posttrain.models.load import load_base
    from posttrain.models.methods import apply_method
    from posttrain.models.forward import FastPaths, sft_forward
    from posttrain.train.loop import Dist, Loop
    from posttrain.train.steps import DataSteps
    from posttrain.data.batches import sft_batches

    overrides, fast = split_fast(variant)

    path = Path(tmp) / "messages.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["answer"]}]}) + "\n"
                            for r in rows))
    cfg = load_config(None, [
        "model.name_or_path=smollm2-135m-instruct", "model.dtype=float32", "data.max_length=512",
        "data.packing=true", "method.type=lora", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0",
        "optim.scheduler=constant", f"train.micro_batch_size={micro}", "train.grad_accum=1", "train.device=cpu",
        "train.max_steps=100", f"output.dir={tmp}/out", "output.tensorboard=false", *overrides,
    ], **{"data.datasets": [{"path": str(path), "format": "openai"}]})
    import torch

    torch.manual_seed(0)
    model, tokenizer = load_base(cfg.model, torch.device("cpu"))
    data = build_sft_data(cfg.data, cfg.template, tokenizer, cfg.train.seed)
    fast = FastPaths(**fast)
    model = apply_method(model, cfg.methods, fused=fast.fused)
    forward = functools.partial(sft_forward, chunk=cfg.train.loss_chunk, head_positions=fast.head_positions,
                                fused=fast.fused)
    steps = DataSteps(sft_batches(data.train, tokenizer.pad_token_id), forward, train=cfg.train,
                      packing=cfg.data.packing, max_length=cfg.data.max_length, dist_ctx=Dist())
    loop = Loop(cfg, model, steps)
    return loop, steps.plans(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2, help="profiled optimizer steps (after one warm-up step)")
    ap.add_argument("--micro", type=int, default=2, help="packed rows per step")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--top", type=int, default=30, help="ops listed")
    ap.add_argument("--set", action="append", default=[], help="config override, or fast.head_positions=all")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--by-shape", action="store_true", help="also list ops grouped by input shapes")
    ap.add_argument("--faults", action="store_true", help="per-op calls, time and minor page faults, no profiler")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile, record_function

    data = DEFAULT_DATA if DEFAULT_DATA.is_file() else FALLBACK_DATA
    with tempfile.TemporaryDirectory() as tmp:
        loop, plans = build(load_rows(data, 0, args.rows), tmp, args.micro, args.set)
        loop.update(loop.steps.micro_batches(plans[0]))  # warm-up: allocator, lazy inits, AdamW state
        real = loop.steps.data.collate
        forward = loop.steps.loss_fn

        def timed_collate(units):
            with record_function("phase:collate"):
                return real(units)

        def timed_forward(model, batch, normalizer):
            with record_function("phase:forward+loss"):
                loss, metrics = forward(model, batch, normalizer)
            return _BackwardMarked(loss), metrics

        if args.faults:
            count_faults(loop, plans[1:1 + args.steps], args.top)
            return
        loop.steps.data.collate, loop.steps.loss_fn = timed_collate, timed_forward
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
            for plan in plans[1:1 + args.steps]:
                with record_function("phase:step"):
                    loop.update(loop.steps.micro_batches(plan))
        wall = time.perf_counter() - start
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.by_shape:
        shaped = prof.key_averages(group_by_input_shape=True)
        print(shaped.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=30,
                           max_shapes_column_width=70))
    phases = {e.key: e.cpu_time_total / 1e6 for e in table if e.key.startswith("phase:")}
    print(f"wall {wall:.2f} s for {args.steps} steps (profiler overhead included); phases (s): "
          + ", ".join(f"{k[6:]} {v:.2f}" for k, v in sorted(phases.items())))


def count_faults(loop, plans, top: int) -> None:
    """Run the steps under a dispatch mode that times every aten call and counts the minor page faults in it."""
    import resource
    from collections import defaultdict

    from torch.utils._python_dispatch import TorchDispatchMode

    def minflt() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    class Counting(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = defaultdict(lambda: [0, 0.0, 0])  # op -> calls, seconds, minor faults

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            faults, start = minflt(), time.perf_counter()
            out = func(*args, **(kwargs or {}))
            row = self.ops[str(func)]
            row[0], row[1], row[2] = row[0] + 1, row[1] + time.perf_counter() - start, row[2] + minflt() - faults
            return out

    faults, start = minflt(), time.perf_counter()
    with Counting() as mode:
        for plan in plans:
            loop.update(loop.steps.micro_batches(plan))
    wall, faults = time.perf_counter() - start, minflt() - faults
    print(f"{len(plans)} steps: {wall:.2f} s (dispatch overhead included), {faults} minor page faults "
          f"({faults / max(1, len(plans)):.0f} per step)")
    print(f"{'op':56} {'calls':>7} {'s':>8} {'ms/call':>8} {'faults':>8} {'faults/call':>11}")
    for name, (calls, secs, flt) in sorted(mode.ops.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{name[:56]:56} {calls:7d} {secs:8.3f} {1e3 * secs / calls:8.3f} {flt:8d} {flt / calls:11.1f}")


class _BackwardMarked:
    """A loss whose .backward() shows up as its own phase in the profile."""

    def __init__(self, loss):
        self.loss = loss

    def backward(self):
        from torch.profiler import record_function

        with record_function("phase:backward"):
            self.loss.backward()

    def detach(self):
        return self.loss.detach()


if __name__ == "__main__":
    main()
