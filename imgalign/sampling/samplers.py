"""Samplers: a schedule plus a step rule, addressed by step index.

Both samplers expose the same three things, which is all `sample_trajectory` and a training step need:

    sampler.num_steps                       T
    sampler.timestep(i)                     what the network receives at step i ([] or [B] for per-sample i)
    sampler.step(i, pred, x_t, stochastic=True, prev_sample=None, generator=None) -> StepOutput

`i` is an int or a per-sample LongTensor [B] (DDPO / DanceGRPO / Pref-GRPO train a random permutation of
steps per sample). `stochastic=False` takes the deterministic ODE step (DDIM eta = 0 / flow Euler); its
log_prob is NaN (no density) and its std 0. The training recompute of a stored transition is
`sampler.step(j, predict(x_j, sampler.timestep(j)), x_j, prev_sample=x_{j+1}).log_prob`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from imgalign.sampling.ddim import PredictionType, ddim_ode_step, ddim_step_with_logprob
from imgalign.sampling.flow import (
    CPSLogProbForm,
    flow_cps_step_with_logprob,
    flow_dance_step_with_logprob,
    flow_ode_step,
    flow_sde_step_with_logprob,
)
from imgalign.sampling.gaussian import Generator, Reduce, StepOutput, per_sample
from imgalign.sampling.schedules import DDIMSchedule, FlowSchedule

FlowMethod = Literal["sde", "cps", "dance", "ode"]
DEFAULT_NOISE_LEVEL = {"sde": 0.7, "cps": 0.8, "dance": 0.3, "ode": 0.0}  # Flow-GRPO, Flow-GRPO CPS, DanceGRPO


def _deterministic(next_sample: Tensor, x_t: Tensor) -> StepOutput:
    batch = x_t.shape[0]
    return StepOutput(
        prev_sample=next_sample,
        log_prob=torch.full((batch,), float("nan"), device=x_t.device),
        mean=next_sample.float(),
        std=per_sample(0.0, x_t),
    )


def _index(values: Tensor, i: int | Tensor, device: torch.device) -> Tensor:
    return values.to(device)[torch.as_tensor(i, device=device).long()]


@dataclass
class DDIMSampler:
    """DDIM(eta) over a `DDIMSchedule` (DDPO samples with eta = 1). prediction_type defaults to the schedule's."""

    schedule: DDIMSchedule
    eta: float = 1.0
    prediction_type: PredictionType | None = None
    clip_sample_range: float | None = None
    reduce: Reduce = "mean"

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def timestep(self, i: int | Tensor) -> Tensor:
        return _index(self.schedule.timesteps, i, self.schedule.timesteps.device)

    def step(
        self,
        i: int | Tensor,
        pred: Tensor,
        x_t: Tensor,
        *,
        stochastic: bool = True,
        prev_sample: Tensor | None = None,
        generator: Generator = None,
    ) -> StepOutput:
        s = self.schedule
        t = _index(s.timesteps, i, x_t.device)
        t_prev = _index(s.prev_timesteps, i, x_t.device)
        common = dict(
            alphas_cumprod=s.alphas_cumprod,
            prediction_type=self.prediction_type or s.prediction_type,
            final_alpha_cumprod=s.final_alpha_cumprod,
            clip_sample_range=self.clip_sample_range,
        )
        if not stochastic or self.eta == 0:
            return _deterministic(ddim_ode_step(pred, x_t, t, t_prev, **common), x_t)
        return ddim_step_with_logprob(
            pred, x_t, t, t_prev, eta=self.eta, prev_sample=prev_sample, generator=generator,
            reduce=self.reduce, **common,
        )


@dataclass
class FlowSampler:
    """Flow-matching sampler over a `FlowSchedule`.

    method: "sde" (Flow-GRPO, noise_level a = 0.7 by default), "cps" (Coefficients-Preserving Sampling,
    a = 0.8), "dance" (DanceGRPO constant-g SDE, eta = 0.3), "ode" (Euler, deterministic).
    noise_level: a for sde/cps, eta for dance; None = the method's default above.
    cps_log_prob_form: see `flow_cps_step_with_logprob` ("squared_error" as Flow-GRPO, or "gaussian").
    """

    schedule: FlowSchedule
    method: FlowMethod = "sde"
    noise_level: float | None = None
    reduce: Reduce = "mean"
    cps_log_prob_form: CPSLogProbForm = "squared_error"

    def __post_init__(self) -> None:
        if self.method not in DEFAULT_NOISE_LEVEL:
            raise ValueError(f"method must be one of {sorted(DEFAULT_NOISE_LEVEL)}, got {self.method!r}")
        if self.noise_level is None:
            self.noise_level = DEFAULT_NOISE_LEVEL[self.method]

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def timestep(self, i: int | Tensor) -> Tensor:
        return _index(self.schedule.timesteps, i, self.schedule.timesteps.device)

    def step(
        self,
        i: int | Tensor,
        pred: Tensor,
        x_t: Tensor,
        *,
        stochastic: bool = True,
        prev_sample: Tensor | None = None,
        generator: Generator = None,
    ) -> StepOutput:
        i = torch.as_tensor(i, device=x_t.device).long()
        sigma = _index(self.schedule.sigmas, i, x_t.device)
        sigma_next = _index(self.schedule.sigmas, i + 1, x_t.device)
        if not stochastic or self.method == "ode":
            return _deterministic(flow_ode_step(pred, x_t, sigma, sigma_next), x_t)
        kwargs = dict(prev_sample=prev_sample, generator=generator, reduce=self.reduce)
        if self.method == "sde":
            return flow_sde_step_with_logprob(
                pred, x_t, sigma, sigma_next, self.noise_level, sigma_at_one=self.schedule.sigmas[1], **kwargs
            )
        if self.method == "cps":
            return flow_cps_step_with_logprob(
                pred, x_t, sigma, sigma_next, self.noise_level, log_prob_form=self.cps_log_prob_form, **kwargs
            )
        return flow_dance_step_with_logprob(pred, x_t, sigma, sigma_next, self.noise_level, **kwargs)
