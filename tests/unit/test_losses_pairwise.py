"""Pairwise DPO-family losses: hand-computed values, gradient signs, limits, f-DPO, the name registry.

Reference inputs (research/losses_and_rewards.md A.3), unless a test says otherwise:
  l_w = -10, l_l = -12, lR_w = lR_l = -11  ->  r_w = +1, r_l = -1, Delta = 2
  beta = 0.1 -> z = beta * Delta = 0.2;  n_w = 4, n_l = 5;  chosen_nll = 2.5
Useful constants: -logsig(0.2) = log(1 + e^-0.2) = 0.5981388694,  -logsig(-0.2) = 0.7981388694,
  sigma(0.1) = 0.5249791875, sigma(0.2) = 0.5498339973.
"""

import math

import pytest
import torch

from imgalign.losses import (
    F_DIVERGENCES,
    LOSS_NAMES,
    REFERENCE_FREE_LOSSES,
    PairwiseInputs,
    aot_loss,
    aot_unpaired_loss,
    cpo_loss,
    dpo_sigmoid_loss,
    f_alpha_from_paper,
    f_alpha_to_paper,
    f_divergence_score,
    f_dpo_loss,
    implicit_accuracy,
    orpo_loss,
    preference_loss,
    rdpo_loss,
    simpo_loss,
    wpo_pair_weights,
)
from imgalign.losses.preference import LOSSES

BETA = 0.1
LN2 = math.log(2)


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def ref_inputs(grad=False, **overrides):
    fields = dict(
        policy_chosen_logps=t(-10.0, grad=grad), policy_rejected_logps=t(-12.0, grad=grad),
        ref_chosen_logps=t(-11.0), ref_rejected_logps=t(-11.0),
        chosen_lengths=t(4.0), rejected_lengths=t(5.0), chosen_nll=t(2.5, grad=grad),
    )
    fields.update(overrides)
    return PairwiseInputs(**fields)


# parameters each loss needs to run on the reference inputs (single pair)
EXTRA = {
    "sppo": dict(chosen_winrate=t(0.8), rejected_winrate=t(0.3)),
    "dno": dict(chosen_winrate=t(0.8), rejected_winrate=t(0.3)),
    "inpo": dict(eta=5.0, prev_chosen_logps=t(-11.0), prev_rejected_logps=t(-11.0)),
}

# ---------------------------------------------------------------------------------------------------
# Hand-computed values


# loss name, params, expected value. Every A.3 row is re-derived in test_a3_reference_values' docstring.
A3 = [
    ("sigmoid", {}, 0.5981388694),
    ("hinge", {}, 0.8),
    ("ipo", {}, 20.7025),
    ("exo_pair", {"label_smoothing": 1e-3}, 2.4220146207),
    ("nca_pair", {}, 1.3387933201),
    ("robust", {"label_smoothing": 0.1}, 0.5731388694),
    ("bco_pair", {}, 1.2887933201),
    ("sppo_hard", {}, 32.0),
    ("aot", {}, 0.5981388694),
    ("aot_unpaired", {}, 0.5981388694),
    ("apo_zero", {}, 0.9500416250),
    ("apo_down", {}, 0.9751451902),
    ("discopop", {"discopop_tau": 0.05}, 0.8147631411),
    ("sigmoid_norm", {}, 0.6709002842),
    ("sigmoid", {"f_divergence": "forward_kl"}, 0.5825167135),
    ("sigmoid", {"f_divergence": "js_divergence"}, 0.6443966601),
    ("sigmoid", {"f_divergence": "alpha_divergence", "f_alpha": 0.5}, 0.5943491230),
]


@pytest.mark.parametrize("name, params, expected", A3, ids=[f"{n}-{p.get('f_divergence', '')}" for n, p, _ in A3])
def test_a3_reference_values(name, params, expected):
    """Values of research A.3, recomputed here by hand (z = beta * Delta = 0.2 unless noted):
    sigmoid      -logsig(0.2) = log(1 + e^-0.2) = 0.5981388694
    hinge        max(0, 1 - 0.2) = 0.8
    ipo          (1/4 - (-1/5) - 1/(2*0.1))^2 = (0.45 - 5)^2 = 20.7025
    exo_pair     sigma(.2)(logsig(.2) - log(.999)) + sigma(-.2)(logsig(-.2) - log(.001))
                 = 0.549834 * (-0.597138) + 0.450166 * 6.109616 = -0.328327 + 2.750342 = 2.4220146
    nca_pair     -logsig(0.1) - .5 logsig(-0.1) - .5 logsig(0.1) = 0.644397 + 0.372198 + 0.322198 = 1.3387933
    robust       [0.9 * 0.598139 - 0.1 * 0.798139] / 0.8 = 0.458511 / 0.8 = 0.5731389
    bco_pair     -logsig(0.1) - logsig(0.1) = 2 * 0.644397 = 1.2887933
    sppo_hard    (1 - 5)^2 + (-1 + 5)^2 = 32
    aot(_unpaired) with B = 1 sorting is the identity: = sigmoid
    apo_zero     (1 - sigma(0.1)) + sigma(-0.1) = 0.475021 + 0.475021 = 0.9500416
    apo_down     sigma(0.1) + 1 - sigma(0.2) = 0.524979 + 0.450166 = 0.9751452
    discopop     m = sigma(0.2/0.05) = sigma(4) = 0.982014; (1-m)*0.598139 + m*e^-0.2 = 0.010758 + 0.804005
    sigmoid_norm -logsig(0.1 * (1/4 + 1/5)) = -logsig(0.045) = 0.6709003
    forward_kl   s = 1 - e^-r: Delta = e^1 - e^-1 = 2.350402; -logsig(0.2350402) = 0.5825167
    js           s = log 2 + logsig(r): Delta = logsig(1) - logsig(-1) = 1 (exactly); -logsig(0.1) = 0.6443967
    alpha 0.5    s = (e^(-r/2) - 1)/(-1/2): Delta = 2(e^0.5 - e^-0.5) = 2.084381; -logsig(0.2084381) = 0.5943491
    """
    x = ref_inputs()
    out = preference_loss(name, x, BETA, **params)
    assert out.losses.shape == (1,)
    assert out.losses.item() == pytest.approx(expected, abs=1e-9)


def test_cdpo_label_smoothing_value():
    """cDPO, eps = 0.1: -0.9 * logsig(0.2) - 0.1 * logsig(-0.2) = 0.9 * 0.5981389 + 0.1 * 0.7981389
    = 0.5383250 + 0.0798139 = 0.6181389 (larger than plain DPO's 0.5981389)."""
    out = dpo_sigmoid_loss(t(1.0), t(-1.0), BETA, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.6181388694, abs=1e-9)


def test_rdpo_value():
    """R-DPO, alpha = 0.05, n_w = 4, n_l = 5: z = 0.1 * 2 + 0.05 * (4 - 5) = 0.15;
    -logsig(0.15) = log(1 + e^-0.15) = 0.6209570."""
    x = ref_inputs()
    assert preference_loss("rdpo", x, BETA, rdpo_alpha=0.05).losses.item() == pytest.approx(0.6209570478, abs=1e-9)
    assert rdpo_loss(t(1.0), t(-1.0), BETA, t(4.0), t(5.0), alpha=0.05).losses.item() == pytest.approx(
        0.6209570478, abs=1e-9)


def test_rdpo_length_sign_longer_chosen_gets_less_push():
    """R-DPO sign (Park et al. 2024 / SimPO Table 3): L = -logsig(beta*Delta + alpha*(n_w - n_l)).
    The objective penalises length (-alpha*|y|), so a win by a longer response is partly credited to its
    length: with n_w = 6, n_l = 4, alpha = 0.05, z = 0.2 + 0.1 = 0.3 -> loss 0.5543552 < DPO 0.5981389,
    and the gradient raising l_w shrinks from beta*sigma(-0.2) = 0.0450166 to beta*sigma(-0.3) = 0.0425557.
    A shorter chosen response (n_w = 4, n_l = 5) gets more push than DPO. The opposite sign would reward
    verbosity and fails this test."""
    def run(n_w, n_l, alpha):
        r_w = t(1.0, grad=True)
        out = rdpo_loss(r_w, t(-1.0), BETA, t(n_w), t(n_l), alpha=alpha)
        out.losses.sum().backward()
        return out.losses.item(), r_w.grad.item()

    loss_long, grad_long = run(6.0, 4.0, 0.05)
    loss_dpo, grad_dpo = run(6.0, 4.0, 0.0)
    loss_short, grad_short = run(4.0, 5.0, 0.05)
    assert loss_long == pytest.approx(0.5543552445, abs=1e-9)
    assert loss_dpo == pytest.approx(0.5981388694, abs=1e-9)
    assert grad_long == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-0.3))), abs=1e-12)
    assert loss_long < loss_dpo < loss_short
    assert abs(grad_long) < abs(grad_dpo) < abs(grad_short)


def test_simpo_value_and_gamma():
    """SimPO (A.3): beta = 2, gamma = beta * 0.5 = 1, lbar_w = -10/4 = -2.5, lbar_l = -12/5 = -2.4:
    -logsig(2 * (-2.5 + 2.4) - 1) = -logsig(-1.2) = log(1 + e^1.2) = 1.4632825.
    Rewards beta * lbar = (-5.0, -4.8)."""
    out = simpo_loss(t(-10.0), t(-12.0), beta=2.0, gamma=1.0, chosen_lengths=t(4.0), rejected_lengths=t(5.0))
    assert out.losses.item() == pytest.approx(1.4632824673, abs=1e-9)
    assert out.chosen_rewards.item() == pytest.approx(-5.0)
    assert out.rejected_rewards.item() == pytest.approx(-4.8)
    x = ref_inputs()
    reg = preference_loss("simpo", x, 2.0, simpo_gamma=1.0)
    assert reg.losses.item() == pytest.approx(1.4632824673, abs=1e-9)


def test_cpo_value():
    """CPO: -logsig(0.1 * (-10 + 12)) + 1.0 * 2.5 = 0.5981389 + 2.5 = 3.0981389; without NLL 0.5981389."""
    assert cpo_loss(t(-10.0), t(-12.0), 0.1, chosen_nll=t(2.5)).losses.item() == pytest.approx(3.0981388694)
    assert cpo_loss(t(-10.0), t(-12.0), 0.1).losses.item() == pytest.approx(0.5981388694)


def test_orpo_value():
    """ORPO (A.3 odds term): lbar_w = -2.5, lbar_l = -2.4;
    log(1 - e^-2.5) = log(0.917915) = -0.085651, log(1 - e^-2.4) = log(0.909282) = -0.095103;
    log_odds = -0.1 - (-0.085651 + 0.095103) = -0.109452;  -logsig(-0.109452) = 0.7493686.
    With lambda = 0.1 and NLL 2.5: 2.5 + 0.1 * 0.7493686 = 2.5749369."""
    assert orpo_loss(t(-2.5), t(-2.4), beta=1.0).losses.item() == pytest.approx(0.7493685654, abs=1e-9)
    out = orpo_loss(t(-10.0), t(-12.0), 0.1, chosen_nll=t(2.5), chosen_lengths=t(4.0), rejected_lengths=t(5.0))
    assert out.losses.item() == pytest.approx(2.5749368565, abs=1e-9)
    # stable on both sides of -log 2 (log1mexp branch) and for tiny |lbar|
    x = orpo_loss(t(-0.1, -1e-6, -30.0), t(-0.2, -2e-6, -31.0), 1.0).losses
    assert torch.isfinite(x).all()


def test_aot_sorts_over_the_batch():
    """AOT with B = 2, beta = 0.1.
    paired: policy margins l_w - l_l = (2, -1) sort to (-1, 2); ref margins (0.5, 1.5) stay (0.5, 1.5);
      delta = (-1.5, 0.5): losses (-logsig(-0.15), -logsig(0.05)) = (0.7709570, 0.6684596).
    unpaired: r_w = (1, -0.5) -> (-0.5, 1); r_l = (-1, 0.5) -> (-1, 0.5); delta = (0.5, 0.5):
      both 0.6684596 (per-pair DPO margins would be (2, -1))."""
    paired = aot_loss(t(-10.0, -12.0), t(-12.0, -11.0), t(-11.0, -11.0), t(-11.5, -12.5), BETA)
    assert paired.losses.tolist() == pytest.approx([0.7709570478, 0.6684596480], abs=1e-9)
    unpaired = aot_unpaired_loss(t(1.0, -0.5), t(-1.0, 0.5), BETA)
    assert unpaired.losses.tolist() == pytest.approx([0.6684596480, 0.6684596480], abs=1e-9)


def test_rewards_and_implicit_accuracy():
    """Rewards are beta * raw log-ratio even under an f-divergence: (0.1 * 1, 0.1 * -1).
    Accuracy on margins (1, 0, -1, 0): 1/4 correct + 0.5 * 2/4 ties = 0.5."""
    out = preference_loss("sigmoid", ref_inputs(), BETA, f_divergence="forward_kl")
    assert out.chosen_rewards.item() == pytest.approx(0.1)
    assert out.rejected_rewards.item() == pytest.approx(-0.1)
    assert not out.chosen_rewards.requires_grad
    acc = implicit_accuracy(t(1.0, 0.0, -1.0, 2.0), t(0.0, 0.0, 0.0, 2.0))
    assert acc.item() == pytest.approx(0.5)
    assert implicit_accuracy(t(1.0, 2.0), t(0.0, 1.0)).item() == 1.0


# ---------------------------------------------------------------------------------------------------
# Gradient signs


def grad_inputs():
    # two pairs; pair 2: r_w = 0.5, r_l = -0.5, n_w = n_l = 3
    return PairwiseInputs(
        policy_chosen_logps=t(-10.0, -8.0, grad=True), policy_rejected_logps=t(-12.0, -9.0, grad=True),
        ref_chosen_logps=t(-11.0, -8.5), ref_rejected_logps=t(-11.0, -8.5),
        chosen_lengths=t(4.0, 3.0), rejected_lengths=t(5.0, 3.0), chosen_nll=t(2.5, 2.0, grad=True),
    )


GRAD_EXTRA = {
    "sppo": dict(chosen_winrate=t(0.8, 0.7), rejected_winrate=t(0.3, 0.2)),
    "dno": dict(chosen_winrate=t(0.8, 0.7), rejected_winrate=t(0.3, 0.2)),
    "inpo": dict(eta=5.0, prev_chosen_logps=t(-11.0, -8.5), prev_rejected_logps=t(-11.0, -8.5)),
}


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradient_pushes_chosen_up_and_rejected_down(name):
    """d loss / d l_w < 0 and d loss / d l_l > 0 for every pair, for every loss that reads log-likelihoods.
    Exceptions by design: apo_down may lower the chosen likelihood (only the rejected sign is checked);
    sft reads only chosen_nll (its gradient must lower the NLL)."""
    x = grad_inputs()
    out = preference_loss(name, x, BETA, **GRAD_EXTRA.get(name, {}))
    out.losses.sum().backward()
    if name == "sft":
        assert (x.chosen_nll.grad > 0).all()
        assert x.policy_chosen_logps.grad is None
        return
    assert (x.policy_rejected_logps.grad > 0).all(), x.policy_rejected_logps.grad
    if name != "apo_down":
        assert (x.policy_chosen_logps.grad < 0).all(), x.policy_chosen_logps.grad


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_gradient_signs_under_every_f_divergence(divergence):
    """g(r) is increasing for every divergence, so f-DPO keeps DPO's gradient signs."""
    x = grad_inputs()
    preference_loss("sigmoid", x, BETA, f_divergence=divergence, f_alpha=0.3).losses.sum().backward()
    assert (x.policy_chosen_logps.grad < 0).all() and (x.policy_rejected_logps.grad > 0).all()


def test_sigmoid_gradient_closed_form():
    """d/dl_w of -logsig(beta * Delta) = -beta * sigma(-beta * Delta) = -0.1 * 0.4501660 = -0.0450166."""
    x = ref_inputs(grad=True)
    preference_loss("sigmoid", x, BETA).losses.sum().backward()
    assert x.policy_chosen_logps.grad.item() == pytest.approx(-0.0450166003, abs=1e-9)
    assert x.policy_rejected_logps.grad.item() == pytest.approx(+0.0450166003, abs=1e-9)


# ---------------------------------------------------------------------------------------------------
# Limits


@pytest.mark.parametrize("name", ["sigmoid", "robust", "aot", "aot_unpaired", "sigmoid_norm", "rdpo", "dno"])
def test_equal_logratios_give_log2(name):
    """r_w = r_l (= 0.3 each, equal lengths, equal win rates): every logistic loss is -logsig(0) = log 2,
    cDPO / robust included: [(1 - eps) - eps] log 2 / (1 - 2 eps) = log 2."""
    x = PairwiseInputs(t(-5.0, -7.0), t(-6.0, -2.0), t(-5.3, -7.3), t(-6.3, -2.3), t(3.0, 2.0), t(3.0, 2.0))
    params = {"dno": dict(chosen_winrate=t(0.6, 0.4), rejected_winrate=t(0.6, 0.4)),
              "robust": dict(label_smoothing=0.2)}.get(name, {})
    assert preference_loss(name, x, BETA, **params).losses.tolist() == pytest.approx([LN2, LN2], abs=1e-12)


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_equal_logratios_give_log2_f_dpo(divergence):
    assert f_dpo_loss(t(0.7), t(0.7), 3.0, divergence, 0.3).losses.item() == pytest.approx(LN2, abs=1e-12)


def test_reference_free_equal_likelihoods_give_log2():
    """SimPO with gamma = 0 and CPO without NLL at l_w = l_l: -logsig(0) = log 2."""
    assert simpo_loss(t(-3.0), t(-3.0), 2.0, gamma=0.0).losses.item() == pytest.approx(LN2)
    assert cpo_loss(t(-3.0), t(-3.0), 0.5).losses.item() == pytest.approx(LN2)


def test_beta_to_zero_limits():
    """beta = 1e-9: sigmoid -> log 2, hinge -> 1, apo_zero -> 1/2 + 1/2 = 1, bco_pair -> 2 log 2,
    nca_pair -> log 2 + log 2 / 2 + log 2 / 2 = 2 log 2, discopop -> log 2 / 2 + 1 / 2 = 0.8465736;
    the sigmoid gradient vanishes like -beta / 2; IPO's target 1 / (2 beta) blows up."""
    tiny = 1e-9
    x = ref_inputs(grad=True)
    expected = {"sigmoid": LN2, "hinge": 1.0, "apo_zero": 1.0, "bco_pair": 2 * LN2, "nca_pair": 2 * LN2,
                "discopop": 0.5 * LN2 + 0.5}
    for name, value in expected.items():
        assert preference_loss(name, x, tiny).losses.item() == pytest.approx(value, abs=1e-8), name
    preference_loss("sigmoid", x, tiny).losses.sum().backward()
    assert x.policy_chosen_logps.grad.item() == pytest.approx(-tiny / 2, rel=1e-6)
    assert preference_loss("ipo", x, 1e-3).losses.item() > 2.4e5


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE_LOSSES))
def test_reference_free_losses_ignore_the_reference(name):
    a = preference_loss(name, ref_inputs(), BETA).losses
    b = preference_loss(name, ref_inputs(ref_chosen_logps=t(3.0), ref_rejected_logps=t(-40.0)), BETA).losses
    c = preference_loss(name, ref_inputs(ref_chosen_logps=None, ref_rejected_logps=None), BETA).losses
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("name", sorted(set(LOSS_NAMES) - REFERENCE_FREE_LOSSES))
def test_reference_based_losses_read_the_reference(name):
    extra = EXTRA.get(name, {})
    a = preference_loss(name, ref_inputs(), BETA, **extra).losses
    b = preference_loss(name, ref_inputs(ref_chosen_logps=t(-10.5), ref_rejected_logps=t(-11.5)), BETA,
                        **extra).losses
    assert not torch.allclose(a, b)


def test_missing_reference_means_log_ratio_equals_log_likelihood():
    """Reference-free DPO: r = l, so -logsig(0.1 * (-10 + 12)) = 0.5981389."""
    x = ref_inputs(ref_chosen_logps=None, ref_rejected_logps=None)
    assert preference_loss("sigmoid", x, BETA).losses.item() == pytest.approx(0.5981388694)


# ---------------------------------------------------------------------------------------------------
# f-DPO


def test_reverse_kl_f_dpo_equals_sigmoid_dpo():
    g = torch.Generator().manual_seed(0)
    r_w, r_l = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    assert torch.allclose(f_dpo_loss(r_w, r_l, 0.3, "reverse_kl").losses, dpo_sigmoid_loss(r_w, r_l, 0.3).losses)
    # alpha -> 1 (our parametrisation) is the reverse KL as well
    assert torch.allclose(f_dpo_loss(r_w, r_l, 0.3, "alpha_divergence", 1.0).losses,
                          dpo_sigmoid_loss(r_w, r_l, 0.3).losses)


@pytest.mark.parametrize("alpha_paper", [0.2, 0.5, 0.8, 1.0])
def test_f_dpo_alpha_conversion_matches_the_paper_form(alpha_paper):
    """Paper (Wang et al. 2023): f'(u) = (1 - u^-a) / a. Ours (TRL main): (u^(alpha-1) - 1) / (alpha - 1).
    With alpha = 1 - a both are the same function, so the losses agree; a = 1 is the forward KL."""
    g = torch.Generator().manual_seed(1)
    r_w, r_l = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    paper_f = lambda r: (1 - torch.exp(r) ** (-alpha_paper)) / alpha_paper  # noqa: E731
    paper = -torch.nn.functional.logsigmoid(0.5 * (paper_f(r_w) - paper_f(r_l)))
    ours = f_dpo_loss(r_w, r_l, 0.5, "alpha_divergence", f_alpha_from_paper(alpha_paper)).losses
    assert torch.allclose(ours, paper)
    assert f_alpha_to_paper(f_alpha_from_paper(alpha_paper)) == pytest.approx(alpha_paper)
    if alpha_paper == 1.0:
        assert torch.allclose(ours, f_dpo_loss(r_w, r_l, 0.5, "forward_kl").losses)
    # the conversion matters away from 0.5: using the paper's a directly gives a different loss
    if alpha_paper != 0.5:
        assert not torch.allclose(f_dpo_loss(r_w, r_l, 0.5, "alpha_divergence", alpha_paper).losses, paper)


def test_f_divergence_stays_finite_on_extreme_logratios():
    """Old TRL overflow test inputs: policy (410, 0.1) / (810.5, 0.2), ref (-610, -0.1) / (110.6, 0.5)."""
    pol_w, pol_l, ref_w, ref_l = t(410.0, 0.1), t(810.5, 0.2), t(-610.0, -0.1), t(110.6, 0.5)
    for dtype in (torch.float32, torch.float16):
        r_w, r_l = (pol_w - ref_w).to(dtype), (pol_l - ref_l).to(dtype)
        for div in F_DIVERGENCES:
            for alpha in (0.3, 1.7):
                assert torch.isfinite(f_dpo_loss(r_w, r_l, 0.1, div, alpha).losses).all(), (dtype, div, alpha)


def test_unknown_f_divergence():
    with pytest.raises(ValueError, match="reverse_kl"):
        f_divergence_score(t(1.0), "kl")


# ---------------------------------------------------------------------------------------------------
# Registry


def test_combined_weights_sum():
    """RPO = sigmoid + 0.005 * sft: 0.5981389 + 0.005 * 2.5 = 0.6106389; terms are unweighted."""
    out = preference_loss(["sigmoid", "sft"], ref_inputs(), BETA, weights=[1.0, 0.005])
    assert out.losses.item() == pytest.approx(0.6106388694, abs=1e-9)
    assert out.terms["sigmoid"].item() == pytest.approx(0.5981388694)
    assert out.terms["sft"].item() == pytest.approx(2.5)
    # MPO-style triple equals the weighted sum of separate calls, per example
    x = grad_inputs()
    names, w = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    combined = preference_loss(names, x, BETA, weights=w).losses
    separate = sum(wk * preference_loss(n, x, BETA).losses for n, wk in zip(names, w))
    assert torch.allclose(combined, separate)
    assert combined.shape == (2,)


def test_default_weights_are_one_and_string_is_accepted():
    a = preference_loss(["sigmoid", "hinge"], ref_inputs(), BETA).losses.item()
    assert a == pytest.approx(0.5981388694 + 0.8)
    assert preference_loss("hinge", ref_inputs(), BETA).losses.item() == pytest.approx(0.8)


def test_pair_weights_multiply_each_example():
    """WPO weight exp(u_w + u_l) = exp(-0.5 - 0.3) = 0.4493290; clamp_max=1 caps exp(0.5) at 1."""
    w = wpo_pair_weights(t(-0.5, 0.2), t(-0.3, 0.3))
    assert w.tolist() == pytest.approx([0.4493289641, math.exp(0.5)])
    assert wpo_pair_weights(t(-0.5, 0.2), t(-0.3, 0.3), clamp_max=1.0).tolist() == pytest.approx([0.4493289641, 1.0])
    x = grad_inputs()
    plain = preference_loss("sigmoid", x, BETA).losses
    weighted = preference_loss("sigmoid", x, BETA, pair_weights=w).losses
    assert torch.allclose(weighted, plain * w)
    with pytest.raises(ValueError, match="sorted rank"):
        preference_loss("aot", x, BETA, pair_weights=w)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError) as e:
        preference_loss(["sigmod"], ref_inputs(), BETA)
    msg = str(e.value)
    assert "did you mean 'sigmoid'" in msg and "hinge" in msg  # closest name + the valid list
    with pytest.raises(ValueError, match="did you mean 'nca_pair'"):
        preference_loss("nca", ref_inputs(), BETA)


def test_unknown_or_unused_parameter_is_an_error():
    with pytest.raises(ValueError, match="did you mean 'label_smoothing'"):
        preference_loss("sigmoid", ref_inputs(), BETA, label_smothing=0.1)
    with pytest.raises(ValueError, match="not read by"):
        preference_loss("sigmoid", ref_inputs(), BETA, simpo_gamma=0.5)


def test_registry_input_errors():
    x = ref_inputs()
    with pytest.raises(ValueError, match="2 weights for 1"):
        preference_loss("sigmoid", x, BETA, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="twice"):
        preference_loss(["sigmoid", "sigmoid"], x, BETA)
    with pytest.raises(ValueError, match="chosen_winrate"):
        preference_loss("sppo", x, BETA)
    with pytest.raises(ValueError, match="lengths"):
        preference_loss("rdpo", ref_inputs(chosen_lengths=None, rejected_lengths=None), BETA)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("exo_pair", x, BETA, label_smoothing=0.0)
    with pytest.raises(ValueError, match="0.5"):
        preference_loss("robust", x, BETA, label_smoothing=0.5)
    with pytest.raises(ValueError, match="both"):
        PairwiseInputs(t(-1.0), t(-2.0), ref_chosen_logps=t(-1.0))


def test_every_registered_loss_has_a_docstring_with_an_equation():
    import imgalign.losses.preference as pref

    for fn_name in dir(pref):
        fn = getattr(pref, fn_name)
        if fn_name.endswith("_loss") and fn_name != "preference_loss" and not fn_name.startswith("_"):
            assert fn.__doc__ and "arXiv" in fn.__doc__ and "=" in fn.__doc__, fn_name
    assert set(LOSSES) == set(LOSS_NAMES)
