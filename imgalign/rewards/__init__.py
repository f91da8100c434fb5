"""One reward layer for every method: ``score(images, prompts) -> Tensor[B]``, ``compare(a, b, prompts) ->
P(a preferred)``, ``group_win_rates(images, prompts)``; a registry by name; weighted combinations.

    >>> from imgalign.rewards import build_reward, build_rewards
    >>> reward = build_reward("pickscore")                       # hub id by default, or model="/local/dir"
    >>> combo = build_rewards(["hpsv2:1.0", "aesthetic:0.05"])   # WeightedReward

Registered rewards: clip, clip_image, toy_clip, pickscore, hpsv2, hpsv2.1, aesthetic, imagereward, dino,
vlm_judge, compressibility, incompressibility, toy, lambda_harmonic. Heavy dependencies (open_clip,
transformers) are imported only when a reward that needs them is built.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import PairwiseReward, Reward, broadcast_prompts, win_rates_from_scores
from .images import Preprocess, to_unit_range
from .loading import RewardLoadError
from .registry import (
    RewardSpec,
    WeightedReward,
    available_rewards,
    build_reward,
    build_rewards,
    register_reward,
)

# reward classes, importable from here without importing their dependencies up front
_LAZY = {
    "CLIPScore": "clip", "CLIPImageSimilarity": "clip", "toy_clip": "clip",
    "PickScore": "pickscore", "HPSv2": "hps", "LaionAesthetic": "aesthetic", "ImageReward": "imagereward",
    "DINOSimilarity": "dino", "VLMJudge": "vlm_judge", "parse_verdict": "vlm_judge",
    "OpenAIJudgeBackend": "vlm_judge", "TransformersJudgeBackend": "vlm_judge",
    "JPEGCompressibility": "compressibility", "JPEGIncompressibility": "compressibility",
    "ToyEvaluatorReward": "toy", "LambdaHarmonic": "harmonic", "group_win_rates": "group",
}

__all__ = [
    "PairwiseReward", "Preprocess", "Reward", "RewardLoadError", "RewardSpec", "WeightedReward",
    "available_rewards", "broadcast_prompts", "build_reward", "build_rewards", "register_reward",
    "to_unit_range", "win_rates_from_scores", *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
