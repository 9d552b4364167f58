"""The one training engine every stage reuses.

A stage hands over its model and a `StepSource` (train/steps.py): how many steps the run has and
what one step does. A step is one or more optimizer updates, each a list of micro-batches: for
SFT, RM and DPO one update over a planned slice of the data; for PPO a fresh rollout, then
several updates over it. The loop alone steps the optimizer and the schedule, clips, evaluates,
checkpoints, resumes exactly and reports; how the model is wrapped, how gradients meet across
processes and how checkpoints are laid out is the engine's part (train/engines/, per
train.distributed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from posttrain.train.config import OptimConfig, RunConfig, TrainConfig, save_config
from posttrain.losses.moments import fold_moments
from posttrain.models.host_memory import retain_freed_memory
from posttrain.train.checkpoint import find_resume
from posttrain.train.engines import build_engine, join, lockstep
from posttrain.train.engines.base import zero_weight
from posttrain.train.reporting import RunReport, already_complete

log = logging.getLogger("posttrain")
# One micro-batch: given the model, runs its forward pass and returns (loss to backward, metrics to sum).
MicroBatch = Callable[[nn.Module], tuple[torch.Tensor, dict]]
# Called before every optimizer update with the 0-based update index (e.g. LISA switches blocks).
StepHook = Callable[[int, torch.optim.Optimizer], None]


@dataclass
class Dist:
    """Where this process sits: rank, world size and device (one process: rank 0 of 1), and how to run the
    model outside an update (set by the loop's engine)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    lockstep: bool = False  # sharded weights: every process must run the same forward passes (FSDP, ZeRO-3)
    runner: Callable | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, train: TrainConfig) -> Dist:
        """Join the process group when launched by torchrun / accelerate launch (gloo on CPU, nccl on CUDA)."""
        rank, world, device = join(train)
        return cls(rank=rank, world=world, device=device, lockstep=lockstep(train) and world > 1)

    def forward(self, fn, *args):
        """fn(*args) where the model's weights are usable (FSDP: inside its root forward), under the run's
        precision; under lockstep every process makes the same calls."""
        return fn(*args) if self.runner is None else self.runner(fn, *args)

    def max(self, value: int) -> int:
        """The largest `value` over processes."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every process's `obj` (picklable), by rank."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Sum a metrics dict over processes; a key one process lacks counts as 0 there."""
        if self.world == 1:
            return dict(values)
        keys = sorted(set().union(*self.gather(sorted(values))))
        return dict(zip(keys, self.sum([values.get(k, 0.0) for k in keys]), strict=True))


def start_run(cfg: RunConfig) -> tuple[Dist, Path]:
    """What every stage does first: join the process group, seed, create the run folder, save the config."""
    dist_ctx = Dist.from_environment(cfg.train)
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
        retain_freed_memory(cfg.train.keep_freed_memory)
        groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        self.engine = build_engine(cfg, self.dist)
        groups = self.engine.prepare(model, groups)
        self.params = self.engine.params
        self.optimizer = self.engine.attach(make_optimizer(groups, cfg.optim))
        self.dist.runner = self.engine.call
        self.total_steps = steps.total_steps
        total_updates = self.total_steps * steps.updates_per_step
        warmup = int(cfg.optim.warmup_ratio * total_updates)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_updates, warmup, cfg.optim.scheduler))
        self.out_dir = Path(cfg.output.dir)

    # ------------------------------------------------------------------ one optimizer update

    def update(self, micro_batches: list[MicroBatch]) -> dict:
        """Backward every micro-batch (losses arrive divided by the whole update's normaliser; the engine makes
        the gradients meet across processes), clip, step; returns the micro-batch metrics summed over
        processes, with lr and grad norm."""
        if self.on_step_start is not None:
            self.on_step_start(self.scheduler.last_epoch, self.optimizer)  # updates done so far
        self.engine.train()
        sums: dict[str, float] = {"loss": 0.0}
        micro_batches = self._in_step(micro_batches)
        for k, micro in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            with self.engine.accumulating(last):
                loss, metrics = self.engine.forward(micro)
                self.engine.backward(loss, last)
            sums["loss"] += float(loss.detach())
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self.engine.clip_and_step(self.cfg.optim.max_grad_norm)
        self.scheduler.step()
        self.engine.zero_grad()
        return summed_metrics(self.dist.sum_dict(sums)) | {"lr": lr, "grad_norm": grad_norm}

    def _in_step(self, micro_batches: list[MicroBatch]) -> list[MicroBatch]:
        """Every process runs as many passes as the busiest one (the engines' collectives pair them up): a
        process with fewer micro-batches (an epoch's last step) adds zero-weight passes."""
        if self.dist.world == 1:
            return micro_batches
        missing = self.dist.max(len(micro_batches)) - len(micro_batches)
        if missing == 0:
            return micro_batches
        filler = zero_weight(micro_batches[0] if micro_batches else self.steps.filler())
        return list(micro_batches) + [filler] * missing

    # ------------------------------------------------------------------ the run

    def run(self, save_model: Callable[[Path, nn.Module], None], extra_summary: dict | None = None) -> dict:
        """Train to the end (or resume), evaluate, then `save_model(out_dir, model)` on the main process with
        the trained model as plain modules with whole weights; returns the summary."""
        t = self.cfg.train
        ckpt_dir = self.out_dir / "checkpoints"
        step = 0
        resume = find_resume(t.resume, ckpt_dir)
        if resume is not None:
            position = self.engine.load_checkpoint(resume, self.scheduler)
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
            if t.save_every and step % t.save_every == 0:
                self.engine.save_checkpoint(ckpt_dir, self.scheduler, {"global_step": step, **self.steps.state(step)},
                                            t.keep_last)
        final_eval = self.steps.evaluate(self.model)
        if final_eval:
            report.eval(step, final_eval)
        plain = self.engine.plain_model()  # every process takes part in gathering sharded weights
        if self.dist.main:
            save_model(self.out_dir, plain)
        # no step ran when resuming at the final checkpoint: the last logged loss is the final one
        final_loss = last["loss"] if "loss" in last else report.last_train("loss")
        summary = {"steps": step, "total_steps": self.total_steps, "final_train_loss": final_loss,
                   "final_eval_loss": final_eval.get("loss"), "processes": self.dist.world,
                   "distributed": t.distributed, **(extra_summary or {})}
        result = report.finish(summary | self.steps.summary(report.history, final_eval))
        if self.dist.main:
            self.steps.finish(self.out_dir, report.history)
        return result
