"""What the loop runs: `StepSource`, the protocol of a run's steps, and `DataSteps`, steps over a dataset.

A source says how many steps the run has and runs step i by calling the loop's `update` once per
optimizer update with that update's micro-batches. `DataSteps` (SFT, RM, DPO) plans each epoch
from the seed alone (packing, accumulation, the share of each process), so any step can be located
from its index: a resumed run and N processes see the batches one uninterrupted process sees.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from posttrain.train.config import TrainConfig
from posttrain.data.batches import Batches
from posttrain.data.collate import StepPlan, epoch_units, plan_epoch
from posttrain.losses.moments import fold_moments, is_moment

LossFn = Callable[[nn.Module, dict, float], tuple[torch.Tensor, dict]]
Update = Callable[[list], dict]  # the loop's `update(micro_batches) -> metrics`
_CORE_METRICS = {"nll_sum", "tokens"}  # what every loss may report; any other key is summed as a stage metric



class StepSource:
    """The steps of a run. Subclasses set `total_steps` and `updates_per_step` and define `run_step`;
    the rest are optional hooks (defaults: no eval, no state of their own, nothing extra to report)."""

    total_steps: int
    updates_per_step: int = 1

    def run_step(self, step: int, update: Update) -> dict:
        """Run 0-based step `step`; returns its metrics (`_tokens` / `_loss_tokens` count throughput)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict:
        """Held-out metrics of `model` (the loop's), or {} when there is nothing to evaluate. Runs on every
        process; anything that runs the model goes through `dist.forward` (sharded engines need it)."""
        return {}

    def filler(self):
        """A micro-batch for a process left without one in an update (its loss is weighted 0)."""
        raise NotImplementedError(f"{type(self).__name__} gives a process no micro-batch and has no filler")

    def state(self, step: int) -> dict:
        """JSON-able state to checkpoint after `step` steps (besides weights, optimizer and RNG)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore what `state` saved (the loop has restored weights, optimizer, schedule and RNG)."""

    def begin(self, report, step: int) -> None:
        """Called once before the first step to run (after a resume, too)."""

    def summary(self, history: list[dict], final_eval: dict) -> dict:
        """Extra entries for train_summary.json."""
        return {}

    def finish(self, out_dir: Path, history: list[dict]) -> None:
        """Called on the main process after the summary is written (e.g. extra plots)."""


@torch.no_grad()
def evaluate_lm(model: nn.Module, data: Batches, loss_fn: LossFn, micro: int, dist_ctx) -> dict:
    """Token-weighted mean loss over `data` (sharded over processes), and perplexity."""
    model.eval()
    order = [[i] for i in range(len(data.lengths))]
    loss_sum = n_tokens = 0.0
    extra: dict[str, float] = {}
    starts = list(range(dist_ctx.rank * micro, len(order), micro * dist_ctx.world))
    if dist_ctx.lockstep:  # sharded weights: every process runs as many passes as the busiest one
        for _ in range(dist_ctx.max(len(starts)) - len(starts)):
            loss_fn(model, {k: v.to(dist_ctx.device) for k, v in data.collate(order[:micro]).items()}, 1.0)
    for start in starts:
        batch = {k: v.to(dist_ctx.device) for k, v in data.collate(order[start:start + micro]).items()}
        loss, metrics = loss_fn(model, batch, 1.0)
        loss_sum += float(loss)
        n_tokens += metrics.get("tokens", 0.0)
        for key in metrics.keys() - _CORE_METRICS:
            extra[key] = extra.get(key, 0.0) + metrics[key]
    # by name: a process whose shard of an uneven held-out split is empty has no stage metrics to send
    extra = dist_ctx.sum_dict(extra | {"_loss_sum": loss_sum, "_tokens": n_tokens})
    loss_sum, n_tokens = extra.pop("_loss_sum"), extra.pop("_tokens")
    loss = loss_sum / max(n_tokens, 1.0)
    if extra:  # stage metrics: per-unit means, like the loss (no perplexity for non-LM losses); moments as is
        stage = {k: v if is_moment(k) else v / max(n_tokens, 1.0) for k, v in extra.items()}
        return {"loss": loss} | fold_moments(stage)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


class DataSteps(StepSource):
    """Optimizer steps over a tokenized dataset: epochs of shuffled (optionally packed) units, split into
    micro-batches of `train.micro_batch_size` units, `train.grad_accum` x processes of them per step."""

    def __init__(self, data: Batches, loss_fn: LossFn, *, train: TrainConfig, packing: bool, max_length: int,
                 dist_ctx, eval_data: Batches | None = None):
        self.data, self.loss_fn, self.train, self.eval_data = data, loss_fn, train, eval_data
        self.packing, self.max_length, self.dist = packing, max_length, dist_ctx
        self._cache: dict[int, list[StepPlan]] = {}
        self.total_steps = self._count_steps()

    def plans(self, epoch: int) -> list[StepPlan]:
        if epoch not in self._cache:
            t = self.train
            units = epoch_units(self.data.lengths, packing=self.packing, max_length=self.max_length, seed=t.seed,
                                epoch=epoch)
            self._cache = {epoch: plan_epoch(units, self.data.loss_tokens, micro=t.micro_batch_size,
                                             accum=t.grad_accum, world=self.dist.world, rank=self.dist.rank)}
        return self._cache[epoch]

    def _count_steps(self) -> int:
        t = self.train
        if t.max_steps > 0:
            return t.max_steps
        full, frac = int(t.epochs), t.epochs - int(t.epochs)
        steps = sum(len(self.plans(e)) for e in range(full))
        if frac > 0:
            steps += math.ceil(frac * len(self.plans(full)))
        return max(1, steps)

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, index of the step within that epoch) of 0-based global step `step`."""
        epoch = 0
        while step >= len(self.plans(epoch)) > 0:
            step -= len(self.plans(epoch))
            epoch += 1
        return epoch, step

    def micro_batches(self, plan: StepPlan) -> list:
        return [functools.partial(self._forward, units, plan.normalizer) for units in plan.micro_batches]

    def _forward(self, units: list[list[int]], normalizer: float, model: nn.Module) -> tuple[torch.Tensor, dict]:
        batch = {k: v.to(self.dist.device) for k, v in self.data.collate(units).items()}
        loss, metrics = self.loss_fn(model, batch, normalizer)
        return loss, {**metrics, "_tokens": float(batch["real_mask"].sum())}

    def run_step(self, step: int, update: Update) -> dict:
        epoch, index = self.locate(step)
        plans = self.plans(epoch)
        return update(self.micro_batches(plans[index])) | {"epoch": epoch + (index + 1) / len(plans)}

    def state(self, step: int) -> dict:
        epoch, index = self.locate(step)  # where the next step starts (for a reader of trainer_state.json)
        return {"epoch": epoch, "step_in_epoch": index}

    def filler(self):
        return functools.partial(self._forward, [[0]], 1.0)

    def evaluate(self, model: nn.Module) -> dict:
        if self.eval_data is None:
            return {}
        return self.dist.forward(evaluate_lm, model, self.eval_data, self.loss_fn, self.train.micro_batch_size,
                                 self.dist)
