"""Log-probabilities of target tokens through the LM head, chunked, never keeping (N, V) logits.

Both the SFT loss and DPO's sequence log-probs need only log p(y_t) at the supervised positions.
With a frozen head (LoRA, QLoRA, prompt tuning) the gradient of log p(y_t) with respect to the
hidden state, W[y_t] - softmax(h_t W^T) W, does not depend on the loss above it, so the fused path
forms it chunk by chunk during the forward pass: backward is then one multiply, with no logits
kept and no recomputation. A trainable head takes the plain path (autograd, chunks recomputed).
Under autocast the fused path casts the head's weight to the autocast dtype once per call (autocast
itself would cast it for each of the two products) and keeps the softmax in float32.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from posttrain.models.anatomy import partitioned
from posttrain.models.onednn_linear import product


class _FrozenHeadLogps(torch.autograd.Function):
    """(N,) log softmax(h W^T + b)[y] for a frozen head; d/dh formed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, need_grad, amp):  # hidden (N, H), weight (V, H)
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
        grad_rows = torch.empty_like(hidden) if need_grad else None  # (N, H) d logp / d h
        rows = weight  # weight[t] below: the head's own rows, in its own dtype
        if amp is not None:  # the matmuls in the autocast dtype, everything else as without autocast
            weight, bias = weight.to(amp), (None if bias is None else bias.to(amp))
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            h = h if amp is None else h.to(amp)
            logits = product(h, weight, bias).float()  # (n, V); oneDNN on a CPU (models/onednn_linear.py)
            target_logits = logits.gather(1, t[:, None])[:, 0]  # (n,)
            top = logits.amax(dim=-1)  # (n,) log-sum-exp, stabilised, in place: exp(logits - top)
            total = logits.sub_(top[:, None]).exp_().sum(dim=-1)  # (n,)
            logps[start:start + chunk] = target_logits - top - total.log()
            if need_grad:  # softmax @ W = (exp(logits - top) @ W) / total: divide n rows, not n x V
                expected = product(logits.to(weight.dtype), weight.t()).div_(total[:, None].to(weight.dtype))  # (n, H)
                grad_rows[start:start + chunk] = rows[t].to(grad_rows.dtype) - expected.to(grad_rows.dtype)
        ctx.save_for_backward(grad_rows)
        return logps

    @staticmethod
    def backward(ctx, grad):  # grad (N,)
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad[:, None].to(grad_rows.dtype), None, None, None, None, None, None


def fused_head_ok(head) -> bool:
    """The fused path applies to a plain frozen nn.Linear head (else autograd takes the plain path), whose
    weight is whole outside its forward (not a ZeRO-3 partition)."""
    return (type(head) is nn.Linear and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad) and not partitioned(head.weight))


def token_logps(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                fused: bool = True) -> torch.Tensor:
    """(N,) float32 log p(targets) from hidden states (N, H) through `head`, `chunk` positions at a time."""
    if fused and fused_head_ok(head):
        need_grad = torch.is_grad_enabled() and hidden.requires_grad  # else skip forming d logp / d h
        device = hidden.device.type
        amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        with torch.autocast(device, enabled=False) if amp is not None else nullcontext():
            return _FrozenHeadLogps.apply(hidden, head.weight, head.bias, targets, chunk, need_grad, amp)

    def chunk_logps(h, t):
        return torch.log_softmax(head(h).float(), dim=-1).gather(-1, t[:, None])[:, 0]  # (n,)

    n = hidden.shape[0]
    if n <= chunk:
        return chunk_logps(hidden, targets) if n else hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0
    # recompute each chunk's logits in backward instead of keeping them all
    return torch.cat([checkpoint(chunk_logps, hidden[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
                      for s in range(0, n, chunk)])
