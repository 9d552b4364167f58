"""The one training engine every stage reuses.

A stage hands over its model, a `Batches` description of its data and a loss function; the
loop owns accumulation (normalised over the whole effective batch), gradient sync across
processes, clipping, the schedule, evaluation, checkpoints, exact resume and reporting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import torch
import torch.distributed as dist

from posttrain.config import OptimConfig, RunConfig
from posttrain.data.collate import StepPlan, epoch_units, plan_epoch
from posttrain.losses.moments import fold_moments, is_moment
from posttrain.train.checkpoint import find_resume, load_checkpoint, save_checkpoint
from posttrain.train.reporting import RunReport, already_complete

_CORE_METRICS = {"nll_sum", "tokens"}  # what every loss may report; any other key is summed as a stage metric
LossFn = Callable[[torch.nn.Module, dict, float], tuple[torch.Tensor, dict]]
# Called before every optimizer step with the 0-based global step (e.g. LISA switches blocks).
StepHook = Callable[[int, torch.optim.Optimizer], None]


@dataclass
class Batches:
    """A tokenized dataset as the loop sees it."""

    lengths: list[int]  # tokens per sample
    loss_tokens: list[int]  # supervised tokens per sample (the accumulation normaliser counts these)
    collate: Callable[[list[list[int]]], dict]  # units -> tensors (on CPU)


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
        from accelerate import PartialState

        state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
        return cls(rank=state.process_index, world=state.num_processes, device=state.device)

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def start_run(cfg: RunConfig) -> tuple[Dist, Path]:
    """What every stage does first: join the process group, seed, create the run folder, save the config."""
    import logging

    from posttrain.config import save_config

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


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, data: Batches, loss_fn: LossFn, micro: int, dist_ctx: Dist) -> dict:
    """Token-weighted mean loss over `data` (sharded over processes), and perplexity."""
    model.eval()
    order = [[i] for i in range(len(data.lengths))]
    loss_sum = n_tokens = 0.0
    extra: dict[str, float] = {}
    for start in range(dist_ctx.rank * micro, len(order), micro * dist_ctx.world):
        batch = {k: v.to(dist_ctx.device) for k, v in data.collate(order[start:start + micro]).items()}
        loss, metrics = loss_fn(model, batch, 1.0)
        loss_sum += float(loss)
        n_tokens += metrics.get("tokens", 0.0)
        for key in metrics.keys() - _CORE_METRICS:
            extra[key] = extra.get(key, 0.0) + metrics[key]
    keys = sorted(extra)
    loss_sum, n_tokens, *values = dist_ctx.sum([loss_sum, n_tokens, *(extra[k] for k in keys)])
    loss = loss_sum / max(n_tokens, 1.0)
    if keys:  # stage metrics: per-unit means, like the loss (no perplexity for non-LM losses); moments as is
        stage = {k: v if is_moment(k) else v / max(n_tokens, 1.0) for k, v in zip(keys, values, strict=True)}
        return {"loss": loss} | fold_moments(stage)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


class Loop:
    def __init__(self, cfg: RunConfig, model: torch.nn.Module, data: Batches, loss_fn: LossFn, *,
                 eval_data: Batches | None = None, dist_ctx: Dist | None = None,
                 param_groups: list[dict] | None = None, on_step_start: StepHook | None = None):
        self.cfg, self.model, self.data, self.loss_fn, self.eval_data = cfg, model, data, loss_fn, eval_data
        self.dist = dist_ctx or Dist()
        self.on_step_start = on_step_start
        groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = make_optimizer(groups, cfg.optim)
        self.total_steps = self._count_steps()
        warmup = int(cfg.optim.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup, cfg.optim.scheduler))
        self.out_dir = Path(cfg.output.dir)

    def _plans(self, epoch: int) -> list[StepPlan]:
        t = self.cfg.train
        units = epoch_units(self.data.lengths, packing=self.cfg.data.packing, max_length=self.cfg.data.max_length,
                            seed=t.seed, epoch=epoch)
        return plan_epoch(units, self.data.loss_tokens, micro=t.micro_batch_size, accum=t.grad_accum,
                          world=self.dist.world, rank=self.dist.rank)

    def _count_steps(self) -> int:
        t = self.cfg.train
        if t.max_steps > 0:
            return t.max_steps
        full, frac = int(t.epochs), t.epochs - int(t.epochs)
        steps = sum(len(self._plans(e)) for e in range(full))
        if frac > 0:
            steps += math.ceil(frac * len(self._plans(full)))
        return max(1, steps)

    # ------------------------------------------------------------------ one optimizer step

    def _step(self, plan: StepPlan, step: int = 0) -> dict:
        if self.on_step_start is not None:
            self.on_step_start(step, self.optimizer)
        self.model.train()
        sums = {"loss": 0.0, "nll_sum": 0.0, "tokens": 0.0, "real_tokens": 0.0}
        for units in plan.micro_batches:
            batch = {k: v.to(self.dist.device) for k, v in self.data.collate(units).items()}
            loss, metrics = self.loss_fn(self.model, batch, plan.normalizer)
            loss.backward()
            sums["loss"] += float(loss.detach())
            sums["nll_sum"] += metrics.get("nll_sum", 0.0)
            sums["tokens"] += metrics.get("tokens", 0.0)
            sums["real_tokens"] += float(batch["real_mask"].sum())
            # stage metrics arrive pre-divided by the normalizer (moments: raw sums, folded after the step)
            for key in metrics.keys() - _CORE_METRICS:
                sums[key] = sums.get(key, 0.0) + metrics[key]
        self._sync_grads()
        clip = self.cfg.optim.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        extra = sorted(sums.keys() - {"loss", "nll_sum", "tokens", "real_tokens"})
        loss, nll, tokens, real, *values = self.dist.sum(
            [sums["loss"], sums["nll_sum"], sums["tokens"], sums["real_tokens"], *(sums[k] for k in extra)])
        out = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "_tokens": real, "_loss_tokens": tokens}
        if not extra or nll:  # token NLL only for stages that report one
            out["token_nll"] = nll / max(tokens, 1.0)
        return out | fold_moments(dict(zip(extra, values)))

    def _sync_grads(self) -> None:
        """Sum gradients over processes: each loss is already divided by the global token count."""
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

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        if self.eval_data is None:
            return {}
        return evaluate_lm(self.model, self.eval_data, self.loss_fn, self.cfg.train.micro_batch_size, self.dist)

    # ------------------------------------------------------------------ the run

    def run(self, save_model: Callable[[Path], None], extra_summary: dict | None = None) -> dict:
        t = self.cfg.train
        ckpt_dir = self.out_dir / "checkpoints"
        position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
        resume = find_resume(t.resume, ckpt_dir)
        if resume is not None:
            position = load_checkpoint(resume, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
            done = already_complete(self.out_dir, position["global_step"], self.total_steps)
            if done is not None:
                return done | {"processes": self.dist.world}
        report = RunReport(self.out_dir, self.total_steps, enabled=self.dist.main,
                           tensorboard=self.cfg.output.tensorboard, start_step=position["global_step"])
        step, last = position["global_step"], {}
        epoch = position["epoch"]
        while step < self.total_steps:
            plans = self._plans(epoch)
            for i in range(position["step_in_epoch"] if epoch == position["epoch"] else 0, len(plans)):
                metrics = self._step(plans[i], step)
                step += 1
                # sums of float weights (rm: 1/3 per pair) land just under the integer: round, never truncate
                tokens, loss_tokens = round(metrics.pop("_tokens")), round(metrics.pop("_loss_tokens"))
                report.step(step, metrics | {"epoch": epoch + (i + 1) / len(plans)}, tokens=tokens,
                            loss_tokens=loss_tokens, log=step % t.log_every == 0 or step == self.total_steps)
                last = metrics
                if t.eval_every and step % t.eval_every == 0 and step < self.total_steps:
                    report.eval(step, self.evaluate())
                if t.save_every and step % t.save_every == 0 and self.dist.main:
                    nxt = {"epoch": epoch + (i + 1 == len(plans)), "global_step": step,
                           "step_in_epoch": 0 if i + 1 == len(plans) else i + 1}
                    save_checkpoint(ckpt_dir, model=self.model, optimizer=self.optimizer, params=self.params,
                                    scheduler=self.scheduler, position=nxt, keep_last=t.keep_last)
                if step >= self.total_steps:
                    break
            epoch += 1
        final_eval = self.evaluate()
        if final_eval:
            report.eval(step, final_eval)
        if self.dist.main:
            save_model(self.out_dir)
        # no step ran when resuming at the final checkpoint: the last logged loss is the final one
        final_loss = last["loss"] if "loss" in last else report.last_train("loss")
        summary = {"steps": step, "total_steps": self.total_steps, "final_train_loss": final_loss,
                   "final_eval_loss": final_eval.get("loss"), "processes": self.dist.world, **(extra_summary or {})}
        return report.finish(summary)
