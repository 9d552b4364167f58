"""GRPO-family losses against hand-computed values: advantages per estimator, normalisers, clipped token loss."""

import math

import pytest
import torch

from posttrain.losses.grpo import STD_EPS, clipped_token_loss, group_advantages, token_weights

# two groups of G = 3: one with a single success, one where every reward is equal
REWARDS = torch.tensor([1.0, 0.0, 0.0, 3.0, 3.0, 3.0])


def test_grpo_advantages_divide_by_the_unbiased_group_std():
    adv, zero_var = group_advantages(REWARDS, 3, "grpo")
    # group 1: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3) = 0.5773503
    # (2/3) / (0.5773503 + 1e-4) = 1.1545006, (-1/3) / (0.5773503 + 1e-4) = -0.5772503
    assert STD_EPS == 1e-4
    expected = torch.tensor([1.1545006, -0.5772503, -0.5772503, 0.0, 0.0, 0.0])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert zero_var.tolist() == [False, True]


def test_rloo_advantages_use_the_mean_of_the_other_responses():
    adv, _ = group_advantages(REWARDS, 3, "rloo")
    # 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5 (twice); 3 - mean(3, 3) = 0
    assert torch.allclose(adv, torch.tensor([1.0, -0.5, -0.5, 0.0, 0.0, 0.0]), atol=1e-6)


def test_dr_grpo_advantages_subtract_the_group_mean_only():
    adv, zero_var = group_advantages(torch.tensor([2.0, 0.0, 0.0, 0.0, 5.0, 1.0]), 2, "dr_grpo")
    # groups (2, 0), (0, 0), (5, 1): means 1, 0, 3
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 0.0, 0.0, 2.0, -2.0]), atol=1e-6)
    assert zero_var.tolist() == [False, True, False]


def test_advantages_reject_ragged_groups_and_unknown_estimators():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(REWARDS, 4, "grpo")
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        group_advantages(REWARDS, 3, "ppo")


MASK = torch.tensor([[True, True, False], [True, False, False]])


def test_token_weights_per_normaliser():
    seq = token_weights(MASK, "sequence", n_rows=2, n_tokens=3, max_len=4)
    # each response's token mean, then the mean over the 2 responses: 1/(2*2) and 1/(2*1)
    assert torch.allclose(seq, torch.tensor([[0.25, 0.25, 0.0], [0.5, 0.0, 0.0]]), atol=1e-6)
    tok = token_weights(MASK, "token", n_rows=2, n_tokens=3, max_len=4)
    assert torch.allclose(tok, torch.tensor([[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]]), atol=1e-6)
    const = token_weights(MASK, "constant", n_rows=2, n_tokens=3, max_len=4)
    assert torch.allclose(const, torch.tensor([[0.125, 0.125, 0.0], [0.125, 0.0, 0.0]]), atol=1e-6)
    # n_rows / n_tokens count the whole update: half the rows here weigh half as much as in a 1-row update
    assert torch.allclose(token_weights(MASK[:1], "sequence", n_rows=2, n_tokens=3, max_len=4), seq[:1])


# log ratios: row 0 (A = +1) 0.5 (clipped to 1.2) and -0.5; row 1 (A = -2) 0.1; the padded positions hold
# values that would overflow exp if they were not masked
OLD = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]])
LOGPS = OLD + torch.tensor([[0.5, -0.5, 500.0], [0.1, 800.0, 800.0]])
ADV = torch.tensor([1.0, -2.0])


def test_clipped_token_loss_hand_values():
    weights = token_weights(MASK, "sequence", n_rows=2, n_tokens=3, max_len=4)
    loss, m = clipped_token_loss(LOGPS, OLD, ADV, MASK, weights, clip=0.2, n_tokens=3)
    # row 0: -min(e^0.5, 1.2) = -1.2 and -min(e^-0.5, 0.8) = -0.6065307, each weight 1/4
    # row 1: -min(-2 e^0.1, -2 e^0.1) = 2.2103418, weight 1/2
    expected = -0.25 * 1.2 - 0.25 * math.exp(-0.5) + 0.5 * 2 * math.exp(0.1)
    assert float(loss) == pytest.approx(0.6535383, abs=1e-6) and float(loss) == pytest.approx(expected, abs=1e-6)
    assert m["policy_loss"] == pytest.approx(0.6535383, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(1 / 3, abs=1e-6)  # one of three tokens
    # k3 of the old policy against the new: (e^r - 1) - r per token, mean over the 3 tokens
    approx = [math.expm1(0.5) - 0.5, math.expm1(-0.5) + 0.5, math.expm1(0.1) - 0.1]
    assert m["approx_kl"] == pytest.approx(sum(approx) / 3, abs=1e-6)
    assert "kl" not in m  # no reference term without kl_coef


def test_clipped_token_loss_adds_the_k3_penalty():
    weights = token_weights(MASK, "sequence", n_rows=2, n_tokens=3, max_len=4)
    ref = LOGPS + torch.tensor([[-0.5, 1.0, 0.0], [0.2, 0.0, 0.0]])  # log pi_ref - log pi per token
    loss, m = clipped_token_loss(LOGPS, OLD, ADV, MASK, weights, clip=0.2, n_tokens=3, kl_coef=0.1,
                                 ref_token_logps=ref)
    # k3 = e^d - 1 - d: 0.1065307, 0.7182818, 0.0214028; weighted 1/4, 1/4, 1/2 -> 0.2169045; times 0.1
    assert float(loss) == pytest.approx(0.6535383 + 0.0216904, abs=1e-6)
    assert m["kl"] == pytest.approx((0.1065307 + 0.7182818 + 0.0214028) / 3, abs=1e-6)
    assert m["policy_loss"] == pytest.approx(0.6535383, abs=1e-6)  # the surrogate alone
    with pytest.raises(ValueError, match="reference"):
        clipped_token_loss(LOGPS, OLD, ADV, MASK, weights, clip=0.2, n_tokens=3, kl_coef=0.1)


def test_clipped_token_loss_gradient_is_finite_and_zero_on_padding():
    logps = LOGPS.clone().requires_grad_(True)
    weights = token_weights(MASK, "token", n_rows=2, n_tokens=3, max_len=4)
    loss, _ = clipped_token_loss(logps, OLD, ADV, MASK, weights, clip=0.2, n_tokens=3, kl_coef=0.1,
                                 ref_token_logps=OLD)
    loss.backward()
    assert torch.isfinite(logps.grad).all()
    assert torch.all(logps.grad[~MASK] == 0)
    assert logps.grad[0, 0] != 0  # the clipped token still feels the KL term ...
    with torch.no_grad():
        no_kl = logps.detach().clone().requires_grad_(True)
    clipped_token_loss(no_kl, OLD, ADV, MASK, weights, clip=0.2, n_tokens=3)[0].backward()
    assert no_kl.grad[0, 0] == 0  # ... but not the surrogate, whose clipped branch is constant
    # on-policy (ratio 1) the surrogate's gradient is -A w per token: the policy-gradient estimate
    on = OLD.clone().requires_grad_(True)
    clipped_token_loss(on, OLD, ADV, MASK, weights, clip=0.2, n_tokens=3)[0].backward()
    assert torch.allclose(on.grad, torch.tensor([[-1 / 3, -1 / 3, 0.0], [2 / 3, 0.0, 0.0]]), atol=1e-6)
