"""Image-image similarity to reference images (DreamBench's DINO and CLIP-I, subject fidelity for RPO)."""

from __future__ import annotations

from abc import abstractmethod

import torch

from .base import Reward
from .images import ImageInput, UnitImages, batch_size_of, to_unit_range


class ReferenceSimilarity(Reward):
    """score_i = mean_j cos(e(image_i), e(ref_j)) over the reference set (DreamBench averages all
    (generated, reference) pairs), or cos(e(image_i), e(ref_i)) with ``paired=True``.

    References are given at construction (``references=``), with :meth:`set_references`, or per call
    (``score(images, references=...)``); any image input the rewards accept. Prompts are ignored.
    """

    differentiable = True
    needs_prompts = False

    def __init__(self, *, references: ImageInput | None = None, paired: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.paired = paired
        self._references: torch.Tensor | None = None
        self._pending_references = references

    def _init_references(self) -> None:
        """Call at the end of a subclass's __init__, once the encoder exists."""
        if self._pending_references is not None:
            self.set_references(self._pending_references)
        self._pending_references = None

    @abstractmethod
    def embed_unit(self, images: UnitImages) -> torch.Tensor:
        """[0, 1] images -> L2-normalised embeddings [B, D] (float32)."""

    def embed(self, images: ImageInput, value_range: tuple[float, float] | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.embed_unit(to_unit_range(images, value_range))

    def set_references(self, references: ImageInput, value_range: tuple[float, float] | None = None) -> None:
        self._references = self.embed(references, value_range)

    def to(self, device=None, dtype=None):
        super().to(device, dtype)
        if self._references is not None:
            self._references = self._references.to(self.device)
        return self

    def _similarity(self, emb: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        refs = refs.to(emb.device)  # emb [B, D], refs [R, D]
        if self.paired:
            if refs.shape[0] != emb.shape[0]:
                raise ValueError(f"paired=True needs one reference per image, got {refs.shape[0]} for {emb.shape[0]}")
            return (emb * refs).sum(-1)
        return (emb @ refs.T).mean(dim=1)

    def _score_batched(self, unit, prompts, references: ImageInput | None = None, **kwargs) -> torch.Tensor:
        refs = self.embed(references) if references is not None else self._references  # embedded once per call
        if refs is None:
            raise ValueError(f"reward '{self.name}' needs reference images: pass references=... at construction or call")
        batch = batch_size_of(unit)
        if self.paired and refs.shape[0] != batch:
            raise ValueError(f"paired=True needs one reference per image, got {refs.shape[0]} for {batch}")
        step = self.batch_size or batch
        out = []
        for start in range(0, batch, step):
            chunk_refs = refs[start : start + step] if self.paired else refs
            out.append(self._similarity(self.embed_unit(unit[start : start + step]), chunk_refs).float())
        return torch.cat(out)

    def _score(self, images, prompts, **kwargs) -> torch.Tensor:
        return self._score_batched(images, prompts, **kwargs)
