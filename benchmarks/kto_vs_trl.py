"""KTO with LoRA on SmolLM2-135M-Instruct: posttrain vs TRL's KTOTrainer, fp32 on CPU.

    python benchmarks/kto_vs_trl.py --repeats 3 --steps 4           # 3 alternating runs per side
    python benchmarks/kto_vs_trl.py --model tiny-random --repeats 1 --steps 1 --name kto_smoke   # a smoke run

The job of examples/kto_lora.yaml on both sides: rows of LLaMA-Factory's kto_en_demo.json (`messages` whose
final assistant reply is labelled desirable or not), max length 384, micro-batches of 4 samples x 2
accumulated (8 per update), beta 0.1, desirable / undesirable weights 1, the reference = the base with
the adapter off (both tools run it every step), each sample's KL reference point from a mismatched
sequence (its prompt with another sample's reply), LoRA r=16 alpha=32 on every linear but the head,
AdamW lr 5e-4 constant, clip 1.0, the same number of optimizer steps. The rows: taken in file order,
kept while the longest prompt + the longest reply among those kept fit max length under the model's
chat template, so neither tool truncates or drops a sample or a mismatched sequence whatever the
pairing; steps x 8 rows, one epoch (each tool sees every row once, in its own order; the two tools
pair the mismatched sequences differently: posttrain a seeded cycle over the data, TRL a cycle within
each micro-batch). Each run is its own process; sides alternate (A B A B ...); medians.
Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    ASSETS, TRL_SIDES, check_ablations, chat_length, finish_vs_trl, lora_job_overrides, markdown_table, median_of,
    peak_rss_mb, run_alternating, trl_side_model, trl_step_timer, vs_trl_parser)
from benchmarks.mc_eval_speed import cpu_flags  # noqa: E402

DEFAULT_DATA = ASSETS / "data" / "llamafactory" / "kto_en_demo.json"
# posttrain-mkl: the products on torch's MKL path (POSTTRAIN_ONEDNN=0, common.SIDE_ENV); stage kto takes no
# fast-path switch
POSTTRAIN_VARIANTS = {"posttrain": [], "posttrain-mkl": []}


# ---------------------------------------------------------------- data


def select_rows(path: Path, model_dir: str, start: int, count: int, max_length: int) -> tuple[list[dict], int]:
    """The first `count` rows from `start` such that the longest prompt + the longest reply among them fit in
    max_length (rendered by the model's chat template); (rows, rows passed over)."""
    from transformers import AutoTokenizer

    from posttrain.data.reading import read_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kept, passed, longest_prompt, longest_reply = [], 0, 0, 0
    for row in list(read_rows(str(path)))[start:]:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        prompt = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        reply = chat_length(tokenizer, messages) - prompt
        if max(longest_prompt, prompt) + max(longest_reply, reply) <= max_length - 4:  # 4: template-boundary slack
            kept.append({"messages": messages, "label": bool(row["label"])})
            longest_prompt, longest_reply = max(longest_prompt, prompt), max(longest_reply, reply)
        else:
            passed += 1
        if len(kept) == count:
            break
    return kept, passed


# ---------------------------------------------------------------- workers (one process each)


def new_counts() -> dict:
    # real: non-padding tokens of the samples and their mismatched sequences (both run through policy and reference);
    # computed: positions the model ran (rows x width); loss: reply tokens of the samples
    return {"real": 0, "computed": 0, "loss": 0, "step_times": [], "losses": []}


def worker_posttrain(spec: dict) -> dict:
    import posttrain.train.kto as kto_mod
    from posttrain.train.config import load_config
    from posttrain.train.loop import Loop

    data_path = Path(spec["tmp"]) / "kto.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in spec["rows"]), encoding="utf-8")
    cfg = load_config(None, [
        *lora_job_overrides("kto", spec),
        f"kto.beta={spec['beta']}", "kto.desirable_weight=1.0", "kto.undesirable_weight=1.0",
        f"optim.lr={spec['lr']}", "optim.scheduler=constant", "optim.warmup_ratio=0.0", "optim.max_grad_norm=1.0",
        f"train.micro_batch_size={spec['micro']}", f"train.grad_accum={spec['accum']}",
        f"train.max_steps={spec['steps']}", "train.eval_every=0", "train.log_every=1", "train.device=cpu",
        f"train.seed={spec['seed']}", "output.tensorboard=false", f"output.dir={spec['tmp']}/out",
    ], **{"data.datasets": [{"path": str(data_path)}]})
    counts = new_counts()
    real_forward = kto_mod.kto_forward

    def counting_forward(model, batch, normalizer, **kw):
        # input_ids...: the samples; kl_input_ids...: their mismatched sequences (one packed row each, or padded)
        counts["computed"] += batch["input_ids"].numel() + batch["kl_input_ids"].numel()
        counts["real"] += int(batch["real_mask"].sum()) + int(batch["kl_real_mask"].sum())
        counts["loss"] += int((batch["weights"] > 0).sum())
        return real_forward(model, batch, normalizer, **kw)

    class TimedLoop(Loop):
        def update(self, micro_batches):
            start = time.perf_counter()
            out = super().update(micro_batches)
            counts["step_times"].append(time.perf_counter() - start)
            counts["losses"].append(out["loss"])
            return out

    kto_mod.kto_forward, kto_mod.Loop = counting_forward, TimedLoop
    summary = kto_mod.run(cfg)
    if summary.get("dropped"):
        raise RuntimeError(f"posttrain dropped rows: {summary['dropped']} (the selection should fit max_length)")
    return finish(counts)


def worker_trl(spec: dict) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import KTOConfig, KTOTrainer

    tokenizer, model = trl_side_model(spec)
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:], "label": r["label"]}
                              for r in spec["rows"]])
    args = KTOConfig(
        output_dir=f"{spec['tmp']}/out", max_steps=spec["steps"], per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["accum"], learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=spec["precision"] == "bf16", fp16=False,
        gradient_checkpointing=False, use_cpu=True, max_length=spec["max_length"], beta=spec["beta"],
        loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0, logging_steps=1, save_strategy="no",
        report_to="none", seed=spec["seed"], dataloader_num_workers=0, disable_tqdm=True)
    peft_cfg = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
    counts = new_counts()

    class CountingTrainer(KTOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            counts["computed"] += inputs["input_ids"].numel() + inputs["KL_input_ids"].numel()
            counts["real"] += int(inputs["attention_mask"].sum() + inputs["KL_attention_mask"].sum())
            counts["loss"] += int(inputs["completion_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = CountingTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                              peft_config=peft_cfg)
    trainer.add_callback(trl_step_timer(counts))
    trainer.train()
    return finish(counts)


def finish(counts: dict) -> dict:
    train_s, steps = sum(counts["step_times"]), len(counts["step_times"])
    return {"train_s": round(train_s, 2), "steps": steps, "step_s": train_s / max(steps, 1),
            "tokens": counts["real"], "loss_tokens": counts["loss"],
            "computed_per_token": round(counts["computed"] / max(counts["real"], 1), 4),
            "tokens_per_s": counts["real"] / train_s, "loss_tokens_per_s": counts["loss"] / train_s,
            "first_loss": counts["losses"][0] if counts["losses"] else None,
            "final_loss": counts["losses"][-1] if counts["losses"] else None,
            "peak_rss_mb": round(peak_rss_mb(), 1)}


# ---------------------------------------------------------------- driver


def summarise(runs: dict[str, list[dict]]) -> dict:
    keys = ["tokens_per_s", "loss_tokens_per_s", "step_s", "train_s", "process_wall_s", "peak_rss_mb", "tokens",
            "loss_tokens", "computed_per_token", "first_loss", "final_loss"]
    return {side: {k: median_of(rs, k) for k in keys} for side, rs in runs.items()}


def render_markdown(result: dict) -> str:
    med, s, m = result["medians"], result["spec"], result["machine"]
    headers = ["side", "runs", "tokens/s", "reply tok/s", "step s", "train s", "process s", "peak RSS MB", "tokens",
               "reply tokens", "positions run / token", "first / final loss"]
    rows = [[side, len(result["runs"][side]), v["tokens_per_s"], v["loss_tokens_per_s"], v["step_s"], v["train_s"],
             v["process_wall_s"], v["peak_rss_mb"], v["tokens"], v["loss_tokens"], v["computed_per_token"],
             f"{v['first_loss']:.4g} / {v['final_loss']:.4g}"] for side, v in med.items()]
    pt, trl = med["posttrain"], med["trl"]
    ratios = [[k, f"{v:.2f}x"] for k, v in result["ratios"].items()]
    ratios.append(["step time TRL/posttrain", f"{trl['step_s'] / pt['step_s']:.2f}x"])
    return "\n\n".join([
        f"# KTO-LoRA: posttrain vs TRL KTOTrainer ({m['date']})",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, CPU flags {s['cpu_flags']}, "
        f"precision {s.get('precision', 'fp32')}. "
        f"Versions: {result['versions']}.",
        f"Data: {s['data']} from row {s['start']}: {s['n_rows']} rows ({s['desirable']} desirable) whose longest "
        f"prompt + longest reply fit max length {s['max_length']} ({s['passed']} rows passed over); model "
        f"{s['model']} ({s['model_dir']}) fp32, SDPA; LoRA r={s['lora_r']} alpha={s['lora_alpha']} all-linear; "
        f"KTO beta={s['beta']}, reference = base with adapter off; {s['steps']} optimizer steps of "
        f"{s['micro']}x{s['accum']} samples; order {result['order']}.",
        f"fp32 matmul peak (2048^3, best of 8, before / after the runs): {result['matmul_gflops_before']:.1f} / "
        f"{result['matmul_gflops_after']:.1f} GFLOP/s.",
        "Medians per side:", markdown_table(headers, rows), "Ratios (medians):",
        markdown_table(["ratio", "value"], ratios),
        "Tokens = non-padding tokens of the samples and of their mismatched sequences (each tool's own pairing), "
        "which both tools run through the policy and the reference; reply tokens = the samples' reply tokens; "
        "tokens/s over the optimizer steps only (step timers inside each tool). Positions run / token above 1 is "
        "padding. The first loss is 0.5 on both sides while LoRA B = 0 (policy = reference).",
    ]) + "\n"


def main() -> None:
    ap = vs_trl_parser(__doc__, str(DEFAULT_DATA), "KTO json/jsonl (messages + label)", "samples per micro-batch",
                       "", "kto_vs_trl")
    ap.set_defaults(micro=4, accum=2)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="a built-in (tiny-random for a smoke run) or a model folder; both sides load the same folder")
    ap.add_argument("--max-length", type=int, default=384, help="max tokens per sequence (examples/kto_lora.yaml)")
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        result = worker_trl(spec) if args.worker in TRL_SIDES else worker_posttrain(spec)
        Path(args.out).write_text(json.dumps(result))
        return
    check_ablations(ap, args.ablations, POSTTRAIN_VARIANTS)
    if args.steps < 1 or args.micro < 2:
        ap.error("--steps must be >= 1 and --micro >= 2 (TRL's KL estimate needs 2 samples per micro-batch)")
    if not Path(args.data).is_file():
        ap.error(f"{args.data} not found (LLaMA-Factory's kto_en_demo.json; see ../shared/assets/README.md)")

    from posttrain.models.sources import resolve_model

    model_dir = resolve_model(args.model)
    wanted = args.steps * args.micro * args.accum
    rows, passed = select_rows(Path(args.data), model_dir, args.start, wanted, args.max_length)
    if len(rows) < wanted:
        sys.exit(f"only {len(rows)} rows of {args.data} fit max length {args.max_length} together; "
                 f"{wanted} needed (fewer --steps or a larger --max-length)")
    spec = {"model": args.model, "model_dir": model_dir, "data": str(args.data), "start": args.start,
            "rows": rows, "n_rows": len(rows), "desirable": sum(r["label"] for r in rows), "passed": passed,
            "max_length": args.max_length, "lora_r": 16, "lora_alpha": 32, "lr": 5e-4, "beta": 0.1,
            "steps": args.steps, "micro": args.micro, "accum": args.accum, "seed": 42, "cpu_flags": cpu_flags(),
            "precision": args.precision}
    script = Path(__file__).resolve()
    order, before, runs = run_alternating(script, spec, args)
    recorded = {k: v for k, v in spec.items() if k != "rows"}  # the row texts stay out of the results file
    finish_vs_trl(args.name, runs, recorded, order, before, summarise, render_markdown)


if __name__ == "__main__":
    main()
