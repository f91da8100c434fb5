"""Flow-matching sampler steps: Euler ODE, Flow-GRPO SDE, DanceGRPO SDE and CPS, each with a log-probability.

Conventions (diffusers' FlowMatchEulerDiscreteScheduler, SD3, FLUX): x_sigma = (1 - sigma) x0 + sigma eps,
sigma in [0, 1] with sigma = 1 pure noise, velocity v = eps - x0; a step goes sigma -> sigma_next < sigma,
dt = sigma_next - sigma < 0. From the velocity at x (`imgalign.sampling.noise.to_x0_eps`, "flow"):

    x0_hat  = x - sigma v            (predicted clean sample)
    eps_hat = x + (1 - sigma) v      (predicted noise; both are posterior means when v = E[eps - x0 | x])
    score   = grad log p_sigma(x) = -E[eps | x] / sigma ~= -eps_hat / sigma

ODE.  dx = v dsigma transports p_1 = N(0, I) to the data; Euler: x' = x + v dt.

Reverse SDE with the same marginals (derivation).  For any g(sigma) >= 0, the forward-in-sigma SDE
dx = [v + (g^2/2) score] dsigma + g dw has the Fokker-Planck equation
d p/d sigma = -div(p v) - (g^2/2) div(p score) + (g^2/2) lap p = -div(p v), since p score = grad p: the
same marginals as the ODE. Run backwards (sigma decreasing, dsigma < 0):

    dx = [v - (g^2/2) score] dsigma + g dw_bar  =  [v + (g^2 / (2 sigma)) eps_hat] dsigma + g dw_bar

whose Euler-Maruyama step is the Gaussian policy

    mean = x + v dt + (g^2 / (2 sigma)) (x + (1 - sigma) v) dt,     std = g sqrt(-dt).

Flow-GRPO (arXiv 2505.05470) takes g = a sqrt(sigma / (1 - sigma)) (a = noise_level, default 0.7), which is
infinite at sigma = 1; it evaluates the (1 - sigma) in that denominator at sigmas[1] instead when
sigma == 1 (our `sigma_at_one`, default sigma_next, which is sigmas[1] on the first step of a schedule).
DanceGRPO (arXiv 2505.07818) takes a constant g = eta (default 0.3).

CPS, Coefficients-Preserving Sampling (arXiv 2509.05952), instead re-noises the predicted clean sample so
that x' has exactly the coefficients of the forward process at sigma_next, like DDIM does for VP diffusion:

    s    = sigma_next sin(a pi / 2)                                         (a = noise_level, default 0.8)
    mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - s^2) eps_hat
    x'   = mean + s z       so the noise coefficient is sqrt(sigma_next^2 - s^2 + s^2) = sigma_next.

a = 0 gives back the Euler ODE step exactly; the last step (sigma_next = 0) is deterministic (s = 0).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from imgalign.sampling.gaussian import (
    Generator,
    Reduce,
    StepOutput,
    finish_step,
    gaussian_log_prob,
    per_sample,
    reduce_latent,
)
from imgalign.sampling.noise import to_x0_eps

CPSLogProbForm = Literal["squared_error", "gaussian"]


def flow_ode_step(velocity: Tensor, x_t: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """Euler step of the flow ODE, x' = x + (sigma_next - sigma) v, in fp32, returned in x_t's dtype.

    Equals diffusers' `FlowMatchEulerDiscreteScheduler.step` (default, non-stochastic) for the same sigmas.
    sigma / sigma_next: scalars or per-sample [B].
    """
    x = x_t.float()
    dt = per_sample(sigma_next, x) - per_sample(sigma, x)
    return (x + dt * velocity.float()).to(x_t.dtype)


def _reverse_sde_step(
    velocity: Tensor,
    x_t: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    g: Tensor,
    prev_sample: Tensor | None,
    generator: Generator,
    reduce: Reduce,
) -> StepOutput:
    """Euler-Maruyama step of the marginal-preserving reverse SDE with diffusion g ([B, 1, ...] fp32)."""
    x, v = x_t.float(), velocity.float()
    dt = sigma_next - sigma  # < 0
    _, eps_hat = to_x0_eps(v, x, 1 - sigma, sigma, "flow")
    mean = x + v * dt + (g**2 / (2 * sigma)) * eps_hat * dt
    std = g * (-dt).clamp(min=0).sqrt()
    return finish_step(mean, std, x_t, prev_sample, generator, reduce)


def flow_sde_step_with_logprob(
    velocity: Tensor,
    x_t: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float = 0.7,
    prev_sample: Tensor | None = None,
    generator: Generator = None,
    reduce: Reduce = "mean",
    sigma_at_one: float | Tensor | None = None,
) -> StepOutput:
    """Flow-GRPO SDE step sigma -> sigma_next and the Gaussian log-probability of its result.

        g       = noise_level * sqrt(sigma / (1 - sigma'))   with sigma' = sigma, or `sigma_at_one` where sigma == 1
        mean    = x + v dt + (g^2 / (2 sigma)) (x + (1 - sigma) v) dt,   dt = sigma_next - sigma
        x'      = mean + g sqrt(-dt) z
        log_prob = log N(x'; mean, g^2 (-dt))  reduced over latent elements (fp32)

    velocity, x_t: [B, ...]; sigma, sigma_next: scalars or per-sample [B]. `sigma_at_one` defaults to
    sigma_next (= sigmas[1] on a schedule's first step, Flow-GRPO's choice). With prev_sample given, nothing is
    sampled and that stored x' is scored. `StepOutput.std` is the transition std g sqrt(-dt); Flow-GRPO's
    `std_dev_t` (used in its dt-free KL) is g = std / sqrt(-dt).
    """
    x = x_t.float()
    sigma_ = per_sample(sigma, x)
    sigma_next_ = per_sample(sigma_next, x)
    at_one = sigma_next_ if sigma_at_one is None else per_sample(sigma_at_one, x)
    denominator = torch.where(sigma_ >= 1, 1 - at_one, 1 - sigma_)
    g = noise_level * (sigma_ / denominator).sqrt()
    return _reverse_sde_step(velocity, x_t, sigma_, sigma_next_, g, prev_sample, generator, reduce)


def flow_dance_step_with_logprob(
    velocity: Tensor,
    x_t: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    eta: float = 0.3,
    prev_sample: Tensor | None = None,
    generator: Generator = None,
    reduce: Reduce = "mean",
) -> StepOutput:
    """DanceGRPO SDE step: the same reverse SDE with constant diffusion g = eta.

        mean = x + v dt + (eta^2 / (2 sigma)) (x + (1 - sigma) v) dt,   std = eta sqrt(-dt)
    """
    x = x_t.float()
    sigma_ = per_sample(sigma, x)
    g = torch.full_like(sigma_, float(eta))
    return _reverse_sde_step(velocity, x_t, sigma_, per_sample(sigma_next, x), g, prev_sample, generator, reduce)


def _squared_error_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduce: Reduce = "mean") -> Tensor:
    """Flow-GRPO's CPS "log-prob": -(x' - mean)^2, all constants dropped (no 1/(2 s^2), no normaliser)."""
    return reduce_latent(-((x.float() - mean.float()) ** 2), reduce)


def flow_cps_step_with_logprob(
    velocity: Tensor,
    x_t: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float = 0.8,
    prev_sample: Tensor | None = None,
    generator: Generator = None,
    reduce: Reduce = "mean",
    log_prob_form: CPSLogProbForm = "squared_error",
) -> StepOutput:
    """Coefficients-Preserving Sampling step sigma -> sigma_next and its log-probability.

        s    = sigma_next sin(noise_level pi / 2)
        mean = (1 - sigma_next)(x - sigma v) + sqrt(sigma_next^2 - s^2)(x + (1 - sigma) v)
        x'   = mean + s z

    Log-probability, `log_prob_form`:
      "squared_error" (default, as Flow-GRPO's CPS code): log_prob = -(x' - mean)^2 reduced over elements, with
          every constant removed. Since s does not depend on the model, the log-ratio of two policies is the
          Gaussian log-ratio times 2 s^2: ratios are much closer to 1 than with "gaussian", and the clip
          ranges of Flow-GRPO's CPS configs assume this form. It is 0 (not NaN) on the deterministic last step.
      "gaussian": the true log N(x'; mean, s^2) (NaN where s = 0, i.e. when sigma_next = 0).
    """
    x, v = x_t.float(), velocity.float()
    sigma_ = per_sample(sigma, x)
    sigma_next_ = per_sample(sigma_next, x)
    std = sigma_next_ * math.sin(noise_level * math.pi / 2)
    x0_hat, eps_hat = to_x0_eps(v, x, 1 - sigma_, sigma_, "flow")
    mean = (1 - sigma_next_) * x0_hat + (sigma_next_**2 - std**2).clamp(min=0).sqrt() * eps_hat
    if log_prob_form == "squared_error":
        log_prob_fn = _squared_error_log_prob
    elif log_prob_form == "gaussian":
        log_prob_fn = gaussian_log_prob
    else:
        raise ValueError(f"log_prob_form must be 'squared_error' or 'gaussian', got {log_prob_form!r}")
    return finish_step(mean, std, x_t, prev_sample, generator, reduce, log_prob_fn=log_prob_fn)
