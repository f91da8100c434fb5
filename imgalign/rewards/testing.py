"""Tiny random-weight reward models built offline, for tests and benchmarks.

Everything here is built from configs in code (no download): the CLIP BPE vocabulary comes from the copy bundled
with open-clip-torch, so tokenizers are the real CLIP tokenizer. Each ``save_tiny_*`` function writes the model the
way a user's real checkpoint would be laid out, so tests load it back through the real loading code by path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from imgalign.models.tokenizers import CLIP_VOCAB_SIZE

from .images import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

#: an open_clip architecture small enough for CPU tests (real CLIP vocabulary, 77-token context)
TINY_OPEN_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": CLIP_VOCAB_SIZE, "width": 32, "heads": 2, "layers": 1},
}


def clip_tokenizer(directory: str | os.PathLike | None = None):
    """The real CLIP tokenizer as a transformers ``CLIPTokenizer``, built offline (optionally saved)."""
    import tempfile

    from imgalign.models.tokenizers import clip_tokenizer as build

    with tempfile.TemporaryDirectory() as work:
        tokenizer = build(work)
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


def clip_processor(directory: str | os.PathLike | None = None, image_size: int = 32, crop_size: int | None = None):
    """A ``CLIPProcessor`` (real CLIP tokenizer + CLIP image processor of the given size), built offline."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": crop_size or image_size, "width": crop_size or image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())
    if directory is not None:
        processor.save_pretrained(str(directory))
    return processor


def tiny_open_clip(seed: int = 0, cfg: dict[str, Any] | None = None):
    """A random-weight open_clip ``CLIP`` of :data:`TINY_OPEN_CLIP_CFG` (or ``cfg``)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**json.loads(json.dumps(cfg or TINY_OPEN_CLIP_CFG)))
    return model.eval()


def save_tiny_open_clip_dir(directory: str | os.PathLike, seed: int = 0, preprocess_cfg: dict | None = None) -> Path:
    """A tiny open_clip model directory (``open_clip_config.json`` + ``open_clip_model.safetensors``)."""
    from .clip import save_open_clip_dir

    model = tiny_open_clip(seed)
    preprocess_cfg = preprocess_cfg or {
        "size": TINY_OPEN_CLIP_CFG["vision_cfg"]["image_size"],
        "mean": list(OPENAI_CLIP_MEAN),
        "std": list(OPENAI_CLIP_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    return save_open_clip_dir(model, TINY_OPEN_CLIP_CFG, directory, preprocess_cfg)


def save_tiny_open_clip_arch(
    directory: str | os.PathLike, name: str = "imgalign-tiny-clip", seed: int = 0, checkpoint: str = "safetensors"
) -> tuple[Path, Path]:
    """(architecture JSON, checkpoint) of a tiny open_clip model, like a real (config name, weights file) pair.

    ``checkpoint="pt"`` writes ``{"state_dict": ...}`` with torch.save, the layout of HPSv2's released files.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arch = directory / f"{name}.json"
    arch.write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    state = {k: v.detach().clone().contiguous() for k, v in tiny_open_clip(seed).state_dict().items()}
    if checkpoint == "pt":
        weights = directory / f"{name}.pt"
        torch.save({"state_dict": state, "epoch": 1}, weights)
    else:
        weights = directory / f"{name}.safetensors"
        save_file(state, str(weights))
    return arch, weights


def tiny_hf_clip_config(image_size: int = 32, logit_scale_init: float = 2.6592):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "vocab_size": CLIP_VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "image_size": image_size, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2,
        },
        projection_dim=16,
        logit_scale_init_value=logit_scale_init,
    )


def save_tiny_hf_clip(directory: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny transformers ``CLIPModel`` + ``CLIPProcessor`` saved in one directory (PickScore's layout)."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(tiny_hf_clip_config(image_size)).eval()
    model.save_pretrained(str(directory))
    clip_processor(directory, image_size=image_size)
    return Path(directory)


def save_tiny_dino(directory: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny transformers ``ViTModel`` (DINO ViT-S/16's architecture family, 2 layers) saved by path."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, qkv_bias=True, layer_norm_eps=1e-6,
    )
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(str(directory))
    ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
    ).save_pretrained(str(directory))
    return Path(directory)


def save_aesthetic_head(path: str | os.PathLike, in_dim: int, seed: int = 0) -> Path:
    """A random LAION-aesthetic-v2 head (768->1024->128->64->16->1 layout, input ``in_dim``) saved like the
    original ``.pth`` (keys ``layers.{0,2,4,6,7}.*``)."""
    torch.manual_seed(seed)
    dims = [in_dim, 1024, 128, 64, 16, 1]
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        layer = torch.nn.Linear(fan_in, fan_out)
        state[f"layers.{index}.weight"] = layer.weight.detach().clone()
        state[f"layers.{index}.bias"] = layer.bias.detach().clone()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


_BERT_WORDS = (
    "a an the of on in to and with is are photo picture image red green blue yellow black white circle circles "
    "square squares triangle triangles cat dog left right above below two three one big small background"
).split()


def wordpiece_tokenizer(words, directory: str | os.PathLike | None = None, **kwargs):
    """An uncased BERT WordPiece tokenizer built offline from a written ``vocab.txt``: the BERT special tokens,
    ``words`` whole, and single letters/digits/punctuation (plain and ``##`` continuations) so any lowercase word
    still tokenizes. Loaded with ``from_pretrained`` on the folder, which works on transformers 4 and 5 (5's
    ``BertTokenizer(vocab_file=...)`` ignores the file and yields a 5-token vocabulary)."""
    import tempfile

    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = specials + list(words) + pieces + ["##" + c for c in pieces]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
        tokenizer = BertTokenizer.from_pretrained(tmp, do_lower_case=True, **kwargs)
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


def bert_tokenizer(directory: str | os.PathLike | None = None):
    """A small uncased BERT WordPiece tokenizer with BLIP's extra tokens ([DEC] as bos, [ENC]), built offline."""
    tokenizer = wordpiece_tokenizer(_BERT_WORDS)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


#: ImageReward's BLIP at toy size (the real one: ViT-L/16 width 1024 x 24 layers, BERT-base 768 x 12 layers)
TINY_IMAGEREWARD_CFG: dict[str, Any] = {
    "image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 2, "vision_heads": 2,
    "text_width": 32, "text_layers": 2, "text_heads": 2, "text_intermediate": 64, "max_position_embeddings": 64,
    "head_dims": [1024, 128, 64, 16],
}


def save_tiny_imagereward(directory: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny ImageReward in the *original* release layout: ``ImageReward.pt`` (BLIP key names, ``blip.*`` /
    ``mlp.layers.*``), ``med_config.json`` and a BERT tokenizer directory ``tokenizer/``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = bert_tokenizer(directory / "tokenizer")
    cfg = TINY_IMAGEREWARD_CFG
    med_config = {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": cfg["text_width"], "initializer_range": 0.02,
        "intermediate_size": cfg["text_intermediate"], "layer_norm_eps": 1e-12,
        "max_position_embeddings": cfg["max_position_embeddings"], "model_type": "bert",
        "num_attention_heads": cfg["text_heads"], "num_hidden_layers": cfg["text_layers"], "pad_token_id": 0,
        "type_vocab_size": 2, "vocab_size": len(tokenizer), "encoder_width": cfg["vision_width"],
        "add_cross_attention": True,
    }
    (directory / "med_config.json").write_text(json.dumps(med_config, indent=2))

    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.05):
        return torch.randn(*shape, generator=generator) * std

    vw, tw, ti = cfg["vision_width"], cfg["text_width"], cfg["text_intermediate"]
    patches = (cfg["image_size"] // cfg["patch_size"]) ** 2
    state: dict[str, torch.Tensor] = {
        "blip.visual_encoder.cls_token": rand(1, 1, vw),
        "blip.visual_encoder.pos_embed": rand(1, patches + 1, vw),
        "blip.visual_encoder.patch_embed.proj.weight": rand(vw, 3, cfg["patch_size"], cfg["patch_size"]),
        "blip.visual_encoder.patch_embed.proj.bias": rand(vw),
        "blip.visual_encoder.norm.weight": 1 + rand(vw),
        "blip.visual_encoder.norm.bias": rand(vw),
    }
    for i in range(cfg["vision_layers"]):
        p = f"blip.visual_encoder.blocks.{i}."
        state.update({
            p + "norm1.weight": 1 + rand(vw), p + "norm1.bias": rand(vw),
            p + "attn.qkv.weight": rand(3 * vw, vw), p + "attn.qkv.bias": rand(3 * vw),
            p + "attn.proj.weight": rand(vw, vw), p + "attn.proj.bias": rand(vw),
            p + "norm2.weight": 1 + rand(vw), p + "norm2.bias": rand(vw),
            p + "mlp.fc1.weight": rand(4 * vw, vw), p + "mlp.fc1.bias": rand(4 * vw),
            p + "mlp.fc2.weight": rand(vw, 4 * vw), p + "mlp.fc2.bias": rand(vw),
        })
    t = "blip.text_encoder."
    state.update({
        t + "embeddings.word_embeddings.weight": rand(len(tokenizer), tw),
        t + "embeddings.position_embeddings.weight": rand(cfg["max_position_embeddings"], tw),
        t + "embeddings.LayerNorm.weight": 1 + rand(tw), t + "embeddings.LayerNorm.bias": rand(tw),
        t + "embeddings.position_ids": torch.arange(cfg["max_position_embeddings"]).unsqueeze(0),
    })
    for i in range(cfg["text_layers"]):
        p = f"{t}encoder.layer.{i}."
        for block, kv_width in (("attention", tw), ("crossattention", vw)):
            state.update({
                p + f"{block}.self.query.weight": rand(tw, tw), p + f"{block}.self.query.bias": rand(tw),
                p + f"{block}.self.key.weight": rand(tw, kv_width), p + f"{block}.self.key.bias": rand(tw),
                p + f"{block}.self.value.weight": rand(tw, kv_width), p + f"{block}.self.value.bias": rand(tw),
                p + f"{block}.output.dense.weight": rand(tw, tw), p + f"{block}.output.dense.bias": rand(tw),
                p + f"{block}.output.LayerNorm.weight": 1 + rand(tw), p + f"{block}.output.LayerNorm.bias": rand(tw),
            })
        state.update({
            p + "intermediate.dense.weight": rand(ti, tw), p + "intermediate.dense.bias": rand(ti),
            p + "output.dense.weight": rand(tw, ti), p + "output.dense.bias": rand(tw),
            p + "output.LayerNorm.weight": 1 + rand(tw), p + "output.LayerNorm.bias": rand(tw),
        })
    # unused by the reward but present in the release (BLIP_Pretrain's contrastive projections)
    state.update({"blip.vision_proj.weight": rand(8, vw), "blip.vision_proj.bias": rand(8),
                  "blip.text_proj.weight": rand(8, tw), "blip.text_proj.bias": rand(8)})
    dims = [tw, *cfg["head_dims"], 1]
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        state[f"mlp.layers.{index}.weight"] = rand(fan_out, fan_in, std=1.0 / (fan_in + 1) ** 0.5)
        state[f"mlp.layers.{index}.bias"] = rand(fan_out)
    torch.save(state, directory / "ImageReward.pt")
    return directory


_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def save_tiny_vlm(directory: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random LLaVA (CLIP vision tower + 1-layer Llama) with a ``LlavaProcessor`` and a chat template,
    saved by path: the smallest model ``AutoModelForImageTextToText`` + ``AutoProcessor`` load like a real judge."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = clip_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.model_max_length = 2048
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", chat_template=_CHAT_TEMPLATE,
        image_token="<image>", num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                                pad_token_id=49407, bos_token_id=49406, eos_token_id=49407),
        image_token_index=image_token, vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).eval().save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return Path(directory)


#: words of the toy and DreamBench-style prompts the tiny ALIGN tokenizer knows whole (others split into letters)
_ALIGN_WORDS = (
    "a an the of on in at to and with is photo picture image red green blue yellow purple orange black white "
    "circle circles square squares triangle triangles star dog cat backpack toy cup vase moon beach city street "
    "table grass snow left right above below next one two three big small background sks"
).split()


def align_tokenizer(directory: str | os.PathLike | None = None, model_max_length: int = 64):
    """ALIGN's text tokenizer at toy size: a BERT WordPiece tokenizer (:func:`wordpiece_tokenizer`) over
    :data:`_ALIGN_WORDS`, built offline."""
    return wordpiece_tokenizer(_ALIGN_WORDS, directory, model_max_length=model_max_length)


def tiny_align_config(vocab_size: int, image_size: int = 32, max_position_embeddings: int = 64):
    """An ``AlignConfig`` at toy size: a 1-layer BERT (width 32) and a 2-stage EfficientNet (stem 32 channels,
    then 16 and 24; image embeddings are the mean-pooled 24 channels, so ``projection_dim`` is 24)."""
    from transformers import AlignConfig

    return AlignConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": max_position_embeddings, "pad_token_id": 0,
        },
        vision_config={
            "image_size": image_size, "width_coefficient": 1.0, "depth_coefficient": 1.0, "kernel_sizes": [3, 3],
            "in_channels": [32, 16], "out_channels": [16, 24], "strides": [1, 2], "num_block_repeats": [1, 1],
            "expand_ratios": [1, 2], "depthwise_padding": [], "hidden_dim": 64, "drop_connect_rate": 0.0,
        },
        projection_dim=24,
    )


def save_tiny_align(directory: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random transformers ``AlignModel`` + ``AlignProcessor`` (BERT WordPiece tokenizer, and an
    ``EfficientNetImageProcessor`` with the class defaults - ``include_top`` included - at ``image_size``) saved in
    one directory, the layout of ``kakaobrain/align-base`` (RPO's lambda-Harmonic backbone)."""
    from transformers import AlignModel, AlignProcessor, EfficientNetImageProcessor

    tokenizer = align_tokenizer()
    image_processor = EfficientNetImageProcessor(
        size={"height": image_size, "width": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    torch.manual_seed(seed)
    model = AlignModel(tiny_align_config(len(tokenizer), image_size)).eval()
    model.save_pretrained(str(directory))
    AlignProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(directory))
    return Path(directory)
