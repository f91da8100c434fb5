"""Tiny diffusers pipelines of every family, built from configs in code (diffusers' own testing pattern).

They have the real architectures (UNet2DConditionModel, SD3 / FLUX transformers, AutoencoderKL, CLIP and
T5 text encoders) at toy widths, random weights from a fixed seed, and the real CLIP tokenizer. Tests and
the demo save them with `save_pretrained` and load them back by path through the same adapters that load
real models, so nothing is downloaded.

FLUX and SD3 normally pair T5 with a sentencepiece tokenizer that cannot be built offline; the tiny
pipelines give their T5 encoder the CLIP tokenizer instead (the pipeline only needs `__call__` with
padding/truncation). Real checkpoints bring their own T5 tokenizer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from imgalign.models.tokenizers import CLIP_VOCAB_SIZE, clip_tokenizer

FAMILIES = ("sd15", "sd2-v", "sdxl", "sd3", "flux")


def _tokenizer(max_length: int = 77):
    with tempfile.TemporaryDirectory() as d:
        return clip_tokenizer(d, model_max_length=max_length)


def _clip_text(width: int = 32, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or width,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5(width: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=CLIP_VOCAB_SIZE, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=49407, eos_token_id=49407)
    return T5EncoderModel(cfg)


def _vae(latent_channels: int = 4, seed: int = 0, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=32, **extra,
    )


def _unet(cross_attention_dim: int, sdxl: bool = False, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = {}
    if sdxl:  # pooled text embeds (32) + 6 time ids * addition_time_embed_dim (8)
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=32 + 6 * 8)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 4), norm_num_groups=8, **extra,
    )


def build_tiny_pipeline(family: str, seed: int = 0):
    """A tiny random-weight pipeline of `family` (one of FAMILIES) producing 32x32 images."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    if family in ("sd15", "sd2-v"):
        v = family == "sd2-v"
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction" if v else "epsilon")
        return StableDiffusionPipeline(
            vae=_vae(seed=seed), text_encoder=_clip_text(32, seed=seed), tokenizer=_tokenizer(), unet=_unet(32, seed=seed),
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if family == "sdxl":
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing="leading", steps_offset=1)
        return StableDiffusionXLPipeline(
            vae=_vae(seed=seed), text_encoder=_clip_text(16, seed=seed), text_encoder_2=_clip_text(16, projection=32, seed=seed + 1),
            tokenizer=_tokenizer(), tokenizer_2=_tokenizer(), unet=_unet(32, sdxl=True, seed=seed), scheduler=scheduler,
        )
    if family == "sd3":
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=64,
            pos_embed_max_size=16,
        )
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(seed=seed, shift_factor=0.0609, scaling_factor=1.5035),
            text_encoder=_clip_text(32, projection=32, seed=seed), tokenizer=_tokenizer(),
            text_encoder_2=_clip_text(32, projection=32, seed=seed + 1), tokenizer_2=_tokenizer(),
            text_encoder_3=_t5(32, seed=seed), tokenizer_3=_tokenizer(),
        )
    if family == "flux":
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
        return FluxPipeline(
            scheduler=scheduler, vae=_vae(latent_channels=4, seed=seed, shift_factor=0.1159, scaling_factor=0.3611),
            text_encoder=_clip_text(32, seed=seed), tokenizer=_tokenizer(), text_encoder_2=_t5(32, seed=seed),
            tokenizer_2=_tokenizer(), transformer=transformer,
        )
    raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")


def save_tiny_pipeline(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny pipeline and `save_pretrained` it (safetensors) so it loads by path like a real model."""
    out = Path(out_dir)
    build_tiny_pipeline(family, seed=seed).save_pretrained(out, safe_serialization=True)
    return out


def save_sd15_architecture(out_dir: str | Path, unet_width: int = 320, seed: int = 0) -> Path:
    """A StableDiffusionPipeline in SD1.5's architecture (UNet blocks unet_width x (1, 2, 4, 4), cross-attention 768;
    CLIP ViT-L/14 text tower; the SD VAE) with random weights, saved once to `out_dir` (kept when it exists). At the
    default width it has SD1.5's 860M-parameter UNet: for memory measurements without downloading weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out_dir)
    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(seed)
    w = unet_width
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(w, 2 * w, 4 * w, 4 * w))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, projection_dim=768))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=_tokenizer(77), unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out)
    return out
