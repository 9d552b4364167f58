"""KTO loss and its KL reference point against hand-computed values."""

import pytest
import torch

from posttrain.losses.kto import kl_reference_point, kto_loss

POLICY = torch.tensor([-1.0, -2.0, -3.0, -4.0])
REF = torch.tensor([-1.5, -1.0, -3.0, -3.0])  # r = log pi - log pi_ref = 0.5, -1, 0, -1
DESIRABLE = torch.tensor([True, True, False, False])


def test_kl_reference_point_is_the_clamped_detached_mean():
    pol = torch.tensor([-2.0, -3.0, -1.0], requires_grad=True)
    z = kl_reference_point(pol, torch.tensor([-2.5, -2.0, -1.9]))  # differences 0.5, -1, 0.9
    assert float(z) == pytest.approx(0.4 / 3, abs=1e-6) and not z.requires_grad
    assert float(kl_reference_point(torch.tensor([-3.0]), torch.tensor([-1.0]))) == 0.0  # negative: clamped


def test_kto_loss_hand_values():
    loss, m = kto_loss(POLICY, REF, DESIRABLE, 0.2, 4.0, beta=0.5, desirable_weight=1.5, undesirable_weight=1.0)
    # desirable: 1.5 (1 - sigmoid(0.5 (0.5 - 0.2))) = 0.6938552, 1.5 (1 - sigmoid(0.5 (-1 - 0.2))) = 0.9684845
    # undesirable: 1 - sigmoid(0.5 (0.2 - 0)) = 0.4750208, 1 - sigmoid(0.5 (0.2 + 1)) = 0.3543437; mean of 4
    assert float(loss) == pytest.approx(0.6229260, abs=1e-6)
    # implicit rewards beta * r: desirable 0.25, -0.5; undesirable 0, -0.5 (as moments the loop folds)
    assert m["rewards/desirable:n"] == 2 and m["rewards/desirable:sum"] == pytest.approx(-0.25, abs=1e-6)
    assert m["rewards/undesirable:sum"] == pytest.approx(-0.5, abs=1e-6)
    assert m["rewards/undesirable:sumsq"] == pytest.approx(0.25, abs=1e-6)
    assert m["kl:n"] == 1 and m["kl:sum"] == pytest.approx(0.2, abs=1e-6)


def test_kto_loss_micro_batches_add_up_and_gradients_push_the_right_way():
    whole, _ = kto_loss(POLICY, REF, DESIRABLE, 0.2, 4.0, beta=0.5, desirable_weight=1.5)
    halves = sum(float(kto_loss(POLICY[i:i + 2], REF[i:i + 2], DESIRABLE[i:i + 2], 0.2, 4.0, beta=0.5,
                                desirable_weight=1.5)[0]) for i in (0, 2))
    assert halves == pytest.approx(float(whole), abs=1e-6)
    pol = POLICY.clone().requires_grad_(True)
    kto_loss(pol, REF, DESIRABLE, 0.2, 4.0, beta=0.5, desirable_weight=1.5)[0].backward()
    # d/dr of lambda (1 - sigmoid(beta (r - z))) / 4 = -lambda beta s (1 - s) / 4 at s = sigmoid(0.15)
    assert float(pol.grad[0]) == pytest.approx(-0.0466123, abs=1e-6)
    assert float(pol.grad[2]) == pytest.approx(0.0311720, abs=1e-6)  # undesirable: descent lowers its log-prob
    assert torch.all(pol.grad[:2] < 0) and torch.all(pol.grad[2:] > 0)
