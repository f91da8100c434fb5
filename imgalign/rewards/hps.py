"""HPSv2 / HPSv2.1 (Wu et al., 2023): open_clip ViT-H-14 fine-tuned on Human Preference Dataset v2.

score = cos(E_image, E_text) - the raw cosine, *no* logit scale (hpsv2's ``score`` takes the diagonal of
``image_features @ text_features.T`` of normalised features). Typical values are ~0.2-0.35; compare scores only
within one prompt, and never v2.0 with v2.1. ``compare`` uses the checkpoint's own temperature:
sigmoid(exp(logit_scale) * (s_a - s_b)).

Preprocessing differs from plain CLIP: the *longer* side is resized to 224 (bicubic) and the image is padded
with black to 224x224, centred, then normalised with the OpenAI CLIP mean/std (hpsv2's ``ResizeMaxSize``). The
original skips the padding when the longer side is already 224 (leaving non-square inputs non-square); we always
pad to square.

Weights: ``checkpoint`` is a local file (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``, a
``{"state_dict": ...}`` read with ``weights_only=True``, or a safetensors conversion) or, by default, the file of
``version`` in the hub repo ``xswu/HPSv2``. ``model`` is the open_clip architecture (ViT-H-14; tests pass a tiny
architecture JSON).
"""

from __future__ import annotations

import os

import torch

from .base import Reward
from .encoders import OpenCLIPEncoder
from .images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess
from .loading import resolve_file

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def hps_preprocess(size: int = 224) -> Preprocess:
    return Preprocess(size=size, resize_mode="longest", interpolation="bicubic", mean=OPENAI_CLIP_MEAN,
                      std=OPENAI_CLIP_STD, fill=0.0)


class HPSv2(Reward):
    name = "hpsv2"
    differentiable = True

    def __init__(
        self,
        version: str = "v2.0",
        checkpoint: str | os.PathLike | None = None,
        *,
        model: str = "ViT-H-14",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int | None = None,
        compare_scale: float | None = None,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        if version not in HPS_FILES:
            raise ValueError(f"HPS version must be one of {sorted(HPS_FILES)}, got {version!r}")
        self.version = version
        weights = resolve_file(checkpoint or HPS_REPO, HPS_FILES[version], param="checkpoint")
        self.encoder = OpenCLIPEncoder(model, str(weights), device=self.device, dtype=self.dtype)
        size = self.encoder.preprocess.output_size[0]
        self.encoder.preprocess = hps_preprocess(size)
        self.compare_scale = compare_scale if compare_scale is not None else self.encoder.logit_scale

    def to(self, device=None, dtype=None) -> HPSv2:
        super().to(device, dtype)
        self.encoder.to(self.device, self.dtype)
        return self

    def _score(self, images, prompts, **kwargs) -> torch.Tensor:
        image_emb = self.encoder.encode_images(images)  # [B, D], normalised
        text_emb = self.encoder.encode_texts(prompts).to(image_emb.device)
        return (image_emb * text_emb).sum(-1)


def hpsv21(**kwargs) -> HPSv2:
    """HPSv2.1 (``HPS_v2.1_compressed.pt``)."""
    kwargs.setdefault("version", "v2.1")
    return HPSv2(**kwargs)
