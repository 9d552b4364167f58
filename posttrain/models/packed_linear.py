"""Decode-time linear layers on MKL's prepacked weights (fp32 on a CPU): the same products, less weight traffic.

A decode step multiplies a few rows by every weight matrix once, so its time is weight traffic. On the
project's 2-core CPUs torch's fp32 `linear` streams the 135M model's weights at 20 GB/s for one row
(a matrix-vector product) but at ~10 GB/s for 8 rows: the GEMM repacks the transposed weight on every
call. MKL's packed-B GEMM (`torch.ops.mkl._mkl_reorder_linear_weight` / `_mkl_linear`, the pair inductor's
weight freezing uses) packs once; sibling projections that read the same input (q/k/v, gate/up) are
packed as one matrix and run as one GEMM. Measured on SmolLM2-135M's shapes at 8 rows (AMX Xeon, 2
threads): all linear layers 44.9 ms -> 29.1 ms a step, the LM head 16.0 -> 7.0 ms.

Used by `models/decode.RaggedBatch` (generate, serve, PPO/GRPO rollouts) under `torch.no_grad()` only; one
row keeps torch's matrix-vector path (faster there), and anything not an fp32 CPU `nn.Linear` (LoRA
adapters' own products, quantized layers, CUDA) runs as before. The packs live as long as the batch that
made them (one `generate` call; a serving engine's running batch), not longer: weights change between calls
in ways no counter shows (PEFT's `merge_adapter` adds into `weight.data`; rollouts swap merged copies in).
Within a batch, a weight swapped or changed in place through autograd (`_version`) is repacked. Packing
SmolLM2-135M takes ~0.2 s; it is skipped when the packs would take more than a quarter of the memory
available.

Written here rather than taken from a library: the alternative that does this (`torch.compile` with
freezing) recompiles as rows leave the batch, and compiling on a 2-core CPU costs more than a generation.
"""

from __future__ import annotations

import contextlib
import threading
import types

import psutil
import torch
from torch import nn
from torch.nn import functional as F

# sibling projections of one module that read the same input: packed together, run as one GEMM
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# rows per GEMM where packing was faster (AMX Xeon; at 16-32 rows the packed LM head ran 1.3-1.8x slower)
ROWS = range(4, 13)
MEMORY_SHARE = 0.25  # pack only when the packed copies fit in this share of the available memory

_stash = threading.local()  # the group outputs computed with a sibling's call, until the others ask for them


def available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _eligible(module: nn.Module) -> bool:
    """A plain fp32 CPU nn.Linear whose forward nobody else has replaced (accelerate hooks, another batch)."""
    if type(module) is not nn.Linear or "forward" in module.__dict__:
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and not w.is_meta


class _Pack:
    """One packed matrix for a linear layer or a group of siblings with the same input."""

    def __init__(self, members: list[nn.Linear]):
        self.members, self.key = members, self._key(members)
        # the packed tensors' storage stays alive with the pack, so a weight swapped in through `.data` (rollout.py's
        # merged LoRA copies) cannot land at the same address and pass for the packed one
        self.sources = [p.data for m in members for p in (m.weight, m.bias) if p is not None]
        with torch.no_grad():
            self.weight = members[0].weight if len(members) == 1 else torch.cat([m.weight for m in members])
            biases = [m.bias for m in members]
            self.bias = None if biases[0] is None else (biases[0] if len(members) == 1 else torch.cat(biases))
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), 8)
        self.sizes = [m.out_features for m in members]

    @staticmethod
    def _key(members: list[nn.Linear]) -> tuple:
        return tuple((p.data_ptr(), p._version) for m in members for p in (m.weight, m.bias) if p is not None)

    def fresh(self) -> bool:
        return self._key(self.members) == self.key

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        member = self.members[index]
        if len(self.members) > 1:
            stash = getattr(_stash, "value", None)
            if stash is not None and stash[0] is self and stash[1] is x and index in stash[2]:
                return stash[2].pop(index)
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.numel() // x.shape[-1] not in ROWS:
            return F.linear(x, member.weight, member.bias)
        rows = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkl._mkl_linear(rows.contiguous(), self.packed, self.weight, self.bias, rows.shape[0])
        y = y.view(*x.shape[:-1], y.shape[-1])
        if len(self.members) == 1:
            return y
        parts = y.split(self.sizes, dim=-1)
        _stash.value = (self, x, {k: p for k, p in enumerate(parts) if k != index})
        return parts[index]


def _groups(model: nn.Module) -> list[list[nn.Linear]]:
    grouped: set[int] = set()
    groups = []
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, nn.Module) and _eligible(m) for m in members) \
                    and len({m.in_features for m in members}) == 1 and len({m.bias is None for m in members}) == 1:
                groups.append(members)
                grouped.update(map(id, members))
    return groups + [[m] for m in model.modules() if isinstance(m, nn.Linear) and _eligible(m) and id(m) not in grouped]


def _fits(groups: list[list[nn.Linear]]) -> bool:
    extra = sum(m.weight.numel() * (2 if len(g) > 1 else 1) for g in groups for m in g) * 4
    return extra < MEMORY_SHARE * psutil.virtual_memory().available


class PackedLinears:
    """The packs of one model's linear layers, built on first use and rebuilt when a weight changed."""

    def __init__(self, model: nn.Module):
        self.model, self.packs = model, None

    @contextlib.contextmanager
    def active(self, rows: int):
        """Within this block the model's fp32 CPU linear layers run on packed weights (when called without
        grad); `rows`: how many rows the coming forward multiplies (one row packs nothing)."""
        if rows not in ROWS or not available():
            yield
            return
        if self.packs is None or not all(p.fresh() for p in self.packs):
            self.packs = None  # free stale packs before building new ones
            groups = _groups(self.model)
            self.packs = [_Pack(g) for g in groups] if groups and _fits(groups) else []
        installed = []
        for pack in self.packs:
            for k, member in enumerate(pack.members):
                if "forward" not in member.__dict__:
                    member.forward = types.MethodType(lambda self, x, pack=pack, k=k: pack.forward(k, x), member)
                    installed.append((member, member.forward))
        try:
            yield
        finally:
            _stash.value = None
            for member, forward in installed:
                if member.__dict__.get("forward") is forward:
                    del member.forward
