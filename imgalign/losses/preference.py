"""Preference losses of the DPO family, shared by the LLM side and the diffusion side.

Pure tensor math: no models, no I/O. Every function works on per-example sequence log-likelihoods
(or on log-ratios against a reference) and returns per-example losses, so callers choose the reduction.

Notation (used in every docstring below)
  l_w, l_l        policy log-likelihood of the chosen (w) and rejected (l) response, log pi(y|x)
  lR_w, lR_l      the same under the reference model pi_ref (taken as 0 when there is no reference)
  r_w = l_w - lR_w, r_l = l_l - lR_l     log-ratios ("chosen_logratios", "rejected_logratios")
  g(r)            f-divergence score map f'(exp(r)) (identity for the reverse KL of plain DPO), see f_divergence_score
  s_w = g(r_w), s_l = g(r_l), Delta = s_w - s_l
                  (only losses of Delta, or of s / n, read g; losses of a single r read the raw r, as TRL)
  n_w, n_l        response lengths (token counts); lbar = l / n is the per-token mean log-likelihood
  beta            KL / temperature coefficient, sigma = sigmoid, logsig = log(sigmoid), eps = label smoothing
Implicit rewards are beta * r (raw log-ratio, not g(r)), detached, as TRL logs them.

Diffusion models plug in through imgalign.losses.diffusion, which reads per-sample denoising errors as
Gaussian log-likelihoods (log p = -err / 2).

Entry point: preference_loss(loss_types, inputs, beta, weights=None, **params) selects losses by name
(TRL's `loss_type` list) and sums them with weights.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------------------------------
# Inputs and outputs


@dataclass
class PairwiseInputs:
    """Per-pair log-likelihoods. All tensors have shape [B]."""

    policy_chosen_logps: Tensor  # [B] l_w, summed over response tokens (or -err/2 for diffusion)
    policy_rejected_logps: Tensor  # [B] l_l
    ref_chosen_logps: Tensor | None = None  # [B] lR_w; None = reference-free (lR = 0)
    ref_rejected_logps: Tensor | None = None  # [B] lR_l
    chosen_lengths: Tensor | None = None  # [B] n_w token counts (SimPO, IPO, R-DPO, ORPO, sigmoid_norm)
    rejected_lengths: Tensor | None = None  # [B] n_l
    chosen_nll: Tensor | None = None  # [B] negative log-likelihood of the chosen response (sft, CPO, ORPO)

    def __post_init__(self):
        if (self.ref_chosen_logps is None) != (self.ref_rejected_logps is None):
            raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
        if (self.chosen_lengths is None) != (self.rejected_lengths is None):
            raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
        if self.policy_chosen_logps.shape != self.policy_rejected_logps.shape:
            raise ValueError(
                f"policy_chosen_logps {tuple(self.policy_chosen_logps.shape)} and policy_rejected_logps "
                f"{tuple(self.policy_rejected_logps.shape)} must have the same shape [B]"
            )

    @property
    def reference_free(self) -> bool:
        return self.ref_chosen_logps is None

    def logratios(self) -> tuple[Tensor, Tensor]:
        """(r_w, r_l), each [B]; the policy log-likelihoods themselves when there is no reference."""
        if self.reference_free:
            return self.policy_chosen_logps, self.policy_rejected_logps
        return (
            self.policy_chosen_logps - self.ref_chosen_logps,
            self.policy_rejected_logps - self.ref_rejected_logps,
        )


@dataclass
class LossOutput:
    losses: Tensor  # [B] per-example loss
    chosen_rewards: Tensor  # [B] implicit reward of the chosen response, detached
    rejected_rewards: Tensor  # [B] implicit reward of the rejected response, detached
    terms: dict[str, Tensor] = field(default_factory=dict)  # name -> [B] unweighted terms (preference_loss)


@dataclass
class UnpairedLossOutput:
    losses: Tensor  # [B] per-example loss
    rewards: Tensor  # [B] implicit reward beta * r, detached


def implicit_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Fraction of pairs ranked correctly by the implicit reward; ties count one half.

    acc = mean(margin > 0) + 0.5 * mean(margin == 0),  margin = chosen_rewards - rejected_rewards.
    (diffusers' Diffusion-DPO script convention: a LoRA model whose adapter is still zero gives 0.5.)
    """
    margin = chosen_rewards - rejected_rewards
    return (margin > 0).float().mean() + 0.5 * (margin == 0).float().mean()


def _rewards(beta: float, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    return beta * chosen.detach(), beta * rejected.detach()


def _out(losses: Tensor, beta: float, chosen: Tensor, rejected: Tensor) -> LossOutput:
    return LossOutput(losses, *_rewards(beta, chosen, rejected))


def _per_token(logps: Tensor, lengths: Tensor | None) -> Tensor:
    """lbar = l / n; with no lengths the values are taken to be per-token (or per-element) means already."""
    return logps if lengths is None else logps / lengths.clamp(min=1)


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """-(1 - eps) * logsig(z) - eps * logsig(-z): the logistic loss against a label flipped with prob eps."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


# ----------------------------------------------------------------------------------------------------
# f-divergence score map (f-DPO)


def _capped_expm1(x: Tensor) -> Tensor:
    # exp(x) - 1 with the exponent capped at 80 so extreme log-ratios stay finite; fp16/bf16 inputs are computed
    # and returned in fp32 (an fp16 exp overflows past 11, and inf - inf would give NaN in s_w - s_l).
    # expm1 keeps f'(u) accurate near u = 1, where the score is close to 0.
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return torch.expm1(x.clamp(max=80.0))


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_score(logratios: Tensor, divergence: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    """Score g(r) = f'(u) exactly, at u = pi / pi_ref = exp(r), additive constants included.

    f-DPO: Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints" (arXiv 2309.16240). Loss: -logsig(beta * (f'(u_w) - f'(u_l))).
    Each generator f is taken in the form with f(1) = f'(1) = 0 (adding c * (u - 1) to f leaves D_f unchanged),
    so g(0) = 0 for every divergence; this is TRL main's convention:
      reverse_kl        g(r) = r                                        f'(u) = log u  (f = u log u - u + 1)
      forward_kl        g(r) = 1 - exp(-r)                              f'(u) = 1 - 1/u
      js_divergence     g(r) = log 2 + logsig(r)                        f'(u) = log(2u / (1 + u))
      alpha_divergence  g(r) = (exp((alpha - 1) r) - 1) / (alpha - 1)   f'(u) = (u^(alpha-1) - 1) / (alpha - 1)
    The constants (0, 1, log 2, -1 / (alpha - 1)) cancel in s_w - s_l but not once the scores are divided by
    lengths (ipo, sigmoid_norm), so they are kept: dropping them would bias those losses by response length.
    (The paper's reverse-KL generator u log u has f'(u) = log u + 1; its +1 is such a constant and is not
    added, so the reverse KL stays plain DPO in every loss.)
    forward_kl and alpha_divergence cap the exponent at 80 and return fp32 for fp16/bf16 inputs.
    Alpha parametrisation: TRL main's. The paper writes f'(u) = (1 - u^(-a)) / a, the same function with
    alpha = 1 - a (f_alpha_from_paper); both agree at 0.5. alpha -> 1 is the reverse KL (g -> r; used when
    |alpha - 1| < 1e-6), alpha = 0 the forward KL.
    """
    if divergence == "reverse_kl":
        return logratios
    if divergence == "forward_kl":
        return -_capped_expm1(-logratios)
    if divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    if divergence == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        return _capped_expm1((alpha - 1.0) * logratios) / (alpha - 1.0)
    raise ValueError(f"unknown f-divergence {divergence!r}; valid: {', '.join(F_DIVERGENCES)}")


def f_alpha_from_paper(alpha_paper: float) -> float:
    """f-DPO paper's alpha a (f'(u) = (1 - u^-a)/a) -> our/TRL-main alpha (f'(u) = (u^(alpha-1) - 1)/(alpha-1))."""
    return 1.0 - alpha_paper


def f_alpha_to_paper(alpha: float) -> float:
    """Inverse of f_alpha_from_paper: alpha_paper = 1 - alpha."""
    return 1.0 - alpha


def f_dpo_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float,
    divergence: str = "reverse_kl", alpha: float = 0.5,
) -> LossOutput:
    """f-DPO (Wang et al. 2023, arXiv 2309.16240): L = -logsig(beta * (g(r_w) - g(r_l))).

    g is f_divergence_score(divergence, alpha); reverse_kl is exactly sigmoid DPO.
    """
    s_w = f_divergence_score(chosen_logratios, divergence, alpha)
    s_l = f_divergence_score(rejected_logratios, divergence, alpha)
    return _out(-F.logsigmoid(beta * (s_w - s_l)), beta, chosen_logratios, rejected_logratios)


# ----------------------------------------------------------------------------------------------------
# Pairwise losses over log-ratios. preference_loss passes g-mapped scores s = g(r) to the losses of the
# difference (sigmoid, robust, ipo, hinge, exo_pair, discopop, sigmoid_norm) when an f-divergence is chosen;
# the losses of a single log-ratio (nca_pair, bco_pair, sppo_hard, apo_zero, apo_down) always get the raw r:
# the f-DPO reparametrisation leaves a beta * log Z(x) term that cancels only in s_w - s_l (TRL does the same
# since huggingface/trl#6559 and rejects f_divergence with them at init).


def dpo_sigmoid_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 0.0
) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290), with cDPO label smoothing (Mitchell 2023, cdpo.pdf Eq. 3).

    L = -(1 - eps) * logsig(beta * Delta) - eps * logsig(-beta * Delta),  Delta = r_w - r_l.
    eps = 0 is plain DPO. At Delta = 0 the loss is log 2.
    """
    z = beta * (chosen_logratios - rejected_logratios)
    return _out(_smoothed_logistic(z, label_smoothing), beta, chosen_logratios, rejected_logratios)


def robust_dpo_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 0.1
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv 2403.00409).

    Unbiased under labels flipped with probability eps < 1/2:
    L = [-(1 - eps) * logsig(beta * Delta) + eps * logsig(-beta * Delta)] / (1 - 2 * eps).
    """
    eps = label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing (flip probability) in [0, 0.5), got {eps}")
    z = beta * (chosen_logratios - rejected_logratios)
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return _out(losses, beta, chosen_logratios, rejected_logratios)


def ipo_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float,
    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
) -> LossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", arXiv 2310.12036, Eq. 17).

    L = (r_w / n_w - r_l / n_l - 1 / (2 * beta))^2, beta = the paper's tau.
    With lengths: TRL's length-normalised form; without: the authors' form on summed log-ratios.
    Under an f-divergence preference_loss passes s = g(r): (s_w / n_w - s_l / n_l - 1 / (2 * beta))^2, g's
    additive constant included (as TRL; it does not cancel when n_w != n_l).
    """
    h = _per_token(chosen_logratios, chosen_lengths) - _per_token(rejected_logratios, rejected_lengths)
    return _out((h - 1 / (2 * beta)) ** 2, beta, chosen_logratios, rejected_logratios)


def hinge_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> LossOutput:
    """SLiC / RSO hinge (Zhao et al. 2023, arXiv 2305.10425; Liu et al. 2023, arXiv 2309.06657).

    L = max(0, 1 - beta * Delta); beta = 1 / margin.
    """
    z = beta * (chosen_logratios - rejected_logratios)
    return _out(torch.relu(1 - z), beta, chosen_logratios, rejected_logratios)


def exo_pair_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 1e-3
) -> LossOutput:
    """EXO, pairwise (Ji et al. 2024, "Towards Efficient Exact Optimization...", arXiv 2402.00856, Eq. 16).

    Reverse KL between the policy's pair distribution p = sigma(beta * Delta) and the smoothed label (1 - eps):
    L = sigma(z) * (logsig(z) - log(1 - eps)) + sigma(-z) * (logsig(-z) - log eps),  z = beta * Delta, eps > 0.
    """
    eps = label_smoothing
    if not 0.0 < eps < 1.0:
        raise ValueError(f"exo_pair needs label_smoothing in (0, 1), e.g. 1e-3 (the paper's value); got {eps}")
    z = beta * (chosen_logratios - rejected_logratios)
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return _out(losses, beta, chosen_logratios, rejected_logratios)


def nca_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> LossOutput:
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment...", arXiv 2402.05369).

    L = -logsig(beta * r_w) - 0.5 * logsig(-beta * r_w) - 0.5 * logsig(-beta * r_l), on the raw r (never g(r)).
    """
    z_w, z_l = beta * chosen_logratios, beta * rejected_logratios
    losses = -F.logsigmoid(z_w) - 0.5 * F.logsigmoid(-z_w) - 0.5 * F.logsigmoid(-z_l)
    return _out(losses, beta, chosen_logratios, rejected_logratios)


def bco_pair_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, delta: float | Tensor = 0.0
) -> LossOutput:
    """BCO, pairwise (Jung et al. 2024, "Binary Classifier Optimization...", arXiv 2404.04656).

    L = -logsig(beta * r_w - delta) - logsig(-(beta * r_l - delta)), on the raw r (never g(r)).
    delta = running mean of the rewards beta * r; TRL main uses delta = 0 (old TRL kept a running mean).
    """
    losses = -F.logsigmoid(beta * chosen_logratios - delta) - F.logsigmoid(-(beta * rejected_logratios - delta))
    return _out(losses, beta, chosen_logratios, rejected_logratios)


def sppo_hard_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> LossOutput:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv 2405.00675; TRL's `sppo_hard`).

    Winner's win rate 1, loser's 0: L = (r_w - 1 / (2 * beta))^2 + (r_l + 1 / (2 * beta))^2, on the raw r
    (never g(r): the targets +-1/(2 beta) are for log-ratios).
    (No 1/2 factor, as TRL; `sppo_loss` is the soft form with the official code's 1/2.)
    """
    losses = (chosen_logratios - 1 / (2 * beta)) ** 2 + (rejected_logratios + 1 / (2 * beta)) ** 2
    return _out(losses, beta, chosen_logratios, rejected_logratios)


def aot_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float, label_smoothing: float = 0.0,
) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv 2406.05882).

    Sort the policy margins m_i = l_w,i - l_l,i and the reference margins mR_i = lR_w,i - lR_l,i over the
    batch, each ascending; delta_(k) = m_(k) - mR_(k);
    L_k = -(1 - eps) * logsig(beta * delta_(k)) - eps * logsig(-beta * delta_(k)).
    Note: loss k belongs to the k-th sorted rank, not to input pair k (so no per-pair weights).
    """
    policy_margin, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)  # [B] ascending
    ref_margin, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)  # [B] ascending
    losses = _smoothed_logistic(beta * (policy_margin - ref_margin), label_smoothing)
    return _out(losses, beta, policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps)


def aot_unpaired_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 0.0
) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882): first-order stochastic dominance of the chosen
    log-ratio distribution over the rejected one.

    delta_(k) = sort(r_w)_(k) - sort(r_l)_(k) (both ascending over the batch); smoothed logistic as aot_loss.
    """
    chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
    losses = _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)
    return _out(losses, beta, chosen_logratios, rejected_logratios)


def apo_zero_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization...", arXiv 2408.06266, Eq. 7).

    Push the chosen likelihood up and the rejected down, independently, on the raw r (never g(r)):
    L = (1 - sigma(beta * r_w)) + sigma(beta * r_l).
    """
    losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    return _out(losses, beta, chosen_logratios, rejected_logratios)


def apo_down_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 8): for pairs whose chosen answer is still
    worse than the model, push both down but the rejected more:
    L = sigma(beta * r_w) + (1 - sigma(beta * (r_w - r_l))), both terms on the raw r (never g(r)).
    By design d L / d l_w can be positive (the chosen likelihood goes down).
    """
    losses = torch.sigmoid(beta * chosen_logratios) + (
        1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
    )
    return _out(losses, beta, chosen_logratios, rejected_logratios)


def discopop_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, tau: float = 0.05
) -> LossOutput:
    """DiscoPOP / LRML (Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms...",
    arXiv 2406.08414, Eq. 5): a log-ratio-modulated mix of the logistic and the exponential loss.

    z = beta * Delta, m = sigma(z / tau);  L = (1 - m) * (-logsig(z)) + m * exp(-z).
    """
    z = beta * (chosen_logratios - rejected_logratios)
    m = torch.sigmoid(z / tau)
    losses = (1 - m) * (-F.logsigmoid(z)) + m * torch.exp(-z)
    return _out(losses, beta, chosen_logratios, rejected_logratios)


def sigmoid_norm_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float,
    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
) -> LossOutput:
    """Length-normalised DPO (SimPO paper App. "DPO w/ LN", arXiv 2405.14734; Tulu 3 sec. 4.3).

    L = -logsig(beta * (r_w / n_w - r_l / n_l)); under an f-divergence preference_loss passes s = g(r) in place
    of r, g's additive constant included (as TRL).
    """
    h = _per_token(chosen_logratios, chosen_lengths) - _per_token(rejected_logratios, rejected_lengths)
    return _out(-F.logsigmoid(beta * h), beta, chosen_logratios, rejected_logratios)


def rdpo_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float,
    chosen_lengths: Tensor, rejected_lengths: Tensor, alpha: float = 0.05,
) -> LossOutput:
    """R-DPO, length-regularised DPO (Park et al. 2024, "Disentangling Length from Quality in DPO",
    arXiv 2403.19159; the same form is tabulated in the SimPO paper, arXiv 2405.14734, Table 3).

    The RL objective gets a length penalty -alpha * |y|; the implicit reward becomes
    beta * r + alpha * |y| (+ const), so
    L = -logsig(beta * r_w - beta * r_l + alpha * (n_w - n_l)).
    Sign: part of a longer chosen response's win is credited to its length, so the loss is smaller and the
    policy is pushed less to raise it (the verbosity the length penalty targets). Some third-party code uses
    "- alpha * (n_w - n_l)", which would reward length; tests pin this sign.
    """
    z = beta * (chosen_logratios - rejected_logratios) + alpha * (chosen_lengths - rejected_lengths)
    return _out(-F.logsigmoid(z), beta, chosen_logratios, rejected_logratios)


# ----------------------------------------------------------------------------------------------------
# Reference-free pairwise losses


def simpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float = 2.0, gamma: float = 0.5,
    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None, label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv 2405.14734). Reference-free, length-normalised, with a target margin gamma:

    L = -(1 - eps) * logsig(beta * lbar_w - beta * lbar_l - gamma) - eps * logsig(-(...)),  lbar = l / n.
    gamma is the margin itself (TRL's `simpo_gamma`); the SimPO repo's gamma_beta_ratio = gamma / beta.
    Without lengths the log-likelihoods are taken as per-token means already. Rewards: beta * lbar.
    """
    lbar_w = _per_token(policy_chosen_logps, chosen_lengths)
    lbar_l = _per_token(policy_rejected_logps, rejected_lengths)
    losses = _smoothed_logistic(beta * (lbar_w - lbar_l) - gamma, label_smoothing)
    return _out(losses, beta, lbar_w, lbar_l)


def cpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float = 0.1,
    chosen_nll: Tensor | None = None, alpha: float = 1.0, label_smoothing: float = 0.0,
) -> LossOutput:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization...", arXiv 2401.08417). Reference-free:

    L = -(1 - eps) * logsig(beta * (l_w - l_l)) - eps * logsig(-beta * (l_w - l_l)) + alpha * NLL(y_w).
    The NLL term is added only when chosen_nll is given. Rewards: beta * l.
    """
    losses = _smoothed_logistic(beta * (policy_chosen_logps - policy_rejected_logps), label_smoothing)
    if chosen_nll is not None:
        losses = losses + alpha * chosen_nll
    return _out(losses, beta, policy_chosen_logps, policy_rejected_logps)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float = 0.1,
    chosen_nll: Tensor | None = None,
    chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
) -> LossOutput:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    arXiv 2403.07691). Odds ratio of the per-token mean likelihoods, odds(y) = p / (1 - p), p = exp(lbar):

    log_odds = (lbar_w - lbar_l) - (log(1 - exp(lbar_w)) - log(1 - exp(lbar_l)))
    L = NLL(y_w) - lambda * logsig(log_odds),  lambda = beta.
    The NLL term is added only when chosen_nll is given (ORPO's NLL runs over prompt + response).
    Without lengths the log-likelihoods are taken as per-token means already (must be < 0).
    Rewards: beta * lbar.
    """
    lbar_w = _per_token(policy_chosen_logps, chosen_lengths)
    lbar_l = _per_token(policy_rejected_logps, rejected_lengths)
    log_odds = (lbar_w - lbar_l) - (_log1mexp(lbar_w) - _log1mexp(lbar_l))
    losses = -beta * F.logsigmoid(log_odds)
    if chosen_nll is not None:
        losses = losses + chosen_nll
    return _out(losses, beta, lbar_w, lbar_l)


# ----------------------------------------------------------------------------------------------------
# Unpaired losses


def kto_loss(
    logratios: Tensor, desirable: Tensor, beta: float = 0.1, kl: float | Tensor = 0.0,
    desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
) -> UnpairedLossOutput:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    arXiv 2402.01306, Eq. 7). Unpaired: each example is desirable or undesirable.

    desirable:   L = lambda_D * (1 - sigma(beta * (r - z)))
    undesirable: L = lambda_U * (1 - sigma(beta * (z - r)))
    r = l - lR [B]; desirable [B] bool; z = kl = the reference point, an estimate of KL(pi || pi_ref)
    (kto_kl_estimate), passed in detached. The paper suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3].
    """
    desirable = desirable.bool()
    z = torch.as_tensor(kl, dtype=logratios.dtype, device=logratios.device).detach()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - logratios))),
    )
    return UnpairedLossOutput(losses, beta * logratios.detach())


def kto_kl_estimate(mismatched_policy_logps: Tensor, mismatched_ref_logps: Tensor) -> Tensor:
    """KTO reference point z = max(0, mean(l(y'|x) - lR(y'|x))), detached.

    The inputs are log-likelihoods of mismatched pairs (response y' of another prompt in the batch), [B].
    Averaging across processes (all-reduce) is the caller's job.
    """
    return (mismatched_policy_logps - mismatched_ref_logps).mean().clamp(min=0).detach()


def bco_loss(
    logratios: Tensor, desirable: Tensor, beta: float = 0.1, delta: float | Tensor = 0.0
) -> UnpairedLossOutput:
    """BCO, unpaired (Jung et al. 2024, "Binary Classifier Optimization...", arXiv 2404.04656).

    A binary classifier on the reward rho = beta * r, shifted by delta:
    desirable:   L = -logsig(rho - delta);  undesirable: L = -logsig(-(rho - delta)).
    delta = running mean of rho over training (kept by the trainer, passed in).
    """
    rho = beta * logratios
    delta = torch.as_tensor(delta, dtype=logratios.dtype, device=logratios.device).detach()
    losses = torch.where(desirable.bool(), -F.logsigmoid(rho - delta), -F.logsigmoid(-(rho - delta)))
    return UnpairedLossOutput(losses, rho.detach())


# ----------------------------------------------------------------------------------------------------
# Game-theoretic / general-preference losses


def sppo_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_winrate: Tensor, rejected_winrate: Tensor,
    beta: float = 0.001,
) -> LossOutput:
    """SPPO (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
    arXiv 2405.00675). Squared loss of each log-ratio toward its target win rate against the current policy:

    L = 0.5 * [(r_w - (P_w - 1/2) / beta)^2 + (r_l - (P_l - 1/2) / beta)^2]
    P_w, P_l [B]: estimated probability that y_w (y_l) beats a sample of the current policy; beta = 1/eta.
    """
    target_w = (chosen_winrate - 0.5) / beta
    target_l = (rejected_winrate - 0.5) / beta
    losses = 0.5 * ((chosen_logratios - target_w) ** 2 + (rejected_logratios - target_l) ** 2)
    return _out(losses, beta, chosen_logratios, rejected_logratios)


def inpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    prev_chosen_logps: Tensor, prev_rejected_logps: Tensor,
    eta: float, tau: float = 0.1,
) -> LossOutput:
    """INPO (Zhang et al. 2025, "Iterative Nash Policy Optimization", ICLR 2025, arXiv 2407.00617).

    Online mirror descent pi_{t+1} ~ pi_t^(1 - eta*tau) * pi_ref^(eta*tau) * exp(eta * P(y > pi_t)),
    learned without win-rate estimates by an IPO-style regression on pairs sampled from pi_t:
      h = (l_w - l_l) - eta * tau * (lR_w - lR_l) - (1 - eta * tau) * (lT_w - lT_l)
      L = (h - eta / 2)^2
    lT = log-likelihood under the previous iterate pi_t ("prev"), tau = KL coefficient to pi_ref
    (the role beta plays in DPO), eta = mirror-descent step. Rewards: tau * (l - lR).
    """
    c = eta * tau
    h = (
        (policy_chosen_logps - policy_rejected_logps)
        - c * (ref_chosen_logps - ref_rejected_logps)
        - (1 - c) * (prev_chosen_logps - prev_rejected_logps)
    )
    return _out((h - eta / 2) ** 2, tau, policy_chosen_logps - ref_chosen_logps,
                policy_rejected_logps - ref_rejected_logps)


def dno_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_winrate: Tensor, rejected_winrate: Tensor,
    eta: float = 0.1,
) -> LossOutput:
    """DNO, regression form (Rosset et al. 2024, "Direct Nash Optimization", arXiv 2404.03715, Alg. 1).

    Soft policy iteration pi_{t+1} ~ pi_t * exp(w_t(y) / eta), learned by a binary cross-entropy regression
    of the pair's log-ratio margin (reference = the previous iterate pi_t) onto soft targets:
      q = sigma(w_t(y_w) - w_t(y_l)),  z = eta * (r_w - r_l),  r = l - log pi_t
      L = -q * logsig(z) - (1 - q) * logsig(-z)
    w_t(y) [B] = win rate of y against pi_t (chosen_winrate, rejected_winrate). The optimum has
    eta * (r_w - r_l) = w_t(y_w) - w_t(y_l). The practical DNO-Prct is plain sigmoid DPO with ref = pi_t.
    """
    q = torch.sigmoid(chosen_winrate - rejected_winrate)
    z = eta * (chosen_logratios - rejected_logratios)
    losses = -q * F.logsigmoid(z) - (1 - q) * F.logsigmoid(-z)
    return _out(losses, eta, chosen_logratios, rejected_logratios)


# ----------------------------------------------------------------------------------------------------
# Pair weights


def wpo_pair_weights(
    chosen_mean_log_weight: Tensor, rejected_mean_log_weight: Tensor, clamp_max: float | None = None
) -> Tensor:
    """WPO pair weight (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization",
    arXiv 2406.11827), detached, [B].

    w = exp(u_w + u_l), u = mean over response tokens of (log p(y_t) - log sum_v p(v)^2), computed by the
    caller from logits. clamp_max=1.0 reproduces old TRL. Pass the result as `pair_weights`.
    """
    w = torch.exp(chosen_mean_log_weight + rejected_mean_log_weight).detach()
    return w if clamp_max is None else w.clamp(max=clamp_max)


# ----------------------------------------------------------------------------------------------------
# Selection by name


@dataclass(frozen=True)
class _Spec:
    fn: Callable[[PairwiseInputs, float, dict], LossOutput]
    params: tuple[str, ...] = ()  # optional/required keyword parameters this loss reads


def _need(params: dict, key: str, loss: str):
    if params.get(key) is None:
        raise ValueError(f"loss type {loss!r} needs the parameter {key!r}")
    return params[key]


def _need_lengths(x: PairwiseInputs, loss: str) -> tuple[Tensor, Tensor]:
    if x.chosen_lengths is None:
        raise ValueError(f"loss type {loss!r} needs chosen_lengths and rejected_lengths in the inputs")
    return x.chosen_lengths, x.rejected_lengths


def _scores(x: PairwiseInputs, p: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(r_w, r_l, s_w, s_l) with s = g(r) for the chosen f-divergence."""
    r_w, r_l = x.logratios()
    div, alpha = p.get("f_divergence", "reverse_kl"), p.get("f_alpha", 0.5)
    return r_w, r_l, f_divergence_score(r_w, div, alpha), f_divergence_score(r_l, div, alpha)


def _with_rewards(out: LossOutput, beta: float, r_w: Tensor, r_l: Tensor) -> LossOutput:
    # score-based losses are computed on g(r); rewards are always logged on the raw log-ratio
    return LossOutput(out.losses, *_rewards(beta, r_w, r_l))


def _score_loss(fn, **param_kwargs: tuple[str, float]) -> _Spec:
    """Registry entry for fn(s_w, s_l, beta, **kwargs) on f-divergence scores.

    param_kwargs maps a preference_loss parameter to (fn keyword, default).
    """

    def run(x: PairwiseInputs, beta: float, p: dict) -> LossOutput:
        r_w, r_l, s_w, s_l = _scores(x, p)
        kwargs = {kw: p.get(param, default) for param, (kw, default) in param_kwargs.items()}
        return _with_rewards(fn(s_w, s_l, beta, **kwargs), beta, r_w, r_l)

    return _Spec(run, ("f_divergence", "f_alpha", *param_kwargs))


def _run_ipo(x, beta, p):
    r_w, r_l, s_w, s_l = _scores(x, p)
    return _with_rewards(ipo_loss(s_w, s_l, beta, x.chosen_lengths, x.rejected_lengths), beta, r_w, r_l)


def _run_sigmoid_norm(x, beta, p):
    r_w, r_l, s_w, s_l = _scores(x, p)
    n_w, n_l = _need_lengths(x, "sigmoid_norm")
    return _with_rewards(sigmoid_norm_loss(s_w, s_l, beta, n_w, n_l), beta, r_w, r_l)


def _logratio_loss(fn) -> _Spec:
    """Registry entry for fn(r_w, r_l, beta) on the raw log-ratios: the losses of a single log-ratio (nca_pair,
    bco_pair, sppo_hard, apo_zero, and both terms of apo_down), as TRL. They do not read f_divergence, so it is
    an unread-parameter error unless another selected loss reads it.
    """
    return _Spec(lambda x, b, p: fn(*x.logratios(), b))


def _run_aot(x, beta, p):
    ref_w = x.ref_chosen_logps if not x.reference_free else torch.zeros_like(x.policy_chosen_logps)
    ref_l = x.ref_rejected_logps if not x.reference_free else torch.zeros_like(x.policy_rejected_logps)
    return aot_loss(x.policy_chosen_logps, x.policy_rejected_logps, ref_w, ref_l, beta,
                    p.get("label_smoothing", 0.0))


def _run_rdpo(x, beta, p):
    n_w, n_l = _need_lengths(x, "rdpo")
    return rdpo_loss(*x.logratios(), beta, n_w, n_l, alpha=p.get("rdpo_alpha", 0.05))


def _run_simpo(x, beta, p):
    return simpo_loss(x.policy_chosen_logps, x.policy_rejected_logps, beta, p.get("simpo_gamma", 0.5),
                      x.chosen_lengths, x.rejected_lengths, p.get("label_smoothing", 0.0))


def _run_cpo(x, beta, p):
    return cpo_loss(x.policy_chosen_logps, x.policy_rejected_logps, beta, x.chosen_nll,
                    p.get("cpo_alpha", 1.0), p.get("label_smoothing", 0.0))


def _run_orpo(x, beta, p):
    return orpo_loss(x.policy_chosen_logps, x.policy_rejected_logps, beta, x.chosen_nll,
                     x.chosen_lengths, x.rejected_lengths)


def _run_sft(x, beta, p):
    if x.chosen_nll is None:
        raise ValueError("loss type 'sft' needs chosen_nll in the inputs")
    r_w, r_l = x.logratios()
    return _out(x.chosen_nll, beta, r_w, r_l)


def _run_sppo(x, beta, p):
    return sppo_loss(*x.logratios(), _need(p, "chosen_winrate", "sppo"), _need(p, "rejected_winrate", "sppo"),
                     beta)


def _run_dno(x, beta, p):
    # the reference in the inputs is the previous iterate pi_t; beta plays eta
    return dno_loss(*x.logratios(), _need(p, "chosen_winrate", "dno"), _need(p, "rejected_winrate", "dno"), beta)


def _run_inpo(x, beta, p):
    if x.reference_free:
        raise ValueError("loss type 'inpo' needs ref_chosen_logps and ref_rejected_logps")
    # beta plays tau (KL coefficient to pi_ref); eta and the previous iterate's log-likelihoods are params
    return inpo_loss(x.policy_chosen_logps, x.policy_rejected_logps, x.ref_chosen_logps, x.ref_rejected_logps,
                     _need(p, "prev_chosen_logps", "inpo"), _need(p, "prev_rejected_logps", "inpo"),
                     eta=_need(p, "eta", "inpo"), tau=beta)


LOSSES: dict[str, _Spec] = {
    "sigmoid": _score_loss(dpo_sigmoid_loss, label_smoothing=("label_smoothing", 0.0)),
    "robust": _score_loss(robust_dpo_loss, label_smoothing=("label_smoothing", 0.1)),
    "ipo": _Spec(_run_ipo, ("f_divergence", "f_alpha")),
    "hinge": _score_loss(hinge_loss),
    "exo_pair": _score_loss(exo_pair_loss, label_smoothing=("label_smoothing", 1e-3)),
    "nca_pair": _logratio_loss(nca_pair_loss),
    "bco_pair": _logratio_loss(bco_pair_loss),
    "sppo_hard": _logratio_loss(sppo_hard_loss),
    "aot": _Spec(_run_aot, ("label_smoothing",)),
    "aot_unpaired": _Spec(lambda x, b, p: aot_unpaired_loss(*x.logratios(), b, p.get("label_smoothing", 0.0)),
                          ("label_smoothing",)),
    "apo_zero": _logratio_loss(apo_zero_loss),
    "apo_down": _logratio_loss(apo_down_loss),
    "discopop": _score_loss(discopop_loss, discopop_tau=("tau", 0.05)),
    "sigmoid_norm": _Spec(_run_sigmoid_norm, ("f_divergence", "f_alpha")),
    "rdpo": _Spec(_run_rdpo, ("rdpo_alpha",)),
    "simpo": _Spec(_run_simpo, ("simpo_gamma", "label_smoothing")),
    "cpo": _Spec(_run_cpo, ("cpo_alpha", "label_smoothing")),
    "orpo": _Spec(_run_orpo),
    "sft": _Spec(_run_sft),
    "sppo": _Spec(_run_sppo, ("chosen_winrate", "rejected_winrate")),
    "inpo": _Spec(_run_inpo, ("eta", "prev_chosen_logps", "prev_rejected_logps")),
    "dno": _Spec(_run_dno, ("chosen_winrate", "rejected_winrate")),
}
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)
REFERENCE_FREE_LOSSES = frozenset({"simpo", "cpo", "orpo", "sft"})  # never read the reference log-likelihoods
_ALL_PARAMS = sorted({k for spec in LOSSES.values() for k in spec.params} | {"pair_weights"})


def _unknown(kind: str, name: str, valid: Sequence[str]) -> ValueError:
    closest = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)[0]  # always name the closest
    return ValueError(f"unknown {kind} {name!r}; did you mean {closest!r}? Valid: {', '.join(valid)}")


def preference_loss(
    loss_types: str | Sequence[str], inputs: PairwiseInputs, beta: float,
    weights: Sequence[float] | None = None, **params,
) -> LossOutput:
    """Weighted sum of named preference losses, per example (TRL's `loss_type` list + `loss_weights`).

    losses = pair_weights * sum_k weights[k] * L_k, each L_k [B]; terms[name] holds the unweighted L_k.
    Names: LOSS_NAMES. Parameters are shared by all selected losses, like one TRL config (default):
      label_smoothing   sigmoid (cDPO, 0), robust (0.1), exo_pair (1e-3), aot/aot_unpaired, simpo, cpo (0)
      f_divergence, f_alpha   g(r) for sigmoid, robust, ipo, hinge, exo_pair, discopop, sigmoid_norm
                        ("reverse_kl", 0.5); see f_divergence_score. nca_pair, bco_pair, sppo_hard, apo_zero,
                        apo_down always read the raw r
      discopop_tau (0.05), rdpo_alpha (0.05), simpo_gamma (0.5, the margin itself), cpo_alpha (1.0)
      chosen_winrate, rejected_winrate [B]   sppo, dno (required)
      eta, prev_chosen_logps, prev_rejected_logps [B]   inpo (required; beta plays INPO's tau)
      pair_weights [B]  multiplies every example (e.g. wpo_pair_weights)
    A parameter no selected loss reads is an error. beta is the paper's lambda for orpo and eta for dno
    (whose reference is the previous iterate). Implicit rewards come from the first loss.
    Examples: RPO = (["sigmoid", "sft"], weights=[1, 0.005]); MPO = (["sigmoid", "bco_pair", "sft"],
    weights=[0.8, 0.2, 1.0]).
    """
    names = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    if not names:
        raise ValueError("loss_types is empty; give at least one of: " + ", ".join(LOSS_NAMES))
    for name in names:
        if name not in LOSSES:
            raise _unknown("loss type", name, LOSS_NAMES)
    if len(set(names)) != len(names):
        raise ValueError(f"loss_types lists a name twice: {names}")
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} loss types {names}")

    pair_weights = params.pop("pair_weights", None)
    readable = {k for name in names for k in LOSSES[name].params}
    for key in params:
        if key not in readable:
            close = difflib.get_close_matches(key, _ALL_PARAMS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"parameter {key!r} is not read by loss types {names}{hint}. "
                f"Parameters they read: {', '.join(sorted(readable)) or '(none)'}"
            )
    if pair_weights is not None and {"aot", "aot_unpaired"} & set(names):
        raise ValueError("pair_weights cannot be used with aot/aot_unpaired: their losses are per sorted rank")

    total, terms, first = None, {}, None
    for name, w in zip(names, weights):
        out = LOSSES[name].fn(inputs, beta, params)
        terms[name] = out.losses
        total = w * out.losses if total is None else total + w * out.losses
        if first is None:
            first = out
    if pair_weights is not None:
        total = total * pair_weights
    return LossOutput(total, first.chosen_rewards, first.rejected_rewards, terms)
