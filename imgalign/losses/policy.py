"""Online-RL policy losses for image generators: group advantages, win rates, the clipped surrogate, KL.

Pure tensor math (no models, no I/O). Used by `imgalign.recipes.pref_grpo` for Pref-GRPO, Flow-GRPO and DDPO.

Setting (DDPO, arXiv 2305.13301; Flow-GRPO, arXiv 2505.05470; Pref-GRPO, arXiv 2508.20751). Denoising is an MDP
whose action at step j is the next latent x_{j+1} ~ pi_theta(. | x_j, c), a Gaussian sampler step. The reward
r(x_0, c) arrives at the end and one advantage per trajectory is applied to every trained step.

Group advantages (GRPO). Each prompt is sampled G times (a group). For reward values r_i:

    A_i = (r_i - mean_{group(i)} r) / (std + eps)           std = the group's std ("group") or the batch's ("global")

Several rewards r^k with weights w_k:
    "normalize_then_weight" (Pref-GRPO):  A = sum_k w_k * norm(r^k)
    "weight_then_normalize" (Flow-GRPO):  A = norm(sum_k w_k * r^k)

Win rate (Pref-GRPO's reward). P[i, j] = P(image i preferred to image j) for the G images of a group, with
P[j, i] = 1 - P[i, j]; ties and judge failures are 0.5. The win rate of image i is

    w_i = (1 / (G - 1)) * sum_{j != i} P[i, j]                (mean 0.5 over a group)

Clipped surrogate (PPO as used by every reference, clip range ~1e-4 because log-probs are per-element means):

    rho  = exp(log pi_theta(x_{j+1} | x_j) - log pi_old(x_{j+1} | x_j))
    L_pg = max(-A * rho, -A * clamp(rho, 1 - eps_clip, 1 + eps_clip))
    logged: approx_kl = 0.5 * (log rho)^2,  clip_frac = [|rho - 1| > eps_clip]

KL to the reference (closed form between two Gaussians of equal variance var):

    KL = mean_elements (mu_theta - mu_ref)^2 / (2 var)
    "gaussian" form: var = the step's variance std^2 (the true KL of the transition)
    "flow_grpo" form: var = std^2 / dt (Flow-GRPO drops dt from the denominator: KL_true * dt; issue #22)

Per-prompt reward history (DDPO's stat tracker): each prompt string keeps its last `buffer_size` rewards across
iterations; a prompt with fewer than `min_count` stored rewards is normalised with the current batch's mean/std,
otherwise with its history's:  A_i = (r_i - mean_hist(prompt_i)) / (std_hist(prompt_i) + eps).

RatioNorm (GRPO-Guard, arXiv 2510.22319; as in Pref-GRPO's `--rationorm`): with s the step std,

    log rho_norm = (log pi_theta - log pi_old + mean_elements (mu_theta - mu_old)^2 / (2 s^2)) * s

re-centres the log-ratio at 0 (its mean is -||mu_theta - mu_old||^2 / (2 s^2)) and equalises its scale across steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

StdMode = Literal["group", "global"]
CombineOrder = Literal["normalize_then_weight", "weight_then_normalize"]

__all__ = [
    "PromptStatTracker",
    "SurrogateOutput",
    "clipped_surrogate",
    "combine_advantages",
    "gaussian_mean_kl",
    "group_advantages",
    "preference_matrix",
    "ratio_norm_log_ratio",
    "win_rates",
    "zero_std_groups",
]


def _group_index(groups: Tensor) -> tuple[Tensor, int]:
    """groups [N] (any integer labels) -> dense labels 0..M-1 [N] and M."""
    _, dense = torch.unique(groups, return_inverse=True)
    return dense, int(dense.max()) + 1 if dense.numel() else 0


def _group_mean_std(values: Tensor, groups: Tensor, unbiased: bool) -> tuple[Tensor, Tensor]:
    """Per-sample mean and std of the sample's group. values [N] float, groups [N] -> ([N], [N])."""
    dense, m = _group_index(groups)
    values = values.double()
    count = torch.zeros(m, dtype=values.dtype).index_add_(0, dense, torch.ones_like(values))
    mean = torch.zeros(m, dtype=values.dtype).index_add_(0, dense, values) / count
    sq = torch.zeros(m, dtype=values.dtype).index_add_(0, dense, (values - mean[dense]) ** 2)
    denom = (count - 1).clamp(min=1) if unbiased else count
    return mean[dense], (sq / denom).sqrt()[dense]


def group_advantages(
    rewards: Tensor, groups: Tensor, *, std: StdMode = "group", eps: float = 1e-4, unbiased: bool = False
) -> Tensor:
    """A_i = (r_i - mean of i's group) / (std + eps). rewards [N], groups [N] (a prompt id per sample) -> [N] fp32.

    std="group": each group's own std (Pref-GRPO, DanceGRPO `--use_group`); "global": the std of all N rewards
    (Flow-GRPO's default `global_std=True`). unbiased: divide by n - 1 (torch's .std(), Pref-GRPO) instead of n
    (numpy's np.std, Flow-GRPO). eps: 1e-4 in Flow-GRPO, 1e-8 in Pref-GRPO.
    """
    if rewards.shape != groups.shape or rewards.ndim != 1:
        raise ValueError(f"rewards and groups must both be [N], got {tuple(rewards.shape)} and {tuple(groups.shape)}")
    mean, group_std = _group_mean_std(rewards, groups, unbiased)
    if std == "group":
        scale = group_std
    elif std == "global":
        scale = _std(rewards.double(), unbiased)
    else:
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    return ((rewards.double() - mean) / (scale + eps)).float()


def combine_advantages(
    rewards: Tensor,
    weights: Tensor | list[float],
    groups: Tensor,
    *,
    order: CombineOrder = "normalize_then_weight",
    std: StdMode = "group",
    eps: float = 1e-4,
    unbiased: bool = False,
) -> Tensor:
    """Advantages from K rewards [K, N] with weights [K] -> [N].

    normalize_then_weight (Pref-GRPO `compute_weighted_advantages`): A = sum_k w_k * group_advantages(r^k);
    weight_then_normalize (Flow-GRPO `multi_score`): A = group_advantages(sum_k w_k * r^k).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.ndim == 1:
        rewards = rewards[None]
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if w.shape[0] != rewards.shape[0]:
        raise ValueError(f"got {rewards.shape[0]} rewards but {w.shape[0]} weights")
    kw = dict(std=std, eps=eps, unbiased=unbiased)
    if order == "normalize_then_weight":
        parts = torch.stack([group_advantages(r, groups, **kw).double() for r in rewards])
        return (w[:, None] * parts).sum(0).float()
    if order == "weight_then_normalize":
        return group_advantages((w[:, None] * rewards.double()).sum(0).float(), groups, **kw)
    raise ValueError(f"order must be 'normalize_then_weight' or 'weight_then_normalize', got {order!r}")


class PromptStatTracker:
    """DDPO's per-prompt reward history (ddpo_pytorch/stat_tracking.py; defaults 16/16, aesthetic 32/16).

    The only stateful piece here: it holds plain Python lists, so `state_dict()` is JSON-serialisable and a
    resumed run continues with the same history.
    """

    def __init__(self, buffer_size: int, min_count: int, *, eps: float = 1e-6, unbiased: bool = False):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size} and {min_count}")
        self.buffer_size, self.min_count, self.eps, self.unbiased = buffer_size, min_count, eps, unbiased
        self.history: dict[str, list[float]] = {}

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Add this iteration's rewards [N] (prompt i's reward is rewards[i]) and return the advantages [N] fp32."""
        rewards = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
        if len(prompts) != rewards.numel():
            raise ValueError(f"got {len(prompts)} prompts for {rewards.numel()} rewards")
        batch_mean, batch_std = rewards.mean(), _std(rewards, self.unbiased)
        adv = torch.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([p == prompt for p in prompts])
            hist = (self.history.get(prompt, []) + rewards[rows].tolist())[-self.buffer_size:]
            self.history[prompt] = hist
            if len(hist) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                h = torch.tensor(hist, dtype=torch.float64)
                mean, std = h.mean(), _std(h, self.unbiased)
            adv[rows] = (rewards[rows] - mean) / (std + self.eps)
        return adv.float()

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: list(map(float, v)) for k, v in state["history"].items()}


def _std(values: Tensor, unbiased: bool) -> Tensor:
    return values.std(unbiased=unbiased) if values.numel() > 1 else torch.zeros((), dtype=values.dtype)


def zero_std_groups(rewards: Tensor, groups: Tensor) -> Tensor:
    """bool [N]: True where every reward of the sample's group is identical (for every one of K rewards [K, N]).

    Such a group carries no learning signal (all advantages 0); Flow-GRPO drops its samples and logs the fraction
    of such groups as `zero_std_ratio`.
    """
    rewards = rewards[None] if rewards.ndim == 1 else rewards
    dense, m = _group_index(groups)
    flat = torch.ones(rewards.shape[1], dtype=torch.bool)
    for r in rewards:
        r = r.double()
        hi = torch.full((m,), -math.inf, dtype=r.dtype).scatter_reduce(0, dense, r, "amax")
        lo = torch.full((m,), math.inf, dtype=r.dtype).scatter_reduce(0, dense, r, "amin")
        flat &= (hi == lo)[dense]
    return flat


def preference_matrix(
    group_size: int, pairs: list[tuple[int, int]], probs: Tensor, swapped_probs: Tensor | None = None
) -> Tensor:
    """The G x G matrix P[i, j] = P(i preferred to j) from judged pairs.

    probs[n]: P(first preferred) for pairs[n] = (i, j) shown as (i, j). swapped_probs[n] (optional order swap):
    P(first preferred) for the same pair shown as (j, i); the two orders are averaged,
    P[i, j] = (probs + 1 - swapped) / 2, which cancels a judge's position bias. NaN (a failed or unparsable
    judgement) counts as a tie, 0.5. Pairs not judged stay 0.5. Diagonal 0.
    """
    p = torch.nan_to_num(torch.as_tensor(probs, dtype=torch.float32).reshape(-1), nan=0.5)
    if swapped_probs is not None:
        s = torch.nan_to_num(torch.as_tensor(swapped_probs, dtype=torch.float32).reshape(-1), nan=0.5)
        p = 0.5 * (p + 1.0 - s)
    if p.shape[0] != len(pairs):
        raise ValueError(f"got {len(pairs)} pairs but {p.shape[0]} probabilities")
    matrix = torch.full((group_size, group_size), 0.5)
    for (i, j), value in zip(pairs, p.tolist()):
        matrix[i, j], matrix[j, i] = value, 1.0 - value
    matrix.fill_diagonal_(0.0)
    return matrix


def win_rates(matrix: Tensor, *, hard: bool = False) -> Tensor:
    """Win rate of each of G images from P [G, G] (P[i, j] = P(i beats j)): mean over j != i -> [G].

    hard=True counts verdicts as Pref-GRPO does: a win (P > 0.5) is 1, a tie (P = 0.5) 1/2, a loss 0.
    A group of one has win rate 0.5.
    """
    g = matrix.shape[0]
    if g < 2:
        return torch.full((g,), 0.5)
    m = matrix.float()
    if hard:
        m = (m > 0.5).float() + 0.5 * (m == 0.5).float()
    m = m * (1.0 - torch.eye(g))
    return m.sum(1) / (g - 1)


@dataclass
class SurrogateOutput:
    loss: Tensor  # [B] per-sample clipped surrogate
    ratio: Tensor  # [B]
    clipped: Tensor  # [B] bool, |ratio - 1| > clip_range
    approx_kl: Tensor  # [B] 0.5 * (log ratio)^2


def clipped_surrogate(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float = 1e-4,
    adv_clip_max: float | None = 5.0,
    log_ratio: Tensor | None = None,
) -> SurrogateOutput:
    """PPO clipped surrogate per sample, all [B]: max(-A rho, -A clamp(rho, 1 - eps, 1 + eps)).

    advantages are first clamped to [-adv_clip_max, adv_clip_max] (5 in every reference; None: no clamp).
    log_ratio: pass a transformed log-ratio (RatioNorm) instead of log_prob - old_log_prob.
    """
    if log_ratio is None:
        log_ratio = log_prob.float() - old_log_prob.float()
    adv = advantages.float()
    if adv_clip_max is not None:
        adv = adv.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return SurrogateOutput(
        loss=torch.maximum(unclipped, clipped),
        ratio=ratio,
        clipped=(ratio - 1.0).abs() > clip_range,
        approx_kl=0.5 * log_ratio.detach() ** 2,
    )


def ratio_norm_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor) -> Tensor:
    """RatioNorm log-ratio [B]: (log pi - log pi_old + mean_el (mu - mu_old)^2 / (2 s^2)) * s.

    log_prob / old_log_prob [B] (per-element means), mean / old_mean [B, ...], std [B] or [B, 1, ...] (step std s).
    """
    s = std.float().reshape(std.shape[0], -1)[:, 0]
    dims = tuple(range(1, mean.ndim))
    bias = ((mean.float() - old_mean.float()) ** 2).mean(dim=dims) / (2 * s**2)
    return (log_prob.float() - old_log_prob.float() + bias) * s


def gaussian_mean_kl(mean: Tensor, ref_mean: Tensor, var: Tensor) -> Tensor:
    """KL(N(mean, var) || N(ref_mean, var)) per element, averaged over elements -> [B].

    mean / ref_mean [B, ...]; var [B] or broadcastable. Use var = std^2 for the true KL of a step, var = std^2 / dt for
    Flow-GRPO's form (KL_true * dt).
    """
    var = var.float()
    if var.ndim == 1:
        var = var.reshape(-1, *([1] * (mean.ndim - 1)))
    dims = tuple(range(1, mean.ndim))
    return ((mean.float() - ref_mean.float()) ** 2 / (2 * var)).mean(dim=dims)
