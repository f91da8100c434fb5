"""Listwise losses: PRO and LiPO-lambda. Hand values, n = 2 agreement with pairwise losses, gradients."""

import math

import pytest
import torch

from imgalign.losses import dpo_sigmoid_loss, lipo_lambda_loss, pro_loss, simpo_loss


def t(*rows, grad=False):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def test_pro_value_with_reward_gaps():
    """n = 3, scores s = (-1, -2, -3) best -> worst, rewards R = (3, 2, 0).
    k = 1: T_12 = 1, T_13 = 3, T_1 = 3:
      L_1 = log(e^(-1*3) + e^(-2*1) + e^(-3*3)) + 1*3 = log(0.0497871 + 0.1353353 + 0.0001234) + 3 = 1.3139281
    k = 2: T_23 = 2, T_2 = 2:  L_2 = log(e^(-2*2) + e^(-3*2)) + 2*2 = log(0.0183156 + 0.0024788) + 4 = 0.1269280
    L = 1.4408561."""
    out = pro_loss(t([-1.0, -2.0, -3.0]), rewards=t([3.0, 2.0, 0.0]))
    assert out.losses.item() == pytest.approx(1.4408561156, abs=1e-9)


def test_pro_sorts_by_rewards_and_normalises_by_length():
    """Same list given shuffled, as summed log-likelihoods with lengths (s = l / n): same 1.4408561."""
    out = pro_loss(t([-6.0, -2.0, -6.0]), rewards=t([0.0, 3.0, 2.0]), lengths=t([2.0, 2.0, 3.0]))
    assert out.losses.item() == pytest.approx(1.4408561156, abs=1e-9)


def test_pro_without_rewards_is_plackett_luce():
    """All T = 1: L = -log softmax(-1, -2, -3)[0] - log softmax(-2, -3)[0]
    = (log(e^-1 + e^-2 + e^-3) + 1) + (log(e^-2 + e^-3) + 2) = 0.4076060 + 0.3132617 = 0.7208677."""
    assert pro_loss(t([-1.0, -2.0, -3.0])).losses.item() == pytest.approx(0.7208676520, abs=1e-9)


def test_pro_n2_equals_reference_free_sigmoid():
    """n = 2: L = -logsig((R_1 - R_2) * (lbar_1 - lbar_2)) = SimPO with beta = R_1 - R_2, gamma = 0
    (and without rewards, reference-free DPO with beta = 1)."""
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(5, 2, generator=g, dtype=torch.float64) * 20
    lengths = torch.randint(1, 9, (5, 2), generator=g).double()
    rewards = torch.stack([torch.full((5,), 2.5), torch.full((5,), 1.0)], dim=1).double()
    pro = pro_loss(logps, rewards, lengths).losses
    simpo = simpo_loss(logps[:, 0], logps[:, 1], beta=1.5, gamma=0.0,
                       chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1]).losses
    assert torch.allclose(pro, simpo)
    assert torch.allclose(pro_loss(logps).losses, dpo_sigmoid_loss(logps[:, 0], logps[:, 1], 1.0).losses)


def test_pro_gradient_pushes_best_up_and_worst_down():
    logps = t([-1.0, -2.0, -3.0], grad=True)
    pro_loss(logps, rewards=t([3.0, 2.0, 0.0])).losses.sum().backward()
    assert logps.grad[0, 0] < 0 < logps.grad[0, 2]


def test_lipo_value():
    """beta = 1, no reference: s = (0.3, 0.1, 0.2), labels psi = (2, 1, 0) -> G = 2^psi - 1 = (3, 1, 0).
    Ranks under s: item0 -> 1, item2 -> 2, item1 -> 3; 1/D = 1/log2(1 + rank) = (1, 0.5, 0.6309298).
    Pairs with psi_i > psi_j:
      (0,1): |3-1| * |1 - 0.5|        = 1.0       * -logsig(0.3 - 0.1) = 0.5981389
      (0,2): |3-0| * |1 - 0.6309298|  = 1.1072107 * -logsig(0.3 - 0.2) = 1.1072107 * 0.6443967 = 0.7134896
      (1,2): |1-0| * |0.5 - 0.6309298|= 0.1309298 * -logsig(0.1 - 0.2) = 0.1309298 * 0.7443967 = 0.0974637
    L = 1.4090854."""
    out = lipo_lambda_loss(t([0.3, 0.1, 0.2]), None, t([2.0, 1.0, 0.0]), beta=1.0)
    assert out.losses.item() == pytest.approx(1.4090854430, abs=1e-9)
    assert out.rewards[0].tolist() == pytest.approx([0.3, 0.1, 0.2])


def test_lipo_uses_reference_and_beta():
    """s = beta * (l - lR): l = (2, 0, 1), lR = (-1, -1, -1), beta = 0.1 -> s = (0.3, 0.1, 0.2): as above."""
    out = lipo_lambda_loss(t([2.0, 0.0, 1.0]), t([-1.0, -1.0, -1.0]), t([2.0, 1.0, 0.0]), beta=0.1)
    assert out.losses.item() == pytest.approx(1.4090854430, abs=1e-9)


def test_lipo_n2_is_scaled_dpo():
    """n = 2, labels (1, 0): one pair with Delta = |1 - 0| * |1/log2(2) - 1/log2(3)| = 1 - 0.6309298 = 0.3690702,
    whichever order s puts them in: L = 0.3690702 * DPO sigmoid loss (beta inside s)."""
    g = torch.Generator().manual_seed(1)
    pol, ref = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.0]] * 6)
    lipo = lipo_lambda_loss(pol, ref, labels, beta=0.5).losses
    dpo = dpo_sigmoid_loss(pol[:, 0] - ref[:, 0], pol[:, 1] - ref[:, 1], 0.5).losses
    assert torch.allclose(lipo, (1 - 1 / math.log2(3)) * dpo)


def test_lipo_ties_and_gradients():
    """Tied labels form no pair (loss 0); otherwise the better-labelled response is pushed up."""
    assert lipo_lambda_loss(t([0.3, 0.1]), None, t([1.0, 1.0]), 1.0).losses.item() == 0.0
    logps = t([0.1, 0.2, 0.3], grad=True)
    lipo_lambda_loss(logps, None, t([2.0, 1.0, 0.0]), 1.0).losses.sum().backward()
    assert logps.grad[0, 0] < 0 < logps.grad[0, 2]
