"""The DPO family: one pure function per loss, and a name -> function registry.

Every function takes the per-pair sequence log-probs in `PairLogps` and returns per-pair losses
(P,); `preference_loss` weights and normalises them and computes the shared metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.losses.pairs import pair_weighted


@dataclass
class PairLogps:
    policy_chosen: torch.Tensor  # (P,) sum of token log-probs of the chosen response under the policy
    policy_rejected: torch.Tensor  # (P,)
    ref_chosen: torch.Tensor | None = None  # (P,) the same under the reference model (None: reference-free)
    ref_rejected: torch.Tensor | None = None  # (P,)
    chosen_lengths: torch.Tensor | None = None  # (P,) response tokens, for length-normalised losses
    rejected_lengths: torch.Tensor | None = None  # (P,)

    def h(self) -> torch.Tensor:
        """(log pi_c - log pi_r) - (log ref_c - log ref_r): the DPO implicit-reward margin / beta."""
        return (self.policy_chosen - self.policy_rejected) - (self.ref_chosen - self.ref_rejected)


def sigmoid_loss(lp: PairLogps, beta: float, label_smoothing: float = 0.0, **_) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7); with label_smoothing eps the conservative cDPO mix."""
    z = beta * lp.h()
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def robust_loss(lp: PairLogps, beta: float, label_smoothing: float = 0.0, **_) -> torch.Tensor:
    """Robust DPO for noisy labels with flip rate eps (Chowdhury et al. 2024, eq. 8): unbiased loss."""
    z = beta * lp.h()
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def hinge_loss(lp: PairLogps, beta: float, **_) -> torch.Tensor:
    """SLiC hinge (Zhao et al. 2023, eq. 3): relu(1 - beta * h)."""
    return torch.relu(1 - beta * lp.h())


def ipo_loss(lp: PairLogps, beta: float, **_) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17, beta as tau): (h - 1/(2 tau))^2 on summed log-probs."""
    return (lp.h() - 1 / (2 * beta)) ** 2


def simpo_loss(lp: PairLogps, beta: float, gamma: float = 0.5, **_) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|y_w| log pi_w - beta/|y_l| log pi_l - gamma)."""
    chosen = lp.policy_chosen / lp.chosen_lengths
    rejected = lp.policy_rejected / lp.rejected_lengths
    return -F.logsigmoid(beta * (chosen - rejected) - gamma)


def orpo_loss(lp: PairLogps, beta: float, **_) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eqs. 4-7, beta as lambda): NLL of chosen + lambda * -log sigmoid(log odds ratio).

    Probabilities are length-normalised (mean token log-prob), as in the paper's P(y|x).
    """
    chosen = lp.policy_chosen / lp.chosen_lengths  # (P,) mean token log-prob, < 0
    rejected = lp.policy_rejected / lp.rejected_lengths
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    return -chosen - beta * F.logsigmoid(log_odds)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": sigmoid_loss, "robust": robust_loss, "hinge": hinge_loss,
    "ipo": ipo_loss, "simpo": simpo_loss, "orpo": orpo_loss,
}
REFERENCE_FREE = frozenset({"simpo", "orpo"})


def preference_loss(
    name: str,
    lp: PairLogps,
    pair_weight: torch.Tensor,  # (P,) 1 / (pairs of the pair's prompt): each prompt counts once
    normalizer: float,  # prompts in the effective batch
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    sft_weight: float = 0.0,  # adds sft_weight * mean token NLL of the chosen response (RPO-style)
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted mean over pairs of LOSSES[name], plus the optional SFT term; metrics pre-normalised."""
    per_pair = LOSSES[name](lp, beta=beta, label_smoothing=label_smoothing, gamma=gamma)
    if sft_weight:
        per_pair = per_pair + sft_weight * -(lp.policy_chosen / lp.chosen_lengths)
    loss, mean = pair_weighted(per_pair, pair_weight, normalizer)
    with torch.no_grad():
        if lp.ref_chosen is not None:
            chosen_r = beta * (lp.policy_chosen - lp.ref_chosen)  # implicit rewards (DPO eq. 5)
            rejected_r = beta * (lp.policy_rejected - lp.ref_rejected)
        else:  # reference-free losses: SimPO's length-normalised reward
            chosen_r = beta * lp.policy_chosen / lp.chosen_lengths
            rejected_r = beta * lp.policy_rejected / lp.rejected_lengths
        metrics = {
            "rewards/chosen": mean(chosen_r), "rewards/rejected": mean(rejected_r),
            "margin": mean(chosen_r - rejected_r), "accuracy": mean((chosen_r > rejected_r).float()),
            "logps/chosen": mean(lp.policy_chosen), "logps/rejected": mean(lp.policy_rejected),
            "tokens": float(pair_weight.sum()),
        }
        if lp.ref_chosen is not None:  # drift from the reference on the data: a cheap KL proxy
            metrics["drift"] = mean((lp.policy_chosen - lp.ref_chosen + lp.policy_rejected - lp.ref_rejected) / 2)
    return loss, metrics
