"""Losses against hand-computed values."""

import math

import torch

from posttrain.losses import sft_loss, sft_loss_from_logps


def test_sft_loss_hand_computed():
    # two positions, vocabulary 3; log-softmax by hand
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([2, 1])
    weights = torch.tensor([1.0, 0.5])
    lse0 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    nll0, nll1 = lse0 - 3.0, math.log(3.0)
    loss, metrics = sft_loss(logits, targets, weights, normalizer=4.0)
    assert abs(float(loss) - (nll0 + 0.5 * nll1) / 4.0) < 1e-6
    assert abs(metrics["nll_sum"] - (nll0 + nll1)) < 1e-6 and metrics["tokens"] == 2


def test_sft_loss_from_logps_hand_computed():
    logps = torch.tensor([-0.5, -2.0, -1.0])
    weights = torch.tensor([1.0, 0.5, 0.0])
    loss, metrics = sft_loss_from_logps(logps, weights, normalizer=2.0)
    assert abs(float(loss) - (0.5 + 0.5 * 2.0) / 2.0) < 1e-6
    assert abs(metrics["nll_sum"] - 3.5) < 1e-6 and metrics["tokens"] == 3
