"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") as pure functions:
unpaired desirable / undesirable responses, each scored against a KL reference point.

Shapes: B responses with per-sequence log-probs (summed over response tokens) under the policy and the
reference, and `desirable` (B,) bool labels. No transformers import.
"""

from __future__ import annotations

import torch

from posttrain.losses.moments import moment_sums


def kl_reference_point(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """z_ref = max(0, mean(log pi(y'|x) - log pi_ref(y'|x))) over mismatched pairs (x, y') of the batch, detached.

    KTO eq. 6 estimates KL(pi || pi_ref) with responses paired to other prompts (their section 4.1; TRL shifts
    completions by one); as in the paper it is clamped at 0 and carries no gradient. Inputs (M,).
    """
    return (kl_policy_logps - kl_ref_logps).detach().float().mean().clamp(min=0.0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor | float,
             normalizer: float, *, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """sum over the B responses of (lambda_y - v(x, y)) / normalizer (KTO eq. 8), with r = log pi/pi_ref and

    v = lambda_D sigmoid(beta (r - z_ref)) for desirable y, lambda_U sigmoid(beta (z_ref - r)) for undesirable y.
    `normalizer`: responses in the whole update, so micro-batches (and processes) add up to the mean. Metrics:
    implicit rewards beta * r of each kind and the reference point, as moments (mean / std over the update).
    """
    r = (policy_logps - ref_logps).float()  # (B,) implicit reward before beta
    z = torch.as_tensor(kl, dtype=r.dtype, device=r.device)
    lam = torch.where(desirable, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    value = lam * torch.sigmoid(beta * torch.where(desirable, r - z, z - r))  # (B,)
    loss = (lam - value).sum() / normalizer
    metrics = {**moment_sums("rewards/desirable", beta * r[desirable]),
               **moment_sums("rewards/undesirable", beta * r[~desirable]), **moment_sums("kl", z.view(1))}
    return loss, metrics
