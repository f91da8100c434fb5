"""f-DPO conventions, checked against TRL's DPOTrainer (main after huggingface/trl#6559) by hand.

Two conventions (see f_divergence_score and the "Pairwise losses" section of imgalign.losses.preference):
  1. g(r) = f'(u) exactly, u = exp(r), for the generator normalised to f'(1) = 0, so g(0) = 0:
       reverse_kl r,  forward_kl 1 - e^-r,  js_divergence log 2 + logsig(r),
       alpha_divergence (e^((alpha-1) r) - 1) / (alpha - 1).
     The constants cancel in s_w - s_l but not after a division by lengths (ipo, sigmoid_norm).
  2. Losses of a single log-ratio (nca_pair, bco_pair, sppo_hard, apo_down, apo_zero) read the raw r, never g(r).

Reference pair unless noted: r_w = +1, r_l = -1 (l_w = -10, l_l = -12, lR_w = lR_l = -11), beta = 0.1.
Constants: e = 2.7182818285, e^-1 = 0.3678794412, logsig(1) = -0.3132616875, logsig(-1) = -1.3132616875.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from imgalign.losses import F_DIVERGENCES, PairwiseInputs, f_divergence_score, preference_loss

BETA = 0.1
NON_REVERSE = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 1.7)]


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def pair(n_w=4.0, n_l=5.0, lengths=True):
    return PairwiseInputs(
        policy_chosen_logps=t(-10.0), policy_rejected_logps=t(-12.0),
        ref_chosen_logps=t(-11.0), ref_rejected_logps=t(-11.0),
        chosen_lengths=t(n_w) if lengths else None, rejected_lengths=t(n_l) if lengths else None,
    )


# ---------------------------------------------------------------------------------------------------
# 1. The score map is f'(u) itself


@pytest.mark.parametrize("divergence, alpha, expected", [
    ("reverse_kl", 0.5, 0.6931471806),
    ("forward_kl", 0.5, 0.5),
    ("js_divergence", 0.5, 0.2876820725),
    ("alpha_divergence", 0.5, 0.5857864376),
    ("alpha_divergence", 0.0, 0.5),
    ("alpha_divergence", 2.0, 1.0),
])
def test_score_is_f_prime_of_u(divergence, alpha, expected):
    """At u = 2 (r = log 2), f'(u) by hand:
    reverse_kl        log u                            = log 2 = 0.6931472
    forward_kl        1 - 1/u                          = 1 - 1/2 = 0.5          (old code: -1/u = -0.5)
    js_divergence     log(2u / (1 + u))                = log(4/3) = 0.2876821   (old: log(u/(1+u)) = -0.4054651)
    alpha 0.5         (u^-0.5 - 1) / (-0.5)            = 2 (1 - 0.7071068) = 0.5857864  (old: -1.4142136)
    alpha 0 (= forward_kl)  (u^-1 - 1) / (-1)          = 0.5
    alpha 2           (u - 1) / 1                      = 1.0                    (old: u = 2)
    At u = 1 (r = 0) every score is f'(1) = 0 (old code: -1, -log 2, 1/(alpha - 1))."""
    s = f_divergence_score(t(math.log(2.0), 0.0), divergence, alpha)
    assert s.tolist() == pytest.approx([expected, 0.0], abs=1e-9)


def test_alpha_divergence_is_continuous_at_alpha_one():
    """(e^((alpha-1) r) - 1) / (alpha - 1) = r + (alpha - 1) r^2 / 2 + ...  ->  r, the reverse KL, as alpha -> 1.
    At alpha = 1 +- 1e-4, r = (1, -1): 1 +- 5e-5 and -1 +- 5e-5 (old code: +-1e4, off by the constant)."""
    r = t(1.0, -1.0)
    for alpha in (1 - 1e-4, 1 + 1e-4):
        assert torch.allclose(f_divergence_score(r, "alpha_divergence", alpha), r, atol=1e-4)
    assert torch.equal(f_divergence_score(r, "alpha_divergence", 1.0), r)


def test_reverse_kl_score_is_the_identity():
    """Reverse KL is untouched: g(r) = r exactly, so every reverse-KL loss is the plain one."""
    r = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(f_divergence_score(r, "reverse_kl"), r)


# ---------------------------------------------------------------------------------------------------
# 2. Length-normalised losses keep the constants (no length bias from dropping them)


@pytest.mark.parametrize("divergence, name, expected", [
    ("forward_kl", "ipo", 21.8102232874),
    ("forward_kl", "sigmoid_norm", 0.6767902664),
    ("js_divergence", "ipo", 23.4548153675),
    ("alpha_divergence", "ipo", 21.8417992452),
    ("reverse_kl", "ipo", 21.6225),
    ("reverse_kl", "sigmoid_norm", 0.6758002977),
])
def test_length_normalised_losses_use_exact_f_prime(divergence, name, expected):
    """r_w = 1, r_l = -1, n_w = 4, n_l = 10, beta = 0.1 (IPO target 1/(2 beta) = 5); h = s_w / 4 - s_l / 10.
    forward_kl  s_w = 1 - e^-1 = 0.6321206, s_l = 1 - e = -1.7182818;
                h = 0.1580301 + 0.1718282 = 0.3298583
                ipo (0.3298583 - 5)^2 = (-4.6701417)^2 = 21.8102233
                  (old code, s = -e^-r: h = -0.0919699 + 0.2718282 = 0.1798583, (-4.8201417)^2 = 23.2337658)
                sigmoid_norm -logsig(0.1 * 0.3298583) = -logsig(0.0329858) = 0.6767903  (old: 0.6841947)
    js          s_w = log 2 + logsig(1) = 0.3798855, s_l = log 2 + logsig(-1) = -0.6201145;
                h = 0.0949714 + 0.0620115 = 0.1569828;  ipo (-4.8430172)^2 = 23.4548154
    alpha 0.5   s = (e^(-r/2) - 1) / (-1/2): s_w = 2 (1 - e^-0.5) = 0.7869387, s_l = 2 (1 - e^0.5) = -1.2974425;
                h = 0.1967347 + 0.1297443 = 0.3264789;  ipo (-4.6735211)^2 = 21.8417992
    reverse_kl  (unchanged) h = 1/4 + 1/10 = 0.35: ipo (0.35 - 5)^2 = 21.6225;
                sigmoid_norm -logsig(0.035) = 0.6758003"""
    params = {} if divergence == "reverse_kl" else {"f_divergence": divergence, "f_alpha": 0.5}
    out = preference_loss(name, pair(4.0, 10.0), BETA, **params)
    assert out.losses.item() == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------------------------------
# 3. Single-log-ratio losses read the raw r, whatever f_divergence the other losses use


RAW_VALUES = {  # test_losses_pairwise A.3, reverse KL
    "nca_pair": 1.3387933201,
    "bco_pair": 1.2887933201,
    "sppo_hard": 32.0,
    "apo_down": 0.9751451902,
    "apo_zero": 0.9500416250,
}


@pytest.mark.parametrize("divergence, alpha", NON_REVERSE)
@pytest.mark.parametrize("name", sorted(RAW_VALUES))
def test_single_logratio_losses_ignore_the_f_divergence(name, divergence, alpha):
    """With sigmoid reading f_divergence in the same call, these terms keep their reverse-KL values (as TRL):
    sppo_hard  (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2 = (1 - 5)^2 + (-1 + 5)^2 = 16 + 16 = 32
               (old code under forward_kl, s = -e^-r: (-0.3678794 - 5)^2 + (-2.7182818 + 5)^2
                = 28.8141297 + 5.2062378 = 34.0203675)
    nca_pair   -logsig(0.1) - 0.5 logsig(-0.1) - 0.5 logsig(0.1) = 1.3387933  (old forward_kl: 1.3323921)
    bco_pair   -logsig(0.1) - logsig(0.1) = 1.2887933                         (old forward_kl: 1.2781514)
    apo_down   sigma(0.1) + 1 - sigma(0.1 * (1 - (-1))) = 0.5249792 + 0.4501660 = 0.9751452
               (old forward_kl, second term on g: 0.5249792 + 1 - sigma(0.2350402) = 0.9664882)
    apo_zero   (1 - sigma(0.1)) + sigma(-0.1) = 0.9500416 (always raw)"""
    out = preference_loss(["sigmoid", name], pair(), BETA, f_divergence=divergence, f_alpha=alpha)
    assert out.terms[name].item() == pytest.approx(RAW_VALUES[name], abs=1e-9)


@pytest.mark.parametrize("name", sorted(RAW_VALUES))
def test_f_divergence_alone_with_a_single_logratio_loss_is_an_error(name):
    """These losses do not read f_divergence, so asking for it with them alone is an unread parameter (TRL raises
    at init for these combinations too)."""
    with pytest.raises(ValueError, match="not read by"):
        preference_loss(name, pair(), BETA, f_divergence="forward_kl")


# ---------------------------------------------------------------------------------------------------
# 4. Losses of the difference s_w - s_l are unchanged by the constants


def _old_score(r, divergence, alpha):
    # the previous convention, f'(u) minus its constant: identical differences s_w - s_l
    if divergence == "forward_kl":
        return -torch.exp(-r)
    if divergence == "js_divergence":
        return F.logsigmoid(r)
    return torch.exp((alpha - 1) * r) / (alpha - 1)


@pytest.mark.parametrize("divergence, alpha", NON_REVERSE)
@pytest.mark.parametrize("name", ["sigmoid", "robust", "hinge", "exo_pair", "discopop", "ipo", "sigmoid_norm"])
def test_difference_losses_unchanged_by_the_constants(name, divergence, alpha):
    """sigmoid, robust, hinge, exo_pair, discopop read only s_w - s_l; ipo and sigmoid_norm too when the lengths
    are equal (here n_w = n_l = 3) or absent: the constant cancels, so the value is the one from the
    constant-free scores (the old convention)."""
    g = torch.Generator().manual_seed(3)
    r_w, r_l = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    n = torch.full((6,), 3.0, dtype=torch.float64)
    lengths = dict(chosen_lengths=n, rejected_lengths=n) if name == "sigmoid_norm" else {}
    params = {"f_divergence": divergence, "f_alpha": alpha}
    new = preference_loss(name, PairwiseInputs(r_w, r_l, **lengths), BETA, **params).losses
    old_w, old_l = _old_score(r_w, divergence, alpha), _old_score(r_l, divergence, alpha)
    plain = preference_loss(name, PairwiseInputs(old_w, old_l, **lengths), BETA).losses  # reverse KL: g = identity
    assert torch.allclose(new, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_scores_stay_finite_in_low_precision(divergence):
    """The constant must not turn a capped exponent into inf - inf: r = (+-200, 0) in fp16 and bf16."""
    for dtype in (torch.float16, torch.bfloat16):
        s = f_divergence_score(torch.tensor([200.0, -200.0, 0.0], dtype=dtype), divergence, 0.3)
        assert torch.isfinite(s).all(), (divergence, dtype, s)
        assert s[2].item() == 0.0
