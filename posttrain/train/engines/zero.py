"""train.distributed: deepspeed. DeepSpeed ZeRO through `deepspeed.initialize`: stage 2 shards optimizer state
and gradients, stage 3 also the weights (DeepSpeed's hooks gather each module's weights when it runs).

The loop's AdamW and schedule stay ours: ZeRO steps the torch optimizer's groups, whose lr the schedule
sets (`zero_allow_untested_optimizer`). The loop marks an update's last micro-batch as the accumulation
boundary; losses arrive as shares of the global mean, so DeepSpeed does not divide them by the
accumulation count, and its average over processes is undone by x world. Checkpoints are DeepSpeed's
own, loaded through torch's weights-only unpickler (DeepSpeed's loader would unpickle anything). Stage 3's
final model is gathered module by module onto a plain copy made on the meta device before sharding.
"""

from __future__ import annotations

import argparse
import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from posttrain.train.engines.base import Engine, Forward
from posttrain.train.engines.fsdp import materialize, meta_copy
from posttrain.train.reference_model import frozen_reference

DEEPSPEED_DIR = "deepspeed"
_TAG = "state"


def deepspeed_config(train, optim, world: int, hidden_size: int | None) -> dict:
    """The DeepSpeed config of train.deepspeed.* (the accumulation boundary is set by the loop per update).
    Bucket sizes follow the model as the HF Trainer's "auto" values do: with DeepSpeed's own (5e8 elements) a
    135M model's gradients all wait in one bucket, +0.5 GB per process (benchmarks/README.md, engine memory)."""
    ds = train.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    bucket = ds.bucket_size or (hidden_size**2 if hidden_size else 0)
    if bucket:
        zero["reduce_bucket_size"] = bucket
        if ds.zero_stage == 3:
            zero |= {"stage3_prefetch_bucket_size": int(0.9 * bucket),
                     "stage3_param_persistence_threshold": 10 * hidden_size if hidden_size else 100_000}
    if ds.zero_stage == 3:
        zero |= {"stage3_max_live_parameters": ds.live_parameters, "stage3_max_reuse_distance": ds.live_parameters}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": train.micro_batch_size, "gradient_accumulation_steps": 1,
            "train_batch_size": train.micro_batch_size * world, "gradient_clipping": optim.max_grad_norm,
            "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False, "steps_per_print": 2**31 - 1}


def _weights_only_load(path, map_location=None):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # optional extra, ~2 s: only under deepspeed
    from deepspeed.runtime.zero.config import ZeroStageEnum  # optional extra
    from deepspeed.utils.tensor_fragment import fragment_address  # optional extra

    # What DeepSpeed's checkpoint files hold besides tensors and containers.
    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address, argparse.Namespace]):
        return torch.load(path, map_location=map_location, weights_only=True)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg, dist_ctx):
        super().__init__(cfg, dist_ctx)
        self.stage = cfg.train.deepspeed.zero_stage
        self.lockstep = self.stage == 3
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    def wrap(self, model, groups):
        self.skeleton = meta_copy(model) if self.dist.main and self.stage == 3 else None
        self.wrapper = Forward(model)
        return groups

    def attach(self, optimizer):
        import deepspeed  # optional extra (posttrain[deepspeed]), ~2 s to import: only when train.distributed asks

        # The shared-memory all-reduce op only speeds up CPU inference, and JIT-compiles for minutes on first use.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        hidden = next((m.config.hidden_size for m in self.model.modules()  # the model inside any stage's wrapper
                       if isinstance(getattr(getattr(m, "config", None), "hidden_size", None), int)), None)
        config = deepspeed_config(self.cfg.train, self.cfg.optim, self.dist.world, hidden)
        self.ds, _, _, _ = deepspeed.initialize(model=self.wrapper, optimizer=optimizer, config=config,
                                                dist_init_required=False)
        self.ds.checkpoint_engine.load = _weights_only_load
        self.optimizer = optimizer  # the torch optimizer: the schedule sets its groups' lr, ZeRO steps with them
        return optimizer

    def forward(self, micro):
        with self.autocast():
            return self.ds(micro, self.model)

    def accumulating(self, last: bool):
        self.ds.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def backward(self, loss, last: bool) -> None:
        self.ds.backward(loss * self.dist.world, scale_wrt_gas=False)

    def clip_and_step(self, max_norm: float) -> float:
        self.ds.step()  # clips to gradient_clipping, steps, clears the gradients
        norm = self.ds.get_global_grad_norm()
        if self.stage == 3:
            # ZeRO-3 copies a weight's gradient of an update's first micro-batch into its buffer and adds the later
            # ones: a weight the first pass does not use (PPO's value head in the ptx pass) would add onto the
            # previous update's gradient. DeepSpeed keeps the buffer between updates: zero it.
            self.ds.optimizer.grad_partitions_flat_buffer.zero_()
        return float(norm) if norm is not None else 0.0

    def zero_grad(self) -> None:
        """DeepSpeed's step cleared them."""

    def plain_model(self):
        if self.stage != 3:
            return super().plain_model()
        state = self.gathered_state()
        return materialize(self.skeleton, state) if self.dist.main else None

    def gathered_state(self) -> dict[str, torch.Tensor]:
        """Whole weights on the main process, module by module, as DeepSpeed's consolidated state dict gathers
        them, leaving out a frozen reference copy (not part of the output); every process walks the same modules."""
        import deepspeed  # optional extra, imported by attach already

        reference = frozen_reference(self.model)
        skipped = set() if reference is None else {id(m) for m in reference.modules()}
        state: dict[str, torch.Tensor] = {}
        seen: dict[int, torch.Tensor] = {}  # tied weights: one tensor under both names
        for prefix, module in self.model.named_modules():
            if id(module) in skipped:
                continue
            params = list(module.named_parameters(recurse=False))
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                if self.dist.main:
                    for name, param in params:
                        key = f"{prefix}.{name}" if prefix else name
                        if param.ds_id not in seen:
                            seen[param.ds_id] = param.detach().to("cpu", copy=True)
                        state[key] = seen[param.ds_id]
                    for name, buffer in module.named_buffers(recurse=False):
                        if name not in module._non_persistent_buffers_set:
                            state[f"{prefix}.{name}" if prefix else name] = buffer.detach().cpu()
        return state

    def save_weights(self, tmp: Path) -> None:
        self.ds.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=_TAG, save_latest=False, exclude_frozen_parameters=True)

    def optimizer_state(self) -> dict:
        return {}  # in DeepSpeed's folder

    def load_weights(self, path: Path, state: dict) -> None:
        # frozen weights were not saved: the module's state loads non-strict
        self.ds.load_checkpoint(str(Path(path) / DEEPSPEED_DIR), tag=_TAG, load_module_strict=False,
                                load_optimizer_states=True, load_lr_scheduler_states=False)
