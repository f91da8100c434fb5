"""PickScore (Kirstain et al., 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

score = exp(logit_scale) * cos(E_text, E_image), with the learned logit scale read from the checkpoint (PickScore's
README turns these into preference probabilities with a softmax over the candidates of one prompt; for two images
that is exactly ``compare``: sigmoid(s_a - s_b)).

Weights: ``model`` (default ``yuvalkirstain/PickScore_v1``, a transformers ``CLIPModel``) and ``processor``
(default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, a ``CLIPProcessor``): hub ids or local directories. The
processor's image settings (shortest-edge resize, center crop, mean/std) are re-implemented in torch so the score
is differentiable; the processor's own 1/255 rescale is accounted for (our images are already in [0, 1]).
"""

from __future__ import annotations

import os

import torch

from .base import Reward
from .encoders import HFDualEncoder
from .loading import local_path


class PickScore(Reward):
    name = "pickscore"
    differentiable = True

    def __init__(
        self,
        model: str | os.PathLike = "yuvalkirstain/PickScore_v1",
        processor: str | os.PathLike | None = None,
        *,
        trust_remote_code: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int | None = None,
        compare_scale: float | None = None,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, compare_scale=compare_scale)
        if processor is None:
            # a local model directory with its own processor files is self-contained; the hub model is not
            path = local_path(model)
            has_processor = path is not None and any(
                (path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")
            )
            processor = None if has_processor else "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
        self.encoder = HFDualEncoder(
            model, processor, device=self.device, dtype=self.dtype, trust_remote_code=trust_remote_code
        )

    def to(self, device=None, dtype=None) -> PickScore:
        super().to(device, dtype)
        self.encoder.to(self.device, self.dtype)
        return self

    def _score(self, images, prompts, **kwargs) -> torch.Tensor:
        image_emb = self.encoder.encode_images(images)  # [B, D]
        text_emb = self.encoder.encode_texts(prompts).to(image_emb.device)  # [B, D]
        return self.encoder.logit_scale * (image_emb * text_emb).sum(-1)
