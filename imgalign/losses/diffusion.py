"""Bridge from diffusion / flow-matching training errors to the preference-loss core, plus the
diffusion-only preference losses (MaPO, Diffusion-KTO, Diffusion-DRO). Pure tensor math.

Convention (one beta for all of imgalign)
-----------------------------------------
Per sample, the denoising error err = mean_{C,H,W} (prediction - target)^2 (target = noise, v or the flow
velocity) is read as a Gaussian log-likelihood, log N(target; prediction, I) up to constants, per element:

    log p(x) ~= -err / 2                                     (denoising_logps)

so the DPO log-ratio of an image is r = -(err_theta - err_ref) / 2. Sigmoid DPO on these with beta gives

    L = -logsig(-(beta / 2) * ((err_theta_w - err_theta_l) - (err_ref_w - err_ref_l)))

which is exactly Diffusion-DPO as in the paper's code (Wallace et al. 2023, arXiv 2311.12908;
SalesforceAIResearch/DiffusionDPO train.py; diffusers' SDXL research script): beta = 5000 for SD1.5/SDXL.
diffusers' SD1.5 research script writes -logsig(beta_hf * (ref_diff - model_diff)) instead, so

    beta = 2 * beta_hf          (beta_from_diffusers / beta_to_diffusers; its default 2500 is our 5000)

Every pairwise loss of the core (ipo, hinge, robust, ...) then works on images through
diffusion_pair_inputs; losses that need lengths (SimPO/IPO normalisation, R-DPO) have no pixel analogue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from imgalign.losses.preference import LossOutput, PairwiseInputs, dpo_sigmoid_loss, kto_loss, preference_loss


def denoising_logps(err: Tensor) -> Tensor:
    """Per-sample log-likelihood of a denoising error: log p = -err / 2. err [B] -> [B]."""
    return -0.5 * err


def diffusion_pair_inputs(
    model_err_w: Tensor, model_err_l: Tensor, ref_err_w: Tensor | None = None, ref_err_l: Tensor | None = None
) -> PairwiseInputs:
    """PairwiseInputs from per-sample errors [B] of the winner (w) and loser (l) under the trained model and
    (optionally) the frozen reference; no reference -> reference-free losses. chosen_nll = err_w / 2, so
    the "sft" term is the usual denoising loss of the winner (halved)."""
    if (ref_err_w is None) != (ref_err_l is None):
        raise ValueError("give both ref_err_w and ref_err_l, or neither (reference-free)")
    return PairwiseInputs(
        policy_chosen_logps=denoising_logps(model_err_w),
        policy_rejected_logps=denoising_logps(model_err_l),
        ref_chosen_logps=None if ref_err_w is None else denoising_logps(ref_err_w),
        ref_rejected_logps=None if ref_err_l is None else denoising_logps(ref_err_l),
        chosen_nll=0.5 * model_err_w,
    )


def diffusion_preference_loss(
    loss_types: str | list[str], model_err_w: Tensor, model_err_l: Tensor,
    ref_err_w: Tensor | None, ref_err_l: Tensor | None, beta: float = 5000.0,
    weights: list[float] | None = None, **params,
) -> LossOutput:
    """preference_loss on denoising errors; e.g. "sigmoid" is Diffusion-DPO with the paper's beta."""
    inputs = diffusion_pair_inputs(model_err_w, model_err_l, ref_err_w, ref_err_l)
    return preference_loss(loss_types, inputs, beta, weights, **params)


def beta_from_diffusers(beta_hf: float) -> float:
    """beta of diffusers' SD1.5 Diffusion-DPO script (-logsig(beta_hf * (ref_diff - model_diff))) -> ours."""
    return 2.0 * float(beta_hf)


def beta_to_diffusers(beta: float) -> float:
    """Our (paper / Salesforce) beta -> diffusers' SD1.5 script's beta_dpo."""
    return float(beta) / 2.0


def _mapo_f(err: Tensor, snr_value: float) -> Tensor:
    # f(L) = x / (exp(x) - 1), x = s * L; -> 1 as x -> 0 (series 1 - x/2), kept NaN-free for autograd
    x = snr_value * err
    small = x.abs() < 1e-6
    x_safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 - x / 2, x_safe / torch.expm1(x_safe))


def mapo_loss(
    model_err_w: Tensor, model_err_l: Tensor, beta: float = 0.1, snr_value: float = 0.5,
    num_train_timesteps: int = 1000,
) -> LossOutput:
    """MaPO, margin-aware reference-free preference optimisation (Hong et al. 2024, "Margin-aware
    Preference Optimization for Aligning Diffusion Models without Reference", arXiv 2406.06424;
    mapo-t2i/mapo utils.py).

      f(L) = s * L / (exp(s * L) - 1)        (decreasing in the error L; s = snr_value)
      log_odds = f(L_w) - f(L_l)
      loss = L_w - beta * logsig(T * log_odds),  T = num_train_timesteps
    L = per-sample denoising error [B] of the trained model; per example (MaPO averages over the batch).
    Rewards: f(L) (a larger f means a smaller error).
    """
    f_w, f_l = _mapo_f(model_err_w, snr_value), _mapo_f(model_err_l, snr_value)
    losses = model_err_w - beta * F.logsigmoid(num_train_timesteps * (f_w - f_l))
    return LossOutput(losses, f_w.detach(), f_l.detach())


def diffusion_kto_loss(
    model_err: Tensor, ref_err: Tensor, desirable: Tensor, beta: float = 1000.0, kl: float | Tensor = 0.0,
    lambda_d: float = 1.0, lambda_u: float = 1.0,
) -> Tensor:
    """Diffusion-KTO per image (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility",
    arXiv 2404.04465, NeurIPS 2024; jacklishufan/diffusion-kto train_kto_sd_v1.5.py).

      g = err_ref - err_theta              (implicit reward; no 1/2: Diffusion-KTO's own beta convention)
      desirable:   loss = lambda_d * (1 - sigma(beta * (g - kl)))
      undesirable: loss = lambda_u * (1 - sigma(-beta * (g - kl)))
    kl = max(0, mean g over the (global) batch), detached, computed by the caller. Default beta 1000.
    Equals the core kto_loss on r = -(err_theta - err_ref)/2 with beta_core = 2 * beta and kl_core = kl / 2.
    Returns per-image losses [B].
    """
    g = ref_err - model_err  # [B]
    return kto_loss(g, desirable, beta, kl, desirable_weight=lambda_d, undesirable_weight=lambda_u).losses


def dro_ranking_loss(
    expert_model_err: Tensor, expert_ref_err: Tensor, policy_model_err: Tensor, policy_ref_err: Tensor,
    margin: float = 0.001,
) -> LossOutput:
    """Diffusion-DRO hinge ranking (NeurIPS 2025, arXiv 2510.18353; basiclab/DiffusionDRO train.py):
    preference learning as inverse RL / ranking of expert demonstrations over online policy samples.

      diff = (E_phi - E_ref) - (P_phi - P_ref)
      loss = max(0, diff + m)
    E = error on a noised expert image against its noise; P = error on a state of the lagged policy's own
    trajectory against that policy's noise prediction; phi = trained model, ref = frozen reference; same t.
    Minimising lowers the expert error and raises the policy-sample error, relative to the reference.
    Rewards: E_ref - E_phi (chosen, expert) and P_ref - P_phi (rejected, policy sample). Per example [B].
    """
    expert_gain = expert_ref_err - expert_model_err  # [B]
    policy_gain = policy_ref_err - policy_model_err  # [B]
    losses = torch.relu(policy_gain - expert_gain + margin)
    return LossOutput(losses, expert_gain.detach(), policy_gain.detach())


def rpo_loss(
    model_err_ref: Tensor, ref_err_ref: Tensor, model_err_gen: Tensor, ref_err_gen: Tensor, labels: Tensor,
    beta: float = 2.0, sim_weight: float = 1.0,
) -> LossOutput:
    """RPO (Miao et al., NeurIPS 2024, arXiv 2407.12164; andrew-miao/RPO train.py): a reference image of the subject
    (conditioned on the instance prompt) against an image the base model generated for a novel prompt, each with its
    own t and noise, and a Bradley-Terry label drawn per pair (labels = 1: the reference image is preferred).

      Delta = (err_ref[ref] - err_theta[ref]) - (err_ref[gen] - err_theta[gen])       RPO's implicit reward margin
      pref  = -( l log sigma((beta/2) Delta) + (1 - l) log sigma(-(beta/2) Delta) )
      loss  = sim_weight * err_theta[ref] + pref                                       per pair [B]

    pref is the core's sigmoid DPO on log-ratios -err/2 (the toolkit's one beta, Diffusion-DPO's paper convention),
    with the preferred side chosen by the label; a soft label in [0, 1] gives the expected loss. RPO's own code
    writes log sigma(beta_rpo * Delta), so beta = 2 * beta_rpo: the reference's beta_rpo = 1 is beta = 2 here.
    Rewards: the implicit rewards (beta/2)(err_ref - err_theta) of the reference (chosen) and generated (rejected) images.
    """
    inputs = diffusion_pair_inputs(model_err_ref, model_err_gen, ref_err_ref, ref_err_gen)
    ref_side = inputs.policy_chosen_logps - inputs.ref_chosen_logps  # log-ratio of the reference image
    gen_side = inputs.policy_rejected_logps - inputs.ref_rejected_logps
    labels = labels.to(ref_side.dtype)
    ref_preferred = dpo_sigmoid_loss(ref_side, gen_side, beta)
    gen_preferred = dpo_sigmoid_loss(gen_side, ref_side, beta)
    pref = labels * ref_preferred.losses + (1 - labels) * gen_preferred.losses
    return LossOutput(sim_weight * model_err_ref + pref, ref_preferred.chosen_rewards, ref_preferred.rejected_rewards)
