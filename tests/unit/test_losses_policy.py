"""Policy losses of online RL (imgalign.losses.policy), with values computed by hand in each docstring."""

import json
import math

import pytest
import torch

from imgalign.losses.policy import (
    PromptStatTracker,
    clipped_surrogate,
    combine_advantages,
    gaussian_mean_kl,
    group_advantages,
    preference_matrix,
    ratio_norm_log_ratio,
    win_rates,
    zero_std_groups,
)

close = dict(atol=1e-5, rtol=0)


def test_group_advantages_group_and_global_std():
    """rewards [1, 3 | 2, 6], groups [0, 0 | 1, 1]. Group means 2 and 4.
    group std (n):     1 and 2           -> A = [-1, 1, -1, 1]
    group std (n - 1): sqrt 2, sqrt 8    -> A = [-0.707107, 0.707107, -0.707107, 0.707107]
    global std (n):    mean 3, var (4 + 0 + 1 + 9) / 4 = 3.5, std 1.870829
                       -> A = [-1, 1, -2, 2] / 1.870829 = [-0.534522, 0.534522, -1.069045, 1.069045]"""
    r, g = torch.tensor([1.0, 3.0, 2.0, 6.0]), torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(group_advantages(r, g, eps=0.0), torch.tensor([-1.0, 1.0, -1.0, 1.0]), **close)
    torch.testing.assert_close(group_advantages(r, g, eps=0.0, unbiased=True),
                               torch.tensor([-0.707107, 0.707107, -0.707107, 0.707107]), **close)
    torch.testing.assert_close(group_advantages(r, g, std="global", eps=0.0),
                               torch.tensor([-0.534522, 0.534522, -1.069045, 1.069045]), **close)
    # group labels need not be contiguous or sorted; eps keeps a zero-std group at exactly 0
    a = group_advantages(torch.tensor([5.0, 2.0, 5.0, 4.0]), torch.tensor([7, 3, 7, 3]), eps=1e-4)
    torch.testing.assert_close(a, torch.tensor([0.0, -1 / 1.0001, 0.0, 1 / 1.0001]), **close)
    with pytest.raises(ValueError, match="'group' or 'global'"):
        group_advantages(r, g, std="batch")


def test_several_rewards_normalised_then_weighted_vs_weighted_then_normalised():
    """One group of 3, r1 = [0, 1, 2], r2 = [0, 0, 3], weights [1, 1], population std.
    normalize_then_weight (Pref-GRPO): A1 = [-1, 0, 1] / sqrt(2/3) = [-1.224745, 0, 1.224745];
        A2 = ([0, 0, 3] - 1) / sqrt 2 = [-0.707107, -0.707107, 1.414214]; A = [-1.931852, -0.707107, 2.638958]
    weight_then_normalize (Flow-GRPO): s = [0, 1, 5], mean 2, std sqrt(14/3) = 2.160247
        -> A = [-0.925820, -0.462910, 1.388730]"""
    r = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    g = torch.zeros(3, dtype=torch.long)
    a = combine_advantages(r, [1.0, 1.0], g, order="normalize_then_weight", eps=0.0)
    torch.testing.assert_close(a, torch.tensor([-1.931852, -0.707107, 2.638958]), **close)
    b = combine_advantages(r, [1.0, 1.0], g, order="weight_then_normalize", eps=0.0)
    torch.testing.assert_close(b, torch.tensor([-0.925820, -0.462910, 1.388730]), **close)
    # weights scale the normalised parts: w = [2, 0] gives twice A1
    torch.testing.assert_close(combine_advantages(r, [2.0, 0.0], g, eps=0.0),
                               torch.tensor([-2.449490, 0.0, 2.449490]), **close)
    with pytest.raises(ValueError, match="weights"):
        combine_advantages(r, [1.0], g)


def test_zero_std_groups_need_every_reward_constant():
    """groups [0, 0 | 1, 1]: r1 = [1, 1 | 2, 3] is constant in group 0 only -> [T, T, F, F];
    adding r2 = [4, 5 | 0, 0] makes group 0 informative (r2 differs) and group 1 too (r1 differs) -> all F."""
    g = torch.tensor([0, 0, 1, 1])
    r1 = torch.tensor([1.0, 1.0, 2.0, 3.0])
    assert zero_std_groups(r1, g).tolist() == [True, True, False, False]
    assert zero_std_groups(torch.stack([r1, torch.tensor([4.0, 5.0, 0.0, 0.0])]), g).tolist() == [False] * 4
    assert zero_std_groups(torch.stack([r1, torch.tensor([4.0, 4.0, 0.0, 0.0])]), g).tolist() == [True, True, False, False]


def test_win_rates_of_a_known_comparison_matrix():
    """G = 3, pairs (0,1), (0,2), (1,2) judged P(first) = [0.8, 0.5, 0.3]:
    P = [[0, .8, .5], [.2, 0, .3], [.5, .7, 0]].
    soft: w0 = (0.8 + 0.5)/2 = 0.65, w1 = (0.2 + 0.3)/2 = 0.25, w2 = (0.5 + 0.7)/2 = 0.6
    hard (win 1, tie 1/2): w0 = (1 + 0.5)/2 = 0.75, w1 = (0 + 0)/2 = 0, w2 = (0.5 + 1)/2 = 0.75. Both average 0.5."""
    pairs = [(0, 1), (0, 2), (1, 2)]
    m = preference_matrix(3, pairs, torch.tensor([0.8, 0.5, 0.3]))
    torch.testing.assert_close(m, torch.tensor([[0.0, 0.8, 0.5], [0.2, 0.0, 0.3], [0.5, 0.7, 0.0]]), **close)
    torch.testing.assert_close(win_rates(m), torch.tensor([0.65, 0.25, 0.6]), **close)
    torch.testing.assert_close(win_rates(m, hard=True), torch.tensor([0.75, 0.0, 0.75]), **close)
    assert win_rates(m).mean().item() == pytest.approx(0.5)
    # a failed judgement (NaN) is a tie: (0,2) failing with verdicts 1 and 0 elsewhere gives [0.75, 0, 0.75]
    failed = preference_matrix(3, pairs, torch.tensor([1.0, math.nan, 0.0]))
    torch.testing.assert_close(win_rates(failed, hard=True), torch.tensor([0.75, 0.0, 0.75]), **close)
    # a group of one has nothing to beat
    assert win_rates(torch.zeros(1, 1)).tolist() == [0.5]


def test_order_swap_cancels_position_bias():
    """A judge that always prefers the first image says P = 1 in both orders: (1 + 1 - 1)/2 = 0.5 for every pair,
    so every win rate is 0.5. An unbiased judge with P(0 over 1) = 0.9 shown as (0,1) and 0.3 shown as (1,0):
    P[0,1] = (0.9 + 1 - 0.3)/2 = 0.8."""
    pairs = [(0, 1), (0, 2), (1, 2)]
    biased = preference_matrix(3, pairs, torch.ones(3), swapped_probs=torch.ones(3))
    torch.testing.assert_close(win_rates(biased), torch.full((3,), 0.5), **close)
    m = preference_matrix(2, [(0, 1)], torch.tensor([0.9]), swapped_probs=torch.tensor([0.3]))
    assert m[0, 1].item() == pytest.approx(0.8) and m[1, 0].item() == pytest.approx(0.2)


def test_clipped_surrogate_values_clipping_and_gradients():
    """clip 0.1. rho = [1.2, 0.8, 1.05, 1.2], A = [1, 1, -1, -1]:
      rho 1.2,  A  1: max(-1.2, -1.1) = -1.1   (clipped: no gradient, gains above 1 + eps are not rewarded)
      rho 0.8,  A  1: max(-0.8, -0.9) = -0.8   (unclipped: d/dlogp = -A rho = -0.8)
      rho 1.05, A -1: max(1.05, 1.05) = 1.05   (inside the range: d/dlogp = 1.05)
      rho 1.2,  A -1: max(1.2, 1.1)   = 1.2    (unclipped: d/dlogp = -A rho = 1.2)
    clip flags |rho - 1| > 0.1: [T, T, F, T]; approx_kl = (log rho)^2 / 2 = [0.016621, 0.024897, 0.001190, 0.016621]"""
    rho = torch.tensor([1.2, 0.8, 1.05, 1.2])
    logp = rho.log().clone().requires_grad_(True)
    out = clipped_surrogate(logp, torch.zeros(4), torch.tensor([1.0, 1.0, -1.0, -1.0]), clip_range=0.1)
    torch.testing.assert_close(out.loss.detach(), torch.tensor([-1.1, -0.8, 1.05, 1.2]), **close)
    assert out.clipped.tolist() == [True, True, False, True]
    torch.testing.assert_close(out.approx_kl, torch.tensor([0.016621, 0.024897, 0.001190, 0.016621]), **close)
    out.loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -0.8, 1.05, 1.2]), **close)


def test_surrogate_at_ratio_one_and_advantage_clip():
    """On-policy (rho = 1) the loss is -A and d/dlogp = -A; advantages are clamped to +-5 first: A = 10 -> -5."""
    logp = torch.zeros(3, requires_grad=True)
    out = clipped_surrogate(logp, torch.zeros(3), torch.tensor([10.0, -2.0, 0.5]), clip_range=1e-4)
    torch.testing.assert_close(out.loss.detach(), torch.tensor([-5.0, 2.0, -0.5]), **close)
    out.loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-5.0, 2.0, -0.5]), **close)
    assert not out.clipped.any() and out.ratio.tolist() == [1.0, 1.0, 1.0]
    unclamped = clipped_surrogate(torch.zeros(1), torch.zeros(1), torch.tensor([10.0]), adv_clip_max=None)
    assert unclamped.loss.item() == -10.0


def test_ratio_norm_recentres_the_log_ratio():
    """s = 0.5, mu - mu_old = 0.1 everywhere -> bias = 0.01 / (2 * 0.25) = 0.02.
    log pi - log pi_old = -0.02 -> (-0.02 + 0.02) * 0.5 = 0 (ratio 1); = 0.03 -> (0.03 + 0.02) * 0.5 = 0.025."""
    mean, old = torch.full((2, 4, 2, 2), 0.1), torch.zeros(2, 4, 2, 2)
    out = ratio_norm_log_ratio(torch.tensor([-0.02, 0.03]), torch.zeros(2), mean, old, torch.full((2, 1, 1, 1), 0.5))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.025]), **close)


def test_gaussian_mean_kl_true_and_flow_grpo_forms():
    """mu - mu_ref = 0.2, var = std^2 = 0.04: KL = 0.04 / 0.08 = 0.5 per element.
    Flow-GRPO's form uses var / dt: dt = 0.25 -> 0.04 / (2 * 0.16) = 0.125 = KL * dt."""
    mean, ref = torch.full((1, 2, 3), 0.2), torch.zeros(1, 2, 3)
    assert gaussian_mean_kl(mean, ref, torch.tensor([0.04])).item() == pytest.approx(0.5)
    assert gaussian_mean_kl(mean, ref, torch.tensor([0.04 / 0.25])).item() == pytest.approx(0.125)
    # equals the closed form of KL between the per-element Gaussians, checked with torch.distributions
    from torch.distributions import Normal, kl_divergence

    kl = kl_divergence(Normal(mean, 0.2), Normal(ref, 0.2)).mean()
    assert gaussian_mean_kl(mean, ref, torch.tensor([0.04])).item() == pytest.approx(kl.item())


def test_prompt_stat_tracker_batch_stats_until_min_count_then_history():
    """Hand-computed: buffer 3, min_count 2, biased std, eps 0."""
    tr = PromptStatTracker(buffer_size=3, min_count=2, eps=0.0)
    # iteration 1: "a" has one reward (< 2) -> batch stats of [1, 3, 5]: mean 3, std sqrt(8/3)
    # "b" has two rewards [3, 5] -> its own history: mean 4, std 1
    adv = tr.update(["a", "b", "b"], torch.tensor([1.0, 3.0, 5.0]))
    s = math.sqrt(8 / 3)
    torch.testing.assert_close(adv, torch.tensor([(1 - 3) / s, -1.0, 1.0]))
    # iteration 2: "a" history [1, 7] -> mean 4, std 3; "b" history keeps the last 3: [3, 5, 2] -> mean 10/3
    adv = tr.update(["a", "b"], torch.tensor([7.0, 2.0]))
    std_b = math.sqrt(((3 - 10 / 3) ** 2 + (5 - 10 / 3) ** 2 + (2 - 10 / 3) ** 2) / 3)
    torch.testing.assert_close(adv, torch.tensor([1.0, (2 - 10 / 3) / std_b]))
    assert tr.history == {"a": [1.0, 7.0], "b": [3.0, 5.0, 2.0]}
    # a constant current group still gets a signed advantage from its history (group advantages give 0)
    adv = tr.update(["b", "b"], torch.tensor([9.0, 9.0]))
    assert (adv > 0).all()
    assert group_advantages(torch.tensor([9.0, 9.0]), torch.tensor([0, 0])).abs().max() == 0


def test_prompt_stat_tracker_state_round_trip_and_errors():
    tr = PromptStatTracker(4, 1)
    tr.update(["x", "y"], torch.tensor([0.5, 1.0]))
    other = PromptStatTracker(4, 1)
    other.load_state_dict(json.loads(json.dumps(tr.state_dict())))
    torch.testing.assert_close(other.update(["x"], torch.tensor([2.0])), tr.update(["x"], torch.tensor([2.0])))
    with pytest.raises(ValueError, match="2 prompts for 3 rewards"):
        tr.update(["x", "y"], torch.zeros(3))
    with pytest.raises(ValueError, match="buffer_size"):
        PromptStatTracker(0, 1)
