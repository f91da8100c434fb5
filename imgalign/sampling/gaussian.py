"""Shared pieces of every stochastic sampler step: the step output, per-sample coefficients, noise, and the
Gaussian log-density of a transition.

A stochastic sampler step is a Gaussian policy  pi(x' | x_t) = N(x'; mean, std^2 I)  (DDPO, Flow-GRPO,
DanceGRPO, CPS all have this form). Its log-density, per latent element, is

    log pi = -(x' - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)

and it is reduced over the latent elements of each sample: averaged (`reduce="mean"`, the default of every
reference implementation, which is why their PPO clip ranges are ~1e-4) or summed (`reduce="sum"`, the true
log-density of the whole latent). Everything here is computed in fp32 whatever the latent dtype: the squared
error divided by a tiny variance overflows bf16/fp16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Reduce = Literal["mean", "sum", "none"]
Generator = torch.Generator | list[torch.Generator] | None

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """One sampler step x_t -> x'.

    prev_sample: x' [B, ...] in x_t's dtype (the sampled next latent, or the one passed in as `prev_sample`).
    log_prob:    [B] fp32 log-density of `prev_sample` under N(mean, std^2), reduced over latent elements
                 ([B, ...] with reduce="none"); NaN where std == 0 (a deterministic step has no density).
    mean:        [B, ...] fp32 mean of the transition.
    std:         [B, 1, ..., 1] fp32 standard deviation of the transition (broadcastable to the latent), i.e.
                 x' = mean + std * noise. 0 for a deterministic step.
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def per_sample(value: float | Tensor, like: Tensor) -> Tensor:
    """A scalar or per-sample value ([] or [B]) as fp32 [B, 1, ..., 1] broadcastable against `like` [B, ...]."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    if value.ndim != 1 or value.shape[0] != like.shape[0]:
        raise ValueError(
            f"expected a scalar or one value per sample (shape [{like.shape[0]}]), got shape {tuple(value.shape)}"
        )
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def randn(like: Tensor, generator: Generator = None) -> Tensor:
    """Standard normal noise shaped like `like`, in fp32 on its device.

    `generator` may be one torch.Generator for the batch or a list with one per sample (so a sample's noise
    does not depend on its batch neighbours; the same convention as diffusers' `randn_tensor`).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}")
        return torch.stack(
            [torch.randn(like.shape[1:], generator=g, device=like.device, dtype=torch.float32) for g in generator]
        )
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def reduce_latent(values: Tensor, reduce: Reduce = "mean") -> Tensor:
    """Reduce per-element values [B, ...] over all non-batch dimensions -> [B] ("none" keeps them)."""
    if reduce == "none":
        return values
    dims = tuple(range(1, values.ndim))
    if reduce == "mean":
        return values.mean(dim=dims) if dims else values
    if reduce == "sum":
        return values.sum(dim=dims) if dims else values
    raise ValueError(f"reduce must be 'mean', 'sum' or 'none', got {reduce!r}")


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduce: Reduce = "mean") -> Tensor:
    """log N(x; mean, std^2) per element in fp32, reduced over latent elements. NaN where std == 0."""
    x, mean, std = x.float(), mean.float(), std.float()
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_prob = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    log_prob = torch.where(std > 0, log_prob, torch.full_like(log_prob, float("nan")))
    return reduce_latent(log_prob, reduce)


def finish_step(
    mean: Tensor,
    std: Tensor,
    x_t: Tensor,
    prev_sample: Tensor | None,
    generator: Generator,
    reduce: Reduce,
    log_prob_fn=gaussian_log_prob,
) -> StepOutput:
    """Sample x' = mean + std * noise (unless `prev_sample` is given) and score it.

    The sample is cast to x_t's dtype *before* it is scored, so the stored log-prob is exactly the one a later
    recomputation with `prev_sample=` finds for the stored (cast) latent: the ratio is exactly 1 before any
    update, whatever the latent dtype.
    """
    if prev_sample is None:
        prev_sample = (mean + std * randn(mean, generator)).to(x_t.dtype)
    elif prev_sample.shape != x_t.shape:
        raise ValueError(f"prev_sample has shape {tuple(prev_sample.shape)}, x_t has {tuple(x_t.shape)}")
    log_prob = log_prob_fn(prev_sample, mean, std, reduce)
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)
