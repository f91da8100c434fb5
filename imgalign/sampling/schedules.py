"""Inference grids, built by diffusers' own schedulers so they match what the pipelines use.

`ddim_schedule`: the DDIM timestep grid of an SD-type model (DDIMScheduler from the checkpoint's scheduler
config: its betas -> alphas_cumprod, `timestep_spacing`, `steps_offset`, `set_alpha_to_one`).
`flow_schedule`: the sigma grid of a flow model (FlowMatchEulerDiscreteScheduler with its shift, or dynamic
shifting with `mu` for FLUX), ending at sigma = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor


def _config_of(scheduler_or_config: Any, overrides: dict[str, Any] | None = None) -> dict:
    """Plain config dict of a scheduler (or dict), with `overrides` applied.

    diffusers drops the keys listed in `_use_default_values` when a config is loaded into another scheduler
    class (so PNDM's defaults do not leak into DDIM); an overridden key must leave that list or it is ignored.
    """
    config = {} if scheduler_or_config is None else dict(getattr(scheduler_or_config, "config", scheduler_or_config))
    overrides = overrides or {}
    if "_use_default_values" in config:
        config["_use_default_values"] = [k for k in config["_use_default_values"] if k not in overrides]
    return {**config, **overrides}


@dataclass(frozen=True)
class DDIMSchedule:
    """DDIM grid: step i goes from timesteps[i] to prev_timesteps[i] (negative after the last step).

    timesteps / prev_timesteps: [T] long, what the network receives is `timesteps[i]`.
    alphas_cumprod: [num_train_timesteps] fp32. final_alpha_cumprod: 0-d fp32 (abar used when t_prev < 0).
    prediction_type: the checkpoint's ("epsilon", "v_prediction" or "sample").
    """

    timesteps: Tensor
    prev_timesteps: Tensor
    alphas_cumprod: Tensor
    final_alpha_cumprod: Tensor
    prediction_type: str
    num_train_timesteps: int

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def ddim_schedule(
    scheduler_or_config: Any = None,
    num_inference_steps: int = 50,
    device: str | torch.device | None = None,
    **config_overrides: Any,
) -> DDIMSchedule:
    """DDIM grid for `num_inference_steps` from a scheduler (any SD scheduler: its config is reused, so a
    pipeline's PNDM/Euler scheduler works), a config dict, or None (DDIMScheduler defaults).

    `config_overrides` update the config (e.g. `timestep_spacing="trailing"`, `prediction_type=...`).
    prev_timesteps = timesteps - num_train_timesteps // num_inference_steps, exactly as DDIMScheduler.step.
    """
    from diffusers import DDIMScheduler

    config = _config_of(scheduler_or_config, config_overrides)
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps.long()
    n_train = int(scheduler.config.num_train_timesteps)
    if int(timesteps.max()) >= n_train:
        raise ValueError(
            f"DDIM grid of {num_inference_steps} steps reaches timestep {int(timesteps.max())} >= "
            f"num_train_timesteps={n_train} (timestep_spacing={scheduler.config.timestep_spacing!r}, "
            f"steps_offset={scheduler.config.steps_offset}); use fewer steps or timestep_spacing='trailing'"
        )
    prev = timesteps - n_train // num_inference_steps
    return DDIMSchedule(
        timesteps=timesteps,
        prev_timesteps=prev,
        alphas_cumprod=scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32),
        final_alpha_cumprod=torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32),
        prediction_type=str(scheduler.config.prediction_type),
        num_train_timesteps=n_train,
    )


@dataclass(frozen=True)
class FlowSchedule:
    """Flow grid: step i goes from sigmas[i] to sigmas[i + 1]; sigmas[-1] == 0.

    sigmas: [T + 1] fp32 in [0, 1]. timesteps: [T] fp32, what the network receives (sigma * 1000 in
    diffusers' flow pipelines).
    """

    sigmas: Tensor
    timesteps: Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def flow_schedule(
    scheduler_or_config: Any = None,
    num_inference_steps: int = 28,
    *,
    shift: float | None = None,
    mu: float | None = None,
    spacing: Literal["diffusers", "uniform"] = "diffusers",
    device: str | torch.device | None = None,
) -> FlowSchedule:
    """Sigma grid of a FlowMatchEulerDiscreteScheduler (from a scheduler, a config dict, or None = defaults).

    shift:   overrides the config's `shift` (SD3: 3.0). mu: the resolution-dependent shift, required when the
             config has `use_dynamic_shifting` (FLUX; the pipeline computes it from the image size).
    spacing: "diffusers" = the scheduler's own grid (what SD3's pipeline uses: linspace between the shifted
             training sigma_max and sigma_min, then shifted); "uniform" = linspace(1, 0, T + 1) then shifted
             (the grid of FLUX's pipeline, DanceGRPO and Pref-GRPO), passed as `sigmas=` to set_timesteps.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = _config_of(scheduler_or_config, {} if shift is None else {"shift": shift})
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs: dict[str, Any] = {}
    if mu is not None:
        kwargs["mu"] = mu
    if spacing == "uniform":
        kwargs["sigmas"] = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].tolist()
        scheduler.set_timesteps(device=device, **kwargs)
    elif spacing == "diffusers":
        scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
    else:
        raise ValueError(f"spacing must be 'diffusers' or 'uniform', got {spacing!r}")
    return FlowSchedule(sigmas=scheduler.sigmas.float(), timesteps=scheduler.timesteps.float())
