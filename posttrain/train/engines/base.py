"""The engine of one process (train.distributed: none) and what every engine offers the loop.

The loop drives an update through these methods whatever the engine: `forward` one micro-batch,
`backward` it, `clip_and_step`, `zero_grad`; `call` runs the model outside an update (eval, PPO
rollouts); `save_checkpoint` / `load_checkpoint` and `plain_model` (the trained model as plain
modules with whole weights, on the main process) for the run's output. Precision lives here too:
autocast over float32 trainable weights, and loss scaling for fp16.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from posttrain.models.checkpointing import enable_gradient_checkpointing
from posttrain.train import checkpoint as ckpt
from posttrain.train.engines.frozen_storage import frozen_base_in_engine_calls, restore, store_frozen_linears

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Forward(nn.Module):
    """Runs a function inside this module's forward. DDP's reducer and FSDP's root hooks fire only through the
    wrapped module's forward, and the losses call the decoder and the LM head separately, never `model(...)`."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, fn, *args):
        return fn(*args)


def zero_weight(micro):
    """A micro-batch that only keeps collectives in step: a real forward and backward, loss x 0, no metrics."""

    def run(model):
        loss, _ = micro(model)
        return loss * 0.0, {}

    return run


def master_weights(model: nn.Module) -> None:
    """Trainable weights in float32 under autocast, whatever the storage dtype of the frozen rest."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


class Engine:
    """train.distributed: none. Subclasses override `wrap` / `attach` and the hooks they change."""

    name = "none"
    lockstep = False  # every forward is a collective (FSDP, ZeRO-3): all processes run the same passes

    def __init__(self, cfg, dist_ctx):
        self.cfg, self.dist = cfg, dist_ctx
        precision = cfg.train.precision  # fp16 on a CPU was refused on joining (engines.join)
        self.amp_dtype = AMP_DTYPES[precision]
        self.scaler = self.make_scaler() if precision == "fp16" else None
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[nn.Parameter] = []
        self.stored_low: list[nn.Parameter] = []  # frozen weights held in the autocast dtype (frozen_storage.py)

    # ------------------------------------------------------------------ setup

    def make_scaler(self) -> torch.amp.GradScaler:
        """fp16's loss scaler (every process holds whole gradients here, so they agree on overflow)."""
        return torch.amp.GradScaler(self.dist.device.type)

    def prepare(self, model: nn.Module, groups: list[dict]) -> list[dict]:
        """Precision, gradient checkpointing, then the engine's wrapping; returns the optimizer's groups."""
        if self.amp_dtype is not None:
            master_weights(model)
            if self.name == "none" and frozen_base_in_engine_calls(self.cfg):
                self.stored_low = store_frozen_linears(model, self.amp_dtype)
        if self.cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.model = model
        groups = self.wrap(model, groups)
        self.params = [p for g in groups for p in g["params"]]
        return groups

    def wrap(self, model: nn.Module, groups: list[dict]) -> list[dict]:
        return groups

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Take the optimizer; returns the torch optimizer whose groups the schedule sets."""
        self.optimizer = optimizer
        return optimizer

    # ------------------------------------------------------------------ running the model

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    def call(self, fn, *args):
        """fn(*args) outside an update (eval, rollouts) where the weights are usable; every process calls it
        with the same passes when the engine is in lockstep."""
        with self.autocast():
            return fn(*args)

    def forward(self, micro) -> tuple[torch.Tensor, dict]:
        with self.autocast():
            return micro(self.model)

    def accumulating(self, last: bool):
        """Context around one micro-batch's forward and backward (DDP skips its all-reduce but on the last)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def clip_and_step(self, max_norm: float) -> float:
        """Clip the global gradient norm (0 = no clipping), step the optimizer; returns the norm before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else math.inf)
        if self.scaler is None:
            self.optimizer.step()
        else:  # skips the step when the scaled gradients overflowed, then adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return float(getattr(norm, "full_tensor", lambda: norm)())

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def train(self) -> None:
        self.model.train()

    def plain_model(self) -> nn.Module | None:
        """The trained model as plain modules with whole weights on the main process (None elsewhere); every
        process calls it (sharded engines gather)."""
        restore(self.stored_low)  # the loaded float32 values, bit for bit, for saving and merging
        self.stored_low = []
        return self.model if self.dist.main else None

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, folder: Path, scheduler, position: dict, keep_last: int) -> None:
        """checkpoints/step-N: weights and optimizer in the engine's layout, then the schedule, every process's
        RNG and the data position; written to a temp folder and renamed when complete."""
        tmp = ckpt.staging(folder, position["global_step"])
        if self.dist.main:
            ckpt.clear(tmp)
        self._barrier()
        self.save_weights(tmp)
        rngs = self._gather(ckpt.rng_state())
        if self.dist.main:
            state = {"scheduler": scheduler.state_dict(), "rng": rngs[0], "rng_ranks": rngs,
                     **self.optimizer_state()}
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            ckpt.write_state(tmp, state, position)
            ckpt.commit(folder, tmp, position["global_step"], keep_last)
        self._barrier()

    def load_checkpoint(self, path: Path, scheduler) -> dict:
        """Restore what save_checkpoint wrote; returns the data position."""
        state, position = ckpt.read_state(path)  # first: a refused file leaves the model untouched
        self.load_weights(path, state)
        scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        ckpt.restore_rng(ranks[self.dist.rank] if len(ranks) == self.dist.world else state["rng"])
        return position

    def save_weights(self, tmp: Path) -> None:
        if self.dist.main:
            ckpt.save_trainable(tmp, self.model, self.params)

    def optimizer_state(self) -> dict:
        """Optimizer state kept in optim_rng.pt (whole-state engines); sharded engines write their own."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_weights(self, path: Path, state: dict) -> None:
        ckpt.load_trainable(path, self.model)
        self.optimizer.load_state_dict(state["optimizer"])

    # ------------------------------------------------------------------ collectives

    def _barrier(self) -> None:
        if self.dist.world > 1:
            dist.barrier()

    def _gather(self, obj) -> list:
        if self.dist.world == 1:
            return [obj]
        out: list = [None] * self.dist.world
        dist.all_gather_object(out, obj)
        return out
