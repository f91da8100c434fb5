"""sample_trajectory / Trajectory: shapes, recorded transitions re-score to ratio 1, SDE window, options."""

import pytest
import torch

from imgalign.sampling import (
    DDIMSampler,
    FlowSampler,
    ddim_schedule,
    flow_ode_step,
    flow_schedule,
    sample_sde_window,
    sample_trajectory,
)

SD_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
    steps_offset=1, clip_sample=False,
)
B, T = 3, 6


class TinyModel(torch.nn.Module):
    """A stand-in network: predict(x [B, C, H, W], timestep [B]) -> [B, C, H, W]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, timestep):
        return 0.3 * self.conv(x) + 0.5 * x + timestep.float().reshape(-1, 1, 1, 1) / 1000


def _samplers():
    return {
        "ddim": DDIMSampler(ddim_schedule(SD_CONFIG, T), eta=1.0),
        "sde": FlowSampler(flow_schedule(None, T, shift=3.0), method="sde"),
        "cps": FlowSampler(flow_schedule(None, T, shift=3.0), method="cps"),
        "dance": FlowSampler(flow_schedule(None, T, shift=3.0), method="dance"),
    }


def _noise(seed=0):
    return torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["ddim", "sde", "cps", "dance"])
def test_trajectory_shapes_and_stored_transitions_rescore_to_ratio_one(name):
    sampler, model = _samplers()[name], TinyModel()
    x_T = _noise()
    traj = sample_trajectory(model, x_T, sampler, generator=torch.Generator().manual_seed(1))
    assert traj.latents.shape == (B, T + 1, 4, 8, 8) and traj.means.shape == (B, T, 4, 8, 8)
    assert traj.log_probs.shape == traj.stds.shape == traj.timesteps.shape == (B, T)
    assert torch.equal(traj.latents[:, 0], x_T) and torch.equal(traj.latents[:, -1], traj.sample)
    assert traj.stochastic.all() and torch.equal(traj.stochastic_steps(), torch.arange(T))
    assert torch.isfinite(traj.log_probs).all()
    torch.testing.assert_close(traj.timesteps[0], sampler.timestep(torch.arange(T)).to(traj.timesteps.dtype))

    # training-time recompute, one random step per sample (DDPO / DanceGRPO permute steps per sample)
    for j in (torch.tensor([0, 3, 5]), torch.tensor([5, 1, 2]), 4):
        tr = traj.transition(j)
        with torch.no_grad():
            out = sampler.step(tr.step_index, model(tr.x_t, tr.timestep), tr.x_t, prev_sample=tr.prev_sample)
        assert torch.equal(out.log_prob, tr.log_prob)
        assert torch.equal(torch.exp(out.log_prob - tr.log_prob), torch.ones(B))
        torch.testing.assert_close(out.mean, tr.mean, rtol=0, atol=0)


def test_sde_window():
    """Steps in [start, end) are SDE steps; the others are Euler ODE steps with log_prob NaN and std 0."""
    sampler, model = _samplers()["sde"], TinyModel()
    traj = sample_trajectory(model, _noise(), sampler, sde_window=(2, 4), generator=torch.Generator().manual_seed(1))
    assert traj.stochastic.tolist() == [False, False, True, True, False, False]
    assert torch.equal(traj.stochastic_steps(), torch.tensor([2, 3]))
    assert torch.isfinite(traj.log_probs[:, 2:4]).all() and torch.all(traj.stds[:, 2:4] > 0)
    assert torch.isnan(traj.log_probs[:, [0, 1, 4, 5]]).all() and torch.all(traj.stds[:, [0, 1, 4, 5]] == 0)
    sigmas = sampler.schedule.sigmas
    for j in (0, 1, 4, 5):
        x = traj.latents[:, j]
        with torch.no_grad():
            expected = flow_ode_step(model(x, sampler.timestep(j).expand(B)), x, sigmas[j], sigmas[j + 1])
        torch.testing.assert_close(traj.latents[:, j + 1], expected)
    assert torch.isfinite(torch.nansum(traj.log_probs, dim=1)).all()
    with pytest.raises(ValueError, match="sde_window"):
        sample_trajectory(model, _noise(), sampler, sde_window=(3, T + 1))


def test_ddim_window_uses_eta0():
    sampler, model = _samplers()["ddim"], TinyModel()
    gen = torch.Generator().manual_seed(1)
    windowed = sample_trajectory(model, _noise(), sampler, sde_window=(0, 0), generator=gen)
    deterministic = sample_trajectory(model, _noise(), DDIMSampler(sampler.schedule, eta=0.0))
    torch.testing.assert_close(windowed.sample, deterministic.sample)
    assert torch.isnan(windowed.log_probs).all() and not windowed.stochastic.any()


def test_seeded_reproducible_record_false_and_callback():
    sampler, model = _samplers()["sde"], TinyModel()
    calls = []
    full = sample_trajectory(
        model, _noise(), sampler, generator=torch.Generator().manual_seed(7),
        callback=lambda j, n, x: calls.append((j, n, tuple(x.shape))),
    )
    light = sample_trajectory(model, _noise(), sampler, generator=torch.Generator().manual_seed(7), record=False)
    assert calls == [(j, T, (B, 4, 8, 8)) for j in range(T)]
    assert light.latents is None and light.means is None
    assert torch.equal(light.sample, full.sample) and torch.equal(light.log_probs, full.log_probs)
    with pytest.raises(ValueError, match="record=False"):
        light.transition(0)
    other_seed = sample_trajectory(model, _noise(), sampler, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(other_seed.sample, full.sample)


def test_grad_only_when_enabled():
    sampler, model = _samplers()["sde"], TinyModel()
    traj = sample_trajectory(model, _noise(), sampler, generator=torch.Generator().manual_seed(1))
    assert not traj.sample.requires_grad
    traj = sample_trajectory(model, _noise(), sampler, generator=torch.Generator().manual_seed(1), enable_grad=True)
    traj.sample.square().mean().backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0


def test_bf16_latents_keep_ratio_one():
    sampler, model = _samplers()["sde"], TinyModel().to(torch.bfloat16)
    traj = sample_trajectory(model, _noise().bfloat16(), sampler, generator=torch.Generator().manual_seed(1))
    assert traj.latents.dtype == torch.bfloat16 and traj.log_probs.dtype == torch.float32
    tr = traj.transition(torch.tensor([1, 2, 3]))
    with torch.no_grad():
        out = sampler.step(tr.step_index, model(tr.x_t, tr.timestep), tr.x_t, prev_sample=tr.prev_sample)
    assert torch.equal(out.log_prob, tr.log_prob)


def test_sample_sde_window():
    gen = torch.Generator().manual_seed(0)
    windows = {sample_sde_window(2, (0, 5), generator=gen) for _ in range(200)}
    assert windows == {(0, 2), (1, 3), (2, 4), (3, 5)}
    with pytest.raises(ValueError, match="does not fit"):
        sample_sde_window(6, (0, 5))
