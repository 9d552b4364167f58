"""The greedy token of an LM head from a bfloat16 copy of its weight, exactly: the argmax of the float32 logits.

Why: on a CPU a decode step of SmolLM2-135M streams 540 MB of float32 weights, 113 MB of them the LM head's
(49152 x 576). A greedy step needs only the argmax of the head's logits, not the logits. oneDNN computes the
product from a packed bfloat16 copy in half the bytes (8 rows on the project's Zen 4 CPU: 1.2 ms against 2.7 ms
from the packed float32 copy); each bfloat16 logit is then within a bound of the exact one, and only the tokens
whose bfloat16 logit comes within the bounds of the best one are computed again in float32 from the weight
itself. No library computes a bounded-error argmax, hence this module.

The bound (per row of x and token j; u = 2^-8 the unit roundoff of bfloat16, g = K u32 for K-term float32 sums):
x and w_j are each rounded to bfloat16 (|x - x'| <= u |x| elementwise, so ||x - x'|| <= u ||x||; likewise w_j),
so |x.w_j - x'.w'_j| <= u ||x|| ||w_j|| + ||x'|| u ||w_j|| <= (2u + u^2) ||x|| ||w_j|| (Cauchy-Schwarz); the
float32 accumulation adds at most g ||x'|| ||w'_j||, the bfloat16 output's rounding u |y| <= u (1 + 3u) ||x||
||w_j||, and the float32 reference computation itself (any summation order) g ||x|| ||w_j||: in all less than
SLACK ||x|| ||w_j||. A token j can be the float32 argmax only if its bfloat16 logit plus its bound reaches the
largest of (bfloat16 logit minus bound) over all tokens (taken per BLOCK of tokens from their largest logit and
bound: a lower value, so more candidates, never fewer). The candidates of all rows are recomputed in float32 and
each row takes the largest (the lowest index on a tie, as `argmax`: tied tokens are all candidates). On SmolLM2's
greedy steps the bounds were about 9x the observed errors and left 5 candidates a row on average (39 for a batch
of 8 rows together). More than a MAX_CANDIDATES share of the vocabulary (flat distributions: a random context) or
a non-finite input computes the full float32 product instead, through oneDNN from the dense weight.

Only on CPUs with native bfloat16 dot products (AVX512_BF16 or AMX), where the bfloat16 product is the faster
one; elsewhere (the project's Zen 3 machines) the head stays float32. Results differ from the float32 head's
only where two logits are within float32 rounding of each other, as any other summation order would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.models.load import cpu_has_fast_bf16

U_BF16 = 2.0 ** -8
SLACK = 3 * U_BF16 + 1e-3  # 2u + u^2 + u(1 + 3u) plus two float32 sums (< 1e-4 for K < 800) and margin
MAX_CANDIDATES = 1 / 8  # of the vocabulary: gathering more rows costs about as much as the full product
BLOCK = 64  # tokens whose largest bound is checked first, as one
MIN_DIM = 64  # narrower heads: too small for the bfloat16 copy to pay


class GreedyHead:
    """`GreedyHead.of(head)` for a bias-free float32 CPU linear layer, or None where it does not pay; `argmax(x)`:
    (B, in) float32 hidden states -> (B,) long, the argmax of x W^T. The copies go stale if the weight changes:
    make it where the weight is fixed (models/onednn_linear.swap_in)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # the float32 weight itself: candidates are recomputed from it
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16), None)
        vocab = weight.shape[0]
        self.blocks = -(-vocab // BLOCK)
        slack = torch.zeros(self.blocks * BLOCK)
        slack[:vocab] = torch.linalg.vector_norm(weight, dim=1) * SLACK  # bound_j = slack_j * ||x||
        self.slack = slack  # (NB * BLOCK,)
        self.block_slack = slack.view(self.blocks, BLOCK).amax(-1)  # (NB,): the largest bound in each block

    @staticmethod
    def of(head: nn.Module | None) -> GreedyHead | None:
        weight = getattr(head, "weight", None)
        if (type(head) is not nn.Linear or head.bias is not None or weight.device.type != "cpu"
                or weight.dtype != torch.float32 or min(weight.shape) < MIN_DIM or not cpu_has_fast_bf16()
                or getattr(torch.ops.mkldnn, "_linear_pointwise", None) is None):
            return None
        return GreedyHead(weight.detach())

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        b, vocab = x.shape[0], self.weight.shape[0]
        approx = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, None, "none", [], "").float()
        if vocab % BLOCK:  # the last block's tail never wins
            approx = torch.cat([approx, approx.new_full((b, self.blocks * BLOCK - vocab), float("-inf"))], dim=1)
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # (B, 1)
        block_top = approx.view(b, self.blocks, BLOCK).amax(-1)  # (B, NB)
        best_low = (block_top - norms * self.block_slack).amax(-1, keepdim=True)  # (B, 1) <= max_k approx_k - bound_k
        if not bool(best_low.isfinite().all()):  # a NaN or an infinity
            return self._full(x)
        # every token that may win in some row (approx + bound reaching that row's best_low): a set that holds each
        # row's float32 argmax, and every token tied with it, so its argmax over the set is the row's argmax
        reach = approx.sub_(best_low).addcmul_(norms, self.slack).amax(0)  # (NB * BLOCK,): >= 0 in some row
        index = (reach >= 0).nonzero().squeeze(1)  # (C,) ascending
        if index.numel() > MAX_CANDIDATES * vocab:  # flat logits
            return self._full(x)
        return index[F.linear(x, self.weight.index_select(0, index)).argmax(-1)]

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "").argmax(-1)
