"""Diffusion bridge (errors -> log-likelihoods, beta conventions) and MaPO / Diffusion-KTO / Diffusion-DRO."""

import math

import pytest
import torch
import torch.nn.functional as F

from imgalign.losses import (
    beta_from_diffusers,
    beta_to_diffusers,
    denoising_logps,
    diffusion_kto_loss,
    diffusion_pair_inputs,
    diffusion_preference_loss,
    dro_ranking_loss,
    implicit_accuracy,
    kto_loss,
    mapo_loss,
    preference_loss,
)

LN2 = math.log(2)


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def random_errors(seed, b=32):
    """Per-sample errors near 0.1 whose DPO logits land in the unsaturated range at beta = 5000."""
    g = torch.Generator().manual_seed(seed)
    base = 0.1 + 0.01 * torch.rand(b, generator=g, dtype=torch.float64)
    return [base + 2e-4 * torch.randn(b, generator=g, dtype=torch.float64) for _ in range(4)]


def test_denoising_logps():
    assert denoising_logps(t(0.3, 0.0)).tolist() == pytest.approx([-0.15, 0.0])


def test_bridge_sigmoid_is_paper_diffusion_dpo_and_diffusers_with_half_beta():
    """Through the bridge, sigmoid DPO with beta equals
    Salesforce/paper:  -logsig(-(beta / 2) * ((e_w - e_l) - (eR_w - eR_l)))
    diffusers SD1.5:   -logsig(beta_hf * (ref_diff - model_diff)) with beta_hf = beta / 2."""
    mw, ml, rw, rl = random_errors(0)
    beta = 5000.0
    ours = preference_loss("sigmoid", diffusion_pair_inputs(mw, ml, rw, rl), beta).losses
    model_diff, ref_diff = mw - ml, rw - rl
    salesforce = -F.logsigmoid(-0.5 * beta * (model_diff - ref_diff))
    beta_hf = beta_to_diffusers(beta)
    diffusers = -F.logsigmoid(beta_hf * (ref_diff - model_diff))
    assert beta_hf == 2500.0 and beta_from_diffusers(2500) == 5000.0
    assert torch.allclose(ours, salesforce) and torch.allclose(ours, diffusers)
    # the logits are not saturated (median loss near log 2), so a wrong factor of 2 is caught
    assert 0.3 < ours.median() < 1.2
    assert not torch.allclose(ours, -F.logsigmoid(beta * (ref_diff - model_diff)))
    for b in (0.5, 1000.0, 5000.0):
        assert beta_from_diffusers(beta_to_diffusers(b)) == pytest.approx(b)


def test_bridge_value_and_rewards():
    """e_w = 0.10, e_l = 0.12, eR_w = 0.11, eR_l = 0.11, beta = 100:
    model_diff - ref_diff = -0.02 - 0 = -0.02; -logsig(-(100/2) * -0.02) = -logsig(1) = 0.3132617.
    Rewards beta * r = 100 * -(0.10 - 0.11)/2 = 0.5 and 100 * -(0.12 - 0.11)/2 = -0.5."""
    out = diffusion_preference_loss("sigmoid", t(0.10), t(0.12), t(0.11), t(0.11), beta=100.0)
    assert out.losses.item() == pytest.approx(0.3132616875, abs=1e-9)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)


def test_reference_equal_to_model_gives_log2_and_half_accuracy():
    """Step 0 with a LoRA-disabled reference: errors identical -> loss log 2, implicit accuracy 0.5."""
    mw, ml, _, _ = random_errors(1)
    out = diffusion_preference_loss("sigmoid", mw, ml, mw.clone(), ml.clone(), beta=5000.0)
    assert torch.allclose(out.losses, torch.full_like(out.losses, LN2))
    assert implicit_accuracy(out.chosen_rewards, out.rejected_rewards).item() == 0.5


def test_reference_free_bridge_and_sft_term():
    """No reference: r = -e/2. e_w = 0.10, e_l = 0.12, beta = 100: -logsig(-50 * (0.10 - 0.12)) = -logsig(1);
    sft term = e_w / 2 = 0.05, so sigmoid + 0.5 * sft = 0.3132617 + 0.025 = 0.3382617."""
    x = diffusion_pair_inputs(t(0.10), t(0.12))
    assert x.reference_free
    out = preference_loss(["sigmoid", "sft"], x, 100.0, weights=[1.0, 0.5])
    assert out.losses.item() == pytest.approx(0.3382616875, abs=1e-9)
    with pytest.raises(ValueError, match="both"):
        diffusion_pair_inputs(t(0.1), t(0.2), ref_err_w=t(0.1))


def test_ipo_and_hinge_through_the_bridge():
    """Same errors with reference (Delta = r_w - r_l = -(0.10 - 0.11)/2 + (0.12 - 0.11)/2 = 0.01), beta = 100:
    ipo (no lengths): (0.01 - 1/200)^2 = 0.005^2 = 2.5e-5;  hinge: max(0, 1 - 100 * 0.01) = 0."""
    x = diffusion_pair_inputs(t(0.10), t(0.12), t(0.11), t(0.11))
    assert preference_loss("ipo", x, 100.0).losses.item() == pytest.approx(2.5e-5)
    assert preference_loss("hinge", x, 100.0).losses.item() == pytest.approx(0.0, abs=1e-12)
    assert preference_loss("hinge", x, 50.0).losses.item() == pytest.approx(0.5)


def test_bridge_gradients_lower_winner_error_raise_loser_error():
    mw, ml, rw, rl = random_errors(2, b=4)
    mw.requires_grad_(True)
    ml.requires_grad_(True)
    diffusion_preference_loss("sigmoid", mw, ml, rw, rl, beta=5000.0).losses.sum().backward()
    assert (mw.grad > 0).all() and (ml.grad < 0).all()


def test_mapo_value():
    """L_w = 0.2, L_l = 0.4, s = 0.5, beta = 0.1, T = 10:
    f(0.2) = 0.1 / (e^0.1 - 1) = 0.9508332, f(0.4) = 0.2 / (e^0.2 - 1) = 0.9033311, log_odds = 0.0475021;
    loss = 0.2 - 0.1 * logsig(10 * 0.0475021) = 0.2 + 0.1 * 0.4835811 = 0.2483581.
    With T = 1000 the log-sigmoid saturates: loss = 0.2 (the winner's denoising loss)."""
    out = mapo_loss(t(0.2), t(0.4), beta=0.1, snr_value=0.5, num_train_timesteps=10)
    assert out.losses.item() == pytest.approx(0.2483581108, abs=1e-9)
    assert out.chosen_rewards.item() == pytest.approx(0.9508331945, abs=1e-9)
    assert mapo_loss(t(0.2), t(0.4)).losses.item() == pytest.approx(0.2, abs=1e-12)


def test_mapo_gradients_and_zero_error():
    """Lower the winner's error, raise the loser's; f(0) = 1 with finite gradients; ignores any reference."""
    lw, ll = t(0.2, 0.0, grad=True), t(0.4, 1e-9, grad=True)
    out = mapo_loss(lw, ll, num_train_timesteps=10)
    out.losses.sum().backward()
    assert lw.grad[0] > 0 and ll.grad[0] < 0
    assert torch.isfinite(out.losses).all() and torch.isfinite(lw.grad).all() and torch.isfinite(ll.grad).all()
    assert out.chosen_rewards[1].item() == pytest.approx(1.0)


def test_diffusion_kto_values():
    """err_theta = 0.3, err_ref = 0.35 -> g = 0.05; kl = 0.01, beta = 10: beta * (g - kl) = 0.4.
    desirable: 1 - sigma(0.4) = 0.4013123; undesirable: 1 - sigma(-0.4) = 0.5986877, times lambda_u = 2."""
    out = diffusion_kto_loss(t(0.3, 0.3), t(0.35, 0.35), torch.tensor([True, False]), beta=10.0, kl=0.01,
                             lambda_u=2.0)
    assert out.tolist() == pytest.approx([0.4013123399, 2 * 0.5986876601], abs=1e-9)


def test_diffusion_kto_equals_core_kto_through_the_bridge():
    """r = -(e_theta - e_ref)/2 = g/2, so beta_core = 2 * beta and kl_core = kl / 2 give the same loss."""
    g = torch.Generator().manual_seed(3)
    model, ref = 0.1 + 0.01 * torch.rand(2, 8, generator=g, dtype=torch.float64)
    desirable = torch.rand(8, generator=g) > 0.5
    ours = diffusion_kto_loss(model, ref, desirable, beta=1000.0, kl=0.002)
    r = denoising_logps(model) - denoising_logps(ref)
    assert torch.allclose(ours, kto_loss(r, desirable, beta=2000.0, kl=0.001).losses)


def test_dro_values_and_gradients():
    """m = 0.001. Pair 1: E_phi = 0.3, E_ref = 0.35, P_phi = 0.5, P_ref = 0.4:
    diff = (0.3 - 0.35) - (0.5 - 0.4) = -0.15 -> max(0, -0.149) = 0.
    Pair 2: E_phi = 0.4, E_ref = 0.35, P_phi = 0.4, P_ref = 0.42: diff = 0.05 + 0.02 = 0.07 -> 0.071.
    Gradient (pair 2): d/dE_phi = +1 (lower expert error), d/dP_phi = -1 (raise policy-sample error)."""
    e_phi, p_phi = t(0.3, 0.4, grad=True), t(0.5, 0.4, grad=True)
    out = dro_ranking_loss(e_phi, t(0.35, 0.35), p_phi, t(0.4, 0.42), margin=0.001)
    assert out.losses.tolist() == pytest.approx([0.0, 0.071], abs=1e-12)
    out.losses.sum().backward()
    assert e_phi.grad.tolist() == [0.0, 1.0] and p_phi.grad.tolist() == [0.0, -1.0]
    assert implicit_accuracy(out.chosen_rewards, out.rejected_rewards).item() == 0.5  # pair 1 ranked right


# ---- RPO ---------------------------------------------------------------------------------------------------------
def test_rpo_values_by_hand():
    """Delta = (e_ref[ref] - e[ref]) - (e_ref[gen] - e[gen]); pref = -logsig(+-(beta/2) Delta) by the label; plus the
    reconstruction err[ref] times sim_weight."""
    from imgalign.losses import rpo_loss

    e_r, er_r, e_g, er_g = t(0.30, 0.30), t(0.34, 0.34), t(0.50, 0.50), t(0.48, 0.48)
    delta = (0.34 - 0.30) - (0.48 - 0.50)  # 0.06
    out = rpo_loss(e_r, er_r, e_g, er_g, t(1.0, 0.0), beta=10.0, sim_weight=0.5)
    z = 5.0 * delta
    expected = [0.5 * 0.30 + math.log1p(math.exp(-z)), 0.5 * 0.30 + math.log1p(math.exp(z))]
    torch.testing.assert_close(out.losses, t(*expected))
    torch.testing.assert_close(out.chosen_rewards, t(5.0 * 0.04, 5.0 * 0.04))  # (beta/2)(e_ref - e) of the reference
    torch.testing.assert_close(out.rejected_rewards, t(-5.0 * 0.02, -5.0 * 0.02))
    # a soft label is the expectation over the two hard ones
    soft = rpo_loss(e_r, er_r, e_g, er_g, t(0.25, 0.25), beta=10.0, sim_weight=0.5).losses
    torch.testing.assert_close(soft, t(*[0.25 * expected[0] + 0.75 * expected[1]] * 2))


def test_rpo_fresh_model_and_beta_convention():
    """theta == reference (a fresh LoRA): Delta = 0, loss = sim_weight * err + log 2 for either label; our beta is twice
    RPO's: beta = 2 beta_rpo gives RPO's -logsig(beta_rpo Delta) exactly."""
    from imgalign.losses import rpo_loss

    e = t(0.2, 0.7, 0.4)
    g = t(0.5, 0.1, 0.3)
    out = rpo_loss(e, e, g, g, t(1.0, 0.0, 1.0), beta=2.0)
    torch.testing.assert_close(out.losses, e + LN2)
    e_r, er_r, e_g, er_g = t(0.3), t(0.5), t(0.6), t(0.55)
    beta_rpo = 1.0
    delta = (0.5 - 0.3) - (0.55 - 0.6)
    rpo_code = -F.logsigmoid(torch.tensor(beta_rpo * delta, dtype=torch.float64))  # andrew-miao/RPO train.py form
    ours = rpo_loss(e_r, er_r, e_g, er_g, t(1.0), beta=2 * beta_rpo, sim_weight=0.0).losses
    torch.testing.assert_close(ours, rpo_code.reshape(1))


def test_rpo_gradient_signs():
    """Label 1 (reference preferred): the gradient lowers err on the reference image and raises it on the negative;
    label 0 reverses the preference term; the reconstruction term always lowers err[ref]."""
    from imgalign.losses import rpo_loss

    for label, sign_gen in ((1.0, -1), (0.0, +1)):
        e_r, e_g = t(0.3, grad=True), t(0.5, grad=True)
        rpo_loss(e_r, t(0.3), e_g, t(0.5), t(label), beta=20.0, sim_weight=0.0).losses.sum().backward()
        assert sign_gen * float(e_g.grad) > 0  # descent moves e_g by -grad: up for label 1, down for label 0
        assert -sign_gen * float(e_r.grad) > 0
    e_r = t(0.3, grad=True)
    rpo_loss(e_r, t(0.3), t(0.5), t(0.5), t(0.0), beta=1e-6, sim_weight=1.0).losses.sum().backward()
    assert float(e_r.grad) > 0.99  # reconstruction dominates with a tiny beta: lowers the reference image's error
