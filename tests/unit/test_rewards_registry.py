"""Registry, specs, weighted combinations, Bradley-Terry compare and group win rates, on tiny fake rewards."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from imgalign.rewards import (
    Reward,
    RewardSpec,
    WeightedReward,
    available_rewards,
    build_reward,
    build_rewards,
    register_reward,
    win_rates_from_scores,
)
from imgalign.rewards.group import group_win_rates


class Brightness(Reward):
    """score = scale * mean pixel value; counts how many images it has encoded."""

    name = "brightness"
    differentiable = True
    needs_prompts = False

    def __init__(self, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
        self.encoded = 0

    def _score(self, images, prompts, **kwargs):
        self.encoded += images.shape[0]
        return self.scale * images.mean(dim=(1, 2, 3))


class PromptLength(Reward):
    name = "prompt_length"

    def _score(self, images, prompts, **kwargs):
        return torch.tensor([float(len(p)) for p in prompts])


register_reward("brightness", Brightness)
register_reward("prompt_length", PromptLength)


def _grey(*levels):
    return torch.stack([torch.full((3, 4, 4), float(v)) for v in levels])


def test_spec_parsing():
    assert RewardSpec.parse("pickscore") == RewardSpec("pickscore", 1.0, {})
    assert RewardSpec.parse("hpsv2.1:0.5") == RewardSpec("hpsv2.1", 0.5, {})
    assert RewardSpec.parse(" aesthetic:-2e-1 ").weight == -0.2
    spec = RewardSpec.from_config({"name": "clip", "weight": 2, "kwargs": {"model": "/m"}})
    assert (spec.name, spec.weight, spec.kwargs) == ("clip", 2.0, {"model": "/m"})
    assert str(spec) == "clip:2"
    with pytest.raises(ValueError, match="not a number"):
        RewardSpec.parse("clip:heavy")
    with pytest.raises(ValueError, match="unknown keys"):
        RewardSpec.from_config({"name": "clip", "wieght": 1})


def test_registry_lists_builtins_and_suggests_names():
    names = available_rewards()
    for name in ("clip", "pickscore", "hpsv2", "hpsv2.1", "aesthetic", "imagereward", "dino", "vlm_judge",
                 "compressibility", "incompressibility", "toy", "lambda_harmonic", "clip_image", "toy_clip"):
        assert name in names
    with pytest.raises(KeyError, match="Did you mean 'pickscore'"):
        build_reward("pickscor")
    reward = build_reward("brightness", scale=2.0)
    assert reward.name == "brightness" and reward.scale == 2.0


def test_importing_the_package_is_lazy():
    """Building the registry must not import open_clip or transformers (heavy) until a reward needs them."""
    code = ("import sys, imgalign.rewards as r; r.available_rewards(); r.RewardSpec.parse('clip:1'); "
            "print('open_clip' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_bradley_terry_compare_from_scores():
    reward = Brightness(scale=10.0)
    a, b = _grey(0.6, 0.5), _grey(0.5, 0.6)
    p = reward.compare(a, b)
    # s_a - s_b = 10 * (0.6 - 0.5) = 1 -> sigmoid(1) = 0.7311; then the reverse
    assert torch.allclose(p, torch.tensor([0.7311, 0.2689]), atol=1e-4)
    reward.compare_scale = 2.0
    assert torch.allclose(reward.compare(a, b)[0], torch.sigmoid(torch.tensor(2.0)))


def test_prompts_are_broadcast_and_checked():
    reward = PromptLength()
    assert reward.score(_grey(0, 0), "abc").tolist() == [3.0, 3.0]
    assert reward.score(_grey(0, 0), ["a", "abcd"]).tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        reward.score(_grey(0, 0), ["a", "b", "c"])
    with pytest.raises(ValueError, match="needs a prompt"):
        reward.score(_grey(0))


def test_batching_and_gradient_policy():
    reward = Brightness(batch_size=2)
    x = torch.rand(5, 3, 4, 4)
    assert torch.allclose(reward.score(x), x.mean(dim=(1, 2, 3)))
    assert not reward.score(x).requires_grad  # no grad unless the input asks for it
    leaf = x.clone().requires_grad_(True)
    reward.score(leaf).sum().backward()
    assert torch.allclose(leaf.grad, torch.full_like(x, 1 / 48))


def test_weighted_reward_hand_computed():
    """total = 2 * brightness + 0.5 * prompt_length, per image."""
    combo = WeightedReward([Brightness(), PromptLength()], [2.0, 0.5])
    parts = combo.score_components(_grey(0.25, 0.5), ["ab", "abcd"])
    assert parts["brightness"].tolist() == [0.25, 0.5] and parts["prompt_length"].tolist() == [2.0, 4.0]
    assert parts["total"].tolist() == [2 * 0.25 + 1.0, 2 * 0.5 + 2.0]
    assert combo.name == "brightness:2+prompt_length:0.5"
    assert not combo.differentiable  # prompt_length is not
    assert combo.compare(_grey(0.5), _grey(0.25), "ab").item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item())
    z = WeightedReward([Brightness(), Brightness()], [1.0, 1.0], normalize="batch").score(_grey(0.0, 1.0))
    assert torch.allclose(z, torch.tensor([-1.4142, 1.4142]), atol=1e-4)
    built = build_rewards(["brightness:2", "prompt_length:0.5"])
    assert isinstance(built, WeightedReward) and built.weights == [2.0, 0.5]
    assert isinstance(build_rewards("brightness"), Brightness)


def test_group_win_rates_cost_g_encodings():
    """Win rates in a group of G from a pointwise reward: G encodings, all pairs from the scores."""
    reward = Brightness(scale=1.0)
    group = _grey(0.1, 0.9, 0.5, 0.5)
    hard = group_win_rates(reward, group, hard=True)
    assert reward.encoded == 4
    # 0.9 beats all three; 0.1 beats none; the two 0.5s beat 0.1, lose to 0.9 and tie each other
    assert hard.tolist() == [0.0, 1.0, 0.5, 0.5]
    soft = reward.group_win_rates(group)
    s = torch.tensor([0.1, 0.9, 0.5, 0.5])
    expected = torch.stack([torch.sigmoid(s[i] - s[[j for j in range(4) if j != i]]).mean() for i in range(4)])
    assert torch.allclose(soft, expected)
    assert soft.mean().item() == pytest.approx(0.5)
    assert win_rates_from_scores(torch.tensor([3.0])).tolist() == [0.5]


def test_spec_weights_must_be_finite():
    from imgalign.errors import UserError

    for text in ("clip:nan", "clip:inf", "clip:-inf"):
        with pytest.raises(UserError, match="not a finite number"):
            RewardSpec.parse(text)
    with pytest.raises(ValueError, match="not a finite number"):
        RewardSpec.from_config({"name": "clip", "weight": float("nan")})


def test_unknown_reward_argument_named_with_the_valid_ones():
    from imgalign.errors import UserError
    from imgalign.rewards.registry import RewardArgumentError, reward_arguments

    with pytest.raises(RewardArgumentError, match=r"reward 'compressibility' has no argument 'qualty' \(did you mean "
                                                  r"'quality'\?\); its arguments are: batch_size, .*quality") as e:
        build_reward("compressibility", qualty=80)
    assert isinstance(e.value, TypeError) and isinstance(e.value, UserError)  # TypeError is what it was before
    # **kwargs is followed into the base classes and into the class a factory function returns
    assert {"criterion", "device", "batch_size"} <= set(reward_arguments("toy"))
    assert {"model", "scale", "device"} <= set(reward_arguments("toy_clip"))
    assert {"version", "checkpoint", "device"} <= set(reward_arguments("hpsv2.1"))
