"""CLIP score and CLIP image-image similarity, on any open_clip model or transformers CLIP.

Where the model comes from (``model`` / ``pretrained``; ``backend="auto"`` picks open_clip or transformers):

- ``model="ViT-B-32", pretrained="laion2b_s34b_b79k"``: a built-in open_clip architecture and a pretrained tag
  (downloaded by open_clip; without network the error names the hub repo to fetch);
- ``model="ViT-B-32", pretrained="/path/weights.safetensors"`` (or ``.pt``/``.pth`` read with
  ``weights_only=True``): a built-in open_clip architecture and a local checkpoint;
- ``model="/path/arch.json", pretrained=...``: a custom open_clip architecture (a model-config JSON);
- ``model="/path/dir"`` holding ``open_clip_config.json`` + ``open_clip_model.safetensors`` (open_clip's model
  directory layout, see :mod:`imgalign.rewards.encoders` and :func:`save_open_clip_dir`), ``"local-dir:/path"``,
  or ``"hf-hub:org/repo"`` with the same layout on the Hub;
- ``model="/path/dir"`` holding a transformers ``CLIPModel`` (``config.json`` + ``model.safetensors`` + processor
  files), or a transformers hub id such as ``openai/clip-vit-large-patch14`` (``backend="transformers"``). The
  toy world's CLIP is a transformers ``CLIPModel`` in ``assets/toy/clip``.

For a built-in open_clip architecture ``pretrained`` defaults to ``"openai"`` when OpenAI released weights for it.

Text uses the model's tokenizer (the CLIP BPE, bundled with open_clip, so it works offline). Images go through a
torch re-implementation of the model's preprocessing, so gradients reach the pixels.

CLIP score: ``scale * cos(E_image, E_text)``; ``scale=100`` is torchmetrics' convention (torchmetrics also clamps the
*batch mean* at 0 - we return per-image values and clamp only when ``clamp=True``). Hessel et al.'s CLIPScore is
``2.5 * max(cos, 0)``: ``scale=2.5, clamp=True``. ``compare`` uses the model's own temperature:
P(a > b) = sigmoid(exp(logit_scale) * (cos_a - cos_b)).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .base import Reward
from .encoders import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, HFDualEncoder, OpenCLIPEncoder, save_open_clip_dir
from .images import ImageInput
from .loading import RewardLoadError, local_path
from .similarity import ReferenceSimilarity

__all__ = ["CLIPScore", "CLIPImageSimilarity", "build_clip_encoder", "save_open_clip_dir", "toy_clip"]


def pick_backend(model: str, pretrained: str | None, backend: str = "auto") -> str:
    """'open_clip' or 'transformers' for a model reference (see the module docstring)."""
    if backend in ("open_clip", "transformers"):
        return backend
    if backend != "auto":
        raise ValueError(f"backend must be auto|open_clip|transformers, got {backend!r}")
    model = str(model)
    if model.startswith(("hf-hub:", "local-dir:")):
        return "open_clip"
    path = local_path(model)
    if path is not None:
        if path.is_dir():
            if (path / OPEN_CLIP_CONFIG).is_file():
                return "open_clip"
            if (path / "config.json").is_file():
                return "transformers"
            raise RewardLoadError(
                f"model={model}: expected {OPEN_CLIP_CONFIG} + {OPEN_CLIP_WEIGHTS} (open_clip) or config.json + "
                f"weights (transformers) in the directory; found {sorted(p.name for p in path.iterdir())}"
            )
        return "open_clip"  # an architecture JSON
    if "/" in model and not pretrained:
        return "transformers"  # a transformers hub id, e.g. openai/clip-vit-large-patch14
    return "open_clip"


def build_clip_encoder(
    model: str,
    pretrained: str | None = None,
    *,
    backend: str = "auto",
    processor: str | None = None,
    preprocess: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> OpenCLIPEncoder | HFDualEncoder:
    if pick_backend(model, pretrained, backend) == "transformers":
        if pretrained:
            raise RewardLoadError(f"model={model} is a transformers model with its own weights; drop pretrained=")
        return HFDualEncoder(model, processor, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return OpenCLIPEncoder(model, pretrained, device=device, dtype=dtype, preprocess=preprocess)


class CLIPScore(Reward):
    """``scale * cos(E_image, E_text)`` (default: OpenAI CLIP ViT-L/14 via open_clip, like torchmetrics' default)."""

    name = "clip"
    differentiable = True

    def __init__(
        self,
        model: str = "ViT-L-14-quickgelu",
        pretrained: str | None = None,
        *,
        scale: float = 100.0,
        clamp: bool = False,
        backend: str = "auto",
        processor: str | None = None,
        preprocess: Mapping[str, Any] | None = None,
        trust_remote_code: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int | None = None,
        compare_scale: float | None = None,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.encoder = build_clip_encoder(model, pretrained, backend=backend, processor=processor, preprocess=preprocess,
                                          device=self.device, dtype=self.dtype, trust_remote_code=trust_remote_code)
        self.scale = float(scale)
        self.clamp = clamp
        # P(a > b) = sigmoid(exp(logit_scale) * (cos_a - cos_b)) = sigmoid(compare_scale * (s_a - s_b))
        self.compare_scale = compare_scale if compare_scale is not None else self.encoder.logit_scale / self.scale

    def to(self, device=None, dtype=None) -> CLIPScore:
        super().to(device, dtype)
        self.encoder.to(self.device, self.dtype)
        return self

    def _score(self, images, prompts, **kwargs) -> torch.Tensor:
        image_emb = self.encoder.encode_images(images)  # [B, D]
        text_emb = self.encoder.encode_texts(prompts).to(image_emb.device)  # [B, D]
        cos = (image_emb * text_emb).sum(dim=-1)  # [B]
        score = self.scale * cos
        return score.clamp_min(0.0) if self.clamp else score


class CLIPImageSimilarity(ReferenceSimilarity):
    """Mean cosine between each image's CLIP image embedding and the references' (DreamBench CLIP-I, which uses
    OpenAI ViT-B/16). See :class:`~imgalign.rewards.similarity.ReferenceSimilarity` for the reference options."""

    name = "clip_image"

    def __init__(
        self,
        model: str = "ViT-B-16-quickgelu",
        pretrained: str | None = None,
        *,
        references: ImageInput | None = None,
        paired: bool = False,
        backend: str = "auto",
        processor: str | None = None,
        preprocess: Mapping[str, Any] | None = None,
        trust_remote_code: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int | None = None,
        compare_scale: float | None = None,
    ):
        super().__init__(references=references, paired=paired, device=device, dtype=dtype, batch_size=batch_size)
        self.encoder = build_clip_encoder(model, pretrained, backend=backend, processor=processor, preprocess=preprocess,
                                          device=self.device, dtype=self.dtype, trust_remote_code=trust_remote_code)
        self.compare_scale = compare_scale if compare_scale is not None else self.encoder.logit_scale
        self._init_references()

    def to(self, device=None, dtype=None) -> CLIPImageSimilarity:
        super().to(device, dtype)
        self.encoder.to(self.device, self.dtype)
        return self

    def embed_unit(self, images) -> torch.Tensor:
        return self.encoder.encode_images(images)


def toy_clip(model: str | os.PathLike | None = None, **kwargs: Any) -> CLIPScore:
    """CLIP score with the toy world's tiny CLIP (default: the shipped toy CLIP directory, see
    :func:`default_toy_clip_dir`). Either model-directory layout works (transformers or open_clip)."""
    model = Path(model) if model is not None else default_toy_clip_dir()
    if not model.is_dir():
        raise RewardLoadError(
            f"toy CLIP not found at {model}; build the toy assets (scripts/build_toy_assets.py) or pass "
            "model=/path/to/toy_clip"
        )
    kwargs.setdefault("pretrained", None)
    return CLIPScore(model=str(model), **kwargs)


def default_toy_clip_dir() -> Path:
    """``imgalign.toy.TOY_CLIP_DIR`` when the toy world defines it, else the first existing of
    ``assets/toy/clip`` and ``assets/toy_clip`` under the repository root."""
    try:
        from imgalign import toy

        location = getattr(toy, "TOY_CLIP_DIR", None)
        if location:
            return Path(location)
    except ImportError:
        pass
    from imgalign._paths import ASSETS as root

    candidates = [root / "toy" / "clip", root / "toy_clip"]
    return next((c for c in candidates if c.is_dir()), candidates[0])
