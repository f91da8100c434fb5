"""Rewards by name, reward specs ("name:weight"), and weighted combinations.

Built-in rewards are registered as "module:attribute" strings, so nothing heavy (open_clip, transformers) is
imported until a reward is actually built.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from imgalign.errors import UserError

from .base import Prompts, Reward, broadcast_prompts
from .images import ImageInput, batch_size_of, images_require_grad, to_unit_range

_BUILTIN: dict[str, str] = {
    "clip": "imgalign.rewards.clip:CLIPScore",
    "clip_image": "imgalign.rewards.clip:CLIPImageSimilarity",
    "toy_clip": "imgalign.rewards.clip:toy_clip",
    "pickscore": "imgalign.rewards.pickscore:PickScore",
    "hpsv2": "imgalign.rewards.hps:HPSv2",
    "hpsv2.1": "imgalign.rewards.hps:hpsv21",
    "aesthetic": "imgalign.rewards.aesthetic:LaionAesthetic",
    "imagereward": "imgalign.rewards.imagereward:ImageReward",
    "dino": "imgalign.rewards.dino:DINOSimilarity",
    "vlm_judge": "imgalign.rewards.vlm_judge:VLMJudge",
    "compressibility": "imgalign.rewards.compressibility:JPEGCompressibility",
    "incompressibility": "imgalign.rewards.compressibility:JPEGIncompressibility",
    "toy": "imgalign.rewards.toy:ToyEvaluatorReward",
    "toy_preference": "imgalign.rewards.toy:toy_preference",
    "lambda_harmonic": "imgalign.rewards.harmonic:LambdaHarmonic",
}
_REGISTRY: dict[str, str | Callable[..., Reward]] = dict(_BUILTIN)


def register_reward(name: str, target: str | Callable[..., Reward] | None = None):
    """Register a reward factory (a Reward subclass, a function, or a "module:attr" string).

    Usable as a decorator: ``@register_reward("mine") class Mine(Reward): ...``.
    """
    if target is not None:
        _REGISTRY[name] = target
        return target

    def decorator(obj):
        _REGISTRY[name] = obj
        return obj

    return decorator


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def _resolve(name: str) -> Callable[..., Reward]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown reward '{name}'.{hint} Available: {', '.join(available_rewards())}")
    target = _REGISTRY[name]
    if isinstance(target, str):
        module_name, attr = target.split(":")
        target = getattr(importlib.import_module(module_name), attr)
    return target


class RewardArgumentError(UserError, TypeError):
    """A keyword argument the reward does not take (a TypeError too, which is what Python raised before).

    `name` is the reward, `key` the argument.
    """

    def __init__(self, message: str, name: str = "", key: str = ""):
        super().__init__(message)
        self.name, self.key = name, key


_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_UNEXPECTED = re.compile(r"unexpected keyword argument '([^']+)'")


def _keyword_names(factory: Callable[..., Any], _depth: int = 0) -> set[str]:
    """Keyword arguments `factory` accepts, following ``**kwargs`` into the base classes (a class; most rewards
    pass them to ``super().__init__``) or into the annotated return class (a function)."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return set()
    names = {p.name for p in params if p.kind in _KEYWORD_KINDS}
    if _depth > 8 or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return names
    if isinstance(factory, type):
        base = next((b for b in factory.__mro__[1:] if "__init__" in vars(b)), object)
        return names if base is object else names | _keyword_names(base, _depth + 1)
    try:
        target = typing.get_type_hints(factory).get("return")
    except Exception:
        return names
    if isinstance(target, type) and target is not factory:
        return names | _keyword_names(target, _depth + 1)
    return names


def reward_arguments(name: str) -> list[str]:
    """The keyword arguments reward `name` accepts, sorted (as far as its signatures say)."""
    return sorted(_keyword_names(_resolve(name)))


def unknown_argument_error(name: str, key: str, where: str = "") -> RewardArgumentError:
    """The error for argument `key` that reward `name` does not take: names the key, the closest and the valid ones."""
    valid = reward_arguments(name)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return RewardArgumentError(
        f"{where or f'reward {name!r}'}: reward '{name}' has no argument '{key}'{hint}; "
        f"its arguments are: {', '.join(valid)}",
        name,
        key,
    )


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Build a reward by registry name, e.g. ``build_reward("clip", model="ViT-B-32", pretrained="/x.pt")``.

    An argument the reward does not take raises RewardArgumentError naming it and the valid ones.
    """
    factory = _resolve(name)
    try:
        reward = factory(**kwargs)
    except TypeError as e:
        match = _UNEXPECTED.search(str(e))
        if match is None or match.group(1) not in kwargs or isinstance(e, RewardArgumentError):
            raise
        raise unknown_argument_error(name, match.group(1)) from e
    if not isinstance(reward, Reward):
        raise TypeError(f"reward factory for '{name}' returned {type(reward).__name__}, not a Reward")
    reward.name = name
    return reward


@dataclass
class RewardSpec:
    """A reward by name with a weight and constructor kwargs. ``RewardSpec.parse("pickscore:0.5")``."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_weight(self.weight, f"reward spec '{self.name}:{self.weight}'")

    @classmethod
    def parse(cls, text: str, kwargs: Mapping[str, Any] | None = None) -> RewardSpec:
        """Parse ``NAME`` or ``NAME:WEIGHT`` (the weight after the last colon, any float)."""
        text = text.strip()
        if not text:
            raise ValueError("empty reward spec; expected NAME or NAME:WEIGHT")
        name, weight = text, 1.0
        if ":" in text:
            head, tail = text.rsplit(":", 1)
            try:
                weight = float(tail)
            except ValueError:
                raise ValueError(f"reward spec '{text}': weight '{tail}' is not a number (expected NAME:WEIGHT)") from None
            name = head.strip()
        if not name:
            raise ValueError(f"reward spec '{text}' has no name")
        return cls(name=name, weight=weight, kwargs=dict(kwargs or {}))

    @classmethod
    def from_config(cls, config: str | Mapping[str, Any] | RewardSpec) -> RewardSpec:
        """From a string, a ``{"name", "weight", "kwargs"}`` mapping (e.g. YAML), or a RewardSpec."""
        if isinstance(config, RewardSpec):
            return config
        if isinstance(config, str):
            return cls.parse(config)
        unknown = set(config) - {"name", "weight", "kwargs"}
        if unknown:
            raise ValueError(f"reward spec {dict(config)}: unknown keys {sorted(unknown)} (expected name, weight, kwargs)")
        if "name" not in config:
            raise ValueError(f"reward spec {dict(config)} has no 'name'")
        return cls(name=str(config["name"]), weight=float(config.get("weight", 1.0)), kwargs=dict(config.get("kwargs") or {}))

    def build(self, **overrides: Any) -> Reward:
        return build_reward(self.name, **{**self.kwargs, **overrides})

    def __str__(self) -> str:
        return f"{self.name}:{self.weight:g}"


class WeightedReward(Reward):
    """``sum_k w_k * r_k(images, prompts)`` over several rewards.

    Reward scales differ by orders of magnitude (HPS ~0.3, CLIP x100 ~30, aesthetic ~5): choose weights with that
    in mind, or pass ``normalize="batch"`` to z-score each component within the batch first (useful for group
    methods; meaningless for a batch of one).

    ``compare``: when every component is pointwise, Bradley-Terry on the combined score (scale 1). When any
    component is pairwise, the weighted mean of the components' own ``compare`` probabilities (weights must then
    be non-negative); ``score`` is unavailable in that case.
    """

    def __init__(
        self,
        rewards: Sequence[Reward],
        weights: Sequence[float] | None = None,
        *,
        names: Sequence[str] | None = None,
        normalize: str | None = None,
    ):
        super().__init__()
        if not rewards:
            raise ValueError("WeightedReward needs at least one reward")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        for reward, weight in zip(rewards, weights):
            _check_weight(weight, f"weight of reward '{reward.name}'")
        if len(weights) != len(rewards):
            raise ValueError(f"got {len(rewards)} rewards but {len(weights)} weights")
        if normalize not in (None, "batch"):
            raise ValueError(f"normalize must be None or 'batch', got {normalize!r}")
        self.rewards = list(rewards)
        self.weights = weights
        self.names = list(names) if names is not None else _unique_names([r.name for r in rewards])
        self.normalize = normalize
        self.pairwise = any(r.pairwise for r in rewards)
        self.differentiable = all(r.differentiable for r in rewards)
        self.needs_prompts = any(r.needs_prompts for r in rewards)
        self.name = "+".join(f"{n}:{w:g}" for n, w in zip(self.names, weights))
        if self.pairwise and any(w < 0 for w in weights):
            raise ValueError("a combination with a pairwise reward needs non-negative weights")

    def to(self, device=None, dtype=None) -> WeightedReward:
        for reward in self.rewards:
            reward.to(device, dtype)
        super().to(device, dtype)
        return self

    def score_components(
        self, images: ImageInput, prompts: Prompts = None, *, value_range: tuple[float, float] | None = None
    ) -> dict[str, torch.Tensor]:
        """Each component's raw score and the weighted ``total`` (one pass per component)."""
        if self.pairwise:
            raise TypeError(f"'{self.name}' contains a pairwise reward: use compare() or group_win_rates()")
        grad = self.differentiable and images_require_grad(images)
        unit = to_unit_range(images, value_range)
        prompt_list = broadcast_prompts(prompts, batch_size_of(unit), required=self.needs_prompts, reward=self.name)
        parts: dict[str, torch.Tensor] = {}
        with torch.set_grad_enabled(grad):
            for name, reward in zip(self.names, self.rewards):
                # components see [0, 1] float images; gradients still flow through `unit`
                parts[name] = reward.score(unit, prompt_list if reward.needs_prompts else None, value_range=(0, 1))
            total = None
            for name, weight in zip(self.names, self.weights):
                value = parts[name]
                if self.normalize == "batch" and value.numel() > 1:
                    value = (value - value.mean()) / (value.std() + 1e-8)
                term = weight * value.to(torch.float32)
                total = term if total is None else total + term.to(total.device)
        parts["total"] = total
        return parts

    def score(self, images, prompts=None, *, value_range=None, **kwargs) -> torch.Tensor:
        return self.score_components(images, prompts, value_range=value_range)["total"]

    __call__ = score

    def _score(self, images, prompts, **kwargs):  # pragma: no cover - score() is overridden
        return self.score(images, prompts, value_range=(0, 1))

    def compare(self, images_a, images_b, prompts=None, *, value_range=None, **kwargs) -> torch.Tensor:
        if not self.pairwise:
            return super().compare(images_a, images_b, prompts, value_range=value_range)
        total_weight = sum(self.weights)
        out = None
        for reward, weight in zip(self.rewards, self.weights):
            p = weight * reward.compare(images_a, images_b, prompts, value_range=value_range).float().cpu()
            out = p if out is None else out + p
        return out / total_weight

    def group_win_rates(self, images, prompts=None, *, hard=False, value_range=None, swap_order=False) -> torch.Tensor:
        if not self.pairwise:
            return super().group_win_rates(images, prompts, hard=hard, value_range=value_range)
        total_weight = sum(self.weights)
        out = None
        for reward, weight in zip(self.rewards, self.weights):
            w = weight * reward.group_win_rates(images, prompts, hard=hard, value_range=value_range,
                                                swap_order=swap_order).float().cpu()
            out = w if out is None else out + w
        return out / total_weight


def _check_weight(weight: float, where: str) -> None:
    if not math.isfinite(float(weight)):
        raise UserError(f"{where}: the weight {weight} is not a finite number; give a number like 1.0 or 0.5")


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if count == 0 else f"{name}#{count + 1}")
    return out


def build_rewards(
    specs: Sequence[str | Mapping[str, Any] | RewardSpec] | str | RewardSpec,
    *,
    normalize: str | None = None,
    **common: Any,
) -> Reward:
    """One reward from one or several specs; several (or one with weight != 1) become a :class:`WeightedReward`.

    ``common`` kwargs (e.g. ``device``) are passed to every reward.
    """
    if isinstance(specs, (str, RewardSpec)):
        specs = [specs]
    parsed = [RewardSpec.from_config(s) for s in specs]
    if not parsed:
        raise ValueError("no reward given")
    rewards = [spec.build(**common) for spec in parsed]
    if len(parsed) == 1 and parsed[0].weight == 1.0 and normalize is None:
        return rewards[0]
    return WeightedReward(rewards, [s.weight for s in parsed], normalize=normalize)


def parse_value(text: str) -> Any:
    """Command-line value: JSON when it parses (numbers, true/false, lists), else the raw string."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text
