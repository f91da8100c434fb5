"""RPO's lambda-Harmonic reward (Miao et al., NeurIPS 2024, "Subject-driven text-to-image generation via
preference-based reinforcement learning").

    s_I(y)    = mean_j cos(f_img(ref_j), f_img(y))        similarity to the subject's reference images
    s_T(y, c) = cos(f_txt(c), f_img(y))                    text alignment
    s^        = (s + 1) / 2                                each mapped from [-1, 1] to [0, 1]
    R_lambda  = 1 / (lambda / (s^_I + eps) + (1 - lambda) / (s^_T + eps)),   eps = 1e-8

a weighted harmonic mean: lambda = 1 gives s^_I, lambda = 0 gives s^_T, and a low value of either pulls R down.
RPO labels preferences with Bradley-Terry on R (p = sigmoid(R(y_ref) - R(y_gen))), which is ``compare`` here
(scale 1). RPO's backbone is ALIGN (``kakaobrain/align-base``, transformers); any CLIP-like dual encoder works
(``model``/``pretrained`` as for the ``clip`` reward, e.g. the toy CLIP). RPO scores s_T with the prompt *without*
the subject identifier: list such tokens in ``remove_tokens`` (e.g. ``["[V]", "sks"]``) to strip them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .clip import build_clip_encoder
from .images import ImageInput
from .similarity import ReferenceSimilarity


class LambdaHarmonic(ReferenceSimilarity):
    name = "lambda_harmonic"
    needs_prompts = True

    def __init__(
        self,
        model: str = "kakaobrain/align-base",
        pretrained: str | None = None,
        *,
        lam: float = 0.5,
        references: ImageInput | None = None,
        remove_tokens: Sequence[str] = (),
        eps: float = 1e-8,
        backend: str = "auto",
        processor: str | None = None,
        preprocess: Mapping[str, Any] | None = None,
        trust_remote_code: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int | None = None,
        compare_scale: float | None = None,
    ):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {lam}")
        super().__init__(references=references, paired=False, device=device, dtype=dtype, batch_size=batch_size,
                         compare_scale=compare_scale)
        self.encoder = build_clip_encoder(model, pretrained, backend=backend, processor=processor,
                                          preprocess=preprocess, device=self.device, dtype=self.dtype,
                                          trust_remote_code=trust_remote_code)
        self.lam = float(lam)
        self.eps = eps
        self.remove_tokens = list(remove_tokens)
        self._init_references()

    def to(self, device=None, dtype=None) -> LambdaHarmonic:
        super().to(device, dtype)
        self.encoder.to(self.device, self.dtype)
        return self

    def embed_unit(self, images) -> torch.Tensor:
        return self.encoder.encode_images(images)

    def clean_prompt(self, prompt: str) -> str:
        for token in self.remove_tokens:
            prompt = prompt.replace(token, " ")
        return re.sub(r"\s+", " ", prompt).strip()

    def components(self, image_emb: torch.Tensor, prompts: list[str], refs: torch.Tensor) -> dict[str, torch.Tensor]:
        """s_I, s_T (cosines) and their [0, 1] maps for normalised image embeddings [B, D]."""
        text_emb = self.encoder.encode_texts([self.clean_prompt(p) for p in prompts]).to(image_emb.device)
        s_image = (image_emb @ refs.to(image_emb.device).T).mean(dim=1)  # [B]
        s_text = (image_emb * text_emb).sum(-1)  # [B]
        return {"s_image": s_image, "s_text": s_text, "image01": (s_image + 1) / 2, "text01": (s_text + 1) / 2}

    def harmonic(self, image01: torch.Tensor, text01: torch.Tensor, lam: float | None = None) -> torch.Tensor:
        """R_lambda of the [0, 1] similarities; `lam` overrides the reward's lambda (RPO labels and validates with
        different lambdas on one backbone)."""
        lam = self.lam if lam is None else float(lam)
        return 1.0 / (lam / (image01 + self.eps) + (1.0 - lam) / (text01 + self.eps))

    def parts(self, images: ImageInput, prompts: Sequence[str], lam: float | None = None,
              value_range: tuple[float, float] | None = None) -> dict[str, torch.Tensor]:
        """Per image the cosines s_image, s_text and R_lambda (`lam` overrides the reward's), from one embedding
        pass over the images against the references set at construction."""
        if self._references is None:
            raise ValueError("lambda_harmonic.parts needs the reference images set (references=...)")
        with torch.no_grad():
            parts = self.components(self.embed(images, value_range), list(prompts), self._references)
            reward = self.harmonic(parts["image01"], parts["text01"], lam)
        return {"s_image": parts["s_image"].float(), "s_text": parts["s_text"].float(), "reward": reward.float()}

    def _score_batched(self, unit, prompts, references: ImageInput | None = None, lam: float | None = None,
                       **kwargs) -> torch.Tensor:
        """`lam`: score with this lambda instead of the reward's own (``score(images, prompts, lam=0.5)``)."""
        lam = self.lam if lam is None else float(lam)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {lam}")
        refs = self.embed(references) if references is not None else self._references
        if refs is None:
            if lam > 0:
                raise ValueError("lambda_harmonic needs reference images (references=...) unless lam=0")
            refs = None
        step = self.batch_size or len(prompts)
        out = []
        for start in range(0, len(prompts), step):
            emb = self.embed_unit(unit[start : start + step])
            chunk_prompts = prompts[start : start + step]
            if refs is None:  # lam = 0: text alignment only
                text_emb = self.encoder.encode_texts([self.clean_prompt(p) for p in chunk_prompts]).to(emb.device)
                out.append(((emb * text_emb).sum(-1) + 1) / 2)
                continue
            parts = self.components(emb, chunk_prompts, refs)
            out.append(self.harmonic(parts["image01"], parts["text01"], lam))
        return torch.cat(out).float()
