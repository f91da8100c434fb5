"""DINO similarity: cosine between DINO [CLS] embeddings of generated and reference images (DreamBench's DINO).

Default backbone ``facebook/dino-vits16`` (DINO v1 ViT-S/16, a transformers ``ViTModel``); any transformers
vision backbone whose ``last_hidden_state[:, 0]`` is the normalised CLS token works too (DINOv2 ``Dinov2Model``).
Hub id or local directory.

Preprocessing (``preprocess="dino"``, the DINO / DreamBench evaluation convention): resize the shorter side to
``image_size * 256 / 224`` (256 for 224) bicubic, center-crop ``image_size``, ImageNet mean/std. Note the hub
checkpoint's own image-processor config squashes to 224x224 instead; ``preprocess="processor"`` uses that.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .images import IMAGENET_MEAN, IMAGENET_STD, ImageInput, Preprocess, preprocess_from_hf
from .loading import from_pretrained
from .similarity import ReferenceSimilarity


class DINOSimilarity(ReferenceSimilarity):
    name = "dino"

    def __init__(
        self,
        model: str | os.PathLike = "facebook/dino-vits16",
        *,
        references: ImageInput | None = None,
        paired: bool = False,
        preprocess: str = "dino",
        trust_remote_code: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int | None = None,
        compare_scale: float | None = None,
    ):
        super().__init__(references=references, paired=paired, device=device, dtype=dtype, batch_size=batch_size,
                         compare_scale=compare_scale)
        from transformers import AutoImageProcessor, AutoModel

        kwargs = {"add_pooling_layer": False} if _is_vit(model) else {}
        self.model = from_pretrained(AutoModel, model, param="model", trust_remote_code=trust_remote_code, **kwargs)
        self.model.to(device=self.device, dtype=self.dtype)
        self._freeze(self.model)
        image_size = getattr(self.model.config, "image_size", 224)
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else int(image_size)
        if preprocess == "dino":
            self.preprocess = Preprocess(size=image_size, resize_mode="shortest",
                                         resize_size=int(image_size * 256 / 224), interpolation="bicubic",
                                         mean=IMAGENET_MEAN, std=IMAGENET_STD)
        elif preprocess == "processor":
            processor = from_pretrained(AutoImageProcessor, model, param="model", trust_remote_code=trust_remote_code)
            self.preprocess = preprocess_from_hf(processor)
        else:
            raise ValueError(f"preprocess must be 'dino' or 'processor', got {preprocess!r}")
        self.image_encodings = 0
        self._init_references()

    def embed_unit(self, images) -> torch.Tensor:
        pixels = self.preprocess(images, device=self.device, dtype=self.dtype)
        self.image_encodings += pixels.shape[0]
        cls = self.model(pixel_values=pixels).last_hidden_state[:, 0]  # [B, D]
        return F.normalize(cls.float(), dim=-1)


def _is_vit(model: str | os.PathLike) -> bool:
    """ViTModel checkpoints (DINO v1) carry an unused pooler we skip; others take no such argument."""
    import json
    from pathlib import Path

    config = Path(str(model)) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type") == "vit"
    return "dino-vit" in str(model)
