"""The sections of the multi-process engines (train.fsdp, train.deepspeed) and the cross-field rules of
TrainConfig's engine and numerics keys (train.distributed, .gradient_checkpointing, .precision).
The rules that depend on the machine (fp16 needs CUDA, an installed DeepSpeed) are checked on joining
(train/engines/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.errors import ConfigError
from posttrain.typed_config import opt


@dataclass
class FSDPConfig:
    reshard_after_forward: bool = opt(
        True, "free each block's gathered weights after its forward and gather them again for backward (less memory, "
        "one more all-gather per block); false keeps them from forward to backward")
    cpu_offload: bool = opt(
        False, "keep the sharded weights, gradients and optimizer state in CPU memory (CUDA runs: less GPU memory, "
        "the optimizer steps on the CPU)")


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[2, 3] = opt(2, "ZeRO stage: 2 shards optimizer state and gradients, 3 also the weights")
    offload_optimizer: bool = opt(False, "ZeRO-Offload: optimizer state in CPU memory, the optimizer steps there")
    offload_params: bool = opt(False, "ZeRO-3 only: weights in CPU memory between uses")
    bucket_size: int = opt(
        0, "elements per gradient reduce bucket and ZeRO-3 prefetch bucket; 0 = hidden_size^2, as the HF Trainer's "
        "'auto' (DeepSpeed's own 5e8 holds every gradient of a model under 0.5B in one bucket that stays allocated)")
    live_parameters: int = opt(
        0, "ZeRO-3 only: gathered weights (elements) kept for reuse instead of freed after each block (DeepSpeed's "
        "stage3_max_live_parameters and stage3_max_reuse_distance). 0 frees each block's weights after use and "
        "gathers them again for backward, as train.fsdp.reshard_after_forward does; DeepSpeed's own default, 1e9, "
        "keeps every weight of a model under 1B parameters gathered from forward to backward (faster, more memory)")


def validate_engine(train, method_type: str) -> None:
    """train.distributed / fsdp / deepspeed / precision rules that the config alone decides."""
    sharded = train.distributed in ("fsdp", "deepspeed")
    if sharded and method_type == "qlora":
        raise ConfigError(f"train.distributed={train.distributed} does not shard a 4-bit (bitsandbytes) base: use "
                          "method.type=qlora with train.distributed=ddp or none, or method.type=lora")
    if sharded and method_type == "lisa":
        raise ConfigError(f"method.type=lisa changes which weights train every few steps, which "
                          f"train.distributed={train.distributed} cannot follow (its sharded optimizer is built once): "
                          "use ddp or none")
    if train.distributed == "deepspeed" and train.precision == "fp16":
        raise ConfigError("train.precision=fp16 with train.distributed=deepspeed is not supported (the loop's loss "
                          "scaler does not see inside ZeRO's optimizer): use bf16")
    for key in ("bucket_size", "live_parameters"):
        if getattr(train.deepspeed, key) < 0:
            raise ConfigError(f"train.deepspeed.{key} must be >= 0, got {getattr(train.deepspeed, key)}")
    if train.deepspeed.offload_params and train.deepspeed.zero_stage != 3:
        raise ConfigError("train.deepspeed.offload_params needs train.deepspeed.zero_stage=3 (stage 2 keeps whole "
                          "weights on every process)")
