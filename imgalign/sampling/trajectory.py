"""Full rollouts that record what online RL (DDPO, Flow-GRPO, DanceGRPO, Pref-GRPO) trains on.

`sample_trajectory(predict, x_T, sampler)` runs the sampler from noise to a sample and records, per step j,
the latents x_j -> x_{j+1}, the network timestep, the policy log-probability and the transition mean / std.

SDE window (Flow-GRPO-Fast, MixGRPO, Pref-GRPO): with `sde_window=(start, end)` only steps start <= j < end
are stochastic; every other step is the deterministic ODE step (DDIM eta = 0 / flow Euler). A deterministic
step has no density, so its log_prob is recorded as NaN (not 0): a recipe that trains on it by mistake gets
a NaN loss at once instead of a silent ratio of 1. Select trainable steps with `trajectory.stochastic`
(or `stochastic_steps()`); `torch.nansum` sums a trajectory's log-probs over its stochastic steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from imgalign.sampling.gaussian import Generator, StepOutput


class Sampler(Protocol):
    num_steps: int

    def timestep(self, i: int | Tensor) -> Tensor: ...

    def step(
        self,
        i: int | Tensor,
        pred: Tensor,
        x_t: Tensor,
        *,
        stochastic: bool = True,
        prev_sample: Tensor | None = None,
        generator: Generator = None,
    ) -> StepOutput: ...


Predict = Callable[[Tensor, Tensor], Tensor]  # predict(x_t [B, ...], timestep [B]) -> prediction [B, ...]
Callback = Callable[[int, int, Tensor], None]  # callback(step_index, num_steps, latents after the step)


class Transition(NamedTuple):
    """Step j of a trajectory for each sample (j an int or per-sample [B])."""

    x_t: Tensor  # [B, ...] latent before the step
    prev_sample: Tensor  # [B, ...] latent after the step
    step_index: Tensor  # [B] long
    timestep: Tensor  # [B] what the network received
    log_prob: Tensor  # [B] fp32 log-prob at rollout (the "old" policy)
    mean: Tensor | None  # [B, ...] fp32 transition mean at rollout (None if not recorded)
    std: Tensor  # [B] fp32


@dataclass
class Trajectory:
    """A batch of rollouts of T steps.

    sample:     [B, ...] the final latent (after the last step; the denoised sample).
    latents:    [B, T + 1, ...] in the latent dtype: latents[:, 0] is the initial noise, latents[:, j + 1]
                the latent after step j (so step j maps latents[:, j] -> latents[:, j + 1]);
                None if record=False.
    log_probs:  [B, T] fp32 policy log-probabilities at rollout; NaN at deterministic steps.
    means:      [B, T, ...] fp32 transition means; None if record=False.
    stds:       [B, T] fp32 transition stds (0 at deterministic steps).
    timesteps:  [B, T] the timestep the network received at each step.
    stochastic: [T] bool, which steps were sampled from the SDE (trainable).
    """

    sample: Tensor
    latents: Tensor | None
    log_probs: Tensor
    means: Tensor | None
    stds: Tensor
    timesteps: Tensor
    stochastic: Tensor

    @property
    def num_steps(self) -> int:
        return int(self.log_probs.shape[1])

    def stochastic_steps(self) -> Tensor:
        """Indices [S] of the stochastic (trainable) steps."""
        return torch.nonzero(self.stochastic).flatten()

    def transition(self, j: int | Tensor) -> Transition:
        """The stored transition at step j (int, or LongTensor [B] for one step per sample)."""
        if self.latents is None:
            raise ValueError("this trajectory was sampled with record=False and holds no latents")
        batch = self.log_probs.shape[0]
        rows = torch.arange(batch, device=self.log_probs.device)
        j = torch.as_tensor(j, device=self.log_probs.device).long().expand(batch)
        return Transition(
            x_t=self.latents[rows, j],
            prev_sample=self.latents[rows, j + 1],
            step_index=j,
            timestep=self.timesteps[rows, j],
            log_prob=self.log_probs[rows, j],
            mean=None if self.means is None else self.means[rows, j],
            std=self.stds[rows, j],
        )


def sample_sde_window(
    window_size: int, window_range: tuple[int, int], generator: torch.Generator | None = None
) -> tuple[int, int]:
    """A random SDE window [start, start + window_size) with lo <= start <= hi - window_size, uniform
    (Flow-GRPO-Fast's `sde_window_size` / `sde_window_range`)."""
    lo, hi = window_range
    if window_size < 1 or hi - lo < window_size:
        raise ValueError(f"window_size {window_size} does not fit in window_range {window_range}")
    start = int(torch.randint(lo, hi - window_size + 1, (1,), generator=generator))
    return start, start + window_size


def sample_trajectory(
    predict: Predict,
    x_T: Tensor,
    sampler: Sampler,
    *,
    sde_window: tuple[int, int] | None = None,
    generator: Generator = None,
    record: bool = True,
    callback: Callback | None = None,
    enable_grad: bool = False,
) -> Trajectory:
    """Run `sampler` from the initial noise x_T [B, ...] for all its steps.

    predict:     the model, predict(x [B, ...], timestep [B]) -> prediction in the sampler's parametrisation
                 (epsilon / v / x0 for DDIM, velocity for flow); CFG, conditioning etc. live inside it.
    sde_window:  (start, end): only steps start <= j < end are stochastic; None = all steps stochastic.
    generator:   noise source (one torch.Generator, or a list with one per sample).
    record:      keep latents and means (memory [B, T, ...]); log-probs, stds, timesteps are always kept.
    callback:    called as callback(j, num_steps, latents) after every step (progress bars, previews).
    enable_grad: build the autograd graph through the rollout (reward backprop); off by default.
    """
    num_steps = sampler.num_steps
    batch = x_T.shape[0]
    start, end = (0, num_steps) if sde_window is None else sde_window
    if not 0 <= start <= end <= num_steps:
        raise ValueError(f"sde_window {sde_window} must satisfy 0 <= start <= end <= num_steps={num_steps}")
    is_sde = [start <= j < end for j in range(num_steps)]

    latents, means, log_probs, stds, timesteps = [x_T], [], [], [], []
    x = x_T
    grad_mode = contextlib.nullcontext() if enable_grad else torch.no_grad()
    with grad_mode:
        for j in range(num_steps):
            t = sampler.timestep(j).to(x.device).expand(batch)
            pred = predict(x, t)
            out = sampler.step(j, pred, x, stochastic=is_sde[j], generator=generator)
            x = out.prev_sample
            log_probs.append(out.log_prob)
            stds.append(out.std.reshape(batch))
            timesteps.append(t)
            if record:
                latents.append(x)
                means.append(out.mean)
            if callback is not None:
                callback(j, num_steps, x)

    return Trajectory(
        sample=x,
        latents=torch.stack(latents, dim=1) if record else None,
        log_probs=torch.stack(log_probs, dim=1),
        means=torch.stack(means, dim=1) if record else None,
        stds=torch.stack(stds, dim=1),
        timesteps=torch.stack(timesteps, dim=1),
        stochastic=torch.tensor(is_sde, dtype=torch.bool, device=x_T.device),
    )
