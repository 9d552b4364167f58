"""train.distributed: fsdp. FSDP2 (`fully_shard`): weights, gradients and optimizer state sharded over the
processes, one unit per decoder block plus a root unit for the rest (embeddings, head, value head).

The root is a `Forward` wrapper, so every pass (an update's micro-batches, eval, PPO rollouts) runs inside
its forward, where the root's weights are gathered. FSDP averages gradients over processes; each loss is a
share of the global mean, so it is multiplied by the world size (gloo cannot skip the division: no
PREMUL_SUM). Checkpoints are sharded through `torch.distributed.checkpoint`, whose metadata file is read
with torch's weights-only unpickler, not pickle. The final model is gathered on the main process into a
plain copy of the modules (made on the meta device before sharding, so it costs no memory until then).
"""

from __future__ import annotations

import copy
import pathlib
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch import _weights_only_unpickler
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import filesystem as dcp_files
from torch.distributed.checkpoint import metadata as dcp_meta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from posttrain.train.engines.base import Engine, Forward
from posttrain.train.reference_model import frozen_reference

SHARDED_DIR = "sharded"
_TRAINABLE = StateDictOptions(ignore_frozen_params=True)  # LoRA: the frozen base is not checkpointed
_METADATA_TYPES = [dcp_meta.Metadata, dcp_meta.TensorStorageMetadata, dcp_meta.BytesStorageMetadata,
                   dcp_meta.ChunkStorageMetadata, dcp_meta.TensorProperties, dcp_meta.MetadataIndex,
                   dcp_meta.StorageMeta, dcp_meta._MEM_FORMAT_ENCODING, dcp_files._StorageInfo, pathlib.PosixPath]


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of every transformers model inside `model` (their `_no_split_modules`), innermost
    first, so nested units are sharded before the units that contain them."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in reversed(list(model.modules())) if type(m).__name__ in names]


def meta_copy(model: nn.Module) -> nn.Module:
    """The modules of `model` with every parameter on the meta device (no memory); buffers are copied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def materialize(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Fill a meta_copy with whole weights by name; tied weights stay one parameter. A frozen reference copy
    inside the skeleton was not gathered and stays on the meta device."""
    reference = frozen_reference(skeleton)
    skipped = set() if reference is None else {id(p) for p in reference.parameters()}
    names: dict[int, list[str]] = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        if id(param) not in skipped:
            names.setdefault(id(param), []).append(name)
    for shared in names.values():
        module, leaf = _owner(skeleton, shared[0])
        param = nn.Parameter(state[shared[0]], requires_grad=module._parameters[leaf].requires_grad)
        for name in shared:
            module, leaf = _owner(skeleton, name)
            module._parameters[leaf] = param
    with torch.no_grad():
        for name, buffer in skeleton.named_buffers():
            if name in state:
                buffer.copy_(state[name])
    return skeleton


def _owner(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    path, _, leaf = dotted.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


class _WeightsOnlyWriter(FileSystemWriter):
    """Writes DCP's .metadata file again in pickle protocol 2 once DCP has written it: the weights-only
    unpickler does not read the frames of newer protocols."""

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)  # fills metadata in place, then writes it
        with open(Path(self.path) / ".metadata", "wb") as file:
            pickle.dump(metadata, file, protocol=2)


class _WeightsOnlyReader(FileSystemReader):
    """DCP's reader unpickles its .metadata file with pickle.load: here torch's weights-only unpickler reads
    it, allowing DCP's own metadata classes and nothing else (a planted payload is refused, never run)."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as file, torch.serialization.safe_globals(_METADATA_TYPES):
            metadata = _weights_only_unpickler.Unpickler(file).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_meta.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class FSDPEngine(Engine):
    name = "fsdp"
    lockstep = True

    def wrap(self, model, groups):
        f, device = self.cfg.train.fsdp, self.dist.device
        names = {id(p): n for n, p in model.named_parameters()}
        originals = list(model.parameters())
        self.skeleton = meta_copy(model) if self.dist.main else None
        mesh = init_device_mesh(device.type, (self.dist.world,))
        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if f.cpu_offload else OffloadPolicy()
        for block in decoder_blocks(model):
            fully_shard(block, mesh=mesh, reshard_after_forward=f.reshard_after_forward, offload_policy=offload)
        # the root's weights are needed again at once by backward: keep them gathered until then
        self.root = fully_shard(Forward(model), mesh=mesh, reshard_after_forward=False, offload_policy=offload)
        sharded = dict(self.root.named_parameters())
        groups = [{**g, "params": [sharded["inner." + names[id(p)]] for p in g["params"]]} for g in groups]
        # The modules now hold sharded parameters; the caller's optimizer groups (a stage keeps them for the whole
        # run) still point at the unsharded originals: empty them, or every process keeps a whole copy.
        kept = {id(p) for p in sharded.values()}
        for param in originals:
            if id(param) not in kept:
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        return groups

    def make_scaler(self):
        # each process sees only its shard of the gradients: the overflow check is all-reduced
        return ShardedGradScaler(self.dist.device.type)

    def forward(self, micro):
        with self.autocast():
            return self.root(micro, self.model)

    def call(self, fn, *args):
        with self.autocast():
            return self.root(fn, *args)

    def backward(self, loss, last: bool) -> None:
        super().backward(loss * self.dist.world, last)

    def plain_model(self):
        # Sharded first (nothing gathered), then whole tensors one at a time, leaving out a frozen reference copy
        # (not part of the output); every process walks the same keys, as each gather is a collective.
        sharded = get_model_state_dict(self.root)
        reference = frozen_reference(self.model)
        prefix = next((f"{n}." for n, m in self.root.named_modules() if m is reference), None)
        state, done = {}, {}
        for key, value in sharded.items():
            if prefix is not None and key.startswith(prefix):
                continue
            if id(value) not in done:  # tied weights appear under two names: one gather
                whole = value.full_tensor() if isinstance(value, DTensor) else value
                done[id(value)] = whole.cpu() if self.dist.main else None
            state[key] = done[id(value)]
        if not self.dist.main:
            return None
        return materialize(self.skeleton, {k.removeprefix("inner."): v for k, v in state.items()})

    def save_weights(self, tmp: Path) -> None:
        model_state, optim_state = get_state_dict(self.root, self.optimizer, options=_TRAINABLE)
        dcp.save({"model": model_state, "optim": optim_state}, storage_writer=_WeightsOnlyWriter(tmp / SHARDED_DIR))

    def optimizer_state(self) -> dict:
        return {}  # in the sharded folder

    def load_weights(self, path: Path, state: dict) -> None:
        model_state, optim_state = get_state_dict(self.root, self.optimizer, options=_TRAINABLE)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, storage_reader=_WeightsOnlyReader(Path(path) / SHARDED_DIR))
        set_state_dict(self.root, self.optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                       options=_TRAINABLE)
