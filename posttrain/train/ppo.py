"""RLHF with PPO (InstructGPT objective), read top to bottom:
config -> prompts (+ ptx data) -> models -> the shared loop, whose every step here is: collect a
rollout batch (sharded over processes), turn rewards and per-token KL into advantages, then PPO
epochs over mini-batches, each one optimizer update (with the ptx LM loss in the same update).

Objective (Ouyang et al. 2022, eq. 2): E[r(x, y) - beta * log(pi(y|x) / pi_SFT(y|x))] + gamma * E_ptx[log pi(x)].
The reference pi_SFT is the policy with its adapter disabled (LoRA, QLoRA, prompt / prefix tuning): no
second copy of the weights; full, freeze, LISA and PiSSA change the base, so they keep a frozen copy.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from posttrain.train.config import RunConfig
from posttrain.data.batches import sft_batches
from posttrain.data.pipeline import build_sft_data
from posttrain.data.policy import drop_summary
from posttrain.errors import ConfigError
from posttrain.losses.ppo import explained_variance, gae, kl_per_token, masked_mean, policy_loss, value_loss, whiten
from posttrain.models.generate import generate_reply
from posttrain.models.load import load_base
from posttrain.models.methods import count_parameters, quantization_config
from posttrain.models.run import save_model
from posttrain.models.forward import sft_forward
from posttrain.train.loop import Loop, start_run
from posttrain.train.reporting import write_sample
from posttrain.train.setup import prepare_model
from posttrain.train.ppo_report import plot_reward_kl
from posttrain.train.reward_sources import AdaptiveKL, FixedKL, RunningMoments, build_reward_source, shape_scores
from posttrain.data.prompts import load_prompts
from posttrain.train.rollout import (
    Experience, PolicyAndValue, Rollout, collect, gather, prompt_indices, row_seed, sampling_weights)
from posttrain.train.steps import StepSource, evaluate_lm

log = logging.getLogger("posttrain")


def run(cfg: RunConfig) -> dict:
    p = cfg.ppo
    dist_ctx, out_dir = start_run(cfg)
    if p.rollout_batch_size % dist_ctx.world or p.mini_batch_size % dist_ctx.world:
        raise ConfigError(f"ppo.rollout_batch_size ({p.rollout_batch_size}) and ppo.mini_batch_size "
                          f"({p.mini_batch_size}) must be multiples of the number of processes ({dist_ctx.world})")
    device = dist_ctx.device

    # models: policy (+ adapter), value head, reference = adapter off (or a frozen copy taken before training)
    base, tokenizer = load_base(cfg.model, device, quantization_config(cfg.methods, device))
    ref_model = None if cfg.methods.adapter_off_is_base() else copy.deepcopy(base).requires_grad_(False).eval()
    prepared = prepare_model(base, cfg)
    policy = prepared.model
    critic = prepare_model(load_base(cfg.model, device)[0], cfg).model if p.value_model == "separate" else None
    pv = PolicyAndValue(policy, base.config.hidden_size, critic, ref_model)
    trainable, total = count_parameters(pv)
    total -= count_parameters(ref_model)[1] if ref_model is not None else 0  # the copy is not a trained model
    trainable -= count_parameters(policy)[0] - prepared.trainable  # LISA: the policy's blocks take turns

    # data: prompts to sample from; optional ptx (SFT / pre-training) data with a held-out split
    prompts, drops = load_prompts(cfg.data, cfg.template, tokenizer, p.max_new_tokens)
    ptx_train = ptx_eval = None
    if p.ptx_datasets:
        ptx_cfg = dataclasses.replace(cfg.data, datasets=p.ptx_datasets, eval_datasets=[], val_size=p.ptx_val_size)
        ptx = build_sft_data(ptx_cfg, cfg.template, tokenizer, cfg.train.seed)
        ptx_train = sft_batches(ptx.train, tokenizer.pad_token_id)
        ptx_eval = sft_batches(ptx.eval, tokenizer.pad_token_id) if ptx.eval is not None else None
    log.info("prompts: %d (dropped: %s); trainable parameters %d of %d", len(prompts), drop_summary(drops) or "none",
             trainable, total)

    steps = PPOSteps(cfg, pv, tokenizer, prompts, build_reward_source(cfg.reward, device), dist_ctx,
                     ptx_train, ptx_eval)
    value_params = [q for n, q in pv.named_parameters() if q.requires_grad and not n.startswith("policy.")]
    loop = Loop(cfg, pv, steps, dist_ctx=dist_ctx, param_groups=prepared.param_groups + [{"params": value_params}],
                on_step_start=prepared.hook)

    def save(out: Path, trained: PolicyAndValue) -> None:
        save_model(trained.policy, tokenizer, out)
        save_file({k: v.contiguous().cpu() for k, v in trained.value_head.state_dict().items()},
                  out / "value_head.safetensors")

    extra = {"stage": "ppo", "prompts": len(prompts), "dropped": drops, "trainable_params": trainable,
             "total_params": total}
    return loop.run(save, extra_summary=extra)


class PPOSteps(StepSource):
    """One step = one rollout batch, then ppo_epochs passes over it in mini-batches (one update each)."""

    def __init__(self, cfg: RunConfig, pv: PolicyAndValue, tokenizer, prompts, reward_fn, dist_ctx,
                 ptx_train=None, ptx_eval=None):
        p = self.p = cfg.ppo
        self.cfg, self.pv, self.tokenizer, self.prompts = cfg, pv, tokenizer, prompts
        self.reward_fn, self.dist, self.ptx_train, self.ptx_eval = reward_fn, dist_ctx, ptx_train, ptx_eval
        self.total_steps = cfg.train.max_steps
        self.updates_per_step = p.ppo_epochs * (p.rollout_batch_size // p.mini_batch_size)
        self.kl_ctl = AdaptiveKL(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_control == "adaptive" \
            else FixedKL(p.kl_coef)
        self.moments = RunningMoments()
        self.start: dict | None = None  # before-training figures, kept in checkpoints so a resume reports them
        self.lm_loss = functools.partial(sft_forward, chunk=cfg.train.loss_chunk)

    # ------------------------------------------------------------------ one step

    def run_step(self, step: int, update) -> dict:
        p, world, rank = self.p, self.dist.world, self.dist.rank
        order = prompt_indices(len(self.prompts), step, p.rollout_batch_size, self.cfg.train.seed)
        mine = range(rank, p.rollout_batch_size, world)  # global rows sampled here: rank, rank + world, ...
        exp, responses = self.dist.forward(collect, self.pv, self.tokenizer,
                                           [self.prompts[order[j]] for j in mine],
                                           [row_seed(self.cfg.train.seed, step, j) for j in mine], p, self.reward_fn,
                                           self.dist.lockstep)
        if self.dist.main and p.sample_every and (step == 0 or (step + 1) % p.sample_every == 0):
            sample = {"prompt": self.prompts[order[0]].text, "response": responses[0], "reward": float(exp.scores[0])}
            write_sample(Path(self.cfg.output.dir), step + 1, sample)
        exp = gather(exp, self.dist, self.tokenizer.pad_token_id)
        rollout, metrics = self.advantages(exp)
        self.kl_ctl.update(metrics["kl"], p.rollout_batch_size)
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + step)  # resume replays the same batches
        sums: dict[str, float] = {}
        for _ in range(p.ppo_epochs):
            perm = torch.randperm(p.rollout_batch_size, generator=gen)
            for start in range(0, p.rollout_batch_size, p.mini_batch_size):
                mini = perm[start:start + p.mini_batch_size]
                for key, value in update(self.micro_batches(rollout, mini, gen)).items():
                    sums[key] = sums.get(key, 0.0) + value
        metrics |= {k: v / self.updates_per_step for k, v in sums.items() if not k.startswith("_")}
        loss = metrics["policy_loss"] + p.vf_coef * metrics["value_loss"]
        return metrics | {"kl_coef": self.kl_ctl.coef, "loss": loss, "_tokens": float(exp.attention_mask.sum()),
                          "_loss_tokens": float(exp.response_mask.sum())}

    @torch.no_grad()
    def advantages(self, exp: Experience) -> tuple[Rollout, dict]:
        """Scores (shaped) + per-token KL penalty -> GAE advantages (Ziegler et al. 2019, eq. 2), over the
        whole batch (every process holds all of it, so whitening and reward statistics are global)."""
        p = self.p
        scores = shape_scores(exp.scores.cpu(), exp.ended.cpu(), self.cfg.reward, self.moments)
        scores = scores.to(exp.scores.device)  # (B,)
        kl = kl_per_token(exp.old_token_logps, exp.ref_token_logps, p.kl_estimator) * exp.response_mask  # (B, R)
        rewards = -self.kl_ctl.coef * kl  # (B, R) per-token KL penalty ...
        last = exp.response_mask.long().sum(1).clamp(min=1) - 1  # (B,) index of the final response token
        rewards[torch.arange(len(last)), last] += scores  # ... plus the score at the last token
        advantages, returns = gae(rewards, exp.old_values, exp.response_mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = whiten(advantages, exp.response_mask)
        rollout = Rollout(exp.input_ids, exp.attention_mask, exp.response_mask, exp.old_token_logps,
                          exp.ref_token_logps, exp.old_values, advantages, returns)
        metrics = {
            "reward_raw": float(exp.scores.mean()), "reward": float(scores.mean()),
            "reward_with_kl": float(rewards.sum(1).mean()), "kl": float(kl.sum(1).mean()),
            "entropy": float(masked_mean(exp.entropy, exp.response_mask)),
            "response_length": float(exp.response_mask.sum(1).float().mean()),
            "eos_rate": float(exp.ended.float().mean()),
            "explained_variance": explained_variance(exp.old_values, returns, exp.response_mask),
        }
        return rollout, metrics

    def micro_batches(self, rollout: Rollout, mini: torch.Tensor, gen: torch.Generator) -> list:
        """This process's share of a ptx batch when PPO-ptx is on, then its micro-batches of one mini-batch (its
        rows rank, rank + world, ...), each weighted by its share of the whole mini-batch. The ptx pass comes
        first: under DDP the last pass (the one that all-reduces) must use every weight, value head included."""
        mine = mini[self.dist.rank::self.dist.world]
        out = []
        if self.p.ptx_coef > 0:
            idx = torch.randint(len(self.ptx_train.lengths), (self.p.ptx_batch_size,), generator=gen).tolist()
            normalizer = max(1.0, float(sum(self.ptx_train.loss_tokens[i] for i in idx)))
            out.append(functools.partial(self.ptx_forward, idx[self.dist.rank::self.dist.world], normalizer))
        for chunk in mine.split(self.cfg.train.micro_batch_size):
            out.append(functools.partial(self.ppo_forward, rollout.select(chunk.to(rollout.input_ids.device)),
                                         len(chunk) / len(mini)))
        return out

    def ppo_forward(self, mb: Rollout, weight: float, model: PolicyAndValue) -> tuple[torch.Tensor, dict]:
        """weight * (policy loss + vf_coef * value loss - entropy_coef * entropy) on one micro-batch."""
        p = self.p
        token_logps, values, entropy = model(mb.input_ids, mb.attention_mask, mb.response_mask.shape[1],
                                             p.temperature)
        pl, pm = policy_loss(token_logps, mb.old_token_logps, mb.advantages, mb.response_mask, p.clip_range)
        vl, vm = value_loss(values, mb.old_values, mb.returns, mb.response_mask, p.value_clip)
        ent = masked_mean(entropy, mb.response_mask)
        metrics = {"policy_loss": pl.item(), "value_loss": vl.item(), "entropy_train": ent.item(), **pm, **vm}
        return weight * (pl + p.vf_coef * vl - p.entropy_coef * ent), {k: weight * v for k, v in metrics.items()}

    def ptx_forward(self, idx: list[int], normalizer: float, model: PolicyAndValue) -> tuple[torch.Tensor, dict]:
        """ptx_coef * LM loss on this process's rows of a random ptx batch (InstructGPT's PPO-ptx)."""
        filler = not idx  # more processes than ptx rows: a zero-weight pass keeps this process in step with the rest
        batch = {k: v.to(self.dist.device) for k, v in self.ptx_train.collate([[i] for i in idx or [0]]).items()}
        loss, _ = self.lm_loss(model.policy, batch, normalizer)
        if filler:
            return 0.0 * loss, {"ptx_loss": 0.0}
        return self.p.ptx_coef * loss, {"ptx_loss": float(loss.detach())}

    # ------------------------------------------------------------------ the loop's hooks

    def evaluate(self, model) -> dict:
        if self.ptx_eval is None:
            return {}
        return self.dist.forward(evaluate_lm, self.pv.policy, self.ptx_eval, self.lm_loss,
                                 self.cfg.train.micro_batch_size, self.dist)

    def begin(self, report, step: int) -> None:
        if self.start is None:
            self.start = {"before": self.greedy_samples(), "ptx_eval_before": self.evaluate(self.pv)}
            if self.start["ptx_eval_before"]:
                report.eval(step, self.start["ptx_eval_before"])

    def state(self, step: int) -> dict:
        return {"kl_coef": self.kl_ctl.coef, "moments": self.moments.state(), "start": self.start}

    def load_state(self, state: dict) -> None:
        self.kl_ctl.coef, self.moments = state["kl_coef"], RunningMoments(**state["moments"])
        self.start = state.get("start")

    def summary(self, history: list[dict], final_eval: dict) -> dict:
        train = [r for r in history if r["split"] == "train"]
        return {**(self.start or {}), "ptx_eval_after": final_eval, "after": self.greedy_samples(),
                "first_reward": train[0]["reward_raw"] if train else None,
                "last_reward": train[-1]["reward_raw"] if train else None}

    def finish(self, out_dir: Path, history: list[dict]) -> None:
        p = self.p
        plot_reward_kl(history, out_dir / "reward_kl.png", p.kl_target if p.kl_control == "adaptive" else None)

    def greedy_samples(self) -> list[dict]:
        """Greedy replies to the first two prompts, for a before/after comparison in the summary (main process;
        with sharded weights every process generates with it)."""
        if not (self.dist.main or self.dist.lockstep):
            return []
        samples = self.dist.forward(self._greedy)
        return samples if self.dist.main else []

    @torch.no_grad()
    def _greedy(self) -> list[dict]:
        policy = self.pv.policy.eval()
        with sampling_weights(policy, self.dist.lockstep):  # as rollouts sample: LoRA merged, oneDNN copies once
            return [{"prompt": q.text, "response": generate_reply(policy, self.tokenizer, q.messages,
                                                                  max_new_tokens=self.p.max_new_tokens,
                                                                  synced=self.dist.lockstep)}
                    for q in self.prompts[:2]]
