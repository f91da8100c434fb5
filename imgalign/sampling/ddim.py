"""DDIM step with a log-probability (DDPO's policy step, arXiv 2305.13301; DDIM, arXiv 2010.02502 eq. 12, 16).

Variance-preserving diffusion: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. From the network output we form
the predicted clean sample x0_hat and predicted noise eps_hat (either one determines the other given x_t;
`imgalign.sampling.noise.to_x0_eps` with alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t)):

    epsilon:       eps_hat = pred,                               x0_hat = (x_t - sqrt(1-abar_t) eps_hat) / sqrt(abar_t)
    sample:        x0_hat  = pred,                               eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1-abar_t)
    v_prediction:  x0_hat  = sqrt(abar_t) x_t - sqrt(1-abar_t) pred,  eps_hat = sqrt(abar_t) pred + sqrt(1-abar_t) x_t

The DDIM step to t_prev (abar_prev = abar[t_prev], or `final_alpha_cumprod` when t_prev < 0) is

    sigma_t = eta * sqrt( (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev) )
    mean    = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat
    x_prev  = mean + sigma_t z,  z ~ N(0, I)

eta = 0 is the deterministic DDIM ODE step, eta = 1 the DDPM posterior variance. The policy log-probability
is log N(x_prev; mean, sigma_t^2) (see `gaussian.py`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from imgalign.sampling.gaussian import Generator, Reduce, StepOutput, finish_step, per_sample
from imgalign.sampling.noise import to_x0_eps

PredictionType = Literal["epsilon", "v_prediction", "sample"]


def _alpha_cumprod(t: int | Tensor, alphas_cumprod: Tensor, final_alpha_cumprod: float | Tensor, like: Tensor):
    """abar at integer timestep(s) t ([] or [B]) as fp32 [B, 1, ..., 1]; t < 0 takes `final_alpha_cumprod`."""
    alphas_cumprod = alphas_cumprod.to(device=like.device, dtype=torch.float32)
    t = torch.as_tensor(t, device=like.device).long()
    abar = alphas_cumprod[t.clamp(min=0)]
    final = torch.as_tensor(final_alpha_cumprod, dtype=torch.float32, device=like.device)
    abar = torch.where(t >= 0, abar, final)
    return per_sample(abar, like)


def _ddim_mean_and_std(
    pred: Tensor,
    x_t: Tensor,
    t: int | Tensor,
    t_prev: int | Tensor,
    alphas_cumprod: Tensor,
    eta: float,
    prediction_type: PredictionType,
    final_alpha_cumprod: float | Tensor,
    clip_sample_range: float | None,
) -> tuple[Tensor, Tensor]:
    pred, x = pred.float(), x_t.float()
    abar_t = _alpha_cumprod(t, alphas_cumprod, final_alpha_cumprod, x)  # [B, 1, ...]
    abar_prev = _alpha_cumprod(t_prev, alphas_cumprod, final_alpha_cumprod, x)
    beta_t = 1 - abar_t

    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
    x0_hat, eps_hat = to_x0_eps(pred, x, abar_t**0.5, beta_t**0.5, prediction_type)
    if clip_sample_range is not None:
        # Like diffusers' `clip_sample` (and DDPO): clip x0_hat only; eps_hat stays the model's.
        x0_hat = x0_hat.clamp(-clip_sample_range, clip_sample_range)

    variance = (1 - abar_prev) / beta_t * (1 - abar_t / abar_prev)
    std = eta * variance.clamp(min=0) ** 0.5  # [B, 1, ...]
    mean = abar_prev**0.5 * x0_hat + (1 - abar_prev - std**2).clamp(min=0) ** 0.5 * eps_hat
    return mean, std


def ddim_step_with_logprob(
    pred: Tensor,
    x_t: Tensor,
    t: int | Tensor,
    t_prev: int | Tensor,
    alphas_cumprod: Tensor,
    eta: float = 1.0,
    prediction_type: PredictionType = "epsilon",
    prev_sample: Tensor | None = None,
    generator: Generator = None,
    reduce: Reduce = "mean",
    final_alpha_cumprod: float | Tensor = 1.0,
    clip_sample_range: float | None = None,
) -> StepOutput:
    """One DDIM(eta) step x_t -> x_{t_prev} and the log-probability of the result.

    pred:           network output [B, ...] (epsilon, v or x0, per `prediction_type`).
    x_t:            current latent [B, ...].
    t, t_prev:      integer training timesteps, scalars or per-sample [B]; t_prev < 0 means "after the last
                    step" and uses `final_alpha_cumprod` (diffusers: 1.0 if `set_alpha_to_one` else abar[0];
                    SD checkpoints use abar[0], which keeps the last step's std > 0).
    alphas_cumprod: [num_train_timesteps] abar of the training schedule.
    eta:            0 = deterministic DDIM, 1 = DDPM variance (DDPO samples with eta = 1).
    prev_sample:    if given, no sampling: score this stored x_{t_prev} instead (the training-time recompute).
    reduce:         "mean" (default, as DDPO) or "sum" over latent elements, or "none".

    Returns StepOutput(prev_sample in x_t's dtype, log_prob [B] fp32, mean fp32, std [B, 1, ...] fp32).
    The log-prob is NaN where std == 0 (eta = 0, or the last step with final_alpha_cumprod = 1).
    """
    mean, std = _ddim_mean_and_std(
        pred, x_t, t, t_prev, alphas_cumprod, eta, prediction_type, final_alpha_cumprod, clip_sample_range
    )
    return finish_step(mean, std, x_t, prev_sample, generator, reduce)


def ddim_ode_step(
    pred: Tensor,
    x_t: Tensor,
    t: int | Tensor,
    t_prev: int | Tensor,
    alphas_cumprod: Tensor,
    prediction_type: PredictionType = "epsilon",
    final_alpha_cumprod: float | Tensor = 1.0,
    clip_sample_range: float | None = None,
) -> Tensor:
    """Deterministic DDIM step (eta = 0): x_{t_prev} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat.

    Equals diffusers' `DDIMScheduler.step(..., eta=0)` for the same timesteps; returned in x_t's dtype.
    """
    mean, _ = _ddim_mean_and_std(
        pred, x_t, t, t_prev, alphas_cumprod, 0.0, prediction_type, final_alpha_cumprod, clip_sample_range
    )
    return mean.to(x_t.dtype)
