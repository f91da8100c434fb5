"""Our deterministic steps and grids equal diffusers' schedulers (DDIMScheduler, FlowMatchEulerDiscreteScheduler)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler

from imgalign.sampling import (
    DDIMSampler,
    FlowSampler,
    ddim_ode_step,
    ddim_schedule,
    ddim_step_with_logprob,
    flow_ode_step,
    flow_schedule,
)

SD_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
    steps_offset=1, clip_sample=False,
)


def _latents(seed):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_equals_diffusers_over_a_full_grid(prediction_type, eta):
    """Every step of a 10-step grid, fed the same inputs: eta = 0 equals DDIMScheduler.step exactly up to fp32
    rounding; eta = 1 too when both draw their noise from the same seeded generator."""
    scheduler = DDIMScheduler(**SD_CONFIG, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    schedule = ddim_schedule(scheduler, 10)
    assert torch.equal(schedule.timesteps, scheduler.timesteps)
    x = _latents(0)
    for j, t in enumerate(scheduler.timesteps):
        pred = _latents(100 + j)
        theirs = scheduler.step(pred, t, x, eta=eta, generator=torch.Generator().manual_seed(j)).prev_sample
        ours = ddim_step_with_logprob(
            pred, x, t, schedule.prev_timesteps[j], schedule.alphas_cumprod, eta=eta,
            prediction_type=prediction_type, final_alpha_cumprod=schedule.final_alpha_cumprod,
            generator=torch.Generator().manual_seed(j),
        )
        torch.testing.assert_close(ours.prev_sample, theirs, atol=1e-5, rtol=1e-5)
        if eta == 0:
            ode = ddim_ode_step(
                pred, x, t, schedule.prev_timesteps[j], schedule.alphas_cumprod, prediction_type,
                schedule.final_alpha_cumprod,
            )
            torch.testing.assert_close(ode, theirs, atol=1e-5, rtol=1e-5)
        x = theirs


def test_ddim_clip_sample_equals_diffusers():
    scheduler = DDIMScheduler(**{**SD_CONFIG, "clip_sample": True, "clip_sample_range": 0.5})
    scheduler.set_timesteps(10)
    schedule = ddim_schedule(scheduler, 10)
    x, pred = _latents(0) * 3, _latents(1)
    t = scheduler.timesteps[4]
    theirs = scheduler.step(pred, t, x, eta=0.0).prev_sample
    ours = ddim_ode_step(pred, x, t, schedule.prev_timesteps[4], schedule.alphas_cumprod, clip_sample_range=0.5)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_ddim_schedule_from_pipeline_scheduler_config():
    """A pipeline's PNDM scheduler config gives the DDIM grid DDIMScheduler.from_config would; overrides apply."""
    pndm = PNDMScheduler(**{k: v for k, v in SD_CONFIG.items() if k != "clip_sample"}, prediction_type="v_prediction")
    schedule = ddim_schedule(pndm, 20)
    reference = DDIMScheduler.from_config(pndm.config)
    reference.set_timesteps(20)
    assert torch.equal(schedule.timesteps, reference.timesteps)
    assert torch.equal(schedule.prev_timesteps, reference.timesteps - 1000 // 20)
    assert schedule.prediction_type == "v_prediction" and schedule.num_steps == 20
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod)
    torch.testing.assert_close(schedule.final_alpha_cumprod, reference.alphas_cumprod[0])  # set_alpha_to_one=False
    trailing = ddim_schedule(pndm, 20, timestep_spacing="trailing")
    assert int(trailing.timesteps[0]) == 999
    with pytest.raises(ValueError, match="num_train_timesteps"):
        ddim_schedule(SD_CONFIG, 1000)  # 'leading' + steps_offset=1 would index timestep 1000


@pytest.mark.parametrize("spacing", ["diffusers", "uniform"])
def test_flow_ode_equals_flow_match_euler_over_a_full_grid(spacing):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    if spacing == "uniform":
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, 9)[:-1].tolist())
    else:
        scheduler.set_timesteps(8)
    schedule = flow_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), 8, spacing=spacing)
    torch.testing.assert_close(schedule.sigmas, scheduler.sigmas)
    torch.testing.assert_close(schedule.timesteps, scheduler.timesteps)
    assert schedule.sigmas[0] == 1.0 and schedule.sigmas[-1] == 0.0 and schedule.num_steps == 8

    sampler = FlowSampler(schedule, method="ode")
    x = _latents(0)
    for j, t in enumerate(scheduler.timesteps):
        v = _latents(100 + j)
        theirs = scheduler.step(v, t, x).prev_sample
        ours = flow_ode_step(v, x, schedule.sigmas[j], schedule.sigmas[j + 1])
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sampler.step(j, v, x).prev_sample, theirs, atol=1e-6, rtol=1e-6)
        x = theirs


def test_flow_schedule_shift_override_and_dynamic_shifting():
    base = flow_schedule(None, 10)  # shift 1
    torch.testing.assert_close(base.timesteps, base.sigmas[:-1] * 1000)
    shifted = flow_schedule(None, 10, shift=3.0)
    assert torch.all(shifted.sigmas[1:-1] > base.sigmas[1:-1])  # shift > 1 spends more steps at high noise
    flux_config = dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15).config)
    with pytest.raises(ValueError, match="mu"):
        flow_schedule(flux_config, 10, spacing="uniform")
    flux = flow_schedule(flux_config, 10, mu=1.15, spacing="uniform")
    reference = FlowMatchEulerDiscreteScheduler.from_config(flux_config)
    reference.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10).tolist(), mu=1.15)
    torch.testing.assert_close(flux.sigmas, reference.sigmas)


def test_samplers_index_per_sample():
    """Sampler.step with per-sample step indices [B] equals per-sample calls at int indices."""
    ddim = DDIMSampler(ddim_schedule(SD_CONFIG, 10), eta=1.0)
    flow = FlowSampler(flow_schedule(None, 10, shift=3.0), method="sde")
    x, pred = _latents(0), _latents(1)
    j = torch.tensor([0, 7])
    for sampler in (ddim, flow):
        batch = sampler.step(j, pred, x, generator=torch.Generator().manual_seed(0))
        for b in range(2):
            alone = sampler.step(int(j[b]), pred[b : b + 1], x[b : b + 1], prev_sample=batch.prev_sample[b : b + 1])
            torch.testing.assert_close(alone.log_prob, batch.log_prob[b : b + 1])
        torch.testing.assert_close(sampler.timestep(j), sampler.timestep(0).new_tensor([sampler.timestep(0), sampler.timestep(7)]))
