"""A fused forward/backward for plain LoRA linears: same maths as PEFT, fewer passes over memory.

PEFT computes `W x + (B (A x)) * s` as five ops, and autograd adds two more full-size passes in
backward (the scale and the sum of the two input gradients). On a CPU those elementwise passes
over (tokens x out_features) tensors cost a visible share of a LoRA step. Here one autograd
Function does `y = x W^T`, then `y += s (x A^T) B^T` inside the GEMM (addmm_ with alpha=s), and
in backward adds the adapter's input gradient into the base one the same way. The parameters,
their names, saving and merging stay PEFT's: only the forward of eligible modules is swapped.
Under autocast (train.precision=bf16 / fp16) the operands are cast to the autocast dtype as
autocast casts a linear's, and the fused op runs in that dtype; the casts' backward returns the
adapter's gradients to its float32 master weights.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from posttrain.models.anatomy import partitioned
from posttrain.models.onednn_linear import product


class _LoraLinearFn(torch.autograd.Function):
    """y = x W^T (+ bias) + s (x A^T) B^T with frozen W and bias; gradients for x, A and B.

    The rank-r intermediates are kept transposed, (r, N): CPU GEMMs with a wide output run several
    times faster than the same products with an (N, r) or (out, r) output.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):  # x (N, in), weight (out, in), a (r, in), b (out, r)
        h_t = lora_a @ x.t()  # (r, N)
        y = product(x, weight, bias)  # (N, out); through oneDNN on a CPU (models/onednn_linear.py)
        y.addmm_(h_t.t(), lora_b.t(), alpha=scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h_t)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad):  # grad (N, out)
        x, weight, lora_a, lora_b, h_t = ctx.saved_tensors
        grad_h_t = (lora_b.t() @ grad.t()).mul_(ctx.scale)  # (r, N)
        grad_b = (h_t @ grad).mul_(ctx.scale).t() if ctx.needs_input_grad[4] else None  # (out, r)
        grad_a = grad_h_t @ x if ctx.needs_input_grad[3] else None  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = product(grad, weight.t()).addmm_(grad_h_t.t(), lora_a)  # (N, in)
        return grad_x, None, None, grad_a, grad_b, None


def _eligible(module) -> bool:
    """Plain LoRA on an nn.Linear: one adapter, no dropout, no DoRA/variants, frozen base."""
    from peft.tuners.lora.layer import Linear as LoraLinear  # heavy: peft, ~3 s

    if type(module) is not LoraLinear or type(module.base_layer) is not nn.Linear:
        return False
    if len(module.lora_A) != 1 or module.lora_variant or module.fan_in_fan_out:
        return False
    (name,) = module.lora_A.keys()
    base = module.base_layer
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    return frozen and isinstance(module.lora_dropout[name], nn.Identity)


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    (name,) = self.lora_A.keys()
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    base = self.base_layer
    device = x.device.type
    amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if (args or kwargs or self.disable_adapters or self.merged or name not in self.active_adapters
            or (amp is None and not x.dtype == lora_a.dtype == base.weight.dtype)
            or base.weight.requires_grad or partitioned(base.weight) or partitioned(lora_a)):
        return type(self).forward(self, x, *args, **kwargs)  # any other state (ZeRO-3 too): PEFT's own path
    operands = (x.reshape(-1, x.shape[-1]), base.weight, base.bias, lora_a, lora_b)
    if amp is None:
        y = _LoraLinearFn.apply(*operands, float(self.scaling[name]))
    else:
        with torch.autocast(device, enabled=False):
            y = _LoraLinearFn.apply(*(t if t is None else t.to(amp) for t in operands), float(self.scaling[name]))
    return y.view(*x.shape[:-1], y.shape[-1])


def enable_fast_lora(model: nn.Module) -> int:
    """Give every eligible LoRA linear in `model` the fused forward; returns how many were switched."""
    count = 0
    for module in model.modules():
        if _eligible(module):
            module.forward = types.MethodType(_fast_forward, module)
            count += 1
    return count


def disable_fast_lora(model: nn.Module) -> None:
    """Back to PEFT's own forward everywhere (the naive reference in tests and benchmarks)."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), types.MethodType) and module.forward.__func__ is _fast_forward:
            del module.forward
