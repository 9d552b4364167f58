"""GRPO-family RL losses as pure tensor functions: group-relative advantages, loss normalisation and the
clipped token-level objective with an optional k3 KL penalty to the reference.

Shapes: B responses in groups of G consecutive rows (the G samples of one prompt), R response
positions; `mask` (B, R) is True on real response tokens. No transformers import.
"""

from __future__ import annotations

import torch

from posttrain.losses.ppo import kl_per_token

ESTIMATORS = ("grpo", "rloo", "dr_grpo")
NORMS = ("sequence", "token", "constant")
STD_EPS = 1e-4  # added to the group std (as TRL does): a 0/1 reward group with one success stays finite


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) rewards -> ((B,) advantages, (B // G,) bool: groups whose G rewards are all equal).

    grpo: A_i = (r_i - mean(r)) / (std(r) + eps), std unbiased (Shao et al. 2024, DeepSeekMath sec. 4.1.2).
    rloo: A_i = r_i - mean_{j != i} r_j, the leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics",
    after Kool et al. 2019). dr_grpo: A_i = r_i - mean(r), no std division (Liu et al. 2025, "Understanding
    R1-Zero-Like Training", Dr. GRPO: the std biases toward questions that are too easy or too hard).
    A group of equal rewards gets A = 0 under all three.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size} (>= 2)")
    r = rewards.double().view(-1, group_size)  # (B/G, G)
    mean = r.mean(1, keepdim=True)
    if estimator == "grpo":
        adv = (r - mean) / (r.std(1, keepdim=True) + STD_EPS)
    elif estimator == "rloo":
        adv = (r - mean) * group_size / (group_size - 1)  # r_i - (sum - r_i) / (G - 1), rearranged
    else:
        adv = r - mean
    zero_variance = r.amax(1) == r.amin(1)  # (B/G,)
    return adv.view(-1).to(rewards.dtype), zero_variance


def token_weights(mask: torch.Tensor, norm: str, *, n_rows: int, n_tokens: float, max_len: int) -> torch.Tensor:
    """(B, R) weight of each token's loss such that the update's loss is their weighted sum. n_rows and
    n_tokens count the whole update (every micro-batch on every process), so the split never matters.

    sequence: 1 / (n_rows |o_i|), each response's token mean, averaged (GRPO, Shao et al. 2024 eq. 3);
    token: 1 / n_tokens, every token of the update alike (DAPO, Yu et al. 2025, token-level loss);
    constant: 1 / (n_rows * max_len), no length in the normaliser, so a long wrong answer is not diluted
    (Dr. GRPO, Liu et al. 2025, whose constant is the generation budget).
    """
    m = mask.float()
    if norm == "sequence":
        return m / (n_rows * m.sum(1, keepdim=True).clamp(min=1.0))
    if norm == "token":
        return m / max(float(n_tokens), 1.0)
    if norm == "constant":
        return m / (n_rows * max_len)
    raise ValueError(f"unknown loss normalisation {norm!r}; use one of {', '.join(NORMS)}")


def clipped_token_loss(token_logps: torch.Tensor, old_token_logps: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, weights: torch.Tensor, *, clip: float, n_tokens: float,
                       kl_coef: float = 0.0, ref_token_logps: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """sum_t w_t * (-min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta * KL_t), rho = pi / pi_old.

    The clipped surrogate of PPO (Schulman et al. 2017 eq. 7) at every token with the response's advantage
    A (B,); KL_t is the k3 estimate of KL(pi || pi_ref) (DeepSeekMath eq. 4), added only when beta > 0.
    Metrics are sums over this micro-batch that add up, over the update, to token means (n_tokens: the
    update's response tokens) or, for policy_loss, to the surrogate under the same weights.
    """
    zero = torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)
    # padding positions become ratio 1 and KL 0 before any arithmetic, so no inf or nan reaches the gradient
    log_ratio = torch.where(mask, token_logps - old_token_logps, zero)  # (B, R)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None].to(ratio.dtype)  # (B, 1)
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv
    surrogate = -torch.minimum(unclipped, clipped)  # (B, R)
    per_token = surrogate
    kl = None
    if kl_coef > 0:
        if ref_token_logps is None:
            raise ValueError("kl_coef > 0 needs the reference log-probs")
        kl = kl_per_token(token_logps, torch.where(mask, ref_token_logps, token_logps), "k3")  # (B, R)
        per_token = surrogate + kl_coef * kl
    loss = (per_token * weights * mask).sum()
    m, n = mask.float(), max(float(n_tokens), 1.0)
    with torch.no_grad():
        metrics = {"policy_loss": float((surrogate * weights * m).sum()),
                   "clip_frac": float(((clipped < unclipped).float() * m).sum() / n),
                   # k3 estimate of KL(pi_old || pi): how far the updates so far moved from the sampler
                   "approx_kl": float(((torch.expm1(log_ratio) - log_ratio) * m).sum() / n)}
        if kl is not None:
            metrics["kl"] = float((kl * m).sum() / n)
    return loss, metrics
