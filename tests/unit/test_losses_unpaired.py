"""Unpaired losses: KTO and BCO. Hand-computed values, gradient signs, the reference point / shift."""

import pytest
import torch

from imgalign.losses import bco_loss, kto_kl_estimate, kto_loss


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


DESIRABLE = torch.tensor([True, False])


def test_kto_values():
    """KTO (research A.3): beta = 0.1, z = 0; desirable r = +1: 1 - sigma(0.1) = 0.4750208;
    undesirable r = -1: 1 - sigma(0.1 * (0 - (-1))) = 0.4750208. Weights lambda_D = 2, lambda_U = 0.5 scale them.
    Rewards beta * r = (0.1, -0.1)."""
    out = kto_loss(t(1.0, -1.0), DESIRABLE, beta=0.1, kl=0.0)
    assert out.losses.tolist() == pytest.approx([0.4750208125, 0.4750208125], abs=1e-9)
    assert out.rewards.tolist() == pytest.approx([0.1, -0.1])
    weighted = kto_loss(t(1.0, -1.0), DESIRABLE, 0.1, 0.0, desirable_weight=2.0, undesirable_weight=0.5)
    assert weighted.losses.tolist() == pytest.approx([0.9500416250, 0.2375104063], abs=1e-9)


def test_kto_reference_point():
    """z = 0.5 shifts both: desirable 1 - sigma(0.1 * (1 - 0.5)) = 1 - sigma(0.05) = 0.4875026;
    undesirable 1 - sigma(0.1 * (0.5 + 1)) = 1 - sigma(0.15) = 0.4625702."""
    out = kto_loss(t(1.0, -1.0), DESIRABLE, 0.1, kl=torch.tensor(0.5, dtype=torch.float64))
    assert out.losses.tolist() == pytest.approx([0.4875026035, 0.4625701547], abs=1e-9)


def test_kto_kl_estimate_is_clamped_mean_and_detached():
    """mean((-3 + 4), (-5 + 4.5)) = mean(1, -0.5) = 0.25; a negative mean clamps to 0."""
    pol = t(-3.0, -5.0, grad=True)
    z = kto_kl_estimate(pol, t(-4.0, -4.5))
    assert z.item() == pytest.approx(0.25) and not z.requires_grad
    assert kto_kl_estimate(t(-5.0), t(-4.0)).item() == 0.0


def test_kto_gradient_signs():
    r = t(0.3, 0.3, grad=True)
    kto_loss(r, DESIRABLE, 0.1, 0.1).losses.sum().backward()
    assert r.grad[0] < 0 < r.grad[1]  # desirable pushed up, undesirable down


def test_bco_values_with_shift():
    """BCO, beta = 0.1, delta = 0.05: desirable r = 1: -logsig(0.1 - 0.05) = -logsig(0.05) = 0.6684596;
    undesirable r = -1: -logsig(-(-0.1 - 0.05)) = -logsig(0.15) = 0.6209570. With delta = 0: both 0.6443967."""
    out = bco_loss(t(1.0, -1.0), DESIRABLE, beta=0.1, delta=0.05)
    assert out.losses.tolist() == pytest.approx([0.6684596480, 0.6209570478], abs=1e-9)
    assert bco_loss(t(1.0, -1.0), DESIRABLE, 0.1).losses.tolist() == pytest.approx([0.6443966601] * 2, abs=1e-9)


def test_bco_gradient_signs_and_detached_delta():
    r = t(0.3, 0.3, grad=True)
    delta = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
    bco_loss(r, DESIRABLE, 0.1, delta).losses.sum().backward()
    assert r.grad[0] < 0 < r.grad[1]
    assert delta.grad is None
