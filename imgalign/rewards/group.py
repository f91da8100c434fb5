"""Win rates inside a group of G images of one prompt (Pref-GRPO's reward).

For an embedding-based (pointwise) reward the G(G-1)/2 comparisons come from G scores, i.e. G image encodings;
a pairwise judge has to look at every pair (twice with order swap). Both go through ``reward.group_win_rates``.
"""

from __future__ import annotations

import torch

from .base import Prompts, Reward, win_rates_from_scores
from .images import ImageInput

__all__ = ["group_win_rates", "win_rates_from_scores"]


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
