"""Linear products through oneDNN on a CPU: layers swapped while a model decodes, and training's big products.

Why: `nn.Linear` on a CPU calls MKL's sgemm with the weight transposed, which re-packs the weight on every
call. A decode step streams every weight once for a few rows, and there MKL reads SmolLM2-135M's fp32 weights
at 10-16 GB/s on the project's 2-core VM, where a plain sum over the same memory reads 39 GB/s. oneDNN (shipped
inside torch as `mkldnn`) computes the same product from a copy of the weight packed in its own layout
(`torch.ops.mkldnn._reorder_linear_weight`, made once per decode call) with dense inputs and outputs
(`torch.ops.mkldnn._linear_pointwise`, the pair inductor's CPU weight freezing uses): 29-34 GB/s for SmolLM2's
layers at 1-8 rows, and faster than MKL for prefill-sized products as well (benchmarks/README.md, Generation).
No library call does this for an `nn.Linear` in place, hence this module: it swaps each plain linear layer's
`forward` for the oneDNN product while a context is open.

The results are the same products summed in another order: relative differences around 4e-6 against
`F.linear` (one rounding of a 576-term sum), so greedy outputs equal HF `generate`'s wherever the top two
logits are further apart than that (every row of the generation benchmark; tests/models/test_onednn_linear.py).
A layer falls back to `F.linear` whenever gradients are on, autocast is on, or the input is not float32 on the
CPU. The copies cost the layers' weights once more in memory while the context is open; with less memory
available than twice that, or for a model whose linear weights are under MIN_BYTES, nothing is swapped; layers
thinner than MIN_DIM (LoRA factors) never are. Freed copies stay in the process for the next call's
(models/host_memory.py: 70-80 ms to swap SmolLM2 in instead of 170-230). Greedy callers ask for a bfloat16 copy
of the LM head instead of its packed float32 one, or both (`head`, models/greedy_head.py).
Sibling layers that read the same input (an attention's q / k / v,
an MLP's gate / up; FUSED) get one packed copy of their weights stacked: one product instead of three streams
the weights faster (SmolLM2's decoder products at 8 rows: 14.9 -> 13.2 ms a step). The hand-written decode step
(models/decode_step.py) uses it directly; HF's forward calls the members one by one with the same tensor, so the
first call computes the stacked product and the others take their parts of it (`FusedSiblings`).

Training products (`product`: the fused LoRA linear's base product and input gradient, the fused LM head's two
products, and with `enable_training_products` every plain linear layer's forward, input and weight gradient in
full / freeze / LISA training) have hundreds of rows, where re-laying a weight out costs little against the
product: they go through the same oneDNN op straight from the dense weight (or its transposed view), with no
copy kept. For SmolLM2's shapes at 128-1024 rows that ran 2.0-2.3x faster than torch's MKL path on the project's
AMD CPU (relative differences ~5e-6; benchmarks/README.md, SFT). Fewer rows than MIN_ROWS, autocast, other
dtypes or devices, and ZeRO-3 partitions keep torch's path.
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.models.anatomy import partitioned
from posttrain.models.greedy_head import GreedyHead
from posttrain.models.host_memory import retain_freed_memory

ENV = "POSTTRAIN_ONEDNN"  # "0" turns the oneDNN products off (for an A/B comparison)
# Below this many bytes of linear weights a model's decode step is not bound by streaming them from memory, and
# packing plus oneDNN's fixed cost per call outweigh the gain (the 2-layer tiny model's GRPO sampling was 1.7x slower
# with the earlier oneDNN op).
MIN_BYTES = 32 << 20
# A layer thinner than this on either side (a LoRA factor of rank r <= 64) stays on torch's path: oneDNN's fixed
# cost of ~12 us a call is more than such a product takes (2-5 us).
MIN_DIM = 128
# Training products with fewer rows than this keep torch's path (a generation step, a short eval batch): oneDNN
# re-lays out a dense weight inside every call, which only many rows pay for.
MIN_ROWS = 64
# Sibling layers (attribute names of one parent module) that read the same input: one stacked packed weight each.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# What the LM head gets: its packed float32 copy (logits for sampling and scoring); a bfloat16 GreedyHead for greedy
# steps instead; or both (a holder whose calls may do either)
Head = Literal["float32", "greedy", "both"]
# y = x W^T (+ b), W dense or packed by _reorder_linear_weight; absent from builds without oneDNN (macOS arm64)
_pointwise = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_ON = torch.backends.mkldnn.is_available() and _pointwise is not None


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ bias) for x (N, in) and W (out, in), W possibly a transposed view (x M = product(x, M.t())):
    through oneDNN for float32 CPU operands with W at least MIN_DIM on both sides, torch's path otherwise. For
    products of many rows without autograd (inside an autograd Function's forward or backward)."""
    if (_ON and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and min(weight.shape) >= MIN_DIM
            and os.environ.get(ENV, "1") != "0"):
        return _pointwise(x, weight, bias, "none", [], "")
    return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())


class _LinearFn(torch.autograd.Function):
    """F.linear with its forward product and input gradient through `product`; the weight gradient g^T x too."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # x (N, in), weight (out, in)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)  # a frozen weight needs no x kept
        ctx.has_bias = bias is not None
        return product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):  # grad (N, out)
        x, weight = ctx.saved_tensors
        grad_x = product(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = product(grad.t(), x.t()) if ctx.needs_input_grad[1] else None  # (out, N) x (N, in)
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _train_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // max(x.shape[-1], 1)
    if (rows < MIN_ROWS or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_autocast_enabled("cpu")
            or type(self.weight.data) is not torch.Tensor or partitioned(self.weight)):
        return F.linear(x, self.weight, self.bias)
    y = _LinearFn.apply(x.reshape(rows, x.shape[-1]), self.weight, self.bias)
    return y.view(*x.shape[:-1], y.shape[-1])


def enable_training_products(model: nn.Module) -> int:
    """Give the model's plain float32 CPU linear layers (not thinner than MIN_DIM, frozen or trained) the forward
    above for training: products of MIN_ROWS rows or more through oneDNN. Returns how many; none with
    POSTTRAIN_ONEDNN=0."""
    if os.environ.get(ENV, "1") == "0" or not _ON:
        return 0
    layers = [m for m in model.modules() if type(m) is nn.Linear and min(m.weight.shape) >= MIN_DIM
              and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 and "forward" not in m.__dict__]
    for m in layers:
        m.forward = _train_forward.__get__(m)
    return len(layers)


def disable_training_products(model: nn.Module) -> None:
    """Back to torch's path for every layer `enable_training_products` switched (references in tests)."""
    for m in model.modules():
        forward = m.__dict__.get("forward")
        if getattr(forward, "__func__", None) is _train_forward:
            del m.forward


def _eligible(model: nn.Module) -> list[nn.Linear]:
    """The model's plain float32 CPU linear layers (not subclasses such as quantized ones, not thinner than
    MIN_DIM), none swapped yet."""
    if os.environ.get(ENV, "1") == "0" or not _ON:
        return []
    layers = [m for m in model.modules() if type(m) is nn.Linear and min(m.weight.shape) >= MIN_DIM]
    if not layers or any("_onednn_weight" in m.__dict__ for m in layers):
        return []  # an outer context (or a serving engine) already swapped them
    ok = all(type(m.weight.data) is torch.Tensor and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
             for m in layers)
    return layers if ok else []


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or x.dtype != torch.float32
            or x.device.type != "cpu" or x.numel() == 0):
        return F.linear(x, self.weight, self.bias)
    return _pointwise(x, self._onednn_weight, self.bias, "none", [], "")


def packed_product(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """A swapped layer's product from its packed weight, without the checks of its forward (for a hand-written
    no-grad float32 step: models/decode_step.py)."""
    return _pointwise(x, layer._onednn_weight, layer.bias, "none", [], "")


class FusedSiblings:
    """Sibling layers' weights stacked and packed once. HF's forward calls the members one at a time on the same
    input: the first call computes the stacked product, each member takes its part once; any other call (another
    input, or the input changed in place since) computes it afresh, so results never depend on the call order."""

    def __init__(self, members: list[nn.Linear]):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(torch.cat([m.weight.detach() for m in members]), None)
        self.bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        self.sizes = [m.out_features for m in members]
        self.pending: tuple | None = None  # (input, its version, the members' outputs not taken yet)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _pointwise(x, self.weight, self.bias, "none", [], "")

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor:
        p = self.pending
        if p is None or p[0] is not x or p[1] != x._version or p[2][index] is None:
            p = (x, x._version, [part.contiguous() for part in self(x).split(self.sizes, dim=-1)])
        out, p[2][index] = p[2][index], None
        self.pending = p if any(part is not None for part in p[2]) else None
        return out


def _fused_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or x.dtype != torch.float32
            or x.device.type != "cpu" or x.numel() == 0):
        return F.linear(x, self.weight, self.bias)
    if x.is_inference():  # torch.inference_mode: no version counter to tell an input changed in place since
        return _pointwise(x, self.weight, self.bias, "none", [], "")  # this layer's own product, dense weight
    return self._onednn_fused.take(self._onednn_index, x)


def _base(module: nn.Module | None) -> nn.Module | None:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module  # under a PEFT LoRA wrapper


def _sibling_groups(model: nn.Module, layers: list[nn.Linear]) -> list[list[nn.Linear]]:
    """FUSED groups among `layers`: the same parent, input width and bias presence."""
    chosen, groups = set(map(id, layers)), []
    for parent in model.modules():
        for names in FUSED:
            members = [_base(getattr(parent, name, None)) for name in names]
            if (all(id(m) in chosen for m in members) and len({m.in_features for m in members}) == 1
                    and len({m.bias is None for m in members}) == 1):
                groups.append(members)
    return groups


def swap_in(model: nn.Module, *, head: Head = "float32") -> list[nn.Linear]:
    """Give the model's eligible linear layers oneDNN copies of their weights (stacked for FUSED siblings) and the
    oneDNN forward; the layers swapped (none when already swapped, not eligible or short of memory). The copies
    go stale if the weights change: `swap_out` them first (`onednn_linears` does). `head`: what the LM head gets
    (HEADS): "greedy" a GreedyHead (models/greedy_head.py) for greedy decode steps where the CPU has bfloat16, its
    float32 logits (prefill) then from its dense weight with no packed copy; "both" both copies."""
    layers = _eligible(model)
    need = sum(m.weight.numel() * 4 for m in layers)
    if not layers or need < MIN_BYTES or _available_bytes() < 2 * need:
        return []
    lm_head = _base(model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    greedy = GreedyHead.of(lm_head) if head != "float32" and any(m is lm_head for m in layers) else None
    retain_freed_memory()  # the next call's copies reuse this call's memory instead of faulting it in
    with torch.no_grad():
        for m in layers:
            m._onednn_before = m.__dict__.get("forward")  # a training forward (enable_training_products), if any
        for members in _sibling_groups(model, layers):
            fused = FusedSiblings(members)
            for index, m in enumerate(members):
                m._onednn_weight, m._onednn_fused, m._onednn_index = None, fused, index
                m.forward = _fused_forward.__get__(m)
        for m in layers:
            if "_onednn_weight" not in m.__dict__:
                dense = m is lm_head and greedy is not None and head == "greedy"
                m._onednn_weight = (m.weight.detach() if dense  # oneDNN takes a dense weight too, a little slower
                                    else torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None))
                m.forward = _forward.__get__(m)
        if greedy is not None:
            lm_head._greedy_head = greedy
    return layers


def swap_out(layers: list[nn.Linear]) -> None:
    for m in layers:
        before = m.__dict__.pop("_onednn_before", None)
        for name in ("forward", "_onednn_weight", "_onednn_fused", "_onednn_index", "_greedy_head"):
            m.__dict__.pop(name, None)
        if before is not None:
            m.forward = before


@contextlib.contextmanager
def onednn_linears(model: nn.Module, *, head: Head = "float32"):
    """Inside: the model's linear layers compute through oneDNN (see the module docstring and `swap_in`); restored
    after."""
    layers = swap_in(model, head=head)
    try:
        yield
    finally:
        swap_out(layers)
