"""The toy world's exact evaluator as a reward (GenEval-style checks of a rendered scene against its prompt).

``imgalign.toy.evaluate(image, prompt)`` segments the image by colour and checks presence, colour, shape, count,
size, relation and background. ``criterion`` picks what the reward returns:

- ``"score"`` (default): the mean of the fidelity criteria the prompt has - dense, good for RL;
- ``"preference"`` (also the reward ``toy_preference``): the toy rater's score, fidelity plus its taste (a white
  background where the prompt states none), scaled down by the toy watermark's coverage;
- ``"watermark"``: the watermark band's coverage (lower is better);
- ``"overall"``: 1.0 iff every applicable criterion holds (GenEval's binary "correct");
- a single criterion name (``"count"``, ``"relation"``, ...): NaN for prompts that lack it.

Not differentiable. The toy package is imported lazily, on first use.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch

from .base import Reward
from .images import unit_to_pil


def _value(result: Any, criterion: str) -> float:
    if isinstance(result, (int, float)):
        return float(result)
    if isinstance(result, dict):
        value = result.get(criterion)
    else:
        value = getattr(result, criterion, None)
        if value is None and hasattr(result, "criteria") and criterion not in ("score", "overall"):
            value = result.criteria.get(criterion)
    return math.nan if value is None else float(value)


class ToyEvaluatorReward(Reward):
    name = "toy"

    def __init__(self, criterion: str = "score", **kwargs):
        super().__init__(**kwargs)
        self.criterion = criterion
        self._evaluate = None

    def _evaluator(self):
        if self._evaluate is None:
            try:
                toy = importlib.import_module("imgalign.toy")
            except ImportError as exc:
                raise ImportError(f"the toy reward needs imgalign.toy ({exc})") from exc
            if not hasattr(toy, "evaluate"):
                raise ImportError("imgalign.toy has no evaluate(image, prompt); the toy world is incomplete")
            self._evaluate = toy.evaluate
        return self._evaluate

    def _score(self, images, prompts, **kwargs) -> torch.Tensor:
        evaluate = self._evaluator()
        values = [_value(evaluate(image, prompt), self.criterion) for image, prompt in zip(unit_to_pil(images), prompts)]
        return torch.tensor(values, dtype=torch.float32)


def toy_preference(**kwargs) -> ToyEvaluatorReward:
    """The toy rater's score (fidelity criteria + taste, scaled by the watermark): the toy pairs' label."""
    reward = ToyEvaluatorReward(criterion="preference", **kwargs)
    reward.name = "toy_preference"
    return reward
