"""Noise-level maths shared by samplers, adapters and recipes: pure tensor functions, no models.

Every family writes its noisy sample as x = alpha x0 + sigma eps (x0 clean, eps ~ N(0, I)):
    VP diffusion (SD1.x/2.x, SDXL):  alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t)
    flow matching (SD3, FLUX):       alpha = 1 - sigma,    sigma in [0, 1]

    to_x0_eps   the network's prediction at (x, alpha, sigma) -> (clean estimate x0, noise estimate eps)
    renoise     the exact forward jump from one noise level to a higher one
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def to_x0_eps(pred: Tensor, x: Tensor, alpha: Tensor | float, sigma: Tensor | float,
              prediction_type: str) -> tuple[Tensor, Tensor]:
    """The network's prediction at x = alpha x0 + sigma eps -> (x0_hat, eps_hat); either determines the other.

        epsilon       (pred = eps):                 x0 = (x - sigma pred) / alpha,   eps = pred
        sample        (pred = x0):                  x0 = pred,                       eps = (x - alpha pred) / sigma
        v_prediction  (v = alpha eps - sigma x0):   x0 = alpha x - sigma v,          eps = sigma x + alpha v
        flow          (v = eps - x0, alpha = 1 - sigma):
                                                    x0 = x - sigma v,                eps = x + (1 - sigma) v

    (v_prediction's inverse uses alpha^2 + sigma^2 = 1.) alpha and sigma broadcast against x (e.g. [B, 1, ..., 1]);
    flow ignores `alpha`, which is 1 - sigma by definition. Computed in the inputs' dtype.
    """
    if prediction_type == "epsilon":
        return (x - sigma * pred) / alpha, pred
    if prediction_type == "sample":
        return pred, (x - alpha * pred) / sigma
    if prediction_type == "v_prediction":
        return alpha * x - sigma * pred, sigma * x + alpha * pred
    if prediction_type == "flow":
        return x - sigma * pred, x + (1 - sigma) * pred
    raise ValueError(f"prediction_type must be one of {', '.join(map(repr, PREDICTION_TYPES))}, "
                     f"got {prediction_type!r}")


def renoise(x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor, z: Tensor) -> Tensor:
    """Exact forward jump from noise level t to a higher level s: if x_t ~ N(alpha_t x0, sigma_t^2) then
    x_s ~ N(alpha_s x0, sigma_s^2).

        x_s = (alpha_s / alpha_t) x_t + sqrt(sigma_s^2 - (alpha_s sigma_t / alpha_t)^2) z,   z ~ N(0, I)

    (= alpha_s (x_t / alpha_t + sqrt(nsr_s^2 - nsr_t^2) z) with nsr = sigma / alpha; this form stays finite at
    alpha_s = 0, the end of a flow schedule, where x_s = z.)
    """
    ratio = alpha_s / alpha_t
    return ratio * x_t + (sigma_s**2 - (ratio * sigma_t) ** 2).clamp_min(0).sqrt() * z


class NoiseLevels:
    """alpha_k, sigma_k for k = 0..T-1 and the time value the family adapter's `predict` expects
    (`model_t[k]`: the DDPM timestep k, or sigma_k for flow families), so one rule serves every family:
    x_k = alpha_k x0 + sigma_k eps (SD-type: alpha = sqrt(alphabar_k); flow: sigma_k = shift((k+1)/T), alpha = 1 - sigma)."""

    def __init__(self, adapter, num_levels: int = 1000):
        self.prediction_type = adapter.prediction_type
        if adapter.is_flow:
            u = torch.arange(1, num_levels + 1, dtype=torch.float64) / num_levels
            shift = adapter.shift
            sigma = shift * u / (1 + (shift - 1) * u)
            alpha = 1 - sigma
            self.model_t = sigma.float()  # the adapter takes sigma for flow families
        else:
            ac = adapter.noise_scheduler.alphas_cumprod.double()
            if len(ac) != num_levels:
                raise ValueError(f"num_levels={num_levels} but the scheduler has {len(ac)} train timesteps")
            alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
            self.model_t = torch.arange(num_levels)
        self.alpha, self.sigma, self.T = alpha.float(), sigma.float(), num_levels

    def coef(self, k: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (-1,) + (1,) * (like.dim() - 1)
        return (self.alpha[k.cpu()].view(shape).to(like.device, like.dtype),
                self.sigma[k.cpu()].view(shape).to(like.device, like.dtype))

    def to_x0_eps(self, pred: Tensor, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """The network's prediction at (x, k) -> (clean estimate x0, noise estimate eps), by the family's
        prediction type (the one conversion every family and sampler shares: `imgalign.sampling.noise.to_x0_eps`)."""
        a, s = self.coef(k, x)
        return to_x0_eps(pred, x, a, s, self.prediction_type)
