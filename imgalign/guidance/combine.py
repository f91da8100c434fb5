"""Per-step prediction combiners: CFG, RL Guidance (RLG) and NPO guidance. Pure tensor math.

They work on whatever the denoiser returns (epsilon, v, flow velocity): at a fixed (x_t, t) every
parameterisation is an affine function of the score with model-independent coefficients, and each rule
below is an affine combination whose weights sum to one, so combining epsilons, velocities, x0 estimates
or scores gives the same sampler.

CFG (Ho & Salimans 2022)
    pred = pred_u + s * (pred_c - pred_u)
    pred_u = model(x_t, t, empty prompt), pred_c = model(x_t, t, prompt), s = guidance scale.

RLG, Reinforcement Learning Guidance (Jin et al. 2025, arXiv 2508.21016)
    pred = pred_B + w * (pred_A - pred_B) = (1 - w) * pred_B + w * pred_A
    pred_B = CFG of the base model, pred_A = CFG of the aligned (RL / DPO-tuned) model, same s for both.
    The score of p_B^(1-w) p_A^w, a geometric mixture: if p_A ∝ p_B exp(R / beta) (KL-regularised optimum)
    then the mixture ∝ p_B exp(w R / beta), i.e. w rescales the KL coefficient to beta / w.
    w = 0: base; w = 1: aligned; 0 < w < 1 interpolates; w > 1 extrapolates (stronger alignment).

NPO guidance (Wang et al. 2025, Diffusion-NPO / Self-NPO)
    pred = pred_neg(x_t, t, empty) + s * (pred_pos(x_t, t, prompt) - pred_neg(x_t, t, empty))
    the negative-preference model replaces only the unconditional branch of CFG.
"""

from __future__ import annotations

from torch import Tensor


def cfg(pred_uncond: Tensor, pred_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: pred_u + s (pred_c - pred_u). s = 1 returns pred_c's values (rounding aside)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def rlg(pred_base: Tensor, pred_aligned: Tensor, weight: float) -> Tensor:
    """RL Guidance on two (already guided) predictions: pred_B + w (pred_A - pred_B).

    w = 0 and w = 1 return the base and the aligned prediction exactly (no rounding), so RLG at those
    weights reproduces the base and the aligned sampler bit for bit.
    """
    if weight == 0:
        return pred_base
    if weight == 1:
        return pred_aligned
    return pred_base + weight * (pred_aligned - pred_base)


def rlg_cfg(base_uncond: Tensor, base_cond: Tensor, aligned_uncond: Tensor, aligned_cond: Tensor,
            guidance_scale: float, weight: float) -> Tensor:
    """The reference order: CFG inside each model first, then RLG between the two guided predictions."""
    return rlg(cfg(base_uncond, base_cond, guidance_scale), cfg(aligned_uncond, aligned_cond, guidance_scale), weight)


def npo(pred_neg_uncond: Tensor, pred_pos_cond: Tensor, scale: float) -> Tensor:
    """NPO guidance: CFG whose unconditional branch comes from the negative model."""
    return cfg(pred_neg_uncond, pred_pos_cond, scale)
