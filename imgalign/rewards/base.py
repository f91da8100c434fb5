"""The reward interface every method scores images through.

- ``score(images, prompts) -> Tensor[B]`` (pointwise rewards), higher is better.
- ``compare(images_a, images_b, prompts) -> Tensor[B]``: P(a preferred to b). Every pointwise reward answers it
  with a Bradley-Terry model on its scores, ``sigmoid(compare_scale * (s_a - s_b))``; pairwise rewards (a VLM
  judge) answer it natively and refuse ``score``.
- ``group_win_rates(images, prompts) -> Tensor[G]``: each image's mean probability of beating the other G-1
  images of its group (Pref-GRPO's reward). Pointwise rewards need G scores; pairwise ones all G(G-1)/2 pairs.

Images: see :mod:`imgalign.rewards.images` (PIL list, uint8 0-255 tensors, float tensors with ``value_range``,
default (0, 1)). Gradients: a differentiable reward keeps the autograd graph exactly when the image tensor
requires grad; otherwise it runs under ``no_grad``. Reward-model parameters are frozen.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from .images import ImageInput, UnitImages, batch_size_of, images_require_grad, to_unit_range

Prompts = str | Sequence[str] | None


def broadcast_prompts(prompts: Prompts, batch: int, *, required: bool, reward: str) -> list[str] | None:
    """One prompt per image: a single string is repeated; a list must have one entry per image."""
    if prompts is None:
        if required:
            raise ValueError(f"reward '{reward}' needs a prompt per image; pass prompts=[...] (or one string)")
        return None
    if isinstance(prompts, str):
        return [prompts] * batch
    prompts = list(prompts)
    if len(prompts) == 1 and batch > 1:
        return prompts * batch
    if len(prompts) != batch:
        raise ValueError(f"reward '{reward}': got {batch} images but {len(prompts)} prompts")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"reward '{reward}': prompt {index} is {type(prompt).__name__}, expected str")
    return prompts


class Reward(ABC):
    """Base class. Subclasses implement :meth:`_score` on images already converted to [0, 1]."""

    #: registry name (set by subclasses / the registry)
    name: str = "reward"
    #: True when gradients can flow from the score back to the input pixels
    differentiable: bool = False
    #: True for rewards that only compare pairs (``score`` raises)
    pairwise: bool = False
    #: False for rewards that ignore prompts (aesthetic, compressibility)
    needs_prompts: bool = True
    #: Bradley-Terry temperature: P(a > b) = sigmoid(compare_scale * (s_a - s_b))
    compare_scale: float = 1.0

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int | None = None,
        compare_scale: float | None = None,
    ):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = _as_dtype(dtype) or torch.float32
        self.batch_size = batch_size
        if compare_scale is not None:
            self.compare_scale = float(compare_scale)

    # ----- models held by the reward (moved by .to()) -----
    def modules(self) -> dict[str, torch.nn.Module]:
        """Every torch module the reward owns, by attribute name."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.nn.Module)}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> Reward:
        """Move the reward's models (in place) and return self. Scores always come back as float32."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = _as_dtype(dtype)
        for module in self.modules().values():
            module.to(device=self.device, dtype=self.dtype)
        return self

    def _freeze(self, *modules: torch.nn.Module) -> None:
        for module in modules:
            module.eval()
            module.requires_grad_(False)

    # ----- pointwise scoring -----
    def score(
        self,
        images: ImageInput,
        prompts: Prompts = None,
        *,
        value_range: tuple[float, float] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Scores, float32 ``[B]``, higher is better. ``prompts``: one string per image, or one for all."""
        if self.pairwise:
            raise TypeError(
                f"reward '{self.name}' is pairwise: use compare(images_a, images_b, prompts) or group_win_rates()"
            )
        grad = self.differentiable and images_require_grad(images)
        unit = to_unit_range(images, value_range)
        batch = batch_size_of(unit)
        prompt_list = broadcast_prompts(prompts, batch, required=self.needs_prompts, reward=self.name)
        with torch.set_grad_enabled(grad):
            return self._score_batched(unit, prompt_list, **kwargs)

    __call__ = score

    def _score_batched(self, unit: UnitImages, prompts: list[str] | None, **kwargs: Any) -> torch.Tensor:
        batch = batch_size_of(unit)
        step = self.batch_size or batch
        chunks = []
        for start in range(0, batch, step):
            stop = min(start + step, batch)
            chunk_prompts = prompts[start:stop] if prompts is not None else None
            out = self._score(unit[start:stop], chunk_prompts, **kwargs)
            chunks.append(out.reshape(-1).float())
        return torch.cat(chunks)

    @abstractmethod
    def _score(self, images: UnitImages, prompts: list[str] | None, **kwargs: Any) -> torch.Tensor:
        """Images in [0, 1] (tensor [B,3,H,W] or list of [3,H,W]); returns [B]."""

    # ----- pairwise -----
    def compare(
        self,
        images_a: ImageInput,
        images_b: ImageInput,
        prompts: Prompts = None,
        *,
        value_range: tuple[float, float] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """P(a preferred to b), float32 ``[B]``. Pointwise rewards: Bradley-Terry on their scores."""
        score_a = self.score(images_a, prompts, value_range=value_range, **kwargs)
        score_b = self.score(images_b, prompts, value_range=value_range, **kwargs)
        if score_a.shape != score_b.shape:
            raise ValueError(f"compare needs as many images in a as in b, got {score_a.shape[0]} and {score_b.shape[0]}")
        return torch.sigmoid(self.compare_scale * (score_a - score_b))

    def group_win_rates(
        self,
        images: ImageInput,
        prompts: Prompts = None,
        *,
        hard: bool = False,
        value_range: tuple[float, float] | None = None,
        swap_order: bool = False,
    ) -> torch.Tensor:
        """Win rate of each image of one group against the other G-1, float32 ``[G]``.

        Pointwise rewards score the G images once (G image encodings) and compare all pairs from the scores:
        ``soft`` (default) averages Bradley-Terry probabilities, ``hard=True`` counts wins (ties count 1/2).
        ``swap_order`` matters only to pairwise judges (scores have no position bias).
        """
        scores = self.score(images, prompts, value_range=value_range)
        return win_rates_from_scores(scores, self.compare_scale, hard=hard)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"


class PairwiseReward(Reward):
    """A reward that only judges pairs (VLM judges). Subclasses implement :meth:`_compare`."""

    pairwise = True
    differentiable = False

    def _score(self, images, prompts, **kwargs):  # pragma: no cover - score() refuses before getting here
        raise TypeError(f"reward '{self.name}' is pairwise")

    def compare(
        self,
        images_a: ImageInput,
        images_b: ImageInput,
        prompts: Prompts = None,
        *,
        value_range: tuple[float, float] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        unit_a = to_unit_range(images_a, value_range)
        unit_b = to_unit_range(images_b, value_range)
        batch = batch_size_of(unit_a)
        if batch_size_of(unit_b) != batch:
            raise ValueError(f"compare needs as many images in a as in b, got {batch} and {batch_size_of(unit_b)}")
        prompt_list = broadcast_prompts(prompts, batch, required=self.needs_prompts, reward=self.name)
        with torch.no_grad():
            return self._compare(unit_a, unit_b, prompt_list, **kwargs).reshape(-1).float()

    @abstractmethod
    def _compare(self, images_a: UnitImages, images_b: UnitImages, prompts: list[str] | None, **kwargs) -> torch.Tensor:
        """P(a preferred to b) for [0, 1] images; returns [B]."""

    def group_win_rates(
        self,
        images: ImageInput,
        prompts: Prompts = None,
        *,
        hard: bool = False,
        value_range: tuple[float, float] | None = None,
        swap_order: bool = False,
    ) -> torch.Tensor:
        """All G(G-1)/2 pairs in one ``compare`` call; P(j beats i) = 1 - P(i beats j).

        ``swap_order``: a second call shows every pair the other way round and the two are averaged,
        P(i beats j) = (p + 1 - p_swapped) / 2, which cancels a judge's position bias. An unparsable verdict
        (NaN) counts as a tie (0.5).
        """
        unit = to_unit_range(images, value_range)
        group = batch_size_of(unit)
        prompt_list = broadcast_prompts(prompts, group, required=self.needs_prompts, reward=self.name)
        if group < 2:
            return torch.full((group,), 0.5)
        pairs = [(i, j) for i in range(group) for j in range(i + 1, group)]
        first = [unit[i] for i, _ in pairs]
        second = [unit[j] for _, j in pairs]
        pair_prompts = [prompt_list[i] for i, _ in pairs] if prompt_list is not None else None
        with torch.no_grad():
            probs = torch.nan_to_num(self._compare(first, second, pair_prompts).reshape(-1).float().cpu(), nan=0.5)
            if swap_order:
                swapped = self._compare(second, first, pair_prompts).reshape(-1).float().cpu()
                probs = 0.5 * (probs + 1.0 - torch.nan_to_num(swapped, nan=0.5))
        matrix = torch.zeros(group, group)
        for (i, j), p in zip(pairs, probs):
            matrix[i, j], matrix[j, i] = p, 1.0 - p
        if hard:
            matrix = (matrix > 0.5).float() + 0.5 * (matrix == 0.5).float()
            matrix.fill_diagonal_(0.0)
        return matrix.sum(dim=1) / (group - 1)


def win_rates_from_scores(scores: torch.Tensor, compare_scale: float = 1.0, *, hard: bool = False) -> torch.Tensor:
    """Row means (over j != i) of P(i beats j) from pointwise scores ``[G]``; ``hard`` counts wins, ties 1/2."""
    group = scores.shape[0]
    if group < 2:
        return torch.full_like(scores, 0.5)
    diff = scores[:, None] - scores[None, :]  # [G, G], diff[i, j] = s_i - s_j
    if hard:
        matrix = (diff > 0).float() + 0.5 * (diff == 0).float()
    else:
        matrix = torch.sigmoid(compare_scale * diff)
    matrix = matrix * (1.0 - torch.eye(group, device=scores.device, dtype=matrix.dtype))
    return matrix.sum(dim=1) / (group - 1)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp64": torch.float64,
             "float64": torch.float64}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]
