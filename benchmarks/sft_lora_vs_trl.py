"""SFT with LoRA on SmolLM2-135M-Instruct: posttrain vs TRL's SFTTrainer, fp32 (or bf16 autocast) on CPU.

    python benchmarks/sft_lora_vs_trl.py                 # 3 alternating runs per side + ablations
    python benchmarks/sft_lora_vs_trl.py --repeats 1 --steps 2 --ablations ""   # a quick look
    python benchmarks/sft_lora_vs_trl.py --precision bf16  # both sides: bf16 autocast, fp32 master weights

Both sides get the same rows (a fixed slice of an alpaca-style file, rendered with the model's
own chat template, loss on the answer only), max length 512, packed rows, the same effective
batch (micro x accumulation rows), LoRA r=8 / alpha=16 on every linear but the head, AdamW at a
constant lr, the same number of optimizer steps. Each run is its own process; sides alternate
(A B A B ...) and medians are reported. Ablations switch posttrain's optimisations off one at a
time (head at every position; padding instead of packing) for before/after figures.
Writes benchmarks/results/sft_lora_vs_trl.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    TRL_SIDES,
    check_ablations,
    split_fast,
    vs_trl_parser,
    run_alternating,
    trl_step_timer,
    finish_vs_trl,
    ASSETS, ROOT, llama_flops, markdown_table, median_of, peak_rss_mb,
    sample_lengths)
from benchmarks.mc_eval_speed import cpu_flags  # noqa: E402

DEFAULT_DATA = ASSETS / "data" / "llamafactory" / "alpaca_en_demo.json"
FALLBACK_DATA = ROOT / "examples" / "data" / "general.jsonl"
MODEL_DIR = Path("~/.cache/posttrain/smollm2-135m-instruct").expanduser()

# posttrain variants: config overrides on top of the shared settings; fast.* switch a fast path off (split_fast)
POSTTRAIN_VARIANTS = {
    "posttrain": [],
    "posttrain-full-head": ["fast.head_positions=all"],  # before: logits at every position
    "posttrain-no-packing": ["data.packing=false"],  # before: one padded sample per row
    "posttrain-unfused": ["fast.fused=false"],  # before: PEFT LoRA forward, masked attention, autograd head
    "posttrain-glibc-default": ["train.keep_freed_memory=false"],  # before: glibc returns freed memory, re-faults it
    "posttrain-mkl": [],  # before: the products on torch's MKL path (POSTTRAIN_ONEDNN=0, common.SIDE_ENV)
}


# ---------------------------------------------------------------- data


def load_rows(path: Path, start: int, count: int) -> list[dict]:
    """A fixed slice as (prompt, answer) pairs; reads alpaca json/jsonl or openai/sharegpt-free files."""
    from posttrain.data.reading import read_rows

    rows = list(read_rows(str(path)))[start:start + count]
    pairs = []
    for row in rows:
        if "instruction" in row:
            prompt = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
            pairs.append({"prompt": prompt, "answer": row["output"]})
        elif "messages" in row:
            msgs = [m for m in row["messages"] if m["role"] in ("user", "assistant")]
            pairs.append({"prompt": msgs[0]["content"], "answer": msgs[1]["content"]})
    return pairs


def keep_fitting(pairs: list[dict], max_length: int) -> tuple[list[dict], int]:
    """The pairs whose rendered conversation fits max_length (posttrain would drop the others, TRL truncate
    them, so the tools would train on different data); (kept, skipped)."""
    from transformers import AutoTokenizer

    from benchmarks.common import chat_length

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    kept = [p for p in pairs if chat_length(tokenizer, [{"role": "user", "content": p["prompt"]},
                                                        {"role": "assistant", "content": p["answer"]}]) <= max_length]
    return kept, len(pairs) - len(kept)


# ---------------------------------------------------------------- workers (one process each)


def worker_posttrain(spec: dict, variant: list[str]) -> dict:

    import posttrain.train.sft as sft_mod
    from posttrain.train.config import load_config
    from posttrain.models.forward import FastPaths
    from posttrain.train.loop import Loop

    overrides, fast = split_fast(variant)

    data_path = Path(spec["tmp"]) / "messages.jsonl"
    with open(data_path, "w", encoding="utf-8") as f:
        for p in spec["pairs"]:
            f.write(json.dumps({"messages": [{"role": "user", "content": p["prompt"]},
                                             {"role": "assistant", "content": p["answer"]}]}) + "\n")
    cfg = load_config(None, [
        "model.name_or_path=smollm2-135m-instruct", "model.dtype=float32", "model.attn_implementation=sdpa",
        f"data.max_length={spec['max_length']}", "data.packing=true", "method.type=lora",
        f"lora.r={spec['lora_r']}", f"lora.alpha={spec['lora_alpha']}", "lora.dropout=0.0",
        f"optim.lr={spec['lr']}", "optim.scheduler=constant", "optim.max_grad_norm=1.0",
        f"train.micro_batch_size={spec['micro']}", f"train.grad_accum={spec['accum']}",
        f"train.max_steps={spec['steps']}", "train.device=cpu", f"train.seed={spec['seed']}",
        "output.tensorboard=false", f"output.dir={spec['tmp']}/out", f"train.precision={spec['precision']}",
        *overrides,
    ], **{"data.datasets": [{"path": str(data_path), "format": "openai"}]})

    counts = {"real": 0, "padded": 0, "loss": 0, "sum_sq_len": 0.0, "step_times": []}
    real_forward = sft_mod.sft_forward

    def counting_forward(model, batch, normalizer, **kw):
        counts["padded"] += batch["input_ids"].numel()
        counts["real"] += int(batch["real_mask"].sum())
        counts["loss"] += int((batch["weights"][:, 1:] != 0).sum())
        lengths = sample_lengths(batch["position_ids"], batch["real_mask"]).double()
        counts["sum_sq_len"] += float((lengths ** 2).sum())
        return real_forward(model, batch, normalizer, **kw)

    real_step = Loop.update

    def timed_step(self, micro_batches):
        start = time.perf_counter()
        out = real_step(self, micro_batches)
        counts["step_times"].append(time.perf_counter() - start)
        counts.setdefault("losses", []).append(out["loss"])
        return out

    sft_mod.sft_forward = counting_forward
    Loop.update = timed_step
    sft_mod.run(cfg, FastPaths(**fast))
    return finish(counts, head_tokens=counts["loss"] if fast.get("head_positions") != "all" else counts["real"])


def worker_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                               "completion": [{"role": "assistant", "content": p["answer"]}]}
                              for p in spec["pairs"]])
    args = SFTConfig(
        output_dir=f"{spec['tmp']}/out", max_steps=spec["steps"], per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["accum"], learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=spec["precision"] == "bf16", fp16=False,
        gradient_checkpointing=False, use_cpu=True, max_length=spec["max_length"],
        packing=spec["trl_packing"], padding_free=spec["trl_packing"], completion_only_loss=True,
        logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"], dataloader_num_workers=0,
        disable_tqdm=True)
    peft_cfg = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
    counts = {"real": 0, "padded": 0, "loss": 0, "sum_sq_len": 0.0, "step_times": [], "losses": []}

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs["labels"]
            counts["padded"] += labels.numel()
            counts["loss"] += int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
            if "position_ids" in inputs:  # padding-free: one flat row, samples restart at position 0
                pos = inputs["position_ids"][0]
                starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
                lengths = [b - a for a, b in zip(starts, starts[1:])]
            else:
                lengths = inputs["attention_mask"].sum(1).tolist()
            counts["real"] += sum(lengths)
            counts["sum_sq_len"] += sum(n * n for n in lengths)
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = CountingTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                              peft_config=peft_cfg)

    trainer.add_callback(trl_step_timer(counts))
    trainer.train()
    return finish(counts, head_tokens=counts["loss"])


def finish(counts: dict, head_tokens: int) -> dict:
    config = json.loads((MODEL_DIR / "config.json").read_text())
    train_s = sum(counts["step_times"])
    flops = llama_flops(config, real_tokens=counts["real"], head_tokens=head_tokens,
                        sum_sq_len=counts["sum_sq_len"], lora_r=SPEC["lora_r"])
    return {"train_s": round(train_s, 2), "steps": len(counts["step_times"]), "tokens": counts["real"],
            "loss_tokens": counts["loss"], "computed_tokens": counts["padded"],
            "padding_fraction": round(1 - counts["real"] / max(counts["padded"], 1), 4),
            "tokens_per_s": counts["real"] / train_s, "loss_tokens_per_s": counts["loss"] / train_s,
            "final_loss": counts["losses"][-1] if counts["losses"] else None,
            "mean_loss": sum(counts["losses"]) / len(counts["losses"]) if counts["losses"] else None,
            "model_flops": flops["total_flops"], "model_gflops_per_s": flops["total_flops"] / train_s / 1e9,
            "peak_rss_mb": round(peak_rss_mb(), 1)}


SPEC: dict = {}


# ---------------------------------------------------------------- driver


def summarise(runs: dict[str, list[dict]]) -> dict:
    keys = ["tokens_per_s", "loss_tokens_per_s", "train_s", "process_wall_s", "peak_rss_mb", "final_loss",
            "mean_loss", "padding_fraction", "model_gflops_per_s", "tokens", "loss_tokens"]
    return {side: {k: median_of(rs, k) for k in keys} for side, rs in runs.items()}


def render_markdown(result: dict) -> str:
    med, peak = result["medians"], result["matmul_peak_gflops"]
    headers = ["side", "runs", "tokens/s", "supervised tok/s", "train s", "process s", "peak RSS MB",
               "final loss", "mean loss", "padding", "model GFLOP/s", "MFU"]
    rows = [[side, len(result["runs"][side]), m["tokens_per_s"], m["loss_tokens_per_s"], m["train_s"],
             m["process_wall_s"], m["peak_rss_mb"], m["final_loss"], m["mean_loss"],
             f"{100 * m['padding_fraction']:.1f}%", m["model_gflops_per_s"],
             f"{100 * m['model_gflops_per_s'] / peak:.1f}%"] for side, m in med.items()]
    ratio_rows = [[k, f"{v:.2f}x"] for k, v in result["ratios"].items()]
    s = result["spec"]
    return "\n\n".join([
        f"# SFT-LoRA: posttrain vs TRL SFTTrainer ({result['machine']['date']})",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch threads "
        f"{result['machine']['torch_threads']}, CPU flags {s.get('cpu_flags', 'not recorded')}. "
        f"Versions: {result['versions']}.",
        f"Data: {s['data']} rows {s['start']}..{s['start'] + s['rows']} ({s.get('skipped', 0)} longer than "
        f"max length skipped); model SmolLM2-135M-Instruct, {s.get('precision', 'fp32')} "
        f"({'bf16 autocast, fp32 master weights' if s.get('precision') == 'bf16' else 'weights and compute'}); "
        f"max length {s['max_length']}; LoRA r={s['lora_r']} alpha={s['lora_alpha']} all-linear; "
        f"{s['steps']} optimizer steps of {s['micro']}x{s['accum']} packed rows; order {result['order']}.",
        f"fp32 matmul peak (2048^3, best of 8, measured before and after the runs): {peak:.1f} GFLOP/s "
        f"(before {result['matmul_gflops_before']:.1f}, after {result['matmul_gflops_after']:.1f}).",
        "Medians per side:", markdown_table(headers, rows), "Ratios (medians):",
        markdown_table(["ratio", "value"], ratio_rows),
        "Model FLOPs count the necessary work (decoder on real tokens, LM head where a loss is taken, "
        "no weight gradient for frozen weights), identical for both tools; MFU = model FLOP/s / matmul peak.",
    ]) + "\n"


def main() -> None:
    ap = vs_trl_parser(__doc__, str(DEFAULT_DATA), "alpaca-style json/jsonl", "packed rows per forward pass",
                       "posttrain-full-head,posttrain-no-packing,posttrain-unfused", "sft_lora_vs_trl")
    ap.add_argument("--rows", type=int, default=200, help="rows in the slice")
    ap.add_argument("--no-trl-packing", action="store_true", help="TRL without packing/padding-free")
    args = ap.parse_args()

    if args.worker:
        SPEC.update(json.loads(Path(args.spec).read_text()))
        if args.worker in TRL_SIDES:
            result = worker_trl(SPEC)
        else:
            result = worker_posttrain(SPEC, POSTTRAIN_VARIANTS[args.worker])
        Path(args.out).write_text(json.dumps(result))
        return
    check_ablations(ap, args.ablations, POSTTRAIN_VARIANTS)

    data = Path(args.data)
    if not data.is_file():
        print(f"{data} not found; using {FALLBACK_DATA}", file=sys.stderr)
        data = FALLBACK_DATA
    pairs, skipped = keep_fitting(load_rows(data, args.start, args.rows), 512)
    spec = {"data": str(data), "start": args.start, "rows": args.rows, "skipped": skipped, "pairs": pairs,
            "max_length": 512, "lora_r": 8, "lora_alpha": 16, "lr": 2e-4, "steps": args.steps, "micro": args.micro,
            "accum": args.accum, "seed": 42, "trl_packing": not args.no_trl_packing,
            "precision": args.precision, "cpu_flags": cpu_flags()}
    script = Path(__file__).resolve()
    order, before, runs = run_alternating(script, spec, args)
    finish_vs_trl(args.name, runs, spec, order, before, summarise, render_markdown)


if __name__ == "__main__":
    main()
