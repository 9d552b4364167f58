"""Engines under the shared loop, one per `train.distributed`: none, ddp, fsdp (FSDP2), deepspeed (ZeRO-2/3).

The loop drives every engine through the same methods (engines/base.py). A multi-process run joins
its process group from the launcher's environment: torchrun and `accelerate launch` both set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; gloo on CPU, nccl on CUDA. accelerate is a
launcher here only: the engine and its options come from train.distributed and train.fsdp /
train.deepspeed, so an accelerate config asking for FSDP or DeepSpeed is refused, not half-applied.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket

import torch
import torch.distributed as dist

from posttrain.errors import ConfigError
from posttrain.models.load import pick_device
from posttrain.train.engines.base import Engine
from posttrain.train.engines.ddp import DDPEngine
from posttrain.train.engines.fsdp import FSDPEngine
from posttrain.train.engines.zero import DeepSpeedEngine

INSTALL_DEEPSPEED = ("pip install 'posttrain[deepspeed]' (DeepSpeed builds from source: DS_BUILD_OPS=0 pip install "
                     "--no-build-isolation deepspeed==0.19.8)")


def join(train) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins the process group when an engine is set."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(train.device)
    if train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (loss-scaled fp16 matmuls); on a CPU use bf16 or fp32")
    if train.distributed == "none":
        if world > 1:
            raise ConfigError(f"this is one of {world} processes (WORLD_SIZE={world}, set by torchrun / accelerate "
                              "launch) but train.distributed is none: set train.distributed to ddp, fsdp or deepspeed")
        return 0, 1, device
    _check_launcher(train.distributed)
    if train.distributed == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"train.distributed=deepspeed: DeepSpeed is not installed; {INSTALL_DEEPSPEED}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:  # one process without a launcher: a group of one, so the engine runs as it would under torchrun
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        atexit.register(_leave)
    return dist.get_rank(), dist.get_world_size(), device


def _leave() -> None:
    """Leave the process group when the process ends. Without it gloo's worker threads can outlive the interpreter
    and abort the process at exit (SIGABRT, "terminate called without an active exception"). At exit, not after
    each run: one process may run several stages in one group, and a group destroyed and created again on the
    launcher's store hangs."""
    if dist.is_initialized():
        dist.destroy_process_group()


def lockstep(train) -> bool:
    """Whether every forward pass is a collective under this engine (sharded weights: FSDP, ZeRO-3)."""
    return train.distributed == "fsdp" or (train.distributed == "deepspeed" and train.deepspeed.zero_stage == 3)


def build_engine(cfg, dist_ctx) -> Engine:
    kind = cfg.train.distributed
    return {"none": Engine, "ddp": DDPEngine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine}[kind](cfg, dist_ctx)


def _check_launcher(kind: str) -> None:
    for var, name in (("ACCELERATE_USE_FSDP", "fsdp"), ("ACCELERATE_USE_DEEPSPEED", "deepspeed")):
        if os.environ.get(var, "").lower() in ("1", "true"):
            raise ConfigError(f"accelerate launch was given a {name} config ({var}=true), but posttrain takes its "
                              f"engine from train.distributed (now {kind}) and train.{name}.*: launch with a plain "
                              "multi-GPU accelerate config (examples/accelerate/) or torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
