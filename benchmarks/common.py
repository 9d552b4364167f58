"""Shared benchmark machinery: per-run subprocesses, the matmul peak, FLOP counting, tables.

Every measured run is a fresh `python <script> --worker SIDE` process, so imports, peak RSS and
allocator state never leak between sides. A benchmark script supplies its own worker functions
(one per side) and reuses the rest; the DPO benchmark plugs in the same way.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ASSETS = ROOT.parent / "shared" / "assets"  # third-party data beside the checkout (README: ../shared/assets)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# `trl-kept-memory`: TRL in a process whose glibc malloc keeps freed memory as posttrain's does by default
# (train.keep_freed_memory, posttrain/models/host_memory.py), set through glibc's environment tunables.
KEPT_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}
# `posttrain-mkl`: posttrain with its linear products on torch's default MKL path (models/onednn_linear.py)
# `posttrain-hf-step`: posttrain decoding every step through HF's forward, not models/decode_step.py
SIDE_ENV = {"trl-kept-memory": KEPT_MEMORY_ENV, "posttrain-mkl": {"POSTTRAIN_ONEDNN": "0"},
            "posttrain-hf-step": {"POSTTRAIN_DECODE_STEP": "0"}}
TRL_SIDES = ("trl", "trl-kept-memory")


def run_worker(script: Path, side: str, spec: dict, timeout: float = 1800) -> dict:
    """Run `script --worker side` on `spec` in its own process; returns the JSON it writes."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "tmp": tmp}))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), "--worker", side, "--spec", str(spec_path),
                               "--out", str(out_path)], capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT, env=os.environ | SIDE_ENV.get(side, {}))
        if proc.returncode != 0:
            raise RuntimeError(f"{side} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(out_path.read_text())
        result["process_wall_s"] = round(time.perf_counter() - start, 2)  # imports + load + train + save
        return result


_PEAK = """
import sys, time, torch
n, repeats = int(sys.argv[1]), int(sys.argv[2])
a, b = torch.randn(n, n), torch.randn(n, n)
a @ b  # warm up
best = 0.0
for _ in range(repeats):
    start = time.perf_counter()
    a @ b
    best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
print(best)
"""


def matmul_peak_gflops(n: int = 2048, repeats: int = 8) -> float:
    """Best observed fp32 GFLOP/s of an n^3 matmul with torch's default threads (the practical peak), measured in
    a child process: one large GEMM in the measuring process made the serving load that followed it ~20% slower
    (2026-12-03: 34.7-35.4 s against 28.8-29.5 s without, benchmarks/README.md)."""
    out = subprocess.run([sys.executable, "-c", _PEAK, str(n), str(repeats)], capture_output=True, text=True,
                         check=True).stdout
    return float(out.split()[-1])


def llama_flops(config: dict, *, real_tokens: int, head_tokens: int, sum_sq_len: float,
                lora_r: int = 0) -> dict:
    """Training FLOPs (forward + backward) of a Llama-style decoder, LoRA-aware.

    Frozen linear weights cost 2*in*out per token forward and the same again backward for the
    input gradient, but no weight gradient; a trainable matrix adds a third 2*in*out (full FT).
    LoRA (rank r, on every linear but the head) adds 2*r*(in+out) three times (fwd, dX, dW).
    Causal attention: QK^T and AV cost 4*d_attn per (query, key) pair, sum over samples of L^2/2
    pairs per layer; backward twice forward. The (tied, frozen) head costs 2*H*V forward and
    2*H*V for its input gradient at each of `head_tokens` positions: model FLOPs count it only
    where a loss is taken (the necessary work), whatever a tool actually computes.
    """
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = [(h, q_out), (h, kv_out), (h, kv_out), (q_out, h), (h, inter), (h, inter), (inter, h)]
    linear = layers * sum(i * o for i, o in shapes)
    lora = layers * sum(lora_r * (i + o) for i, o in shapes)
    per_token = 4 * linear + 6 * lora  # frozen: fwd + dX; LoRA: fwd + dX + dW
    attention = 3 * layers * 4 * q_out * sum_sq_len / 2  # fwd + 2x bwd
    head = 4 * h * config["vocab_size"] * head_tokens
    total = per_token * real_tokens + attention + head
    return {"linear_params": linear, "lora_params": lora, "total_flops": total,
            "flops_per_token": total / max(real_tokens, 1)}


def llama_forward_flops(config: dict, *, real_tokens: int, head_tokens: int, sum_sq_len: float) -> float:
    """Forward-only FLOPs of the frozen model (a DPO reference pass): linears, causal attention, head."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    linear = layers * sum(i * o for i, o in [(h, q_out), (h, kv_out), (h, kv_out), (q_out, h), (h, inter),
                                              (h, inter), (inter, h)])
    attention = layers * 4 * q_out * sum_sq_len / 2
    return 2 * linear * real_tokens + attention + 2 * h * config["vocab_size"] * head_tokens


def sample_lengths(position_ids, real_mask):
    """(S,) length of every sample in a (B, T) batch whose position ids restart at 0 per packed sample."""
    import torch

    next_starts = torch.ones_like(real_mask)  # (B, T) the next token starts a new sample or is padding
    next_starts[:, :-1] = ~real_mask[:, 1:] | (position_ids[:, 1:] == 0)
    return position_ids[real_mask & next_starts] + 1


def chat_length(tokenizer, messages: list[dict]) -> int:
    """Tokens of a conversation rendered by the model's own chat template (what both tools train on)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"date": date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(), "torch_threads":
            torch.get_num_threads(), "python": platform.python_version(), "platform": platform.platform()}


def versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def finish_vs_trl(name: str, runs: dict, spec: dict, order: list[str], before: float, summarise, render) -> None:
    """Medians, ratios posttrain/TRL (and posttrain/ablations), machine and versions -> results/<name>.json + .md."""
    after = matmul_peak_gflops()
    medians = summarise(runs)
    pt, trl = medians["posttrain"], medians["trl"]
    ratios = {"tokens/s posttrain/TRL": pt["tokens_per_s"] / trl["tokens_per_s"],
              "supervised tokens/s posttrain/TRL": pt["loss_tokens_per_s"] / trl["loss_tokens_per_s"],
              "peak RSS posttrain/TRL": pt["peak_rss_mb"] / trl["peak_rss_mb"]}
    for variant in medians:
        if variant.startswith("posttrain-") or variant in TRL_SIDES[1:]:
            ratios[f"tokens/s posttrain/{variant}"] = pt["tokens_per_s"] / medians[variant]["tokens_per_s"]
    result = {"machine": machine(), "versions": versions("torch", "transformers", "peft", "trl", "posttrain"),
              "spec": {k: v for k, v in spec.items() if k != "pairs"}, "order": order,
              "matmul_gflops_before": before, "matmul_gflops_after": after, "matmul_peak_gflops": max(before, after),
              "runs": runs, "medians": medians, "ratios": ratios}
    write_results(name, result, render)


def lora_job_overrides(stage: str, spec: dict) -> list[str]:
    """posttrain config keys of a LoRA timing job that both stage benchmarks hold equal with TRL: the model
    (fp32 weights, SDPA), max length, no validation split, LoRA r / alpha without dropout, the precision."""
    return [f"stage={stage}", f"model.name_or_path={spec['model_dir']}", "model.dtype=float32",
            "model.attn_implementation=sdpa", f"data.max_length={spec['max_length']}", "data.val_size=0",
            "method.type=lora", f"lora.r={spec['lora_r']}", f"lora.alpha={spec['lora_alpha']}", "lora.dropout=0.0",
            f"train.precision={spec.get('precision', 'fp32')}"]


def trl_side_model(spec: dict):
    """(tokenizer, fp32 SDPA model) of the folder posttrain resolved, after seeding torch: TRL's side."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    return tokenizer, AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                           attn_implementation="sdpa")


def trl_step_timer(counts: dict):
    """A transformers callback that appends each optimizer step's seconds to counts['step_times']
    and each logged loss to counts['losses'] (TRL's side of the step timers)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            counts["step_times"].append(time.perf_counter() - self.start)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                counts["losses"].append(logs["loss"])

    return Timer()


def run_alternating(script: Path, spec: dict, args) -> tuple[list[str], float, dict]:
    """posttrain, TRL (, TRL with kept memory), posttrain, TRL ... then the ablations, each in its own process
    -> (order, peak, runs)."""
    sides = ["posttrain", "trl"] + (["trl-kept-memory"] if args.trl_kept_memory else [])
    order = sides * args.repeats + [a for a in args.ablations.split(",") if a]
    before = matmul_peak_gflops()
    runs: dict[str, list[dict]] = {}
    for side in order:
        result = run_worker(script, side, spec)
        runs.setdefault(side, []).append(result)
        first = f"first/final loss {result['first_loss']}/" if "first_loss" in result else "final loss "
        print(f"{side}: {result['tokens_per_s']:.1f} tok/s, {result['loss_tokens_per_s']:.1f} supervised tok/s, "
              f"rss {result['peak_rss_mb']:.0f} MB, {first}{result['final_loss']}", flush=True)
    return order, before, runs


def split_fast(overrides: list[str]) -> tuple[list[str], dict]:
    """A variant's overrides -> (config overrides, FastPaths keyword arguments). `fast.fused=false` and
    `fast.head_positions=all` switch a fast path off: not config keys, a stage's run(cfg, fast=FastPaths(...))
    (posttrain/models/forward.py)."""
    config, fast = [], {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.startswith("fast."):
            fast[key.removeprefix("fast.")] = value.lower() == "true" if value.lower() in ("true", "false") else value
        else:
            config.append(item)
    return config, fast


def check_ablations(ap, ablations: str, variants) -> None:
    """Unknown --ablations names end the command at once, not after every main run has finished."""
    unknown = [a for a in ablations.split(",") if a and a not in variants and a not in TRL_SIDES[1:]]
    if unknown:
        ap.error(f"unknown --ablations {', '.join(unknown)}; choose from {', '.join(v for v in variants)}")


def vs_trl_parser(doc: str, data: str, data_help: str, micro_help: str, ablations: str, name: str):
    """The arguments every posttrain-vs-TRL benchmark takes (each script adds its own)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    for hidden in ("--worker", "--spec", "--out"):  # the worker process's side of run_worker
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=data, help=f"{data_help} (default: %(default)s)")
    ap.add_argument("--start", type=int, default=0, help="first row of the slice")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    ap.add_argument("--micro", type=int, default=2, help=micro_help)
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per main side")
    ap.add_argument("--ablations", default=ablations,
                    help="comma-separated posttrain variants run once each after the main runs")
    ap.add_argument("--name", default=name, help="results file stem")
    ap.add_argument("--trl-kept-memory", action="store_true",
                    help="a third alternating side: TRL with glibc malloc keeping freed memory, as posttrain does")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="both sides: fp32, or bf16 autocast with fp32 master weights (train.precision / bf16=True)")
    return ap


def write_results(name: str, result: dict, render) -> None:
    """RESULTS/NAME.json (the figures) and RESULTS/NAME.md (render(result)), and print the rendering."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{name}.md").write_text(render(result))
    print(render(result))
