"""DPO with LoRA on SmolLM2-135M-Instruct: posttrain vs TRL's DPOTrainer, fp32 on CPU.

    python benchmarks/dpo_lora_vs_trl.py                  # 3 alternating runs per side + ablation
    python benchmarks/dpo_lora_vs_trl.py --repeats 1 --steps 1 --micro 1 --accum 1 --ablations ""   # a quick look

Both sides get the same preference pairs (a fixed slice of LLaMA-Factory's dpo_en_demo set, rows
whose prompt + longer answer fit in max length 512 under the model's chat template, so neither tool
truncates or drops), the same effective batch (micro x accumulation pairs), LoRA r=8 / alpha=16 on
every linear but the head, sigmoid DPO with beta 0.1, the reference = the base with adapters off,
AdamW at a constant lr, the same number of optimizer steps. Each run is its own process; sides
alternate (A B A B ...) and medians are reported. A sanity check runs each tool's own reference
log-prob code on the same first pairs before training: the numbers must agree across tools.
The ablation `posttrain-unfused` (FastPaths(fused=False)) is the "before" of posttrain's fast paths.
Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dpo_report import render_markdown  # noqa: E402
from benchmarks.common import (  # noqa: E402
    TRL_SIDES,
    check_ablations,
    split_fast,
    vs_trl_parser,
    run_alternating,
    trl_step_timer,
    finish_vs_trl,
    ASSETS, ROOT, chat_length, llama_flops, llama_forward_flops, median_of, peak_rss_mb)

DEFAULT_DATA = ASSETS / "data" / "llamafactory" / "dpo_en_demo.json"
FALLBACK_DATA = ROOT / "examples" / "data" / "prefs_train.jsonl"
MODEL_DIR = Path("~/.cache/posttrain/smollm2-135m-instruct").expanduser()
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# posttrain variants: config overrides on top of the shared settings; fast.* switch a fast path off (split_fast)
POSTTRAIN_VARIANTS = {
    "posttrain": [],
    "posttrain-unfused": ["fast.fused=false"],  # before: PEFT LoRA forward, padded rows, masked attention
    "posttrain-mkl": [],  # before: the products on torch's MKL path (POSTTRAIN_ONEDNN=0, common.SIDE_ENV)
}


# ---------------------------------------------------------------- data


def to_pair(row: dict) -> dict:
    """{prompt: messages, chosen: str, rejected: str} from a sharegpt or prompt/chosen/rejected row."""
    def text(v):
        return v if isinstance(v, str) else v.get("value", v.get("content"))

    if "conversations" in row:
        prompt = [{"role": ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
    else:
        prompt = [{"role": "user", "content": row["prompt"]}]
    return {"prompt": prompt, "chosen": text(row["chosen"]), "rejected": text(row["rejected"])}


def load_pairs(path: Path, start: int, count: int, max_length: int) -> tuple[list[dict], int]:
    """The first `count` pairs from row `start` whose both conversations fit in max_length; (pairs, skipped)."""
    from transformers import AutoTokenizer

    from posttrain.data.reading import read_rows

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)

    def length(messages):
        return chat_length(tokenizer, messages)

    pairs, skipped = [], 0
    for row in list(read_rows(str(path)))[start:]:
        pair = to_pair(row)
        fits = all(length(pair["prompt"] + [{"role": "assistant", "content": pair[side]}]) <= max_length
                   for side in ("chosen", "rejected"))
        if fits and pair["chosen"] != pair["rejected"]:
            pairs.append(pair)
        else:
            skipped += 1
        if len(pairs) == count:
            break
    return pairs, skipped


# ---------------------------------------------------------------- workers (one process each)


def new_counts() -> dict:
    # real: tokens of the chosen/rejected sequences as rendered (the prompt once per response, the same for both
    # tools); computed: positions the model ran (rows x width); stored: non-padding positions among them
    return {"real": 0, "computed": 0, "stored": 0, "loss": 0, "sum_sq_len": 0.0, "step_times": [], "losses": []}


def worker_posttrain(spec: dict, variant: list[str]) -> dict:
    import torch

    import posttrain.train.dpo as dpo_mod
    from posttrain.train.config import load_config
    from posttrain.models.forward import FastPaths
    from posttrain.train.loop import Loop

    overrides, fast = split_fast(variant)

    data_path = Path(spec["tmp"]) / "prefs.jsonl"
    data_path.write_text("".join(json.dumps(p) + "\n" for p in spec["pairs"]), encoding="utf-8")
    cfg = load_config(None, [
        "stage=dpo", "model.name_or_path=smollm2-135m-instruct", "model.dtype=float32",
        "model.attn_implementation=sdpa", f"data.max_length={spec['max_length']}", "data.val_size=0",
        "method.type=lora", f"lora.r={spec['lora_r']}", f"lora.alpha={spec['lora_alpha']}", "lora.dropout=0.0",
        "dpo.loss=sigmoid", f"dpo.beta={spec['beta']}", "dpo.reference=adapter", f"optim.lr={spec['lr']}",
        "optim.scheduler=constant", "optim.max_grad_norm=1.0", f"train.micro_batch_size={spec['micro']}",
        f"train.grad_accum={spec['accum']}", f"train.max_steps={spec['steps']}", "train.device=cpu",
        f"train.seed={spec['seed']}", "output.tensorboard=false", f"output.dir={spec['tmp']}/out", *overrides,
    ], **{"data.datasets": [{"path": str(data_path)}]})
    counts = new_counts()
    real_forward = dpo_mod.dpo_forward

    def counting_forward(model, batch, normalizer, **kw):
        counts["computed"] += batch["input_ids"].numel()
        counts["stored"] += int(batch["real_mask"].sum())  # shared prompts are stored once
        counts["real"] += int(batch["seq_lengths"].sum())
        counts["loss"] += batch["target_ids"].numel()
        counts["sum_sq_len"] += float((batch["seq_lengths"].double() ** 2).sum())
        return real_forward(model, batch, normalizer, **kw)

    class SanityLoop(Loop):
        """Before training: the reference log-probs of the first pairs, by posttrain's own code path."""

        def __init__(self, cfg, model, steps, **kw):
            super().__init__(cfg, model, steps, **kw)
            batch = steps.data.collate([[i] for i in range(spec["sanity_pairs"])])  # rows: chosen, rejected, ...
            with torch.no_grad(), model.disable_adapter():
                logps, _ = dpo_mod.response_logps(model, batch)
            tokens = batch["seq_lengths"]  # per sequence as rendered (rows may be packed, prompts shared)
            counts["sanity"] = {"chosen_logps": logps[0::2].tolist(), "rejected_logps": logps[1::2].tolist(),
                                "chosen_tokens": tokens[0::2].tolist(), "rejected_tokens": tokens[1::2].tolist()}

        def update(self, micro_batches):
            start = time.perf_counter()
            out = super().update(micro_batches)
            counts["step_times"].append(time.perf_counter() - start)
            counts["losses"].append(out["loss"])
            return out

    dpo_mod.dpo_forward, dpo_mod.Loop = counting_forward, SanityLoop
    summary = dpo_mod.run(cfg, FastPaths(**fast))
    if summary.get("dropped"):
        raise RuntimeError(f"posttrain dropped pairs: {summary['dropped']} (the slice should fit max_length)")
    return finish(counts)


def worker_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa")
    data = Dataset.from_list([{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in spec["pairs"]])
    args = DPOConfig(
        output_dir=f"{spec['tmp']}/out", max_steps=spec["steps"], per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["accum"], learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, max_length=spec["max_length"], beta=spec["beta"],
        loss_type=["sigmoid"], logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"],
        dataloader_num_workers=0, disable_tqdm=True)
    peft_cfg = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
    counts = new_counts()

    class CountingTrainer(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            lengths = inputs["attention_mask"].sum(1)  # rows: chosen..., rejected... (right-padded)
            counts["computed"] += inputs["input_ids"].numel()
            counts["real"] += int(lengths.sum())
            counts["stored"] += int(lengths.sum())
            counts["loss"] += int(inputs["completion_mask"][:, 1:].sum())
            counts["sum_sq_len"] += float((lengths.double() ** 2).sum())
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = CountingTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                              peft_config=peft_cfg)
    k = spec["sanity_pairs"]  # TRL's own collator and reference log-prob code on the same first pairs
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(k)])
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, inputs)
    tokens = inputs["attention_mask"].sum(1)
    counts["sanity"] = {"chosen_logps": chosen.tolist(), "rejected_logps": rejected.tolist(),
                        "chosen_tokens": tokens[:k].tolist(), "rejected_tokens": tokens[k:].tolist()}
    trainer.add_callback(trl_step_timer(counts))
    trainer.train()
    return finish(counts)


def finish(counts: dict) -> dict:
    config = json.loads((MODEL_DIR / "config.json").read_text())
    train_s = sum(counts["step_times"])
    sizes = {"real_tokens": counts["real"], "head_tokens": counts["loss"], "sum_sq_len": counts["sum_sq_len"]}
    # policy forward + backward (LoRA-aware) and the reference forward (adapters off, no gradient)
    flops = llama_flops(config, lora_r=SPEC["lora_r"], **sizes)["total_flops"] + llama_forward_flops(config, **sizes)
    return {"train_s": round(train_s, 2), "steps": len(counts["step_times"]), "tokens": counts["real"],
            "loss_tokens": counts["loss"], "computed_tokens": counts["computed"],
            "padding_fraction": round(1 - counts["stored"] / max(counts["computed"], 1), 4),
            "computed_per_token": round(counts["computed"] / max(counts["real"], 1), 4),
            "tokens_per_s": counts["real"] / train_s, "loss_tokens_per_s": counts["loss"] / train_s,
            "first_loss": counts["losses"][0] if counts["losses"] else None,
            "final_loss": counts["losses"][-1] if counts["losses"] else None,
            "model_flops": flops, "model_gflops_per_s": flops / train_s / 1e9,
            "peak_rss_mb": round(peak_rss_mb(), 1), "sanity": counts["sanity"]}


SPEC: dict = {}


# ---------------------------------------------------------------- driver


def summarise(runs: dict[str, list[dict]]) -> dict:
    keys = ["tokens_per_s", "loss_tokens_per_s", "train_s", "process_wall_s", "peak_rss_mb", "first_loss",
            "final_loss", "padding_fraction", "computed_per_token", "model_gflops_per_s", "tokens", "loss_tokens"]
    return {side: {k: median_of(rs, k) for k in keys} for side, rs in runs.items()}


def main() -> None:
    ap = vs_trl_parser(__doc__, str(DEFAULT_DATA), "preference json/jsonl", "pairs per forward pass",
                       "posttrain-unfused", "dpo_lora_vs_trl")
    ap.add_argument("--rows", type=int, default=None,
                    help="pairs in the slice (default steps x micro x accum: one epoch, both tools see the same pairs)")
    ap.add_argument("--sanity-pairs", type=int, default=2, help="pairs in the before-training sanity check")
    args = ap.parse_args()

    if args.worker:
        SPEC.update(json.loads(Path(args.spec).read_text()))
        trl = args.worker in TRL_SIDES
        result = worker_trl(SPEC) if trl else worker_posttrain(SPEC, POSTTRAIN_VARIANTS[args.worker])
        Path(args.out).write_text(json.dumps(result))
        return
    check_ablations(ap, args.ablations, POSTTRAIN_VARIANTS)

    data = Path(args.data)
    if not data.is_file():
        print(f"{data} not found; using {FALLBACK_DATA}", file=sys.stderr)
        data = FALLBACK_DATA
    pairs, skipped = load_pairs(data, args.start, args.rows or args.steps * args.micro * args.accum, 512)
    spec = {"data": str(data), "start": args.start, "rows": len(pairs), "skipped": skipped, "pairs": pairs,
            "max_length": 512, "lora_r": 8, "lora_alpha": 16, "lr": 5e-5, "beta": 0.1, "steps": args.steps,
            "micro": args.micro, "accum": args.accum, "seed": 42,
            "sanity_pairs": min(args.sanity_pairs, len(pairs))}
    script = Path(__file__).resolve()
    order, before, runs = run_alternating(script, spec, args)
    finish_vs_trl(args.name, runs, spec, order, before, summarise, render_markdown)


if __name__ == "__main__":
    main()
