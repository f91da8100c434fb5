"""Distillation losses between a student's and a teacher's estimates: pure tensor math, no models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """Pseudo-Huber distance (consistency models, Song & Dhariwal 2023, arXiv 2310.14189; Self-NPO's loss),
    per sample, in fp32:

        loss_b = mean_i( sqrt((pred_bi - target_bi)^2 + c^2) - c )      -> [B]

    ~ (pred - target)^2 / (2c) for |pred - target| << c, ~ |pred - target| for |pred - target| >> c: for small c it
    behaves like L1, whose minimiser over a set of targets is their median.
    """
    return ((pred.float() - target.float()) ** 2 + c * c).sqrt().sub(c).flatten(1).mean(1)


# ------------------------------------------------------------------------------------------------------------------
# Distribution matching distillation (DMD, Yin et al. 2024, arXiv 2311.18828; DMD2, arXiv 2405.14867, code
# tianweiy/DMD2 main/sd_guidance.py) and the Flash-DMD split (arXiv 2511.20549). All in x0 space, so one set of
# functions serves eps, v and flow teachers once their predictions are converted with sampling.noise.to_x0_eps.
# ------------------------------------------------------------------------------------------------------------------
def dm_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor, eps: float = 1e-12) -> Tensor:
    """The distribution-matching direction for student samples x [B, ...], given the real (teacher, with CFG) and
    fake (critic, no CFG) clean estimates at the SAME noised x_t:

        p_real = x - x0_real,  p_fake = x - x0_fake
        g      = (p_real - p_fake) / mean_{C,H,W} |p_real|          per sample (DMD's weight w_t in x0 space)

    Computed in float64 then cast back, NaN/inf set to 0 (as the reference). A descent step x <- x - lr * g moves x
    toward the real score's estimate and away from the fake's: g = (x0_fake - x0_real) / mean|x - x0_real|.
    """
    x64, real, fake = x.double(), x0_real.double(), x0_fake.double()
    p_real, p_fake = x64 - real, x64 - fake
    scale = p_real.abs().flatten(1).mean(1).clamp_min(eps).view(-1, *([1] * (x.dim() - 1)))
    return torch.nan_to_num((p_real - p_fake) / scale, nan=0.0, posinf=0.0, neginf=0.0).to(x.dtype)


def dm_surrogate_loss(x: Tensor, grad: Tensor) -> Tensor:
    """0.5 * mean((x - stopgrad(x - g))^2) per sample [B]: its gradient with respect to x is g / numel(x_b), so the
    student receives the DM direction through autograd (DMD2's form; mean over C, H, W)."""
    target = (x - grad).detach()
    return 0.5 * (x.float() - target.float()).pow(2).flatten(1).mean(1)


def gan_critic_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Non-saturating logistic discriminator loss per sample: softplus(D(fake)) + softplus(-D(real)) (DMD2)."""
    return F.softplus(fake_logits.float()).flatten(1).mean(1) + F.softplus(-real_logits.float()).flatten(1).mean(1)


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss per sample: softplus(-D(G(z)))."""
    return F.softplus(-fake_logits.float()).flatten(1).mean(1)


def timestep_split(t: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Flash-DMD's timestep-aware split of the student's timesteps t [B] (larger t = more noise; flow sigmas in
    [0, 1] or SD timesteps in [0, 1000)): -> (dm_mask, adversarial_mask), DM on t >= threshold (the high-noise steps:
    layout), adversarial on t < threshold (the low-noise steps: texture). The paper's threshold is not public."""
    dm = t >= threshold
    return dm, ~dm


def student_timesteps(num_steps: int, num_train_timesteps: int = 1000, shift: float | None = None) -> Tensor:
    """The few-step student's timesteps, first (noisiest) first.

    SD schedules (shift None): DMD2's range(T - 1, 0, -T / N), e.g. [999, 749, 499, 249] for N = 4 (integers).
    Flow schedules (shift s): sigmas 1, (N - 1)/N, ..., 1/N, shifted as SD3 does, s * u / (1 + (s - 1) * u) (floats in
    (0, 1]; FastVideo's N-step list under the flow shift)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift is None:
        step = num_train_timesteps / num_steps
        return torch.tensor([int(num_train_timesteps - 1 - round(k * step)) for k in range(num_steps)])
    u = torch.tensor([(num_steps - k) / num_steps for k in range(num_steps)], dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).float()


def reward_hinge_loss(scores: dict[str, Tensor], thresholds: dict[str, float], weights: dict[str, float]) -> Tensor:
    """DMDR's reward term on the student's samples: sum_i w_i * relu(tau_i - r_i) per sample [B] (rewards above their
    threshold tau_i stop pushing; DMDR: CLIP and HPSv2.1 at weight 0.3, tau 0.7)."""
    missing = set(weights) - set(scores) or set(weights) - set(thresholds)
    if missing:
        raise ValueError(f"reward_hinge_loss: no score or threshold for {sorted(missing)}")
    return sum(w * torch.relu(thresholds[k] - scores[k].float()) for k, w in weights.items())


def smoothed_gradient(h, x: Tensor, xi: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """Gaussian smoothing with antithetic pairs: for x [B, ...] and directions xi [B, K, ...],
        grad_b = mean_k (h(x_b + sigma xi_bk) - h(x_b - sigma xi_bk)) / (2 sigma) * xi_bk
    an unbiased estimate of the gradient of E_xi h(x + sigma xi) (exact in expectation for a linear h); h maps
    latents [M, ...] -> [M] and is called once, on [x, x + sigma xi, x - sigma xi]. -> (h(x) [B], grad [B, ...])."""
    b, k = xi.shape[:2]
    xs = torch.cat([x, (x[:, None] + sigma * xi).flatten(0, 1), (x[:, None] - sigma * xi).flatten(0, 1)])
    values = h(xs).float()
    h0, plus, minus = values[:b], values[b:b + b * k].view(b, k), values[b + b * k:].view(b, k)
    coef = ((plus - minus) / (2 * sigma)).view(b, k, *([1] * (x.dim() - 1))).to(xi)
    return h0, (coef * xi).mean(1)
