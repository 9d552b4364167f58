"""GRPO with LoRA on SmolLM2-135M-Instruct: posttrain vs TRL's GRPOTrainer, fp32 on CPU.

    python benchmarks/grpo_vs_trl.py --repeats 3 --steps 4          # 3 alternating runs per side
    python benchmarks/grpo_vs_trl.py --model tiny-random --repeats 1 --steps 1 --name grpo_smoke   # a smoke run

The job of examples/grpo_arith.yaml on both sides: the prompts of examples/data/arith_easy/train.jsonl
(the user turn; the assistant turn is the reference), G=8 responses to each of 4 prompts per step,
at most 64 new tokens at temperature 0.7 (top-p 1, no top-k), the reward 1 when the reply's last number
equals the reference's (posttrain's own `ExactMatch("number")`, which the TRL side calls too), group
mean/std advantages, the per-sequence-mean clipped loss (eps 0.2), no KL term and no reference model,
one optimizer update per step (micro-batches of 8 responses), LoRA r=16 alpha=32 on every linear
but the head, AdamW lr 2e-4 constant, clip 1.0. Both see the same prompts in each step: TRL gets the
rows in posttrain's seeded order and does not shuffle (checked per step in the results).
Tokens/s = prompt + completion tokens (no padding; a completion up to and including its stop token)
of every response of the step, over the step's wall time (sampling, reward, update). Sampling is
random on each side, so completion lengths and rewards differ between runs; they are reported.
Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    ROOT, TRL_SIDES, check_ablations, finish_vs_trl, lora_job_overrides, markdown_table, median_of, peak_rss_mb,
    run_alternating, trl_side_model, trl_step_timer, vs_trl_parser)
from benchmarks.mc_eval_speed import cpu_flags  # noqa: E402

DEFAULT_DATA = ROOT / "examples" / "data" / "arith_easy" / "train.jsonl"
# ablations (env in common.SIDE_ENV): posttrain-mkl = rollouts on torch's default linear path (before oneDNN);
# posttrain-hf-step = every decode step through HF's forward (before models/decode_step.py)
POSTTRAIN_VARIANTS = {"posttrain": [], "posttrain-mkl": [], "posttrain-hf-step": []}


# ---------------------------------------------------------------- data


def read_prompt_rows(path: Path) -> list[dict]:
    """{prompt: the messages before the final assistant turn, answer: that turn's text} per row, file order."""
    from posttrain.data.reading import read_rows

    out = []
    for row in read_rows(str(path)):
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        out.append({"prompt": messages[:-1], "answer": messages[-1]["content"]})
    return out


def step_order(n_prompts: int, steps: int, per_step: int, seed: int) -> list[int]:
    """The prompt indices posttrain samples, step after step (its seeded reshuffle, train/rollout.py)."""
    from posttrain.train.rollout import prompt_indices

    return [i for step in range(steps) for i in prompt_indices(n_prompts, step, per_step, seed)]


# ---------------------------------------------------------------- workers (one process each)


def new_counts() -> dict:
    return {"tokens": 0, "completion": 0, "step_times": [], "gen_times": [], "losses": [], "rewards": [],
            "step_prompts": []}


def worker_posttrain(spec: dict) -> dict:
    import posttrain.train.grpo as grpo_mod
    from posttrain.train.config import load_config

    cfg = load_config(None, [
        *lora_job_overrides("grpo", spec),
        "grpo.estimator=grpo", f"grpo.group_size={spec['group_size']}",
        f"grpo.prompts_per_step={spec['prompts_per_step']}", "grpo.mini_batch_size=0", "grpo.epochs=1",
        f"grpo.max_new_tokens={spec['max_new_tokens']}", f"grpo.temperature={spec['temperature']}", "grpo.top_p=1.0",
        f"grpo.clip_range={spec['clip']}", "grpo.kl_coef=0.0", "grpo.loss_norm=sequence", "grpo.sample_every=0",
        f"optim.lr={spec['lr']}", "optim.scheduler=constant", "optim.max_grad_norm=1.0",
        f"train.micro_batch_size={spec['micro']}", f"train.max_steps={spec['steps']}", "train.eval_every=0",
        "train.log_every=1", "train.device=cpu", f"train.seed={spec['seed']}", "output.tensorboard=false",
        f"output.dir={spec['tmp']}/out",
    ], **{"data.datasets": [{"path": spec["data"]}],
          "reward.sources": [{"type": "exact_match", "answer": "number"}]})
    counts = new_counts()
    real_sample = grpo_mod.sample

    def timed_sample(policy, tokenizer, prompts, seeds, sampling_cfg, **kw):
        start = time.perf_counter()
        out = real_sample(policy, tokenizer, prompts, seeds, sampling_cfg, **kw)
        counts["gen_times"].append(time.perf_counter() - start)
        counts["step_prompts"].append(sorted({q.text for q in prompts}))
        return out

    class TimedSteps(grpo_mod.GRPOSteps):
        def run_step(self, step, update):
            start = time.perf_counter()
            metrics = super().run_step(step, update)
            counts["step_times"].append(time.perf_counter() - start)
            counts["tokens"] += round(metrics["_tokens"])  # prompt + response tokens of the step, no padding
            counts["completion"] += round(metrics["_loss_tokens"])
            counts["losses"].append(metrics["loss"])
            counts["rewards"].append(metrics["reward"])
            return metrics

    grpo_mod.sample, grpo_mod.GRPOSteps = timed_sample, TimedSteps
    summary = grpo_mod.run(cfg)
    if summary.get("dropped_prompts"):
        raise RuntimeError(f"posttrain dropped prompts: {summary['dropped_prompts']} (the order would differ)")
    return finish(counts)


def worker_trl(spec: dict) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.train.verifiable import ExactMatch  # the same reward code as posttrain's side (only `re`)

    tokenizer, model = trl_side_model(spec)
    rows = read_prompt_rows(Path(spec["data"]))
    data = Dataset.from_list([rows[i] for i in spec["order"]])  # posttrain's prompts, step by step
    batch = spec["group_size"] * spec["prompts_per_step"]
    args = GRPOConfig(
        output_dir=f"{spec['tmp']}/out", max_steps=spec["steps"], per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=batch // spec["micro"], num_generations=spec["group_size"],
        max_completion_length=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, epsilon=spec["clip"], loss_type="grpo", scale_rewards="group",
        shuffle_dataset=False, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, bf16=spec["precision"] == "bf16", fp16=False,
        gradient_checkpointing=False, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"], dataloader_num_workers=0,
        disable_tqdm=True)
    peft_cfg = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
    counts = new_counts()
    exact = ExactMatch("number")

    def last_number_reward(completions, answer, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return exact([""] * len(texts), texts, list(answer))

    class CountingTrainer(GRPOTrainer):
        def _generate(self, prompts):
            start = time.perf_counter()
            out = super()._generate(prompts)
            counts["gen_times"].append(time.perf_counter() - start)
            counts["step_prompts"].append(sorted({p[-1]["content"] for p in prompts}))
            return out

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            counts["tokens"] += int(out["prompt_mask"].sum() + out["completion_mask"].sum())
            counts["completion"] += int(out["completion_mask"].sum())
            return out

    trainer = CountingTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                              reward_funcs=last_number_reward, peft_config=peft_cfg)
    trainer.add_callback(trl_step_timer(counts))
    trainer.train()
    counts["rewards"] = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    return finish(counts)


def finish(counts: dict) -> dict:
    train_s, steps = sum(counts["step_times"]), len(counts["step_times"])
    return {"train_s": round(train_s, 2), "steps": steps, "step_s": train_s / max(steps, 1),
            "generation_s": sum(counts["gen_times"]) / max(steps, 1), "tokens": counts["tokens"],
            "loss_tokens": counts["completion"],
            "tokens_per_s": counts["tokens"] / train_s, "loss_tokens_per_s": counts["completion"] / train_s,
            "mean_reward": sum(counts["rewards"]) / max(len(counts["rewards"]), 1),
            "first_loss": counts["losses"][0] if counts["losses"] else None,
            "final_loss": counts["losses"][-1] if counts["losses"] else None,
            "peak_rss_mb": round(peak_rss_mb(), 1), "step_prompts": counts["step_prompts"]}


# ---------------------------------------------------------------- driver


def summarise(runs: dict[str, list[dict]]) -> dict:
    keys = ["tokens_per_s", "loss_tokens_per_s", "step_s", "generation_s", "train_s", "process_wall_s",
            "peak_rss_mb", "mean_reward", "tokens", "loss_tokens", "first_loss", "final_loss"]
    return {side: {k: median_of(rs, k) for k in keys} for side, rs in runs.items()}


def same_prompts(runs: dict[str, list[dict]]) -> str:
    """'k/n' steps in which every run of both sides sampled the same prompts."""
    firsts = [r["step_prompts"] for rs in runs.values() for r in rs]
    n = min(len(f) for f in firsts)
    return f"{sum(all(f[s] == firsts[0][s] for f in firsts) for s in range(n))}/{n}"


def render_markdown(result: dict) -> str:
    med, s, m = result["medians"], result["spec"], result["machine"]
    headers = ["side", "runs", "tokens/s", "completion tok/s", "step s", "sampling s / step", "train s",
               "process s", "peak RSS MB", "tokens", "completion tokens", "mean reward", "first / final loss"]
    rows = [[side, len(result["runs"][side]), v["tokens_per_s"], v["loss_tokens_per_s"], v["step_s"],
             v["generation_s"], v["train_s"], v["process_wall_s"], v["peak_rss_mb"], v["tokens"], v["loss_tokens"],
             v["mean_reward"], f"{v['first_loss']:.4g} / {v['final_loss']:.4g}"] for side, v in med.items()]
    pt, trl = med["posttrain"], med["trl"]
    ratios = [[k, f"{v:.2f}x"] for k, v in result["ratios"].items()]
    ratios.append(["step time TRL/posttrain", f"{trl['step_s'] / pt['step_s']:.2f}x"])
    return "\n\n".join([
        f"# GRPO-LoRA: posttrain vs TRL GRPOTrainer ({m['date']})",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, CPU flags {s['cpu_flags']}, "
        f"precision {s.get('precision', 'fp32')}. "
        f"Versions: {result['versions']}.",
        f"Model {s['model']} ({s['model_dir']}) fp32, SDPA; LoRA r={s['lora_r']} alpha={s['lora_alpha']} all-linear; "
        f"prompts {s['data']} ({s['n_prompts']} rows); G={s['group_size']} x {s['prompts_per_step']} prompts per "
        f"step, max {s['max_new_tokens']} new tokens, temperature {s['temperature']}, reward = last number exact "
        f"match, no KL, one update per step in micro-batches of {s['micro']}; {s['steps']} steps; order "
        f"{result['order']}. Same prompts in each step on every run of both sides: {s['same_prompts']}.",
        f"fp32 matmul peak (2048^3, best of 8, before / after the runs): {result['matmul_gflops_before']:.1f} / "
        f"{result['matmul_gflops_after']:.1f} GFLOP/s.",
        "Medians per side:", markdown_table(headers, rows), "Ratios (medians):",
        markdown_table(["ratio", "value"], ratios),
        "Tokens = prompt + completion tokens of every response of a step (no padding; a completion up to and "
        "including its stop token), the same count on both sides; tokens/s = tokens / summed step wall time "
        "(sampling, reward, forward, backward, optimizer). Sampling s / step is the generation call alone. "
        "Sampling is random on each side: completion lengths and rewards differ between runs.",
    ]) + "\n"


def main() -> None:
    ap = vs_trl_parser(__doc__, str(DEFAULT_DATA), "prompt jsonl (messages ending in the reference answer)",
                       "responses per micro-batch", "", "grpo_vs_trl")
    ap.set_defaults(micro=8, accum=4)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="a built-in (tiny-random for a smoke run) or a model folder; both sides load the same folder")
    ap.add_argument("--group-size", type=int, default=8, help="G: responses per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="completion length limit")
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        result = worker_trl(spec) if args.worker in TRL_SIDES else worker_posttrain(spec)
        Path(args.out).write_text(json.dumps(result))
        return
    check_ablations(ap, args.ablations, POSTTRAIN_VARIANTS)
    batch = args.micro * args.accum
    if args.steps < 1 or batch % args.group_size:
        ap.error(f"--steps must be >= 1 and --micro x --accum ({batch} responses per step) a multiple of "
                 f"--group-size ({args.group_size})")

    from posttrain.models.sources import resolve_model

    model_dir = resolve_model(args.model)
    n_prompts = len(read_prompt_rows(Path(args.data)))
    per_step = batch // args.group_size
    spec = {"model": args.model, "model_dir": model_dir, "data": str(Path(args.data).resolve()),
            "n_prompts": n_prompts, "order": step_order(n_prompts, args.steps, per_step, 42), "max_length": 192,
            "lora_r": 16, "lora_alpha": 32, "lr": 2e-4, "clip": 0.2, "group_size": args.group_size,
            "prompts_per_step": per_step, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "steps": args.steps, "micro": args.micro, "seed": 42, "cpu_flags": cpu_flags(),
            "precision": args.precision}
    script = Path(__file__).resolve()
    order, before, runs = run_alternating(script, spec, args)
    spec["same_prompts"] = same_prompts(runs)
    finish_vs_trl(args.name, runs, spec, order, before, summarise, render_markdown)


if __name__ == "__main__":
    main()
