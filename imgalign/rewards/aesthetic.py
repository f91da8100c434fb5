"""LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann et al.).

score = MLP(E_image / ||E_image||): the OpenAI CLIP ViT-L/14 image embedding, L2-normalised, through a head
768 -> 1024 -> 128 -> 64 -> 16 -> 1 trained with MSE on AVA ratings (so scores sit on the ~1-10 AVA scale).
The standard ``sac+logos+ava1-l14-linearMSE.pth`` has dropout between layers and *no activations* (so the head is
one affine map); the ``reluMSE`` variants have ReLUs - the layout is read from the checkpoint's keys. Prompts are
ignored. This is "v2"; LAION's v1 linear heads (``sa_0_4_vit_l_14_linear.pth``) are a different artefact.

Weights: ``head`` is a local ``.pth`` (read with ``weights_only=True``) or ``.safetensors`` file, or a hub repo
holding ``head_filename`` (default: ``trl-lib/ddpo-aesthetic-predictor`` / ``aesthetic-model.pth``, the copy TRL's
DDPO example used). The CLIP backbone is any open_clip model (``clip_model`` / ``clip_pretrained``), by default
OpenAI's ViT-L/14 (``ViT-L-14-quickgelu`` / ``openai``).
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn as nn

from .base import Reward
from .encoders import OpenCLIPEncoder
from .loading import RewardLoadError, load_state_dict, resolve_file


class AestheticHead(nn.Module):
    """Linear layers (with optional ReLUs between them); dropout is omitted since it is inactive at eval."""

    def __init__(self, dims: list[int], relu: bool = False):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, linear in enumerate(self.linears):
            x = linear(x)
            # the reluMSE variant has a ReLU after every Linear but the last
            if self.relu and index < len(self.linears) - 1:
                x = torch.relu(x)
        return x

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> AestheticHead:
        """Build from an original ``layers.{i}.weight`` state dict, whatever the Sequential indices are."""
        indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.weight$", k))})
        if not indices:
            raise RewardLoadError(f"not an aesthetic-predictor head: keys {sorted(state)[:6]}...")
        weights = [state[f"layers.{i}.weight"] for i in indices]
        dims = [weights[0].shape[1]] + [w.shape[0] for w in weights]
        # linearMSE: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear -> indices 0,2,4,6,7
        # reluMSE: a ReLU after each of the first 4 Linear layers -> indices 0,3,6,9,11
        relu = any(b - a > 2 for a, b in zip(indices, indices[1:]))
        head = cls(dims, relu=relu)
        for linear, i in zip(head.linears, indices):
            linear.weight.data.copy_(state[f"layers.{i}.weight"])
            linear.bias.data.copy_(state[f"layers.{i}.bias"])
        return head


class LaionAesthetic(Reward):
    name = "aesthetic"
    differentiable = True
    needs_prompts = False

    def __init__(
        self,
        head: str | os.PathLike = "trl-lib/ddpo-aesthetic-predictor",
        head_filename: str = "aesthetic-model.pth",
        *,
        clip_model: str = "ViT-L-14-quickgelu",
        clip_pretrained: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int | None = None,
        compare_scale: float | None = None,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, compare_scale=compare_scale)
        head_state = load_state_dict(resolve_file(head, head_filename, param="head"))
        self.encoder = OpenCLIPEncoder(clip_model, clip_pretrained, device=self.device, dtype=self.dtype)
        self.head = AestheticHead.from_state_dict(head_state)
        embed_dim = int(self.encoder.model.text_projection.shape[1]) if hasattr(self.encoder.model, "text_projection") else None
        if embed_dim is not None and self.head.linears[0].in_features != embed_dim:
            raise RewardLoadError(
                f"aesthetic head expects {self.head.linears[0].in_features}-d embeddings but {clip_model} gives "
                f"{embed_dim}-d; the v2 heads need CLIP ViT-L/14 (768-d)"
            )
        self.head.to(device=self.device, dtype=torch.float32)
        self._freeze(self.head)

    def to(self, device=None, dtype=None) -> LaionAesthetic:
        if device is not None:
            self.device = torch.device(device)
        self.encoder.to(self.device, dtype)
        self.head.to(self.device)  # the head stays float32: it is tiny and its inputs are unit vectors
        return self

    def _score(self, images, prompts, **kwargs) -> torch.Tensor:
        embedding = self.encoder.encode_images(images)  # [B, D], already L2-normalised, float32
        return self.head(embedding).squeeze(-1)
