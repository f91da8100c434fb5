"""Noise-level maths shared by samplers, adapters and recipes: pure tensor functions, no models.

Every family writes its noisy sample as x = alpha x0 + sigma eps (x0 clean, eps ~ N(0, I)):
    VP diffusion (SD1.x/2.x, SDXL):  alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t)
    flow matching (SD3, FLUX):       alpha = 1 - sigma,    sigma in [0, 1]

    to_x0_eps   the network's prediction at (x, alpha, sigma) -> (clean estimate x0, noise estimate eps)
    renoise     the exact forward jump from one noise level to a higher one
"""

from __future__ import annotations

from typing import Literal

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
