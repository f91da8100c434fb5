"""Win rates inside a group of G images of one prompt (Pref-GRPO's reward).

For an embedding-based (pointwise) reward the G(G-1)/2 comparisons come from G scores, i.e. G image encodings;
a pairwise judge has to look at every pair (twice with order swap). Both go through ``reward.group_win_rates``.
"""

from __future__ import annotations

import torch

from .base import Prompts, Reward, win_rates_from_scores
from .images import ImageInput

__all__ = ["group_win_rates", "judge_group", "win_rates_from_scores"]


def group_win_rates(
    reward: Reward,
    images: ImageInput,
    prompts: Prompts = None,
    *,
    hard: bool = False,
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Win rate of each image against the other G-1 images of its group, float32 ``[G]``, mean 0.5.

    ``hard=False``: mean Bradley-Terry probability (pointwise rewards) / mean judge probability (pairwise);
    ``hard=True``: fraction of comparisons won, ties counted 1/2.
    """
    return reward.group_win_rates(images, prompts, hard=hard, value_range=value_range)


def judge_group(
    reward: Reward,
    images: ImageInput,
    prompt: str,
    *,
    hard: bool = True,
    swap_order: bool = False,
    value_range: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, int]:
    """Win rates ``[G]`` of one group, and the number of failed judge calls (0 or 1), for online RL.

    A judge that fails (server down, a request error) must not stop a training run: the group then counts as
    ties (every win rate 0.5, so its advantages are zero) and the failure is counted for the logs.
    """
    group = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    try:
        return reward.group_win_rates(images, [prompt] * group, hard=hard, value_range=value_range,
                                      swap_order=swap_order).float().cpu(), 0
    except Exception:  # noqa: BLE001 - any judge failure becomes ties, counted and logged
        return torch.full((group,), 0.5), 1
