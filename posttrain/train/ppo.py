"""RLHF with PPO (InstructGPT objective), read top to bottom:
config -> prompts (+ ptx data) -> models -> per step: rollout, rewards and advantages, PPO epochs over
mini-batches (with the ptx LM loss in the same optimizer step) -> log, checkpoint.

Objective (Ouyang et al. 2022, eq. 2): E[r(x, y) - beta * log(pi(y|x) / pi_SFT(y|x))] + gamma * E_ptx[log pi(x)].
The reference pi_SFT is the policy with its adapter disabled (LoRA, QLoRA, prompt / prefix tuning): no
second copy of the weights; full, freeze, LISA and PiSSA change the base, so they keep a frozen copy.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from posttrain.config import RunConfig, adapter_off_is_base, save_config
from posttrain.data.pipeline import build_sft_data
from posttrain.losses.ppo import gae, kl_per_token, masked_mean, policy_loss, value_loss, whiten, explained_variance
from posttrain.models.load import load_base, pick_device
from posttrain.models.methods import (apply_method, count_parameters, optimizer_groups, quantization_config,
                                      step_hook)
from posttrain.models.run import save_model, stop_token_ids
from posttrain.train.checkpoint import find_resume, load_checkpoint, save_checkpoint
from posttrain.train.lm_forward import sft_forward
from posttrain.train.loop import Dist, evaluate_lm, lr_factor, make_optimizer
from posttrain.train.reporting import RunReport, already_complete
from posttrain.train.rewards import AdaptiveKL, FixedKL, RunningMoments, build_reward_source, shape_scores
from posttrain.train.rollout import PolicyAndValue, Rollout, load_prompts, prompt_indices, sample
from posttrain.train.sft import to_batches

log = logging.getLogger("posttrain")


def run(cfg: RunConfig) -> dict:
    p = cfg.ppo
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")

    # models: policy (+ adapter), value head, reference = adapter off (or a frozen copy taken before training)
    base, tokenizer = load_base(cfg.model, device, quantization_config(cfg, device))
    ref_model = None if adapter_off_is_base(cfg) else copy.deepcopy(base).requires_grad_(False).eval()
    policy = apply_method(base, cfg)
    critic = apply_method(load_base(cfg.model, device)[0], cfg) if p.value_model == "separate" else None
    pv = PolicyAndValue(policy, base.config.hidden_size, critic)
    hook = step_hook(policy, cfg)  # LISA re-draws its blocks before optimizer updates
    trainable, total = count_parameters(pv)
    if hook is not None:
        trainable -= count_parameters(policy)[0] - hook.trainable_per_step(policy)

    # data: prompts to sample from; optional ptx (SFT / pre-training) data with a held-out split
    prompts, dropped = load_prompts(cfg.data, cfg.template, tokenizer, p.max_new_tokens)
    ptx_train = ptx_eval = None
    if p.ptx_datasets:
        ptx_cfg = dataclasses.replace(cfg.data, datasets=p.ptx_datasets, eval_datasets=[], val_size=p.ptx_val_size)
        ptx = build_sft_data(ptx_cfg, cfg.template, tokenizer, cfg.train.seed)
        ptx_train = to_batches(ptx.train, tokenizer.pad_token_id)
        ptx_eval = to_batches(ptx.eval, tokenizer.pad_token_id) if ptx.eval is not None else None
    log.info("prompts: %d (%d dropped); trainable parameters %d of %d", len(prompts), dropped, trainable, total)
    reward_fn = build_reward_source(cfg.reward, device)
    stops = stop_token_ids(policy, tokenizer)

    # optimizer and schedule over every PPO optimizer step of the run
    groups = optimizer_groups(policy, cfg) + [{"params": [q for n, q in pv.named_parameters() if q.requires_grad
                                                          and not n.startswith("policy.")]}]
    params = [q for g in groups for q in g["params"]]
    optimizer = make_optimizer(groups, cfg.optim)
    updates_per_step = p.ppo_epochs * (p.rollout_batch_size // p.mini_batch_size)
    total_updates = cfg.train.max_steps * updates_per_step
    warmup = int(cfg.optim.warmup_ratio * total_updates)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_updates, warmup, cfg.optim.scheduler))
    kl_ctl = AdaptiveKL(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_control == "adaptive" else FixedKL(p.kl_coef)
    moments = RunningMoments()

    lm_loss = functools.partial(sft_forward, chunk=cfg.train.loss_chunk)
    ptx_eval_fn = functools.partial(evaluate_lm, policy, ptx_eval, lm_loss, cfg.train.micro_batch_size,
                                    Dist(device=device)) if ptx_eval else dict

    # resume: weights, optimizer, scheduler and RNG (the rollouts' sampling stream) from the shared checkpoint
    # code, plus PPO's own state: KL coefficient, reward moments, and the before-training figures
    ckpt_dir = out_dir / "checkpoints"
    step, start = 0, None
    resume = find_resume(cfg.train.resume, ckpt_dir)
    if resume is not None:
        position = load_checkpoint(resume, model=pv, optimizer=optimizer, scheduler=scheduler)
        step, kl_ctl.coef, moments = position["global_step"], position["kl_coef"], RunningMoments(**position["moments"])
        start = position.get("start")
        if (done := already_complete(out_dir, step, cfg.train.max_steps)) is not None:
            return done
    report = RunReport(out_dir, cfg.train.max_steps, enabled=True, tensorboard=cfg.output.tensorboard,
                       start_step=step)
    if start is None:
        start = {"before": greedy_samples(policy, tokenizer, prompts[:2], stops, p.max_new_tokens),
                 "ptx_eval_before": ptx_eval_fn()}
        if start["ptx_eval_before"]:
            report.eval(step, start["ptx_eval_before"])
    summary = {"stage": "ppo", "prompts": len(prompts), "trainable_params": trainable, "total_params": total, **start}
    gen = torch.Generator()

    while step < cfg.train.max_steps:
        batch_prompts = [prompts[i] for i in prompt_indices(len(prompts), step, p.rollout_batch_size, cfg.train.seed)]
        rollout, metrics, texts = make_rollout(pv, ref_model, tokenizer, batch_prompts, cfg, reward_fn, kl_ctl,
                                               moments, stops)
        kl_ctl.update(metrics["kl"], p.rollout_batch_size)
        gen.manual_seed(cfg.train.seed * 7919 + step)  # per-step stream: resume replays the same mini-batches
        metrics |= ppo_update(pv, rollout, optimizer, scheduler, params, cfg, ptx_train, gen, hook,
                              first_update=step * updates_per_step)
        step += 1
        metrics |= {"kl_coef": kl_ctl.coef, "loss": metrics["policy_loss"] + p.vf_coef * metrics["value_loss"]}
        report.step(step, metrics, tokens=int(rollout.attention_mask.sum()),
                    loss_tokens=int(rollout.response_mask.sum()), log=step % cfg.train.log_every == 0)
        if p.sample_every and (step % p.sample_every == 0 or step == 1):
            write_sample(out_dir, step, texts)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and ptx_eval:
            report.eval(step, ptx_eval_fn())
        if cfg.train.save_every and step % cfg.train.save_every == 0:
            save_checkpoint(ckpt_dir, model=pv, optimizer=optimizer, scheduler=scheduler, keep_last=cfg.train.keep_last,
                            params=params, position={"global_step": step, "kl_coef": kl_ctl.coef,
                                                     "moments": moments.state(), "start": start})

    summary["ptx_eval_after"] = ptx_eval_fn()
    if summary["ptx_eval_after"]:
        report.eval(step, summary["ptx_eval_after"])
    summary["after"] = greedy_samples(policy, tokenizer, prompts[:2], stops, p.max_new_tokens)
    save_model(policy, tokenizer, out_dir)
    head_state = {k: v.contiguous().cpu() for k, v in pv.value_head.state_dict().items()}
    save_file(head_state, out_dir / "value_head.safetensors")
    train_rows = [r for r in report.history if r["split"] == "train"]
    summary |= {"steps": step, "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
                "first_reward": train_rows[0]["reward_raw"] if train_rows else None,
                "last_reward": train_rows[-1]["reward_raw"] if train_rows else None}
    result = report.finish(summary)
    plot_reward_kl(report.history, out_dir / "reward_kl.png", p.kl_target if p.kl_control == "adaptive" else None)
    return result


@torch.no_grad()
def make_rollout(pv: PolicyAndValue, ref_model, tokenizer, prompts, cfg: RunConfig, reward_fn, kl_ctl, moments,
                 stops) -> tuple[Rollout, dict, list[dict]]:
    """Sample, score, and turn scores + per-token KL into GAE advantages (Ziegler et al. 2019, eq. 2)."""
    p = cfg.ppo
    input_ids, attention_mask, response_mask, ended = sample(pv.policy, tokenizer, prompts, p, stops)
    device = next(pv.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    response_mask = response_mask.to(device)
    width = response_mask.shape[1]
    pv.eval()
    old_logps, old_values, entropy = pv(input_ids, attention_mask, width, p.temperature)
    if ref_model is None:
        with pv.reference():
            ref_logps = pv(input_ids, attention_mask, width, p.temperature, values=False)[0]
    else:
        ref_logps = PolicyAndValue(ref_model, 1)(input_ids, attention_mask, width, p.temperature, values=False)[0]

    responses = [tokenizer.decode(ids[m], skip_special_tokens=True) for ids, m in
                 zip(input_ids[:, -width:].cpu(), response_mask.cpu())]
    raw = torch.tensor(reward_fn([q.text for q in prompts], responses), dtype=torch.float32)
    scores = shape_scores(raw, ended, cfg.reward, moments).to(device)  # (B,)

    kl = kl_per_token(old_logps, ref_logps, p.kl_estimator) * response_mask  # (B, R)
    rewards = -kl_ctl.coef * kl  # (B, R) per-token KL penalty ...
    last = response_mask.long().sum(1).clamp(min=1) - 1  # (B,) index of the final response token
    rewards[torch.arange(len(prompts)), last] += scores  # ... plus the score at the last token
    advantages, returns = gae(rewards, old_values, response_mask, p.gamma, p.lam)
    if p.whiten_advantages:
        advantages = whiten(advantages, response_mask)
    rollout = Rollout(input_ids, attention_mask, response_mask, old_logps, ref_logps, old_values, advantages, returns)
    metrics = {
        "reward_raw": float(raw.mean()), "reward": float(scores.mean()),
        "reward_with_kl": float(rewards.sum(1).mean()), "kl": float(kl.sum(1).mean()),
        "entropy": float(masked_mean(entropy, response_mask)),
        "response_length": float(response_mask.sum(1).float().mean()), "eos_rate": float(ended.float().mean()),
        "explained_variance": explained_variance(old_values, returns, response_mask),
    }
    texts = [{"prompt": q.text, "response": r, "reward": float(s)} for q, r, s in zip(prompts, responses, raw)]
    return rollout, metrics, texts


def ppo_update(pv: PolicyAndValue, rollout: Rollout, optimizer, scheduler, params, cfg: RunConfig, ptx_train,
               gen: torch.Generator, hook=None, first_update: int = 0) -> dict:
    """PPO epochs over shuffled mini-batches; each mini-batch is one optimizer step (micro-batched).

    `hook(update_index, optimizer)` runs before each optimizer step's backward passes (LISA's schedule).
    """
    p, micro = cfg.ppo, cfg.train.micro_batch_size
    pv.train()
    sums: dict[str, float] = {}
    n_updates = 0
    for _ in range(p.ppo_epochs):
        order = torch.randperm(p.rollout_batch_size, generator=gen)
        for start in range(0, p.rollout_batch_size, p.mini_batch_size):
            mini = order[start:start + p.mini_batch_size]
            if hook is not None:
                hook(first_update + n_updates, optimizer)
            for chunk in mini.split(micro):  # gradient accumulation: weight each micro-batch by its share
                metrics = ppo_micro_step(pv, rollout.select(chunk.to(rollout.input_ids.device)), p,
                                         len(chunk) / len(mini))
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v * len(chunk) / len(mini)
            if p.ptx_coef > 0:
                sums["ptx_loss"] = sums.get("ptx_loss", 0.0) + ptx_step(pv.policy, ptx_train, p, cfg, gen)
            clip = cfg.optim.max_grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
            sums["lr"] = sums.get("lr", 0.0) + scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            n_updates += 1
    return {k: v / n_updates for k, v in sums.items()}


def ppo_micro_step(pv: PolicyAndValue, mb: Rollout, p, weight: float) -> dict:
    """Backward of weight * (policy loss + vf_coef * value loss - entropy_coef * entropy) on one micro-batch."""
    token_logps, values, entropy = pv(mb.input_ids, mb.attention_mask, mb.response_mask.shape[1], p.temperature)
    pl, pm = policy_loss(token_logps, mb.old_token_logps, mb.advantages, mb.response_mask, p.clip_range)
    vl, vm = value_loss(values, mb.old_values, mb.returns, mb.response_mask, p.value_clip)
    ent = masked_mean(entropy, mb.response_mask)
    (weight * (pl + p.vf_coef * vl - p.entropy_coef * ent)).backward()
    return {"policy_loss": pl.item(), "value_loss": vl.item(), "entropy_train": ent.item(), **pm, **vm}


def ptx_step(policy, ptx_train, p, cfg: RunConfig, gen: torch.Generator) -> float:
    """Backward of ptx_coef * LM loss on a random ptx batch (InstructGPT's PPO-ptx); returns the LM loss."""
    idx = torch.randint(len(ptx_train.lengths), (p.ptx_batch_size,), generator=gen).tolist()
    device = next(policy.parameters()).device
    batch = {k: v.to(device) for k, v in ptx_train.collate([[i] for i in idx]).items()}
    normalizer = max(1.0, float(sum(ptx_train.loss_tokens[i] for i in idx)))
    loss, _ = sft_forward(policy, batch, normalizer, chunk=cfg.train.loss_chunk)
    (p.ptx_coef * loss).backward()
    return float(loss.detach())


@torch.no_grad()
def greedy_samples(policy, tokenizer, prompts, stops: list[int], max_new_tokens: int) -> list[dict]:
    """Greedy replies to a few fixed prompts, for a before/after comparison in the summary."""
    from posttrain.serve.chat import generate_reply

    policy.eval()
    return [{"prompt": q.text, "response": generate_reply(policy, tokenizer, q.messages, max_new_tokens=max_new_tokens)}
            for q in prompts]


def write_sample(out_dir: Path, step: int, texts: list[dict]) -> None:
    with open(out_dir / "logs" / "samples.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **texts[0]}, ensure_ascii=False) + "\n")


def plot_reward_kl(history: list[dict], path: Path, kl_target: float | None = None) -> None:
    """reward_kl.png: raw reward and KL to the reference per PPO step (+ a 4-step trailing mean; the KL target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if r["split"] == "train"]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    raw = [r["reward_raw"] for r in rows]
    trailing = [sum(raw[max(0, i - 3):i + 1]) / len(raw[max(0, i - 3):i + 1]) for i in range(len(raw))]
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(10, 4))
    ax_r.plot(steps, raw, alpha=0.5, label="reward (raw score)")
    ax_r.plot(steps, trailing, color="tab:blue", linewidth=2, label="reward, mean of last 4 steps")
    ax_r.plot(steps, [r["reward_with_kl"] for r in rows], label="reward - beta * KL (shaped)")
    ax_k.plot(steps, [r["kl"] for r in rows], color="tab:red", label="KL to reference (per response)")
    if kl_target is not None:
        ax_k.axhline(kl_target, color="gray", linestyle="--", label="adaptive KL target")
    for ax in (ax_r, ax_k):
        ax.set_xlabel("PPO step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
