"""Rollouts of online RL: the stochastic sampler built from a pipeline's scheduler, and sampling that records
every transition's log-probability, with one generator per sample so a sample never depends on its batch.

`sample` arguments are any object with the fields of pref-grpo's `sample:` config section (sampler, num_steps,
eta, noise_level, flow_spacing, resolution, guidance_scale).
"""

from __future__ import annotations

import torch

from imgalign.errors import UserError


def make_sampler(adapter, sample):
    """The stochastic sampler of the rollout, built from the pipeline's own scheduler config."""
    from imgalign.sampling import DDIMSampler, FlowSampler, ddim_schedule, flow_schedule

    method = sample.sampler
    if method == "auto":
        method = "sde" if adapter.is_flow else "ddim"
    if not adapter.is_flow:
        if method != "ddim":
            raise UserError(f"sample.sampler={method!r}: SD-type models use 'ddim' (or 'auto')")
        return DDIMSampler(ddim_schedule(adapter.pipe.scheduler, sample.num_steps), eta=sample.eta)
    if method not in ("sde", "cps", "dance"):
        raise UserError(f"sample.sampler={method!r}: flow models use sde | cps | dance (or 'auto')")
    config = adapter.pipe.scheduler.config
    dynamic = bool(config.get("use_dynamic_shifting"))
    spacing = sample.flow_spacing if sample.flow_spacing != "auto" else ("uniform" if dynamic else "diffusers")
    mu = None
    if dynamic:  # FLUX: the resolution-dependent shift, as the pipeline computes it
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        side = sample.resolution // adapter.pipe.vae_scale_factor // 2
        mu = calculate_shift(side * side, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    schedule = flow_schedule(adapter.pipe.scheduler, sample.num_steps, mu=mu, spacing=spacing)
    return FlowSampler(schedule, method=method, noise_level=sample.noise_level)


def step_dt(sampler, j: torch.Tensor) -> torch.Tensor:
    """Fraction of the trajectory covered by step j [B]: sigma_j - sigma_{j+1} (flow) or (t_j - t_prev_j) / T (DDIM)."""
    s = sampler.schedule
    if hasattr(s, "sigmas"):
        sig = s.sigmas.to(j.device)
        return (sig[j] - sig[j + 1]).float()
    return ((s.timesteps.to(j.device)[j] - s.prev_timesteps.to(j.device)[j]).float() / s.num_train_timesteps)


def make_predict(adapter, model, cond, uncond, guidance_scale: float):
    """predict(x, sampler_timestep) for the sampler: flow samplers hand sigma * 1000, adapters take sigma."""

    def predict(x, t):
        t = t / 1000.0 if adapter.is_flow else t
        return adapter.predict_cfg(model, x, t, cond, uncond, guidance_scale)

    return predict


def latent_shape(adapter, resolution: int) -> tuple[int, int, int]:
    f = adapter.pipe.vae_scale_factor
    return adapter.vae.config.latent_channels, resolution // f, resolution // f


@torch.no_grad()
def rollout(adapter, model, sampler, prompts: list[str], seeds: list[int], sample, dtype,
            sde_window=None, decode: bool = True, noise_seeds: list[int] | None = None):
    """Sample prompts [B] -> (trajectory, images in [-1, 1] or None, cond, uncond).

    seeds: one per sample, for the sampler's step noise; noise_seeds: for the initial noise (default: seeds; equal
    within a group for `same_latent`). Each sample has its own generators, so it does not depend on the batch split.
    """
    from imgalign.sampling import sample_trajectory

    device = adapter.device
    shape = latent_shape(adapter, sample.resolution)
    init = [torch.Generator().manual_seed(s) for s in (noise_seeds or seeds)]
    x_T = torch.stack([torch.randn(shape, generator=g) for g in init]).to(device, dtype)
    step_gens = [torch.Generator(device).manual_seed(s + 1) for s in seeds]
    cond = adapter.encode_prompts(prompts)
    # the pipeline's own unconditional branch (SDXL: zeros when force_zeros_for_empty_prompt, else "")
    uncond = adapter.encode_uncond(len(prompts), cond) if sample.guidance_scale != 1.0 else None
    traj = sample_trajectory(make_predict(adapter, model, cond, uncond, sample.guidance_scale), x_T, sampler,
                             sde_window=sde_window, generator=step_gens)
    images = adapter.decode_latents(traj.sample) if decode else None
    return traj, images, cond, uncond
