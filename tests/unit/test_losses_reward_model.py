"""Reward-model losses: Bradley-Terry (plain, margin, scaled), rating regression, their combination, GPM."""

import math

import pytest
import torch

from imgalign.losses import (
    bradley_terry_loss,
    combined_reward_loss,
    gpm_loss,
    gpm_preference_score,
    gpm_win_probability,
    rating_regression_loss,
    scaled_bradley_terry_loss,
)


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def test_bradley_terry_values():
    """r_w = 2, r_l = 1: -logsig(1) = log(1 + e^-1) = 0.3132617; margin 0.5: -logsig(0.5) = 0.4740770;
    scaled with strength m = 2: 2 * 0.3132617 = 0.6265234."""
    assert bradley_terry_loss(t(2.0), t(1.0)).item() == pytest.approx(0.3132616875, abs=1e-9)
    assert bradley_terry_loss(t(2.0), t(1.0), margin=t(0.5)).item() == pytest.approx(0.4740769842, abs=1e-9)
    assert scaled_bradley_terry_loss(t(2.0), t(1.0), t(2.0)).item() == pytest.approx(0.6265233750, abs=1e-9)


def test_bradley_terry_gradient_signs():
    r_w, r_l = t(0.0, 1.0, grad=True), t(0.0, 2.0, grad=True)
    scaled_bradley_terry_loss(r_w, r_l, t(1.0, 3.0)).sum().backward()
    assert (r_w.grad < 0).all() and (r_l.grad > 0).all()


def test_rating_regression_values():
    """[B]: (2.5 - 2)^2 = 0.25; [B, K=2]: mean((1 - 0)^2, (3 - 1)^2) = (1 + 4) / 2 = 2.5."""
    assert rating_regression_loss(t(2.5), t(2.0)).item() == pytest.approx(0.25)
    assert rating_regression_loss(t([1.0, 3.0]), t([0.0, 1.0])).tolist() == pytest.approx([2.5])


def test_combined_reward_loss_value_and_stages():
    """r_w = 2, r_l = 1, ratings h_w = 2.5, h_l = 0, strength 2, weights 1 / 0.5:
    1 * 2 * 0.3132617 + 0.5 * ((2 - 2.5)^2 + (1 - 0)^2) / 2 = 0.6265234 + 0.5 * 0.625 = 0.9390234.
    bt_weight = 0 is the regression stage, regression_weight = 0 the Scaled-BT stage."""
    args = (t(2.0), t(1.0), t(2.5), t(0.0))
    assert combined_reward_loss(*args, strength=t(2.0), regression_weight=0.5).item() == pytest.approx(0.9390233750)
    assert combined_reward_loss(*args, bt_weight=0.0).item() == pytest.approx(0.625)
    assert combined_reward_loss(*args, strength=t(2.0), regression_weight=0.0).item() == pytest.approx(0.6265233750)
    assert combined_reward_loss(*args, regression_weight=0.0).item() == pytest.approx(0.3132616875)


def test_gpm_score_values():
    """2-d: s = v_i[0] v_j[1] - v_i[1] v_j[0]; v_w = (1, 0), v_l = (0, 1): s = 1 - 0 = 1, loss -logsig(1) = 0.3132617.
    4-d with eigenvalues (1, 0.5): v_w = (1, 0, 0.6, 0.8), v_l = (0, 1, 0.8, -0.6):
    block 1: 1 * (1*1 - 0*0) = 1; block 2: 0.5 * (0.6*(-0.6) - 0.8*0.8) = 0.5 * (-1.0) = -0.5; s = 0.5;
    tau = 0.5 -> loss -logsig(1) = 0.3132617."""
    assert gpm_preference_score(t([1.0, 0.0]), t([0.0, 1.0])).item() == pytest.approx(1.0)
    assert gpm_loss(t([1.0, 0.0]), t([0.0, 1.0])).item() == pytest.approx(0.3132616875, abs=1e-9)
    v_w, v_l, lam = t([1.0, 0.0, 0.6, 0.8]), t([0.0, 1.0, 0.8, -0.6]), t([1.0, 0.5])
    assert gpm_preference_score(v_w, v_l, lam).item() == pytest.approx(0.5)
    assert gpm_loss(v_w, v_l, tau=0.5, eigenvalues=lam).item() == pytest.approx(0.3132616875, abs=1e-9)


def test_gpm_is_skew_symmetric():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    lam = torch.rand(5, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(gpm_preference_score(a, b, lam), -gpm_preference_score(b, a, lam))
    assert torch.allclose(gpm_preference_score(a, a, lam), torch.zeros(5, dtype=torch.float64))
    p = gpm_win_probability(a, b, 0.3, lam) + gpm_win_probability(b, a, 0.3, lam)
    assert torch.allclose(p, torch.ones(5, dtype=torch.float64))


def test_gpm_represents_cyclic_preferences():
    """Unit vectors at 0, 120, 240 degrees: s(a, b) = sin(angle_b - angle_a) = sin(120 deg) = 0.8660 for
    a > b, b > c and c > a alike: a cycle no scalar reward (r_a > r_b > r_c > r_a) can express."""
    angle = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=torch.float64)
    v = torch.stack([angle.cos(), angle.sin()], dim=1)  # [3, 2]
    s = gpm_preference_score(v, v.roll(-1, dims=0))  # a>b, b>c, c>a
    assert s.tolist() == pytest.approx([math.sin(2 * math.pi / 3)] * 3)
    assert (gpm_win_probability(v, v.roll(-1, dims=0)) > 0.5).all()


def test_gpm_gradient_and_odd_dimension():
    v_w, v_l = t([0.6, 0.8], grad=True), t([0.8, 0.6])
    gpm_loss(v_w, v_l).sum().backward()
    # d s / d v_w = (v_l[1], -v_l[0]) = (0.6, -0.8); the loss decreases along it
    assert v_w.grad[0, 0] < 0 < v_w.grad[0, 1]
    with pytest.raises(ValueError, match="even"):
        gpm_preference_score(t([1.0, 0.0, 1.0]), t([1.0, 0.0, 1.0]))
