"""Game-theoretic / general-preference losses: SPPO, INPO, DNO (hand values, special cases, fixed points)."""

import pytest
import torch

from imgalign.losses import (
    PairwiseInputs,
    dno_loss,
    dpo_sigmoid_loss,
    inpo_loss,
    ipo_loss,
    preference_loss,
    sppo_hard_loss,
    sppo_loss,
)


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def test_sppo_value():
    """beta = 0.1, P_w = 0.8, P_l = 0.3: targets (0.8 - 0.5)/0.1 = 3 and (0.3 - 0.5)/0.1 = -2;
    r_w = 1, r_l = -1: 0.5 * ((1 - 3)^2 + (-1 + 2)^2) = 0.5 * (4 + 1) = 2.5.
    Swapping the win rates: targets -2 and 3: 0.5 * ((1 + 2)^2 + (-1 - 3)^2) = 12.5."""
    assert sppo_loss(t(1.0), t(-1.0), t(0.8), t(0.3), 0.1).losses.item() == pytest.approx(2.5)
    assert sppo_loss(t(1.0), t(-1.0), t(0.3), t(0.8), 0.1).losses.item() == pytest.approx(12.5)


def test_sppo_hard_is_half_weight_soft_sppo_with_hard_win_rates():
    """P_w = 1, P_l = 0: targets +-1/(2 beta); SPPO (official code, with 1/2) = sppo_hard (TRL, no 1/2) / 2."""
    r_w, r_l = t(0.7, -2.0), t(0.1, 3.0)
    soft = sppo_loss(r_w, r_l, t(1.0, 1.0), t(0.0, 0.0), 0.1).losses
    assert torch.allclose(soft, 0.5 * sppo_hard_loss(r_w, r_l, 0.1).losses)


def test_sppo_minimum_at_target_log_ratios():
    r_w, r_l = t(3.0, grad=True), t(-2.0, grad=True)
    out = sppo_loss(r_w, r_l, t(0.8), t(0.3), 0.1)
    out.losses.sum().backward()
    assert out.losses.item() == pytest.approx(0.0, abs=1e-12)
    assert r_w.grad.item() == pytest.approx(0.0, abs=1e-12) and r_l.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_inpo_value():
    """eta = 5, tau = 0.04 -> eta * tau = 0.2. l_w - l_l = -10 + 12 = 2; ref margin -11 + 11.5 = 0.5;
    previous-iterate margin -10.5 + 11.5 = 1.0.
    h = 2 - 0.2 * 0.5 - 0.8 * 1.0 = 1.1;  (h - eta/2)^2 = (1.1 - 2.5)^2 = 1.96.
    (Swapping the roles of ref and prev would give h = 2 - 0.2 - 0.4 = 1.4 -> 1.21.)
    Rewards tau * (l - lR) = (0.04 * 1, 0.04 * -0.5)."""
    out = inpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.5), t(-10.5), t(-11.5), eta=5.0, tau=0.04)
    assert out.losses.item() == pytest.approx(1.96)
    assert out.chosen_rewards.item() == pytest.approx(0.04)
    assert out.rejected_rewards.item() == pytest.approx(-0.02)
    x = PairwiseInputs(t(-10.0), t(-12.0), t(-11.0), t(-11.5))
    reg = preference_loss("inpo", x, 0.04, eta=5.0, prev_chosen_logps=t(-10.5), prev_rejected_logps=t(-11.5))
    assert reg.losses.item() == pytest.approx(1.96)


def test_inpo_first_iteration_is_ipo():
    """With pi_t = pi_ref: h = (l_w - l_l) - (lR_w - lR_l) = Delta, and (Delta - eta/2)^2 is IPO with
    1/(2 beta) = eta/2, i.e. beta = 1/eta (summed log-ratios)."""
    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(4))
    inpo = inpo_loss(pw, pl, rw, rl, rw, rl, eta=4.0, tau=0.1).losses
    assert torch.allclose(inpo, ipo_loss(pw - rw, pl - rl, beta=1 / 4.0).losses)


def test_dno_value():
    """eta = 0.1, r_w = 1, r_l = -1 (against pi_t), win rates 0.8 / 0.3:
    q = sigma(0.8 - 0.3) = sigma(0.5) = 0.6224593; z = 0.1 * 2 = 0.2;
    L = -0.6224593 * logsig(0.2) - 0.3775407 * logsig(-0.2) = 0.3723171 + 0.3013299 = 0.6736470."""
    out = dno_loss(t(1.0), t(-1.0), t(0.8), t(0.3), eta=0.1)
    assert out.losses.item() == pytest.approx(0.6736470031, abs=1e-9)


def test_dno_hard_target_is_dpo_and_fixed_point():
    """q -> 1 (huge win-rate gap) gives sigmoid DPO with beta = eta. The gradient vanishes where
    eta * (r_w - r_l) = w(y_w) - w(y_l), the soft-policy-iteration target."""
    r_w, r_l = t(0.4, -1.0), t(0.1, -3.0)
    hard = dno_loss(r_w, r_l, t(100.0, 100.0), t(0.0, 0.0), eta=0.3).losses
    assert torch.allclose(hard, dpo_sigmoid_loss(r_w, r_l, 0.3).losses)
    # eta = 0.5, w_w - w_l = 0.9 - 0.4 = 0.5 -> optimum at r_w - r_l = 1
    r_w = t(1.5, grad=True)
    dno_loss(r_w, t(0.5), t(0.9), t(0.4), eta=0.5).losses.sum().backward()
    assert r_w.grad.item() == pytest.approx(0.0, abs=1e-12)
