"""Critic-free RL with verifiable rewards (GRPO, RLOO, Dr. GRPO), read top to bottom:
config -> prompts (+ held-out prompts) -> policy (+ a reference only when grpo.kl_coef > 0) -> the shared
loop, whose every step here is: sample G responses to each of the step's prompts (sharded over
processes, each row with its own seed), score them with the weighted reward sources, gather, turn
each group's rewards into advantages (losses/grpo.py), then `epochs` passes of clipped token-level
updates over mini-batches, each one optimizer update.

Objective (Shao et al. 2024, DeepSeekMath eq. 3): the clipped surrogate at every response token with
the response's group-relative advantage, minus beta * k3 KL(pi || pi_ref). With one update per step
(the default) the sampler is the policy being updated: its own detached log-probs serve as pi_old
and no extra forward pass is spent on them. Groups whose G rewards are all equal get advantage 0:
they stay in the batch and its normaliser (not skipped) and are counted as `zero_variance_groups`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from posttrain.errors import ConfigError, DataError
from posttrain.losses.grpo import clipped_token_loss, group_advantages, token_weights
from posttrain.data.policy import drop_summary
from posttrain.data.prompts import Prompt, load_prompts
from posttrain.models.forward import packs_rows
from posttrain.models.load import load_base
from posttrain.models.methods import quantization_config
from posttrain.models.run import save_model
from posttrain.train.grpo_eval import greedy_eval, plot_rewards
from posttrain.train.config import RunConfig
from posttrain.train.loop import Loop, start_run
from posttrain.train.reference_model import policy_of, with_reference
from posttrain.train.reporting import write_sample
from posttrain.train.response_logps import response_logps
from posttrain.train.reward_set import RewardSet, build_reward_set
from posttrain.train.reward_sources import RunningMoments, shape_scores
from posttrain.train.setup import prepare_model
from posttrain.train.rollout import adapter_disabled, gather, gather_rows, prompt_indices, row_seed, sample
from posttrain.train.steps import StepSource

log = logging.getLogger("posttrain")


def run(cfg: RunConfig) -> dict:
    g = cfg.grpo
    dist_ctx, out_dir = start_run(cfg)
    batch = g.prompts_per_step * g.group_size
    if batch % dist_ctx.world or (g.mini_batch_size or batch) % dist_ctx.world:
        raise ConfigError(f"grpo: the step's {batch} responses and grpo.mini_batch_size ({g.mini_batch_size}) must be "
                          f"multiples of the number of processes ({dist_ctx.world})")
    device = dist_ctx.device

    # models: the policy (+ adapter); a reference only for the KL term: adapter off, else a frozen copy
    base, tokenizer = load_base(cfg.model, device, quantization_config(cfg.methods, device))
    ref_model = None
    if g.kl_coef > 0 and not cfg.methods.adapter_off_is_base():
        ref_model = copy.deepcopy(base).requires_grad_(False).eval()
    prepared = prepare_model(base, cfg)
    policy, trainable, total = prepared.model, prepared.trainable, prepared.total

    # data: prompts (their final assistant turn is the reference answer) and held-out prompts
    prompts, drops = load_prompts(cfg.data, cfg.template, tokenizer, g.max_new_tokens)
    if cfg.data.eval_datasets:
        eval_prompts, eval_drops = load_prompts(cfg.data, cfg.template, tokenizer, g.max_new_tokens,
                                                cfg.data.eval_datasets)
        drops = dict(Counter(drops) + Counter(eval_drops))
    else:
        prompts, eval_prompts = hold_out(prompts, cfg.data.val_size, cfg.train.seed)
    rewards = build_reward_set(cfg.reward, device)
    if rewards.needs_references:
        missing = sum(q.reference is None for q in prompts + eval_prompts)
        if missing:
            raise DataError(f"reward {', '.join(t.name for t in rewards.terms if t.wants_references)} compares with "
                            f"each prompt's reference (its final assistant turn): {missing} prompts have none")
    log.info("prompts: %d train, %d held out (dropped: %s); trainable parameters %d of %d", len(prompts),
             len(eval_prompts), drop_summary(drops) or "none", trainable, total)

    steps = GRPOSteps(cfg, policy, ref_model, tokenizer, prompts, eval_prompts, rewards, dist_ctx)
    # the copy inside the module the engine wraps: sharded like the policy under fsdp and ZeRO-3
    loop = Loop(cfg, with_reference(policy, ref_model), steps, dist_ctx=dist_ctx, param_groups=prepared.param_groups,
                on_step_start=prepared.hook)
    extra = {"stage": "grpo", "estimator": g.estimator, "loss_norm": steps.norm, "prompts": len(prompts),
             "eval_prompts": len(eval_prompts), "dropped_prompts": drops, "trainable_params": trainable,
             "total_params": total}
    return loop.run(lambda out, trained: save_model(policy_of(trained), tokenizer, out), extra_summary=extra)


def hold_out(prompts: list[Prompt], val_size: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held out): data.val_size prompts (a share if < 1, else a count) drawn with the seed."""
    n = int(val_size) if val_size >= 1 else round(val_size * len(prompts))
    if n <= 0:
        return prompts, []
    if n >= len(prompts):
        raise ConfigError(f"data.val_size={val_size} holds out all {len(prompts)} prompts")
    held = set(torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return [q for i, q in enumerate(prompts) if i not in held], [q for i, q in enumerate(prompts) if i in held]


@dataclass
class GroupRollout:
    """One step's responses: G consecutive rows per prompt. B rows, P prompt positions (left-padded), R
    response positions (right-padded)."""

    input_ids: torch.Tensor  # (B, P+R) prompt then response tokens
    attention_mask: torch.Tensor  # (B, P+R) bool, False on padding (both sides)
    response_mask: torch.Tensor  # (B, R) bool, True on sampled tokens up to and including the stop token
    ended: torch.Tensor  # (B,) bool, the response stopped on its own within the length limit
    old_token_logps: torch.Tensor | None  # (B, R) the sampler's; None when each step makes one update
    ref_token_logps: torch.Tensor | None  # (B, R) the reference's; None when grpo.kl_coef == 0

    def select(self, index: torch.Tensor) -> GroupRollout:
        return GroupRollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                               for f in fields(self)})


class GRPOSteps(StepSource):
    """One step = one sampled batch of groups, then `epochs` passes over it in mini-batches (one update each)."""

    def __init__(self, cfg: RunConfig, policy, ref_model, tokenizer, prompts: list[Prompt],
                 eval_prompts: list[Prompt], rewards: RewardSet, dist_ctx):
        g = self.g = cfg.grpo
        self.cfg, self.policy, self.ref_model, self.tokenizer = cfg, policy, ref_model, tokenizer
        self.prompts, self.eval_prompts, self.rewards, self.dist = prompts, eval_prompts, rewards, dist_ctx
        self.total_steps = cfg.train.max_steps
        self.batch = g.prompts_per_step * g.group_size
        self.mini = g.mini_batch_size or self.batch
        self.updates_per_step = g.epochs * (self.batch // self.mini)
        self.norm = g.loss_norm if g.loss_norm != "auto" else ("constant" if g.estimator == "dr_grpo" else "sequence")
        self.pack = packs_rows(cfg)
        self.start: dict | None = None  # before-training figures, kept in checkpoints so a resume reports them
        self.samples: list[dict] = []  # greedy replies to the first held-out prompts, from the latest evaluation

    # ------------------------------------------------------------------ one step

    def run_step(self, step: int, update) -> dict:
        rollout, advantages, metrics = self.rollout(step)
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + step)  # resume replays the same batches
        sums: dict[str, float] = {}
        for _ in range(self.g.epochs):
            order = torch.randperm(self.batch, generator=gen) if self.updates_per_step > 1 else torch.arange(self.batch)
            for start in range(0, self.batch, self.mini):
                micro = self.micro_batches(rollout, advantages, order[start:start + self.mini])
                for key, value in update(micro).items():
                    sums[key] = sums.get(key, 0.0) + value
        metrics |= {k: v / self.updates_per_step for k, v in sums.items() if not k.startswith("_")}
        return metrics | {"_tokens": float(rollout.attention_mask.sum()),
                          "_loss_tokens": float(rollout.response_mask.sum())}

    @torch.no_grad()
    def rollout(self, step: int) -> tuple[GroupRollout, torch.Tensor, dict]:
        """Sample and score this process's rows of the step, gather all of them; (rollout, advantages (B,), metrics)."""
        g, rank, world, seed = self.g, self.dist.rank, self.dist.world, self.cfg.train.seed
        order = prompt_indices(len(self.prompts), step, g.prompts_per_step, seed)
        mine = list(range(rank, self.batch, world))  # global rows sampled here: rank, rank + world, ...
        prompts = [self.prompts[order[j // g.group_size]] for j in mine]
        groups = [j // g.group_size for j in mine]
        # where the weights are usable and under the run's precision (the engine's), as PPO's rollouts
        s, old, ref = self.dist.forward(self.sample_local, prompts, [row_seed(seed, step, j) for j in mine], groups)
        scores = self.rewards.score([q.text for q in prompts], s.texts, [q.reference for q in prompts])  # (b, S)
        local = GroupRollout(s.input_ids, s.attention_mask, s.response_mask, s.ended, old, ref)
        rollout = gather(local, self.dist, self.tokenizer.pad_token_id)
        scores = gather_rows(scores.to(s.input_ids.device), self.dist).cpu()  # (B, S)
        total = self.rewards.total(scores)  # (B,)
        shaped = shape_scores(total, rollout.ended.cpu(), self.cfg.reward, RunningMoments())  # no-EOS penalty, clip
        advantages, zero_variance = group_advantages(shaped, g.group_size, g.estimator)
        if self.dist.main and g.sample_every and (step == 0 or (step + 1) % g.sample_every == 0):
            self.write_group(step, rollout, total, order[0])
        lengths = rollout.response_mask.sum(1).float()
        metrics = {"reward": float(total.mean()), "zero_variance_groups": float(zero_variance.float().mean()),
                   "response_length": float(lengths.mean()), "truncated": float(1 - rollout.ended.float().mean()),
                   **{f"reward/{n}": float(v) for n, v in zip(self.rewards.names, scores.mean(0))}}
        if self.rewards.accuracy is not None:
            metrics["accuracy"] = metrics[f"reward/{self.rewards.accuracy}"]
        if shaped is not total:
            metrics["reward_shaped"] = float(shaped.mean())
        return rollout, advantages.to(rollout.input_ids.device), metrics

    def sample_local(self, prompts: list, seeds: list[int], groups: list[int]) -> tuple:
        """This process's samples, and their log-probs under the sampler (when a step makes several updates)
        and under the reference (when the KL term is on)."""
        s = sample(self.policy, self.tokenizer, prompts, seeds, self.g, synced=self.dist.lockstep)
        old = self.logps(self.policy, s, groups) if self.updates_per_step > 1 else None
        ref = None
        if self.g.kl_coef > 0:
            with adapter_disabled(self.policy) if self.ref_model is None else contextlib.nullcontext():
                ref = self.logps(self.ref_model or self.policy, s, groups)
        return s, old, ref

    def logps(self, model, s, groups: list[int]) -> torch.Tensor:
        """(b, R) response log-probs of this process's samples, micro-batch by micro-batch, without gradients."""
        model.eval()
        micro = self.cfg.train.micro_batch_size
        return torch.cat([self.forward_logps(model, s.input_ids[i:i + micro], s.attention_mask[i:i + micro],
                                             s.response_mask[i:i + micro], groups[i:i + micro])
                          for i in range(0, len(groups), micro)])

    def forward_logps(self, model, input_ids, attention_mask, response_mask, groups) -> torch.Tensor:
        t = self.cfg.train
        return response_logps(model, input_ids, attention_mask, response_mask, groups, pack=self.pack,
                              temperature=self.g.temperature, chunk=t.loss_chunk)

    def micro_batches(self, rollout: GroupRollout, advantages: torch.Tensor, mini: torch.Tensor) -> list:
        """This process's micro-batches of one mini-batch (its rows rank, rank + world, ... in group order, so a
        micro-batch's responses to one prompt share it), normalised over the whole mini-batch."""
        mine = mini[self.dist.rank::self.dist.world].sort().values.to(rollout.input_ids.device)
        n_tokens = float(rollout.response_mask[mini.to(rollout.input_ids.device)].sum())
        return [functools.partial(self.forward, rollout.select(chunk), advantages[chunk],
                                  (chunk // self.g.group_size).tolist(), len(mini), n_tokens)
                for chunk in mine.split(self.cfg.train.micro_batch_size)]

    def forward(self, mb: GroupRollout, advantages: torch.Tensor, groups: list[int], n_rows: int, n_tokens: float,
                model) -> tuple[torch.Tensor, dict]:
        """The clipped token loss of one micro-batch, as its share of the mini-batch's loss."""
        g = self.g
        logps = self.forward_logps(policy_of(model), mb.input_ids, mb.attention_mask, mb.response_mask,
                                   groups)  # (b, R)
        old = logps.detach() if mb.old_token_logps is None else mb.old_token_logps
        weights = token_weights(mb.response_mask, self.norm, n_rows=n_rows, n_tokens=n_tokens,
                                max_len=g.max_new_tokens)
        return clipped_token_loss(logps, old, advantages, mb.response_mask, weights, clip=g.clip_range,
                                  n_tokens=n_tokens, kl_coef=g.kl_coef, ref_token_logps=mb.ref_token_logps)

    def write_group(self, step: int, rollout: GroupRollout, total: torch.Tensor, prompt_index: int) -> None:
        """The step's first group (the G responses to its first prompt) with their rewards, to logs/samples.jsonl."""
        width = rollout.response_mask.shape[1]
        ids = rollout.input_ids[:self.g.group_size, -width:]
        texts = [self.tokenizer.decode(row[m], skip_special_tokens=True)
                 for row, m in zip(ids, rollout.response_mask[:self.g.group_size])]
        q = self.prompts[prompt_index]
        write_sample(Path(self.cfg.output.dir), step + 1, {"prompt": q.text, "reference": q.reference,
                                                          "responses": texts,
                                                          "rewards": total[:self.g.group_size].tolist()})

    # ------------------------------------------------------------------ the loop's hooks

    def evaluate(self, model) -> dict:
        if not self.eval_prompts:
            return {}
        g = self.g
        # where the weights are usable (FSDP: inside its root forward), as the rollouts
        metrics, self.samples = self.dist.forward(functools.partial(
            greedy_eval, self.policy, self.tokenizer, self.eval_prompts, self.rewards, max_new_tokens=g.max_new_tokens,
            stop=g.stop_strings, batch_size=self.batch, dist_ctx=self.dist))
        return metrics

    def begin(self, report, step: int) -> None:
        if self.start is None:
            self.start = {"eval_before": self.evaluate(self.policy), "before": self.samples}
            if self.start["eval_before"]:
                report.eval(step, self.start["eval_before"])

    def state(self, step: int) -> dict:
        return {"start": self.start}

    def load_state(self, state: dict) -> None:
        self.start = state.get("start")

    def summary(self, history: list[dict], final_eval: dict) -> dict:
        train = [r for r in history if r["split"] == "train"]
        first, last = (train[0], train[-1]) if train else ({}, {})
        return {**(self.start or {}), "eval_after": final_eval, "after": self.samples,
                "first_reward": first.get("reward"), "last_reward": last.get("reward"),
                "first_accuracy": first.get("accuracy"), "last_accuracy": last.get("accuracy")}

    def finish(self, out_dir: Path, history: list[dict]) -> None:
        plot_rewards(history, out_dir / "reward_accuracy.png", self.rewards.names)
