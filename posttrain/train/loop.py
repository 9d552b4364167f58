"""The one training engine every stage reuses.

A stage hands over its model and a `StepSource` (train/steps.py): how many steps the run has and
what one step does. A step is one or more optimizer updates, each a list of micro-batches: for
SFT, RM and DPO one update over a planned slice of the data; for PPO a fresh rollout, then
several updates over it. The loop alone steps the optimizer and the schedule, syncs gradients
across processes, clips, evaluates, checkpoints, resumes exactly and reports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch import nn

from posttrain.train.config import OptimConfig, RunConfig, save_config
from posttrain.losses.moments import fold_moments
from posttrain.train.checkpoint import find_resume, load_checkpoint, save_checkpoint
from posttrain.train.reporting import RunReport, already_complete

log = logging.getLogger("posttrain")
# One micro-batch: given the model, runs its forward pass and returns (loss to backward, metrics to sum).
MicroBatch = Callable[[nn.Module], tuple[torch.Tensor, dict]]
# Called before every optimizer update with the 0-based update index (e.g. LISA switches blocks).
StepHook = Callable[[int, torch.optim.Optimizer], None]


@dataclass
class Dist:
    """Where this process sits: rank, world size and device (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str = "auto") -> Dist:
        """Join the process group when launched by torchrun / accelerate launch (gloo on CPU)."""
        state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
        return cls(rank=state.process_index, world=state.num_processes, device=state.device)

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Sum a metrics dict over processes; a key one process lacks counts as 0 there."""
        if self.world == 1:
            return dict(values)
        names: list[list[str]] = [[] for _ in range(self.world)]
        dist.all_gather_object(names, sorted(values))
        keys = sorted(set().union(*names))
        return dict(zip(keys, self.sum([values.get(k, 0.0) for k in keys]), strict=True))


def start_run(cfg: RunConfig) -> tuple[Dist, Path]:
    """What every stage does first: join the process group, seed, create the run folder, save the config."""
    dist_ctx = Dist.from_environment(cfg.train.device)
    if not dist_ctx.main:
        logging.getLogger("posttrain").setLevel(logging.WARNING)  # one process speaks for the run
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dist_ctx.main:
        save_config(cfg, out_dir / "config.yaml")
    return dist_ctx, out_dir


def make_optimizer(params: list[torch.nn.Parameter] | list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over a parameter list, or over groups (a group's own "lr" overrides cfg.lr)."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Linear warmup to 1, then cosine/linear decay to 0 (or constant) at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * progress))) if kind == "cosine" else max(0.0, 1 - progress)


def summed_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Micro-batch metric sums (over processes too) -> what is logged: a token NLL for LM losses (`nll_sum`
    over `tokens`), `name/mean` and `name/std` for moments; `_tokens` / `_loss_tokens` for throughput."""
    out = dict(sums)
    nll, tokens = out.pop("nll_sum", 0.0), out.pop("tokens", 0.0)
    out["_tokens"], out["_loss_tokens"] = out.pop("_tokens", 0.0), tokens
    stage = set(out) - {"loss", "_tokens", "_loss_tokens"}
    if not stage or nll:  # token NLL only for stages that report one
        out["token_nll"] = nll / max(tokens, 1.0)
    return fold_moments(out)


class Loop:
    def __init__(self, cfg: RunConfig, model: nn.Module, steps, *, dist_ctx: Dist | None = None,
                 param_groups: list[dict] | None = None, on_step_start: StepHook | None = None):
        self.cfg, self.model, self.steps = cfg, model, steps
        self.dist = dist_ctx or Dist()
        self.on_step_start = on_step_start
        groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = make_optimizer(groups, cfg.optim)
        self.total_steps = steps.total_steps
        total_updates = self.total_steps * steps.updates_per_step
        warmup = int(cfg.optim.warmup_ratio * total_updates)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_updates, warmup, cfg.optim.scheduler))
        self.out_dir = Path(cfg.output.dir)

    # ------------------------------------------------------------------ one optimizer update

    def update(self, micro_batches: list[MicroBatch]) -> dict:
        """Backward every micro-batch (losses arrive divided by the whole update's normaliser), sync the
        gradients, clip, step; returns the micro-batch metrics summed over processes, with lr and grad norm."""
        if self.on_step_start is not None:
            self.on_step_start(self.scheduler.last_epoch, self.optimizer)  # updates done so far
        self.model.train()
        sums: dict[str, float] = {"loss": 0.0}
        for micro in micro_batches:
            loss, metrics = micro(self.model)
            loss.backward()
            sums["loss"] += float(loss.detach())
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        self._sync_grads()
        clip = self.cfg.optim.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return summed_metrics(self.dist.sum_dict(sums)) | {"lr": lr, "grad_norm": float(grad_norm)}

    def _sync_grads(self) -> None:
        """Sum gradients over processes: each loss is already divided by the global normaliser."""
        if self.dist.world == 1:
            return
        # Frozen-this-step parameters (LISA) stay gradient-free, so AdamW leaves them alone.
        params = [p for p in self.params if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    # ------------------------------------------------------------------ the run

    def run(self, save_model: Callable[[Path], None], extra_summary: dict | None = None) -> dict:
        t = self.cfg.train
        ckpt_dir = self.out_dir / "checkpoints"
        step = 0
        resume = find_resume(t.resume, ckpt_dir)
        if resume is not None:
            position = load_checkpoint(resume, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
            step = position["global_step"]
            done = already_complete(self.out_dir, step, self.total_steps)
            if done is not None:
                return done | {"processes": self.dist.world}
            self.steps.load_state(position)
        report = RunReport(self.out_dir, self.total_steps, enabled=self.dist.main,
                           tensorboard=self.cfg.output.tensorboard, start_step=step)
        self.steps.begin(report, step)
        last: dict = {}
        while step < self.total_steps:
            metrics = self.steps.run_step(step, self.update)
            step += 1
            # sums of float weights (rm: 1/3 per pair) land just under the integer: round, never truncate
            tokens, loss_tokens = round(metrics.pop("_tokens", 0.0)), round(metrics.pop("_loss_tokens", 0.0))
            report.step(step, metrics, tokens=tokens, loss_tokens=loss_tokens,
                        log=step % t.log_every == 0 or step == self.total_steps)
            last = metrics
            if t.eval_every and step % t.eval_every == 0 and step < self.total_steps:
                report.eval(step, self.steps.evaluate(self.model))
            if t.save_every and step % t.save_every == 0 and self.dist.main:
                save_checkpoint(ckpt_dir, model=self.model, optimizer=self.optimizer, params=self.params,
                                scheduler=self.scheduler, position={"global_step": step, **self.steps.state(step)},
                                keep_last=t.keep_last)
        final_eval = self.steps.evaluate(self.model)
        if final_eval:
            report.eval(step, final_eval)
        if self.dist.main:
            save_model(self.out_dir)
        # no step ran when resuming at the final checkpoint: the last logged loss is the final one
        final_loss = last["loss"] if "loss" in last else report.last_train("loss")
        summary = {"steps": step, "total_steps": self.total_steps, "final_train_loss": final_loss,
                   "final_eval_loss": final_eval.get("loss"), "processes": self.dist.world, **(extra_summary or {})}
        result = report.finish(summary | self.steps.summary(report.history, final_eval))
        if self.dist.main:
            self.steps.finish(self.out_dir, report.history)
        return result
