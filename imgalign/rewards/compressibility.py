"""JPEG (in)compressibility, DDPO's simplest rewards (Black et al., 2023).

Each image is rounded to 8-bit RGB, encoded as JPEG at ``quality`` (95, DDPO's setting) and measured in kilobytes
(bytes / 1000). ``incompressibility`` = size in kB; ``compressibility`` = -size in kB. Prompts are ignored; not
differentiable (JPEG encoding is not).
"""

from __future__ import annotations

import io

import torch

from .base import Reward
from .images import unit_to_pil


def jpeg_size_kb(image, quality: int = 95) -> float:
    """Size in kB (1000 bytes) of a PIL image saved as JPEG at ``quality``."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JPEGIncompressibility(Reward):
    name = "incompressibility"
    needs_prompts = False
    sign = 1.0

    def __init__(self, quality: int = 95, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        self.quality = quality

    def _score(self, images, prompts, **kwargs) -> torch.Tensor:
        sizes = [jpeg_size_kb(image, self.quality) for image in unit_to_pil(images)]
        return self.sign * torch.tensor(sizes, dtype=torch.float32)


class JPEGCompressibility(JPEGIncompressibility):
    name = "compressibility"
    sign = -1.0
