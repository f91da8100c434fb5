"""Sampler-step log-probabilities against closed-form Gaussians (torch.distributions.Normal), written from
independent forms of each step's mean and variance; recompute ratio = 1; reduce; per-sample timesteps."""

import math

import pytest
import torch
from torch.distributions import Normal

from imgalign.sampling import (
    ddim_ode_step,
    ddim_schedule,
    ddim_step_with_logprob,
    flow_cps_step_with_logprob,
    flow_dance_step_with_logprob,
    flow_ode_step,
    flow_sde_step_with_logprob,
    gaussian_log_prob,
)

SD_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
    steps_offset=1, clip_sample=False,
)
SHAPE = (3, 4, 5, 6)  # [B, C, H, W]


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _normal_log_prob(x, mean, std):
    """Mean over latent elements of log N(x; mean, std^2) by torch.distributions."""
    lp = Normal(mean.double(), torch.as_tensor(std, dtype=torch.float64)).log_prob(x.double())
    return lp.flatten(1).mean(1)


def _alphas_cumprod():
    return ddim_schedule(SD_CONFIG, 50).alphas_cumprod


# ---------------------------------------------------------------- DDIM ---------------------------------


def test_ddim_eta1_is_the_ddpm_posterior():
    """DDIM(eta=1) from t to t_prev equals the DDPM posterior q(x_prev | x_t, x0_hat):
    mean = sqrt(abar_prev) beta / (1 - abar_t) x0_hat + sqrt(alpha) (1 - abar_prev) / (1 - abar_t) x_t,
    var  = (1 - abar_prev) / (1 - abar_t) beta,   alpha = abar_t / abar_prev, beta = 1 - alpha."""
    ac = _alphas_cumprod().double()
    x_t, eps = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    t, t_prev = 501, 481
    out = ddim_step_with_logprob(eps, x_t, t, t_prev, ac.float(), eta=1.0, generator=torch.Generator().manual_seed(3))

    a_t, a_p = ac[t], ac[t_prev]
    alpha, beta = a_t / a_p, 1 - a_t / a_p
    x0_hat = (x_t.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    mean = a_p.sqrt() * beta / (1 - a_t) * x0_hat + alpha.sqrt() * (1 - a_p) / (1 - a_t) * x_t.double()
    std = ((1 - a_p) / (1 - a_t) * beta).sqrt()

    torch.testing.assert_close(out.mean.double(), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.std.flatten().double(), std.expand(3), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(out.log_prob.double(), _normal_log_prob(out.prev_sample, mean, std), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_parametrisations_agree(prediction_type):
    """The same (x0, eps) expressed as epsilon, v or x0 prediction gives the same step and log-prob."""
    ac = _alphas_cumprod()
    x0, noise = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    t, t_prev = 301, 281
    a = ac[t]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction_type]
    ref = ddim_step_with_logprob(noise, x_t, t, t_prev, ac, eta=0.7, generator=torch.Generator().manual_seed(0))
    out = ddim_step_with_logprob(
        pred, x_t, t, t_prev, ac, eta=0.7, prediction_type=prediction_type, prev_sample=ref.prev_sample
    )
    torch.testing.assert_close(out.mean, ref.mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.log_prob, ref.log_prob, atol=1e-3, rtol=1e-4)


def test_ddim_final_step_uses_final_alpha():
    """t_prev < 0: abar_prev = final_alpha_cumprod. With 1.0 the step lands on x0_hat with std 0 (NaN log-prob)."""
    ac = _alphas_cumprod()
    x_t, eps = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    out = ddim_step_with_logprob(eps, x_t, 1, -19, ac, eta=1.0, final_alpha_cumprod=1.0)
    x0_hat = (x_t - (1 - ac[1]).sqrt() * eps) / ac[1].sqrt()
    torch.testing.assert_close(out.prev_sample, x0_hat)
    assert torch.all(out.std == 0) and torch.isnan(out.log_prob).all()

    out = ddim_step_with_logprob(eps, x_t, 1, -19, ac, eta=1.0, final_alpha_cumprod=ac[0])
    ref = ddim_step_with_logprob(eps, x_t, 1, 0, ac, eta=1.0, prev_sample=out.prev_sample)
    torch.testing.assert_close(out.log_prob, ref.log_prob)
    assert torch.isfinite(out.log_prob).all() and torch.all(out.std > 0)


def test_ddim_ode_step_is_eta0_mean():
    ac = _alphas_cumprod()
    x_t, eps = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    out = ddim_step_with_logprob(eps, x_t, 401, 381, ac, eta=0.0)
    torch.testing.assert_close(ddim_ode_step(eps, x_t, 401, 381, ac), out.prev_sample)
    torch.testing.assert_close(out.prev_sample, out.mean)
    assert torch.isnan(out.log_prob).all()  # a deterministic step has no density


# ---------------------------------------------------------------- flow ---------------------------------


def test_flow_sde_matches_closed_form():
    """Flow-GRPO SDE written in Flow-GRPO's grouping: mean = x (1 + g^2 dt / (2 s)) + v (1 + g^2 (1 - s) / (2 s)) dt,
    g = a sqrt(s / (1 - s)), std = g sqrt(-dt)."""
    x, v = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    s, s_next, a = 0.6, 0.52, 0.7
    out = flow_sde_step_with_logprob(v, x, s, s_next, noise_level=a, generator=torch.Generator().manual_seed(0))
    dt = s_next - s
    g = a * math.sqrt(s / (1 - s))
    mean = x.double() * (1 + g**2 * dt / (2 * s)) + v.double() * (1 + g**2 * (1 - s) / (2 * s)) * dt
    std = g * math.sqrt(-dt)
    torch.testing.assert_close(out.mean.double(), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.std.flatten().double(), torch.full((3,), std, dtype=torch.float64))
    torch.testing.assert_close(out.log_prob.double(), _normal_log_prob(out.prev_sample, mean, std), atol=1e-4, rtol=1e-5)
    # the draw really is mean + std * N(0, 1) noise
    z = (out.prev_sample.double() - mean) / std
    assert abs(z.mean().item()) < 0.2 and abs(z.std().item() - 1) < 0.15


def test_flow_sde_sigma_one_edge():
    """At sigma = 1, g = a sqrt(1 / (1 - sigma_at_one)); sigma_at_one defaults to sigma_next (= sigmas[1])."""
    x, v = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    out = flow_sde_step_with_logprob(v, x, 1.0, 0.9, noise_level=0.7)
    g = 0.7 * math.sqrt(1 / (1 - 0.9))
    torch.testing.assert_close(out.std.flatten(), torch.full((3,), g * math.sqrt(0.1)))
    assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.mean).all()
    explicit = flow_sde_step_with_logprob(v, x, 1.0, 0.9, noise_level=0.7, sigma_at_one=0.8)
    torch.testing.assert_close(explicit.std.flatten(), torch.full((3,), 0.7 * math.sqrt(1 / 0.2) * math.sqrt(0.1)))


def test_flow_sde_equals_dance_with_same_diffusion():
    """DanceGRPO's form (score from x0_hat: -(x - (1 - s) x0_hat) / s^2, mean = x + dt v - dt g^2/2 score) with
    g equal to Flow-GRPO's g gives the Flow-GRPO step: both are the same reverse SDE."""
    x, v = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    s, s_next, a = 0.4, 0.3, 0.9
    g = a * math.sqrt(s / (1 - s))
    sde = flow_sde_step_with_logprob(v, x, s, s_next, noise_level=a, generator=torch.Generator().manual_seed(0))
    dance = flow_dance_step_with_logprob(v, x, s, s_next, eta=g, prev_sample=sde.prev_sample)
    torch.testing.assert_close(dance.mean, sde.mean)
    torch.testing.assert_close(dance.log_prob, sde.log_prob)

    dt = s_next - s
    x0_hat = x.double() - s * v.double()
    score = -(x.double() - (1 - s) * x0_hat) / s**2
    mean = x.double() + dt * v.double() - dt * 0.5 * g**2 * score
    torch.testing.assert_close(dance.mean.double(), mean, atol=1e-5, rtol=1e-5)
    lp = _normal_log_prob(dance.prev_sample, mean, g * math.sqrt(-dt))
    torch.testing.assert_close(dance.log_prob.double(), lp, atol=1e-4, rtol=1e-5)


def test_flow_cps_closed_form_and_log_prob_forms():
    x, v = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    s, s_next, a = 0.7, 0.55, 0.8
    out = flow_cps_step_with_logprob(v, x, s, s_next, noise_level=a, generator=torch.Generator().manual_seed(0))
    std = s_next * math.sin(a * math.pi / 2)
    x0_hat, x1_hat = x.double() - s * v.double(), x.double() + (1 - s) * v.double()
    mean = (1 - s_next) * x0_hat + math.sqrt(s_next**2 - std**2) * x1_hat
    torch.testing.assert_close(out.mean.double(), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.std.flatten().double(), torch.full((3,), std, dtype=torch.float64))
    # default form: Flow-GRPO's "-(x' - mean)^2", constants removed
    torch.testing.assert_close(
        out.log_prob.double(), -((out.prev_sample.double() - mean) ** 2).flatten(1).mean(1), atol=1e-5, rtol=1e-5
    )
    gauss = flow_cps_step_with_logprob(v, x, s, s_next, a, prev_sample=out.prev_sample, log_prob_form="gaussian")
    torch.testing.assert_close(gauss.log_prob.double(), _normal_log_prob(out.prev_sample, mean, std), atol=1e-4, rtol=1e-5)


def test_flow_cps_noise_zero_is_euler_and_last_step_deterministic():
    x, v = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    out = flow_cps_step_with_logprob(v, x, 0.5, 0.4, noise_level=0.0)
    torch.testing.assert_close(out.prev_sample, flow_ode_step(v, x, 0.5, 0.4))
    last = flow_cps_step_with_logprob(v, x, 0.1, 0.0, noise_level=0.8)
    torch.testing.assert_close(last.prev_sample, x - 0.1 * v)  # lands on x0_hat
    assert torch.all(last.log_prob == 0)  # squared-error form: 0, not NaN
    assert torch.isnan(flow_cps_step_with_logprob(v, x, 0.1, 0.0, log_prob_form="gaussian").log_prob).all()


def test_flow_ode_step():
    x, v = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    torch.testing.assert_close(flow_ode_step(v, x, 0.8, 0.75), x - 0.05 * v)


# ----------------------------------------------------- shared properties of every stochastic step --------


def _steps():
    """name -> fn(pred, x_t, prev_sample, generator, reduce, per_sample_time) for every stochastic step."""
    ac = _alphas_cumprod()

    def ddim(pred, x, prev, gen, reduce, t=None):
        t = torch.tensor([901, 501, 21]) if t is None else t
        return ddim_step_with_logprob(pred, x, t, t - 20, ac, 1.0, prev_sample=prev, generator=gen, reduce=reduce)

    def sigmas(t):
        return (torch.tensor([1.0, 0.6, 0.1]), torch.tensor([0.95, 0.5, 0.0])) if t is None else t

    def sde(pred, x, prev, gen, reduce, t=None):
        s, sn = sigmas(t)
        return flow_sde_step_with_logprob(pred, x, s, sn, 0.7, prev_sample=prev, generator=gen, reduce=reduce)

    def dance(pred, x, prev, gen, reduce, t=None):
        s, sn = sigmas(t)
        return flow_dance_step_with_logprob(pred, x, s, sn, 0.3, prev_sample=prev, generator=gen, reduce=reduce)

    def cps(pred, x, prev, gen, reduce, t=None):
        s, sn = sigmas(t)
        sn = sn.clamp(min=0.05)  # keep s > 0 so the Gaussian form is finite
        return flow_cps_step_with_logprob(
            pred, x, s, sn, 0.8, prev_sample=prev, generator=gen, reduce=reduce, log_prob_form="gaussian"
        )

    return {"ddim": ddim, "flow_sde": sde, "flow_dance": dance, "flow_cps": cps}


STEP_NAMES = ["ddim", "flow_sde", "flow_dance", "flow_cps"]


@pytest.mark.parametrize("name", STEP_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_gives_ratio_exactly_one(name, dtype):
    """Scoring the stored transition again (prev_sample=...) reproduces the rollout log-prob bit for bit, also
    when latents are bf16 (the sample is cast before it is scored), so exp(new - old) == 1 before any update."""
    step = _steps()[name]
    x, pred = _rand(*SHAPE, seed=1, dtype=dtype), _rand(*SHAPE, seed=2, dtype=dtype)
    rollout = step(pred, x, None, torch.Generator().manual_seed(0), "mean")
    assert rollout.prev_sample.dtype == dtype and rollout.log_prob.dtype == torch.float32
    recompute = step(pred, x, rollout.prev_sample, None, "mean")
    assert torch.equal(recompute.log_prob, rollout.log_prob)
    assert torch.equal(torch.exp(recompute.log_prob - rollout.log_prob), torch.ones(3))
    assert torch.isfinite(rollout.log_prob).all()


@pytest.mark.parametrize("name", STEP_NAMES)
def test_reduce_mean_sum_none(name):
    step = _steps()[name]
    x, pred = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    ref = step(pred, x, None, torch.Generator().manual_seed(0), "mean")
    per_element = step(pred, x, ref.prev_sample, None, "none").log_prob
    summed = step(pred, x, ref.prev_sample, None, "sum").log_prob
    n = 4 * 5 * 6
    assert per_element.shape == SHAPE and summed.shape == (3,)
    torch.testing.assert_close(summed, ref.log_prob * n, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(per_element.flatten(1).mean(1), ref.log_prob)
    with pytest.raises(ValueError, match="reduce"):
        step(pred, x, ref.prev_sample, None, "max")


@pytest.mark.parametrize("name", STEP_NAMES)
def test_per_sample_timesteps_equal_single_sample_steps(name):
    """A batch with one timestep per sample equals stepping each sample alone at its own timestep."""
    step = _steps()[name]
    x, pred = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    batch = step(pred, x, None, torch.Generator().manual_seed(0), "mean")
    for b in range(3):
        if name == "ddim":
            t = torch.tensor([901, 501, 21])[b : b + 1]
        else:
            t = (torch.tensor([1.0, 0.6, 0.1])[b : b + 1], torch.tensor([0.95, 0.5, 0.0])[b : b + 1])
        single = step(pred[b : b + 1], x[b : b + 1], batch.prev_sample[b : b + 1], None, "mean", t)
        torch.testing.assert_close(single.mean, batch.mean[b : b + 1])
        torch.testing.assert_close(single.log_prob, batch.log_prob[b : b + 1])


def test_per_sample_generators():
    """A list of generators gives each sample the noise it would get alone (batch-composition independent)."""
    x, v = _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2)
    gens = [torch.Generator().manual_seed(10 + b) for b in range(3)]
    batch = flow_sde_step_with_logprob(v, x, 0.5, 0.4, generator=gens)
    alone = flow_sde_step_with_logprob(v[1:2], x[1:2], 0.5, 0.4, generator=[torch.Generator().manual_seed(11)])
    torch.testing.assert_close(batch.prev_sample[1:2], alone.prev_sample)


def test_gaussian_log_prob_matches_normal():
    x, mean = _rand(2, 7, seed=1), _rand(2, 7, seed=2)
    std = torch.tensor([0.3, 2.0]).reshape(2, 1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std).double(), _normal_log_prob(x, mean, std), atol=1e-5, rtol=1e-6)
