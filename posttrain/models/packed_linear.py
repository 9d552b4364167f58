"""Decode-time linear layers on MKL's prepacked weights (fp32 on a CPU): the same products, less weight traffic.

A decode step multiplies a few rows by every weight matrix once, so its time is weight traffic. On the
project's 2-core CPUs torch's fp32 `linear` streams the 135M model's weights at 20 GB/s for one row
(a matrix-vector product) but at ~10 GB/s for 8 rows: the GEMM repacks the transposed weight on every
call. MKL's packed-B GEMM (`torch.ops.mkl._mkl_reorder_linear_weight` / `_mkl_linear`, the pair inductor's
weight freezing uses) packs once. Measured on SmolLM2-135M (AMX Xeon, 2 threads), one decode step of 8
rows: 86.1 -> 67.0 ms (the LM head alone 13.2 -> 6.9 ms). Packing q/k/v and gate/up as one matrix each
gained nothing more in the model and was dropped.

Used by `models/decode.RaggedBatch` (generate, serve, PPO/GRPO rollouts) under `torch.no_grad()` only and
at 4-12 rows (`ROWS`): at fewer rows torch's path is as fast, at 16 and more the packed GEMM was slower.
Anything not an fp32 CPU `nn.Linear` (quantized layers, CUDA) runs as before. The packs take about the
weights' size again in memory (MKL reserves more address space than it touches) and live as long as the
batch that made them (one `generate` call; a serving engine's running batch), not longer: weights change
between calls in ways no counter shows (PEFT's `merge_adapter` adds into `weight.data`; rollouts swap merged
copies in). Within a batch, a weight swapped or changed through autograd (`_version`) is repacked. Packing
SmolLM2-135M takes ~0.2 s; it is skipped when the packs would take more than a quarter of the memory
available.

Written here rather than taken from a library: the alternative that does this (`torch.compile` with
freezing) recompiles as rows leave the batch, and compiling on a 2-core CPU costs more than a generation.
"""

from __future__ import annotations

import contextlib
import types

import psutil
import torch
from torch import nn
from torch.nn import functional as F

# rows per GEMM where packing was faster (AMX Xeon; at 16-32 rows the packed LM head ran 1.3-1.8x slower)
ROWS = range(4, 13)
MEMORY_SHARE = 0.25  # pack only when the packs fit in this share of the available memory


def available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _eligible(module: nn.Module) -> bool:
    """A plain fp32 CPU nn.Linear whose forward nobody else has replaced (accelerate hooks, another batch)."""
    if type(module) is not nn.Linear or "forward" in module.__dict__:
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and not w.is_meta


class _Pack:
    """One linear layer's packed weight."""

    def __init__(self, module: nn.Linear):
        self.module, self.key = module, self._key(module)
        # the packed tensors' storage stays alive with the pack, so a weight swapped in through `.data` (rollout.py's
        # merged LoRA copies) cannot land at the same address and pass for the packed one
        self.sources = [p.data for p in (module.weight, module.bias) if p is not None]
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(module.weight.detach(), ROWS.start)

    @staticmethod
    def _key(module: nn.Linear) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in (module.weight, module.bias) if p is not None)

    def fresh(self) -> bool:
        return self._key(self.module) == self.key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.numel() // x.shape[-1] not in ROWS:
            return F.linear(x, m.weight, m.bias)
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.ops.mkl._mkl_linear(rows, self.packed, m.weight, m.bias, rows.shape[0])
        return y.view(*x.shape[:-1], y.shape[-1])


class PackedLinears:
    """The packs of one model's linear layers, built on first use and rebuilt when a weight changed."""

    def __init__(self, model: nn.Module):
        self.model, self.packs = model, None

    @contextlib.contextmanager
    def active(self, rows: int):
        """Within this block the model's fp32 CPU linear layers run on packed weights when called without grad
        on 4-12 rows; `rows`: how many rows the coming decode steps multiply (outside ROWS nothing is packed)."""
        if rows not in ROWS or not available():
            yield
            return
        if self.packs is None or not all(p.fresh() for p in self.packs):
            self.packs = None  # free stale packs before building new ones
            linears = [m for m in self.model.modules() if _eligible(m)]
            fits = sum(m.weight.numel() for m in linears) * 4 < MEMORY_SHARE * psutil.virtual_memory().available
            self.packs = [_Pack(m) for m in linears] if fits else []
        installed = []
        for pack in self.packs:
            if "forward" not in pack.module.__dict__:
                pack.module.forward = types.MethodType(lambda self, x, pack=pack: pack.forward(x), pack.module)
                installed.append((pack.module, pack.module.forward))
        try:
            yield
        finally:
            for module, forward in installed:
                if module.__dict__.get("forward") is forward:
                    del module.forward
