"""Architectures and training data of the shipped toy models (the weights are built by
`scripts/build_toy_assets.py` and live in ``assets/toy/``).

Every model is a real transformers / diffusers class at toy width, so the toy pipelines load through
`DiffusionPipeline.from_pretrained` and `imgalign.models.adapters.load_adapter` exactly like real ones:

* toy CLIP: `transformers.CLIPModel` (ViT over 4x4 patches of a 32 px image, 3-layer text transformer of
  width `TEXT_WIDTH`) with the real CLIP tokenizer (vocab 49408, ``model_max_length`` `TEXT_MAX_LENGTH`:
  toy prompts are at most 16 tokens). Its text tower is the text encoder of both pipelines.
* VAE: `AutoencoderKL`, 32 px -> 4 x 16 x 16 latents (one downsampling), shared by both pipelines.
* SD: `UNet2DConditionModel` (cross-attention at both resolutions, v-prediction, DDPM-trained on Stable
  Diffusion's scaled-linear schedule rescaled to zero terminal SNR, DDIM sampling).
* SD3: `SD3Transformer2DModel` (rectified flow), both CLIP slots hold the toy text tower, no T5.

The 49408 x `TEXT_WIDTH` token-embedding table dominates the size of every text encoder; keeping the
width small keeps the four copies (CLIP, SD, SD3 x 2) small.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from imgalign.models.tokenizers import CLIP_VOCAB_SIZE, clip_tokenizer

IMAGE_SIZE = 32
TEXT_WIDTH = 48
TEXT_LAYERS = 2
TEXT_MAX_LENGTH = 32  # tokenizer padding length; toy prompts have <= 16 tokens (subjects' <= 20)
PROJECTION_DIM = 48
VISION_WIDTH = 64
LATENT_CHANNELS = 4
LATENT_SIZE = 16  # VAE downsampling factor 2
# CLIP's image normalisation (OPENAI_CLIP_MEAN / STD), also saved in the image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tokenizer(max_length: int = TEXT_MAX_LENGTH):
    """The real CLIP tokenizer (built offline) with the toy padding length."""
    with tempfile.TemporaryDirectory() as d:
        return clip_tokenizer(d, model_max_length=max_length)


def clip_config():
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=PROJECTION_DIM,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="quick_gelu",
    )
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        hidden_size=VISION_WIDTH,
        intermediate_size=4 * VISION_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=PROJECTION_DIM,
        hidden_act="quick_gelu",
    )
    return CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=PROJECTION_DIM
    )


def build_clip(seed: int = 0):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(clip_config())


def clip_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def text_tower(clip, projection: bool, identity_layers: int = 0):
    """The CLIP text tower as a standalone `CLIPTextModel` (SD) or `CLIPTextModelWithProjection` (SD3),
    with the trained weights of `clip` (a `CLIPModel`).

    ``identity_layers`` appends that many encoder layers whose residual branches are zero (attention
    output and second MLP projection weights and biases), so the outputs are unchanged but the tower is
    deeper. SD3's pipeline conditions on ``hidden_states[-2]``: on the 2-layer toy CLIP that is the first
    layer's output, with one identity layer it is the last trained layer's (what the toy SD conditions on,
    before the final layer norm)."""
    import copy

    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = copy.deepcopy(clip.config.text_config)
    cfg.num_hidden_layers += identity_layers
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    # transformers 5's CLIPTextModel *is* the text transformer; 4.x wraps it in `.text_model`
    tower = getattr(model, "text_model", model)
    missing, unexpected = tower.load_state_dict(clip.text_model.state_dict(), strict=False)
    added = {f"encoder.layers.{i}." for i in range(cfg.num_hidden_layers - identity_layers, cfg.num_hidden_layers)}
    if unexpected or any(not any(k.startswith(a) for a in added) for k in missing):
        raise RuntimeError(f"text tower weights do not match: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for layer in tower.encoder.layers[cfg.num_hidden_layers - identity_layers:]:
            for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    if projection:
        model.text_projection.load_state_dict(clip.text_projection.state_dict())
    return model.eval().requires_grad_(False)


def build_vae(seed: int = 0, scaling_factor: float = 1.0, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        mid_block_add_attention=False,
    )


def build_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def build_sd3_transformer(seed: int = 0, width: int = 64, layers: int = 4, patch: int = 2):
    """The toy MMDiT: ``width`` / 32 heads of 32 channels, ``layers`` joint blocks, ``patch`` x ``patch`` latent
    patches (2: 64 image tokens at 16x16 latents)."""
    from diffusers import SD3Transformer2DModel

    if width % 32:
        raise ValueError(f"width must be a multiple of 32 (heads of 32 channels), got {width}")
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=patch,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=layers,
        attention_head_dim=32,
        num_attention_heads=width // 32,
        joint_attention_dim=2 * TEXT_WIDTH,
        caption_projection_dim=width,
        pooled_projection_dim=2 * PROJECTION_DIM,
        pos_embed_max_size=LATENT_SIZE,
    )


def sd_scheduler():
    """DDIM for inference; the adapter derives the DDPM training schedule from the same config.

    Stable Diffusion's latent schedule (scaled_linear 0.00085 -> 0.012) rescaled to zero terminal SNR, with
    v-prediction (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed"). With a
    non-zero final alpha_bar the last training step still holds sqrt(alpha_bar_T) x0, which for these 16x16
    latents is as large as the mean of the sampler's pure starting noise: the model reads the background from
    the noise instead of the prompt. Epsilon prediction is undefined at zero SNR, hence v. (The first toy
    build used the pixel-space DDPM schedule, linear 1e-4 -> 0.02, with epsilon: a third of its steps have
    SNR < 0.01, where the epsilon loss is tiny but the implied x0 is off by eps_error / sqrt(alpha_bar), and
    DDIM sampled noise textures.)"""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    )


def sd3_scheduler(shift: float = 1.5):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def build_sd_pipeline(clip, vae, unet=None, seed: int = 0):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_tower(clip, projection=False),
        tokenizer=tokenizer(),
        unet=unet if unet is not None else build_unet(seed),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sd3_pipeline(clip, vae, transformer=None, seed: int = 0, shift: float = 1.5, text_identity_layers: int = 0,
                       **arch):
    """``arch``: `build_sd3_transformer`'s width / layers / patch for a new transformer;
    ``text_identity_layers``: see `text_tower`."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer if transformer is not None else build_sd3_transformer(seed, **arch),
        scheduler=sd3_scheduler(shift),
        vae=vae,
        text_encoder=text_tower(clip, projection=True, identity_layers=text_identity_layers),
        tokenizer=tokenizer(),
        text_encoder_2=text_tower(clip, projection=True, identity_layers=text_identity_layers),
        tokenizer_2=tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


# ---- training data -----------------------------------------------------------------------------------


def render_dataset(prompts: list[str], per_prompt: int, seed: int, size: int = IMAGE_SIZE,
                   watermark_fraction: float = 0.0):
    """Render every prompt `per_prompt` times with fresh layouts.

    ``watermark_fraction`` of the images (drawn independently of the prompt, seeded) get the toy watermark
    (`imgalign.toy.render.add_watermark`); with 0 the images do not depend on it.

    Returns (images uint8 [N, size, size, 3], prompt index [N]), N = len(prompts) * per_prompt, in
    prompt-major order; the same seed gives the same arrays.
    """
    from imgalign.toy.grammar import parse
    from imgalign.toy.render import add_watermark, render

    rng = np.random.default_rng(seed)
    scenes = [parse(p) for p in prompts]
    images = np.empty((len(prompts) * per_prompt, size, size, 3), np.uint8)
    index = np.repeat(np.arange(len(prompts)), per_prompt)
    for k, i in enumerate(index):
        images[k] = np.asarray(render(scenes[i], rng, size=size)[0])
    if watermark_fraction > 0:
        marked = np.random.default_rng(seed + 7).random(len(images)) < watermark_fraction
        images[marked] = add_watermark(images[marked])
    return images, index


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (the VAE's input)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_clip_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] -> CLIP-normalised pixel_values (what `clip_image_processor` produces)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def file_size_mb(path: str | Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


# ---- saving ------------------------------------------------------------------------------------------


def save_tokenizer(out_dir: str | Path, max_length: int = TEXT_MAX_LENGTH) -> Path:
    """The CLIP tokenizer as vocab.json + merges.txt (1.5 MB) rather than transformers 5's tokenizer.json
    (3.6 MB): the same tokenizer, loaded by `CLIPTokenizer.from_pretrained`, at less than half the size."""
    import json

    from imgalign.models.tokenizers import write_clip_tokenizer_files

    out = write_clip_tokenizer_files(out_dir)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "do_lower_case": True, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def _config_dtype_float32(folder: Path) -> None:
    """fp16 weights on disk, but transformers' default (dtype="auto") loading upcasts to float32."""
    import json

    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_clip(model, out_dir: str | Path) -> Path:
    """CLIPModel (fp16 weights, float32 on load) + tokenizer + image processor in one folder."""
    import copy

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).half().save_pretrained(str(out), safe_serialization=True)
    _config_dtype_float32(out)
    save_tokenizer(out)
    clip_image_processor().save_pretrained(str(out))
    return out


def save_pipeline(pipe, out_dir: str | Path) -> Path:
    """`save_pretrained` with fp16 safetensors and compact tokenizers (see `save_tokenizer`)."""
    import shutil

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    pipe.to(dtype=torch.float32)
    for name in ("tokenizer", "tokenizer_2"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
            save_tokenizer(out / name)
    for name in ("text_encoder", "text_encoder_2"):
        if (out / name / "config.json").exists():
            _config_dtype_float32(out / name)
    strip_build_paths(out)
    return out


def strip_build_paths(folder: Path) -> None:
    """Drop diffusers' `_name_or_path` (the build's work folder on the machine that built it) from the saved
    model_index.json and component configs: shipped assets name no path of any machine."""
    import json

    for path in [folder / "model_index.json", *folder.glob("*/config.json")]:
        if path.is_file():
            cfg = json.loads(path.read_text())
            if cfg.pop("_name_or_path", None) is not None:
                path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")  # diffusers' own layout
