"""Reward and DPO-family losses against hand-computed values (issue 3's golden numbers)."""

import itertools
import math

import pytest
import torch

from posttrain.losses import LOSSES, PairLogps, bradley_terry, pairwise_reward_loss, preference_loss

PC, PR = [-0.5, -10.0, -1.0], [-0.1, -30.0, -21.0]
RC, RR = [-0.5, -10.1, -0.1], [-0.1, -20.1, -0.1]


def _lp(lengths=False):
    t = torch.tensor
    kw = {"chosen_lengths": t([1.0, 2.0, 4.0]), "rejected_lengths": t([1.0, 3.0, 7.0])} if lengths else {}
    return PairLogps(t(PC), t(PR), t(RC), t(RR), **kw)


def _close(x, expected):
    assert torch.allclose(x.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6), (x, expected)


def _nls(z):  # -log sigmoid(z), by hand
    return math.log1p(math.exp(-z))


def test_dpo_family_golden_values():
    lp = _lp()
    _close(LOSSES["sigmoid"](lp, beta=0.1), [0.693147, 0.313262, 0.126928])
    _close(LOSSES["hinge"](lp, beta=0.1), [1.0, 0.0, 0.0])
    _close(LOSSES["sigmoid"](lp, beta=0.1, label_smoothing=0.1), [0.693147, 0.413262, 0.326928])
    # IPO: h = [0, 10, 20], 1/(2 tau) = 5 -> (h - 5)^2
    _close(LOSSES["ipo"](lp, beta=0.1), [25.0, 25.0, 225.0])
    # robust: ((1-e) nls(z) - e nls(-z)) / (1 - 2e), z = beta h = [0, 1, 2]
    e = 0.1
    _close(LOSSES["robust"](lp, beta=0.1, label_smoothing=e),
           [((1 - e) * _nls(z) - e * _nls(-z)) / (1 - 2 * e) for z in (0.0, 1.0, 2.0)])


def test_simpo_and_orpo_golden_values():
    lp = _lp(lengths=True)
    avg_c, avg_r = [-0.5, -5.0, -0.25], [-0.1, -10.0, -3.0]
    # SimPO: -log sigmoid(beta (avg_c - avg_r) - gamma), beta 2, gamma 0.5
    _close(LOSSES["simpo"](lp, beta=2.0, gamma=0.5), [_nls(2.0 * (c - r) - 0.5) for c, r in zip(avg_c, avg_r)])
    # ORPO: -avg_c + lambda * -log sigmoid(log odds(c) - log odds(r)), odds(p) = p / (1 - p)
    def log_odds(a):
        return a - math.log(1 - math.exp(a))
    _close(LOSSES["orpo"](lp, beta=0.1), [-c + 0.1 * _nls(log_odds(c) - log_odds(r)) for c, r in zip(avg_c, avg_r)])


def test_reward_golden_values():
    _close(bradley_terry(torch.tensor([1.0]), torch.tensor([0.0])), [0.313262])
    _close(bradley_terry(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5])), [0.474077])


def test_policy_equals_reference_gives_ln2_and_zero_rewards():
    x = torch.tensor([-3.0, -7.5])
    lp = PairLogps(x, x - 1, x, x - 1)
    loss, m = preference_loss("sigmoid", lp, torch.ones(2), 2.0, beta=0.1)
    assert abs(float(loss) - math.log(2)) < 1e-6
    assert m["rewards/chosen"] == 0 and m["rewards/rejected"] == 0 and m["margin"] == 0


def test_ranked_list_is_mean_of_its_pairs():
    rewards = torch.tensor([0.3, -1.2, 2.0, 0.7])  # ranks [0, 1, 2, 3]: index order is best to worst
    pairs = list(itertools.combinations(range(4), 2))
    better, worse = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    loss, m = pairwise_reward_loss(rewards, better, worse, torch.zeros(6), torch.full((6,), 1 / 6), 1.0)
    by_hand = sum(_nls(float(rewards[i] - rewards[j])) for i, j in pairs) / 6
    assert abs(float(loss) - by_hand) < 1e-6 and m["tokens"] == pytest.approx(1.0)
    assert m["accuracy"] == pytest.approx(2 / 6)  # right: 0>1 and 2>3; wrong: 0-2, 0-3, 1-2, 1-3


def test_reward_centering_and_weighting():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    loss, _ = pairwise_reward_loss(rewards, torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([0.5, 0.0]),
                                   torch.ones(2), 2.0, center_coef=0.01)
    by_hand = (0.474077 + 0.01 * 1.0 + math.log(2) + 0.01 * 1.0) / 2
    assert abs(float(loss) - by_hand) < 1e-6


def test_sft_weight_adds_chosen_nll():
    lp = _lp(lengths=True)
    base, _ = preference_loss("sigmoid", lp, torch.ones(3), 3.0, beta=0.1)
    with_sft, _ = preference_loss("sigmoid", lp, torch.ones(3), 3.0, beta=0.1, sft_weight=1.0)
    assert abs(float(with_sft - base) - (0.5 + 5.0 + 0.25) / 3) < 1e-6


def test_reward_moments_summed_over_micro_batches_give_mean_and_std():
    """Reward mean/std reported per micro-batch, summed as the loop sums them, equal torch's over all rewards."""
    from posttrain.losses.moments import fold_moments

    rewards = torch.tensor([0.3, -1.2, 2.0, 0.7, 5.0, -0.4, 1.1])
    # three micro-batches of 2, 4 and 1 response rows; pairs index rows within each
    micro = [([0, 1], [0], [1]), ([2, 3, 4, 5], [0, 2], [1, 3]), ([6], [], [])]
    summed: dict[str, float] = {}
    for rows, better, worse in micro:
        _, m = pairwise_reward_loss(rewards[rows], torch.tensor(better, dtype=torch.long),
                                    torch.tensor(worse, dtype=torch.long), torch.zeros(len(better)),
                                    torch.ones(len(better)), 3.0)
        for key, value in m.items():
            summed[key] = summed.get(key, 0.0) + value
    folded = fold_moments(summed)
    assert folded["rewards/mean"] == pytest.approx(float(rewards.mean()), abs=1e-6)
    assert folded["rewards/std"] == pytest.approx(float(rewards.std()), abs=1e-6)
    assert not any(":" in key for key in folded) and folded["accuracy"] == pytest.approx(1.0)
