"""Config sections and set-up steps that every diffusion recipe shares (model, LoRA, validation)."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from imgalign.config import MISSING, ConfigError, cfg_field
from imgalign.models.adapters import DEFAULT_LORA_TARGETS, ModelAdapter, adapters_disabled, load_adapter
from imgalign.train.checkpoint import read_safetensors_folder
from imgalign.train.setup import captioned_grid


@dataclass
class ModelConfig:
    pretrained: str = cfg_field(MISSING, "hub id or local folder of a diffusers pipeline (SD1.x/2.x, SDXL, SD3, FLUX)")
    variant: str | None = cfg_field(None, "weights variant to load, e.g. fp16")
    drop_t5: bool = cfg_field(False, "SD3 only: load without the T5 text encoder")
    timestep_sampling: Literal["logit_normal", "uniform"] = cfg_field("logit_normal", "flow families: density of "
                                                                     "training sigmas")
    flow_shift: float | None = cfg_field(None, "flow families: timestep shift for training sigmas (null: scheduler's static shift)")
    flux_guidance: float = cfg_field(3.5, "FLUX guidance-embedding value used in training forwards")
    max_sequence_length: int = cfg_field(128, "T5 token length for SD3/FLUX prompts", ge=1)


@dataclass
class LoraConfig:
    enabled: bool = cfg_field(True, "train a LoRA adapter (reference = adapter disabled); false = full fine-tuning "
                              "with a frozen reference copy")
    rank: int = cfg_field(8, "LoRA rank r", ge=1)
    alpha: float | None = cfg_field(None, "LoRA alpha (null: equal to rank)", gt=0)
    target_modules: list[str] = cfg_field(list(DEFAULT_LORA_TARGETS), "module names that get LoRA layers")
    init: str = cfg_field("gaussian", "peft init_lora_weights (gaussian: A random, B zero, so step 0 equals the base)")
    ref_cpu_offload: bool = cfg_field(False, "full fine-tuning on GPU: stream the frozen reference from CPU memory")


@dataclass
class ValidationConfig:
    enabled: bool = cfg_field(True, "write validation grids (false: no validation at all)")
    every: int = cfg_field(0, "write a validation image grid every N optimizer steps (0: only before and after)",
                           ge=0)
    prompts: list[str] = cfg_field(["a red circle", "two blue squares"], "validation prompts")
    images_per_prompt: int = cfg_field(2, "images per prompt (one grid row per prompt)", ge=1)
    seed: int = cfg_field(1234, "fixed seed, so grids are comparable across steps")
    num_inference_steps: int = cfg_field(20, "sampler steps", ge=1)
    guidance_scale: float = cfg_field(5.0, "CFG scale")
    resolution: int | None = cfg_field(None, "image size (null: the training resolution)", ge=8)
    prompts_file: str | None = cfg_field(None, "read validation prompts from this file instead (.txt, .jsonl, .csv)",
                                         exists="file")
    reward: str | None = cfg_field(None, "score validation images with this reward (imgalign.rewards name, e.g. toy, "
                                   "pickscore) and log val/<reward>")

    def __post_init__(self):
        if self.enabled and not self.prompts and not self.prompts_file:
            raise ValueError("validation.prompts is empty and no validation.prompts_file is set; give prompts, or "
                             "switch validation off with validation.enabled=false")


def load_model(cfg: ModelConfig, device, dtype: torch.dtype) -> ModelAdapter:
    adapter = load_adapter(cfg.pretrained, dtype=dtype, device=device, variant=cfg.variant, drop_t5=cfg.drop_t5,
                           timestep_sampling=cfg.timestep_sampling, flow_shift=cfg.flow_shift,
                           flux_guidance=cfg.flux_guidance, max_sequence_length=cfg.max_sequence_length)
    adapter.freeze_all()
    return adapter


def make_trainable(adapter: ModelAdapter, lora: LoraConfig, gradient_checkpointing: bool, weight_dtype: torch.dtype,
                   reference: bool = True):
    """LoRA (reference = adapter disabled, no second copy) or full fine-tuning (reference = frozen copy).

    Returns the reference network for full fine-tuning, or None for LoRA or when `reference=False` (a recipe
    that never evaluates the reference need not hold a second copy).
    """
    net = adapter.denoiser
    if gradient_checkpointing:
        net.enable_gradient_checkpointing()
    if lora.enabled:
        adapter.add_lora(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules, init=lora.init)
        return None
    frozen = copy.deepcopy(net).to(weight_dtype).requires_grad_(False).eval() if reference else None
    net.to(torch.float32).requires_grad_(True)  # trainable master weights in fp32
    if frozen is not None and lora.ref_cpu_offload and net.device.type != "cpu":
        from accelerate import cpu_offload

        frozen = cpu_offload(frozen.to("cpu"), execution_device=net.device)
    return frozen


def save_weights(adapter: ModelAdapter, model, folder: Path, lora: bool) -> None:
    """LoRA: diffusers-format pytorch_lora_weights.safetensors; full: the denoiser via save_pretrained."""
    if lora:
        adapter.save_lora(folder, model)
    else:
        model.save_pretrained(folder / adapter.denoiser_name, safe_serialization=True)


def load_weights(adapter: ModelAdapter, model, folder: Path, lora: bool) -> None:
    if lora:
        adapter.load_lora_into_denoiser(folder)
    else:
        model.load_state_dict(read_safetensors_folder(folder / adapter.denoiser_name))



def denoising_errors(pred, target):
    """Per-sample denoising error mean_{C,H,W} (prediction - target)^2: [N, C, h, w] -> [N], in fp32."""
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def reference_errors(adapter, model, reference, noisy, t, cond, target, accelerator):
    """Errors [N] of the reference on the same inputs, without grad (LoRA: adapter disabled; full: the frozen copy)."""
    with torch.no_grad(), accelerator.autocast():
        if reference is None:
            with adapters_disabled(model):
                ref_pred = adapter.predict(model, noisy, t, cond)
        else:
            ref_pred = adapter.predict(reference, noisy, t, cond)
    return denoising_errors(ref_pred, target)


@torch.no_grad()
def read_generated_record(path: Path, settings: dict, what: str, fix: str) -> dict:
    """The JSON record of a folder of generated images ({} when there is none yet); a ConfigError naming the settings
    that differ when the folder was made with other `settings` than these. `what` names the images, `fix` the way
    out (e.g. which key points elsewhere)."""
    import json

    if not path.is_file():
        return {}
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("settings") != settings:
        changed = sorted(k for k in settings if record.get("settings", {}).get(k) != settings[k])
        raise ConfigError(f"{path}: {what} were made with other settings ({', '.join(changed)}); delete the folder to "
                          f"regenerate them, or {fix}")
    return record


def validation_images(adapter: ModelAdapter, cfg: ValidationConfig, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Generate the validation prompts at a fixed seed with the pipeline as it is now.

    Returns images [N, 3, H, W] in [0, 1] and their prompts (images_per_prompt consecutive images per prompt).
    """
    prompts = cfg.prompts
    if cfg.prompts_file:
        from imgalign.data import load_prompt_file

        prompts = load_prompt_file(cfg.prompts_file)
    prompts = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    size = cfg.resolution or resolution
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    was_training = adapter.denoiser.training
    adapter.denoiser.eval()
    dtype = adapter.vae.dtype  # mixed precision: frozen weights in bf16/fp16, LoRA in fp32
    with torch.autocast(adapter.device.type, dtype=dtype, enabled=dtype != torch.float32):
        images = adapter.pipe(prompt=prompts, height=size, width=size, num_inference_steps=cfg.num_inference_steps,
                              guidance_scale=cfg.guidance_scale, generator=gen, output_type="pt").images.float()
    adapter.denoiser.train(was_training)
    return images, prompts


def make_validator(accelerator, adapter: ModelAdapter, cfg: ValidationConfig, resolution: int, out_dir: Path,
                   weights=None):
    """-> validate(step) (None when validation.enabled is false): on the main process, write the grid, score it with the validation reward (built once)
    and log `val/<reward>`; other ranks return {}. `weights` is an optional context-manager factory that swaps
    in the weights to validate (e.g. an EMA)."""
    if not cfg.enabled:
        return None
    reward = None
    if cfg.reward:
        from imgalign.rewards import build_reward

        reward = build_reward(cfg.reward)

    def validate(step: int) -> dict[str, float]:
        if not accelerator.is_main_process:
            return {}
        with weights() if weights is not None else contextlib.nullcontext():
            logs = run_validation(adapter, cfg, resolution, out_dir, step, reward)
        if logs:
            accelerator.log(logs, step=step)
        return logs

    return validate


def run_validation(adapter: ModelAdapter, cfg: ValidationConfig, resolution: int, out_dir: Path, step: int,
                   reward=None) -> dict[str, float]:
    """Write validation/step-N.png (one row per prompt, captioned with it; tiles upscaled nearest-neighbour to at
    least 128 px) and, with a reward, return {"val/<name>": mean score}."""
    images, prompts = validation_images(adapter, cfg, resolution)
    (out_dir / "validation").mkdir(parents=True, exist_ok=True)
    k = cfg.images_per_prompt
    captioned_grid(images * 2 - 1, row_labels=prompts[::k], title=f"validation, step {step}").save(
        out_dir / "validation" / f"step-{step:06d}.png")
    if reward is None:
        return {}
    return {f"val/{cfg.reward}": float(reward.score(images, prompts).mean())}
