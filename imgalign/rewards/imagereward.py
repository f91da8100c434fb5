"""ImageReward (Xu et al., NeurIPS 2023), run on transformers' BLIP modules.

Why not the ``image-reward`` package: it vendors BLIP code that needs old timm/fairscale pins, loads its
checkpoint with an unrestricted ``torch.load`` and downloads at import time. The model is small and standard, so we
rebuild it from transformers parts and map the released weights onto them:

- vision: BLIP's ViT-L/16 (``visual_encoder``: timm-style blocks, LayerNorm eps 1e-6, exact GELU) ->
  ``BlipVisionModel`` (same pre-LN blocks, fused qkv with the same [3, heads, head_dim] layout, final LayerNorm on
  every token);
- text: BLIP's ``med.py`` BERT with cross-attention to image tokens (``text_encoder``) -> ``BlipTextModel``
  (identical module names; cross-attention exists when ``is_decoder=True`` in its config, and is run with
  bidirectional self-attention via ``is_decoder=False`` in forward);
- head ``mlp``: Linear 768->1024->128->64->16->1 with dropout and *no activations*.

reward = (MLP(h_[CLS]) - 0.16717362830052426) / 1.0333394966054072, where h_[CLS] is the first token of the text
encoder run on ``tokenizer(prompt, padding="max_length", truncation=True, max_length=35)`` cross-attending to all
image tokens (the first token stays [CLS]; ImageReward does not swap in BLIP's [ENC]). Images: resize shorter side
to 224 (bicubic), center crop 224, OpenAI CLIP mean/std. ``compare`` is Bradley-Terry with scale 1, which is the
model ImageReward was trained with (loss -log sigmoid(r_w - r_l)).

Weights, in either layout:
- the original release: ``checkpoint`` = ``ImageReward.pt`` (read with ``weights_only=True``) or a directory with
  ``ImageReward.pt`` + ``med_config.json``, default the hub repo ``THUDM/ImageReward``; tokenizer
  ``bert-base-uncased`` (+ BLIP's ``[DEC]`` and ``[ENC]`` tokens, vocabulary 30524);
- our converted layout (see :meth:`ImageReward.save`): ``config.json`` + ``model.safetensors`` + tokenizer files.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .aesthetic import AestheticHead
from .base import Reward
from .images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess
from .loading import RewardLoadError, from_pretrained, load_state_dict, local_path, offline_help, resolve_file

IMAGEREWARD_REPO = "THUDM/ImageReward"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
CONVERTED_CONFIG = "config.json"
CONVERTED_WEIGHTS = "model.safetensors"

_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]
# parts of the release the reward does not use (BLIP_Pretrain's contrastive projections, buffers)
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|position_ids$")


def convert_original_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released ImageReward keys (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``) -> ours
    (``vision.*`` BlipVisionModel, ``text.*`` BlipTextModel, ``head.layers.*``). Unknown keys are an error."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if _UNUSED.search(key):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder.") :]
            for pattern, replacement in _VISION_RENAMES:
                new, count = re.subn(pattern, replacement, name)
                if count:
                    out["vision." + new] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            out["text." + key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp.layers."):
            out["head." + key[len("mlp.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise RewardLoadError(f"unexpected keys in the ImageReward checkpoint: {unknown[:8]}")
    return out


def configs_from_original(state: dict[str, torch.Tensor], med_config: dict[str, Any], vision_heads: int | None):
    """(vision_config dict, text_config dict, head state) read off the released checkpoint + med_config.json."""
    width = state["blip.visual_encoder.cls_token"].shape[-1]
    patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    positions = state["blip.visual_encoder.pos_embed"].shape[1] - 1
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k)))
    mlp_dim = state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
    vision = {
        "hidden_size": int(width), "intermediate_size": int(mlp_dim), "num_hidden_layers": int(layers),
        # BLIP's ViT-B and ViT-L both use 64-dim heads (12 and 16 heads); not recoverable from weight shapes
        "num_attention_heads": int(vision_heads or max(1, width // 64)),
        "image_size": int(math.isqrt(positions) * patch), "patch_size": int(patch), "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
    }
    text = {
        "vocab_size": med_config["vocab_size"], "hidden_size": med_config["hidden_size"],
        "encoder_hidden_size": med_config.get("encoder_width", width),
        "intermediate_size": med_config["intermediate_size"], "num_hidden_layers": med_config["num_hidden_layers"],
        "num_attention_heads": med_config["num_attention_heads"],
        "max_position_embeddings": med_config["max_position_embeddings"],
        "layer_norm_eps": med_config.get("layer_norm_eps", 1e-12), "hidden_act": med_config.get("hidden_act", "gelu"),
        "pad_token_id": med_config.get("pad_token_id", 0), "is_decoder": True,  # is_decoder=True creates cross-attention
    }
    # generation-only ids: BlipTextConfig's defaults (bos 30522, sep 102) are meaningless for other vocabularies
    for key in ("bos_token_id", "sep_token_id", "eos_token_id"):
        text[key] = med_config.get(key) if med_config.get(key) is not None and med_config[key] < text["vocab_size"] else None
    return vision, text


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + linear head; ``forward`` returns the *unnormalised* head output [B]."""

    def __init__(self, vision_config: dict[str, Any], text_config: dict[str, Any], head: AestheticHead):
        super().__init__()
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.vision_config, self.text_config = dict(vision_config), dict(text_config)
        self.vision = BlipVisionModel(BlipVisionConfig(**vision_config))
        self.text = BlipTextModel(BlipTextConfig(**text_config), add_pooling_layer=False)
        self.head = head

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_tokens = self.vision(pixel_values=pixel_values).last_hidden_state  # [B, 1 + patches, Wv]
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask,
            is_decoder=False,  # bidirectional self-attention + cross-attention (BLIP's "multimodal" mode)
        ).last_hidden_state  # [B, L, Wt]
        return self.head(text[:, 0].float()).squeeze(-1)  # [B]


def _blip_tokenizer(source: str | os.PathLike):
    """BERT tokenizer with BLIP's extra tokens: ``[DEC]`` as bos and ``[ENC]`` (vocabulary 30522 -> 30524)."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, source, param="tokenizer")
    if "[DEC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(Reward):
    name = "imagereward"
    differentiable = True

    def __init__(
        self,
        checkpoint: str | os.PathLike = IMAGEREWARD_REPO,
        *,
        tokenizer: str | os.PathLike | None = None,
        vision_heads: int | None = None,
        max_length: int = 35,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int | None = None,
        compare_scale: float | None = None,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, compare_scale=compare_scale)
        self.max_length = max_length
        path = local_path(checkpoint)
        if path is not None and path.is_dir() and (path / CONVERTED_CONFIG).is_file():
            self.model, self.tokenizer = self._load_converted(path, tokenizer)
        else:
            self.model, self.tokenizer = self._load_original(checkpoint, tokenizer, vision_heads)
        vocab = self.model.text.embeddings.word_embeddings.num_embeddings
        if len(self.tokenizer) > vocab:
            raise RewardLoadError(f"tokenizer has {len(self.tokenizer)} tokens but the text encoder only {vocab}")
        self.model.to(device=self.device, dtype=self.dtype)
        self.model.head.to(torch.float32)
        self._freeze(self.model)
        size = self.model.vision_config["image_size"]
        self.preprocess = Preprocess(size=size, resize_mode="shortest", interpolation="bicubic",
                                     mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
        self.image_encodings = 0  # images encoded so far (the benchmark counts these)

    @staticmethod
    def _load_original(checkpoint, tokenizer, vision_heads):
        try:
            weights = resolve_file(checkpoint, "ImageReward.pt", param="checkpoint")
        except RewardLoadError as exc:
            if local_path(checkpoint) is not None:
                raise
            raise RewardLoadError(
                f"{offline_help(str(checkpoint), 'checkpoint')} (the directory must hold ImageReward.pt and "
                f"med_config.json; the tokenizer is bert-base-uncased, also a hub download: pass tokenizer=DIR)"
            ) from exc
        med_path = weights.parent / "med_config.json"
        if not med_path.is_file() and local_path(checkpoint) is None:  # hub repo: fetch the config too
            med_path = resolve_file(checkpoint, "med_config.json", param="checkpoint")
        if not med_path.is_file():
            raise RewardLoadError(f"checkpoint={checkpoint}: med_config.json must sit next to ImageReward.pt")
        state = load_state_dict(weights)
        vision_cfg, text_cfg = configs_from_original(state, json.loads(med_path.read_text()), vision_heads)
        converted = convert_original_state_dict(state)
        head = AestheticHead.from_state_dict({k[len("head.") :]: v for k, v in converted.items() if k.startswith("head.")})
        model = ImageRewardModel(vision_cfg, text_cfg, head)
        body = {k: v for k, v in converted.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(body, strict=False)
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise RewardLoadError(f"ImageReward weights do not fit: missing {missing[:6]}, unexpected {unexpected[:6]}")
        if tokenizer is None:
            local_tok = weights.parent / "tokenizer"
            tokenizer = local_tok if local_tok.is_dir() else "bert-base-uncased"
        return model, _blip_tokenizer(tokenizer)

    @staticmethod
    def _load_converted(path: Path, tokenizer):
        config = json.loads((path / CONVERTED_CONFIG).read_text())
        state = load_state_dict(path / CONVERTED_WEIGHTS)
        head = AestheticHead.from_state_dict({k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")})
        model = ImageRewardModel(config["vision"], config["text"], head)
        body = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(body, strict=False)
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise RewardLoadError(f"{path}: weights do not fit: missing {missing[:6]}, unexpected {unexpected[:6]}")
        return model, _blip_tokenizer(tokenizer or path)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the converted layout: ``config.json`` + ``model.safetensors`` (+ tokenizer files)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"vision": self.model.vision_config, "text": self.model.text_config,
                  "reward_mean": REWARD_MEAN, "reward_std": REWARD_STD, "format": "imgalign-imagereward-v1"}
        (directory / CONVERTED_CONFIG).write_text(json.dumps(config, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items() if not k.startswith("head.")}
        for index, linear in zip((0, 2, 4, 6, 7), self.model.head.linears):
            state[f"head.layers.{index}.weight"] = linear.weight.detach().cpu().contiguous()
            state[f"head.layers.{index}.bias"] = linear.bias.detach().cpu().contiguous()
        save_file(state, str(directory / CONVERTED_WEIGHTS))
        self.tokenizer.save_pretrained(str(directory))
        return directory

    def to(self, device=None, dtype=None) -> ImageReward:
        super().to(device, dtype)
        self.model.head.to(torch.float32)
        return self

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"].to(self.device), "attention_mask": tokens["attention_mask"].to(self.device)}

    def raw_output(self, images, prompts: list[str]) -> torch.Tensor:
        """The head's output before standardisation, for [0, 1] images."""
        pixels = self.preprocess(images, device=self.device, dtype=self.dtype)
        self.image_encodings += pixels.shape[0]
        return self.model(pixels, **self.tokenize(prompts))

    def _score(self, images, prompts, **kwargs) -> torch.Tensor:
        return (self.raw_output(images, prompts) - REWARD_MEAN) / REWARD_STD
