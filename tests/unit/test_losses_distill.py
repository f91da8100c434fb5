"""DMD / DMD2 / Flash-DMD core (imgalign.losses.distill): hand-computed values, gradients, limits and a sign test on a
1-D Gaussian where both scores are exact."""

import math

import pytest
import torch

from imgalign.losses.distill import (
    dm_gradient,
    dm_surrogate_loss,
    gan_critic_loss,
    gan_generator_loss,
    reward_hinge_loss,
    student_timesteps,
    timestep_split,
)
from imgalign.sampling.noise import to_x0_eps


def test_dm_gradient_by_hand_and_its_limits():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    real = torch.tensor([[0.0, 1.0], [1.0, -1.0]]).reshape(2, 1, 1, 2)
    fake = torch.tensor([[2.0, 2.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    g = dm_gradient(x, real, fake)
    # sample 0: p_real = [1, 1], p_fake = [-1, 0], mean|p_real| = 1 -> g = [2, 1]
    # sample 1: p_real = [-1, 1], p_fake = [0, 0], mean|p_real| = 1 -> g = [-1, 1]
    torch.testing.assert_close(g.reshape(2, 2), torch.tensor([[2.0, 1.0], [-1.0, 1.0]]))
    assert torch.equal(dm_gradient(x, real, real), torch.zeros_like(x))  # fake == real: nothing to match
    # scale invariance of the direction: the normaliser is DMD's w_t
    torch.testing.assert_close(dm_gradient(3 * x, 3 * real, 3 * fake), g)
    # x == x0_real makes the normaliser 0: the reference's nan_to_num gives 0, never NaN
    assert torch.isfinite(dm_gradient(real, real, fake)).all()


def test_surrogate_gradient_is_the_dm_direction():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 2, requires_grad=True)
    g = torch.randn(3, 4, 2, 2)
    loss = dm_surrogate_loss(x, g)
    torch.testing.assert_close(loss, 0.5 * g.pow(2).flatten(1).mean(1))
    loss.sum().backward()
    torch.testing.assert_close(x.grad, g / 16)  # d/dx of 0.5 mean((x - sg(x - g))^2) = g / numel per sample


def _exact_prediction(mu, x_t, alpha, sigma, prediction_type):
    """The exact denoiser of N(mu, 1) data at x_t = alpha x0 + sigma eps, in the family's parameterisation."""
    x0 = mu + alpha * (x_t - alpha * mu) / (alpha**2 + sigma**2)
    e = (x_t - alpha * x0) / sigma
    return {"epsilon": e, "v_prediction": alpha * e - sigma * x0, "flow": e - x0}[prediction_type]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_dm_step_moves_a_gaussian_toward_the_real_one(prediction_type):
    """Real data N(0, 1), fake (student) samples N(2, 1); both posterior means are exact:
    E[x0 | x_t] = mu + a (x_t - a mu) / (a^2 + s^2) for unit-variance data. The DM direction, passed through each
    family's prediction and to_x0_eps, is positive on average, so descent moves the samples toward 0, and a few
    steps shrink the gap."""
    torch.manual_seed(1)
    x = 2 + torch.randn(512, 1, 4, 4)  # 16 i.i.d. dimensions per sample (the normaliser averages them)
    for _ in range(20):
        sigma = torch.rand(x.shape[0], 1, 1, 1) * 0.9 + 0.05
        alpha = 1 - sigma if prediction_type == "flow" else (1 - sigma**2).sqrt()
        eps = torch.randn_like(x)
        x_t = alpha * x + sigma * eps

        real = to_x0_eps(_exact_prediction(0.0, x_t, alpha, sigma, prediction_type), x_t, alpha, sigma,
                         prediction_type)[0]
        fake = to_x0_eps(_exact_prediction(float(x.mean()), x_t, alpha, sigma, prediction_type), x_t, alpha, sigma,
                         prediction_type)[0]
        g = dm_gradient(x, real, fake)
        assert float(g.mean()) > 0
        x = x - 0.05 * g
    assert 0 < float(x.mean()) < 1.5


def test_gan_losses_by_hand():
    real, fake = torch.tensor([[2.0], [0.0]]), torch.tensor([[-1.0], [0.0]])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    torch.testing.assert_close(gan_critic_loss(real, fake), torch.tensor([sp(-1.0) + sp(-2.0), 2 * math.log(2)]))
    torch.testing.assert_close(gan_generator_loss(fake), torch.tensor([sp(1.0), math.log(2)]))
    logits = torch.zeros(1, requires_grad=True)
    gan_generator_loss(logits.reshape(1, 1)).sum().backward()
    assert float(logits.grad) < 0  # the generator raises the critic's logit on its samples


def test_timestep_split_and_student_schedules():
    dm, adv = timestep_split(torch.tensor([999, 749, 499, 249]), 500)
    assert dm.tolist() == [True, True, False, False] and adv.tolist() == [False, False, True, True]
    assert student_timesteps(4).tolist() == [999, 749, 499, 249]  # DMD2's 4-step list
    assert student_timesteps(1).tolist() == [999]
    flow = student_timesteps(4, shift=3.0)
    u = torch.tensor([1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(flow, 3 * u / (1 + 2 * u))
    torch.testing.assert_close(student_timesteps(4, shift=1.0), u)  # no shift: the uniform sigmas
    with pytest.raises(ValueError):
        student_timesteps(0)


def test_reward_hinge():
    scores = {"clip": torch.tensor([0.5, 0.9]), "hps": torch.tensor([0.75, 0.6])}
    loss = reward_hinge_loss(scores, {"clip": 0.7, "hps": 0.7}, {"clip": 0.3, "hps": 0.3})
    torch.testing.assert_close(loss, torch.tensor([0.3 * 0.2, 0.3 * 0.1]))
    with pytest.raises(ValueError, match="hps"):
        reward_hinge_loss({"clip": scores["clip"]}, {"clip": 0.7}, {"clip": 0.3, "hps": 0.3})
