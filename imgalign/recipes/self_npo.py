"""Self-NPO (Wang et al. 2025, arXiv 2505.11777): a negative-preference model learned from the model itself.

Data-free truncated diffusion fine-tuning. The result is a deliberately *weakened* copy of the model that
is plugged into the unconditional branch of CFG at sampling time (NPO guidance, `imgalign.guidance`):
    pred = pred_neg(x, empty) + s * (pred_pos(x, prompt) - pred_neg(x, empty)).

One training step, per sample (all noise levels are indices k in 0..T-1 of the family's discrete schedule,
with x_k = alpha_k x0 + sigma_k eps; SD-type: alpha = sqrt(alphabar_k), sigma = sqrt(1 - alphabar_k);
flow families: sigma_k = shift((k+1)/T), alpha = 1 - sigma):
  1. a starting state x0: the model's own samples (generated once, before training) or given images
  2. a point of a K-step DDIM grid (K = 25, tau_i = (i+1) T/K - 1), i ~ U{0..K-1}; x = alpha x0 + sigma eps
  3. truncated rollout of the EMA teacher, no grad: up to n = 5 deterministic DDIM steps of size T/K under
     weak/negative guidance  pred = pred_c + w (pred_c - pred_u)  (w = -1: unconditional only; w = -5:
     anti-prompt); the teacher's guided clean estimate x0_hat at the end point k_end = max(k_s - n T/K, 0)
  4. re-noise to a higher level s ~ U{k_end+1..T-1} with the exact forward jump
        x_s = (alpha_s / alpha_t) x_t + sqrt(sigma_s^2 - (alpha_s sigma_t / alpha_t)^2) z
     (= alpha_s (x_t / alpha_t + sqrt(nsr_s^2 - nsr_t^2) z) with nsr = sigma / alpha, the reference's form;
     this one stays finite at alpha_s = 0)
  5. the student, with the real prompt, predicts x0_phi from x_s; loss = pseudo-Huber
        mean( sqrt((x0_phi - x0_hat)^2 + c^2) - c ),  c = 0.001
  6. after each optimizer step the teacher follows: teacher <- d teacher + (1 - d) student, d = 0.999.

A DDIM step with eta = 0 is x' = alpha' x0_hat + sigma' eps_hat, which for flow models is exactly the Euler
step x' = x + (sigma' - sigma) v, so one rollout rule serves every family (epsilon, v, flow velocity).
The teacher is the student's network with the EMA weights swapped in (no second network in memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from imgalign.config import cfg_field
from imgalign.losses.distill import pseudo_huber
from imgalign.recipes import common
from imgalign.recipes.common import (
    ModelConfig,
    ValidationConfig,
    load_model,
    load_weights,
    make_trainable,
    make_validator,
    save_weights,
)
from imgalign.sampling.noise import NoiseLevels, renoise
from imgalign.train import setup
from imgalign.train.ema import EMA
from imgalign.train.loop import Run, lora_layout
from imgalign.train.seeding import global_positions, rand_per_sample, randn_per_sample, sample_generators
from imgalign.train.setup import RunConfig, count_params


@dataclass
class DataConfig:
    prompts: list[str] = cfg_field([], "prompts of the self-generated starting states (and the student's prompts)")
    prompts_file: str | None = cfg_field(None, "or read the prompts from this file (.txt, .jsonl, .csv)", exists="file")
    image_dir: str | None = cfg_field(None, "optional real starting states: a folder of x.png/x.jpg with x.txt "
                                      "captions (the reference's layout); null = the model's own samples", exists="dir")
    num_samples: int = cfg_field(64, "self-generated starting states (cycled over the prompts)", ge=1)
    sample_steps: int = cfg_field(20, "sampler steps for the self-generated starting states", ge=1)
    sample_guidance: float = cfg_field(5.0, "CFG scale for the self-generated starting states")
    resolution: int = cfg_field(512, "image size of starting states", ge=8)


@dataclass
class NPOConfig:
    teacher_guidance: float = cfg_field(-1.0, "w in pred_c + w (pred_c - pred_u) for the teacher rollout: -1 = "
                                        "unconditional (SD1.5 reference), -5 = negative guidance (SDXL reference)")
    ddim_grid: int = cfg_field(25, "K: points of the DDIM grid the rollout walks on", ge=1)
    rollout_steps: int = cfg_field(5, "n: DDIM steps of the truncated teacher rollout", ge=0)
    ema_decay: float = cfg_field(0.999, "teacher <- d teacher + (1 - d) student after every optimizer step",
                                 ge=0, le=1)
    loss: Literal["huber", "l2"] = cfg_field(
        "huber", "on the clean estimate x0: huber (pseudo-Huber, the reference; for small c ~L1, whose minimiser is the median, so the negative drops modes the model "
        "draws on a minority of samples and NPO guidance then amplifies them) | l2 (the mean: the negative keeps "
        "every mode at its rate; on the toy world only l2 beat CFG, README)")
    huber_c: float = cfg_field(0.001, "pseudo-Huber constant c", gt=0)
    num_levels: int = cfg_field(1000, "T: discrete noise levels (SD-type: the scheduler's train timesteps)")


@dataclass
class LoraConfig(common.LoraConfig):
    enabled: bool = cfg_field(False, "train a LoRA adapter (teacher = EMA of the LoRA weights); false = full "
                              "fine-tuning of the denoiser, as in the reference")


@dataclass
class OptimConfig(setup.OptimConfig):
    lr: float = cfg_field(1e-6, "peak learning rate (reference: 1e-6 SD1.5, 1e-7 SDXL, full fine-tuning)")
    weight_decay: float = cfg_field(1e-3, "AdamW weight decay (reference: 1e-3 SD1.5, 0 SDXL)")


@dataclass
class SelfNPOConfig:
    model: ModelConfig = cfg_field(ModelConfig, "the pipeline to derive a negative model from")
    lora: LoraConfig = cfg_field(LoraConfig, "LoRA (true) or full fine-tuning (false, the reference)")
    data: DataConfig = cfg_field(DataConfig, "starting states")
    npo: NPOConfig = cfg_field(NPOConfig, "truncated diffusion fine-tuning")
    optim: OptimConfig = cfg_field(OptimConfig, "optimizer and learning-rate schedule")
    run: RunConfig = cfg_field(RunConfig, "steps, batch, precision, checkpoints, logging")
    validation: ValidationConfig = cfg_field(ValidationConfig, "validation image grids (the student with plain CFG)")

    def __post_init__(self):
        d = self.data
        if not (d.prompts or d.prompts_file or d.image_dir):
            raise ValueError("Self-NPO needs starting states: set data.prompts or data.prompts_file (the model's own "
                             "samples), or data.image_dir (real images)")


Config = SelfNPOConfig


# ------------------------------------------------------------------------------------------------
# noise levels of the family's schedule (the conversions, the re-noising jump `renoise` and the loss
# `pseudo_huber` are pure tensor math in imgalign.sampling.noise and imgalign.losses.distill)
# ------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------
# starting states
# ------------------------------------------------------------------------------------------------
def _prompts(cfg: DataConfig) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        from imgalign.data import load_prompt_file

        prompts += load_prompt_file(cfg.prompts_file)
    return prompts


@torch.no_grad()
def self_samples(adapter, cfg: DataConfig, seed: int, batch: int = 8) -> tuple[Tensor, list[str]]:
    """The model's own samples at CFG `sample_guidance` -> VAE latents [N, C, h, w] and their prompts."""
    prompts = _prompts(cfg)
    if not prompts:
        raise ValueError("Self-NPO needs prompts: set data.prompts or data.prompts_file (or data.image_dir)")
    prompts = [prompts[i % len(prompts)] for i in range(cfg.num_samples)]
    gen = torch.Generator("cpu").manual_seed(seed)
    latents = []
    kw = {"guidance_scale": cfg.sample_guidance}
    for i in range(0, len(prompts), batch):
        images = adapter.pipe(prompt=prompts[i:i + batch], height=cfg.resolution, width=cfg.resolution,
                              num_inference_steps=cfg.sample_steps, generator=gen, output_type="pt", **kw).images
        latents.append(adapter.encode_images(images.float() * 2 - 1, generator=gen).cpu())
    return torch.cat(latents), prompts


@torch.no_grad()
def folder_samples(adapter, cfg: DataConfig, seed: int) -> tuple[Tensor, list[str]]:
    """Images x.png/x.jpg with captions x.txt -> latents (shorter side resized, centre crop)."""
    import numpy as np
    from PIL import Image

    from imgalign.data.errors import DataError, not_utf8
    from imgalign.data.images import read_image

    root = Path(cfg.image_dir)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise DataError(f"data.image_dir={root} has no .png/.jpg/.webp images; point it at a folder of x.png + x.txt")
    outside = [f for f in files if not f.resolve().is_relative_to(root.resolve())]
    if outside:
        raise DataError(f"data.image_dir={root}: {outside[0].name} is a link to a file outside the folder; copy the "
                        "image into the folder instead")
    gen = torch.Generator("cpu").manual_seed(seed)
    latents, prompts = [], []
    r = cfg.resolution
    for f in files:
        cap = f.with_suffix(".txt")
        if not cap.is_file():
            raise DataError(f"{f}: no caption file {cap.name} next to it; write the image's caption there")
        img = read_image(f)
        scale = r / min(img.size)
        img = img.resize((max(r, round(img.width * scale)), max(r, round(img.height * scale))), Image.LANCZOS)
        left, top = (img.width - r) // 2, (img.height - r) // 2
        arr = np.asarray(img.crop((left, top, left + r, top + r)), dtype=np.float32) / 127.5 - 1
        pixels = torch.from_numpy(arr).permute(2, 0, 1)[None]
        latents.append(adapter.encode_images(pixels, generator=gen).cpu())
        try:
            prompts.append(cap.read_text(encoding="utf-8").strip())
        except UnicodeDecodeError as e:
            raise DataError(not_utf8(str(cap), e)) from None
    return torch.cat(latents), prompts


def starting_states(adapter, cfg: SelfNPOConfig, out_dir: Path, is_main: bool, accelerator) -> tuple[Tensor, list[str]]:
    """Computed once per run and stored in the output folder, so a resumed run trains on the same states."""
    from safetensors.torch import load_file, save_file

    path = out_dir / "starting_states.safetensors"
    if is_main and not path.is_file():
        fn = folder_samples if cfg.data.image_dir else self_samples
        latents, prompts = fn(adapter, cfg.data, cfg.run.seed)
        save_file({"latents": latents.contiguous()}, str(path.with_suffix(".tmp")),
                  metadata={"prompts": "\n".join(p.replace("\n", " ") for p in prompts)})
        path.with_suffix(".tmp").rename(path)
    accelerator.wait_for_everyone()  # every rank, always: a rank that saw the file early must not skip the barrier
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        prompts = fh.metadata()["prompts"].split("\n")
    return load_file(str(path))["latents"], prompts


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def train(cfg: SelfNPOConfig) -> dict:
    run = cfg.run
    book = Run(cfg, "self-npo")
    accelerator, dtype = book.accelerator, book.dtype

    adapter = load_model(cfg.model, accelerator.device, dtype)
    latents, prompts = starting_states(adapter, cfg, book.out_dir, accelerator.is_main_process, accelerator)

    make_trainable(adapter, cfg.lora, run.gradient_checkpointing, dtype, reference=False)  # the teacher is an EMA
    net, use_lora = adapter.denoiser, cfg.lora.enabled
    teacher = EMA(net, cfg.npo.ema_decay, name="ema_teacher")  # swapped into the student for teacher forwards
    levels = NoiseLevels(adapter, cfg.npo.num_levels)

    model, optimizer, scheduler = book.prepare(net, cfg.optim, lora_layout(cfg.lora),
                                               lambda m, d: save_weights(adapter, m, d, use_lora),
                                               lambda m, d: load_weights(adapter, m, d, use_lora))
    book.add_state("ema_teacher", teacher.save, teacher.load)
    book.resume()
    start_step = book.start_step
    rank, world = accelerator.process_index, accelerator.num_processes

    trainable, total = count_params(net)
    n = cfg.npo
    book.banner("imgalign self-npo", {
        "model": f"{cfg.model.pretrained} ({adapter.family}, {adapter.prediction_type})",
        "trainable": f"{trainable:,} of {total:,} params ({f'LoRA r={cfg.lora.rank}' if use_lora else 'full'})",
        "teacher": f"EMA of the student (decay {n.ema_decay}), guidance w={n.teacher_guidance:g}",
        "rollout": f"{n.rollout_steps} DDIM steps on a {n.ddim_grid}-point grid, re-noise to a higher level",
        "starting states": f"{len(latents)} ({'images from ' + cfg.data.image_dir if cfg.data.image_dir else 'own samples'})",
        "effective batch": f"{run.batch_size} x {run.grad_accum} accum x {world} procs"
                           f" = {run.batch_size * run.grad_accum * world}/step",
    })
    book.start(make_validator(accelerator, adapter, cfg.validation, cfg.data.resolution, book.out_dir),
               cfg.validation.every)

    step, micro = start_step, start_step * run.grad_accum
    model.train()
    while step < run.max_steps:
        # each sample's starting state, noise and levels come from (seed, step, its position in the effective
        # batch): resume reproduces them, and so does any split over processes and micro-steps
        positions = global_positions(rank, world, micro % run.grad_accum, run.batch_size)
        gens = sample_generators(run.seed, "self-npo", micro // run.grad_accum, positions)
        idx = [int(torch.randint(0, len(latents), (1,), generator=g)) for g in gens]
        batch = {"latents": latents[idx].to(accelerator.device), "prompts": [prompts[i] for i in idx]}
        done = book.micro_step(model, _step, adapter, model, teacher, levels, batch, gens, cfg, accelerator)
        micro += 1
        if not done:
            continue
        teacher.step(step)
        step += 1
        logs = book.end_step(step, book.step_metrics(),
                             {"micro_step": micro})
        book.bar.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/lr']:.2e}")
    return book.finish(step, {"micro_step": micro}, lambda m: save_weights(adapter, m, book.out_dir, use_lora))


def _step(adapter, model, teacher: EMA, levels: NoiseLevels, batch, gens, cfg: SelfNPOConfig, accelerator):
    """One micro-batch, one generator per sample (its grid point, noise, re-noise level and re-noise draw) ->
    (mean loss, metrics)."""
    n = cfg.npo
    x0 = batch["latents"]  # [B, C, h, w]
    b = x0.shape[0]
    dev = x0.device
    cond = adapter.encode_prompts(batch["prompts"])
    w = n.teacher_guidance
    uncond = adapter.encode_uncond(b, cond) if w != 0 else None  # as the pipeline builds it (SDXL: zeros)

    # 2. a point of the DDIM grid, noised
    step = levels.T // n.ddim_grid
    i = torch.cat([torch.randint(0, n.ddim_grid, (1,), generator=g) for g in gens])
    k = (i + 1) * step - 1  # [B] start levels
    eps = randn_per_sample(x0.shape[1:], gens).to(dev)
    a, s = levels.coef(k, x0)
    x = a * x0 + s * eps

    def teacher_pred(x, k):
        """guided teacher prediction pred_c + w (pred_c - pred_u) at levels k [B]"""
        t = levels.model_t[k].to(dev)
        if w == -1:  # pred_c + (-1)(pred_c - pred_u) = pred_u: one forward
            return adapter.predict(model, x, t, uncond).float()
        if w == 0:
            return adapter.predict(model, x, t, cond).float()
        from imgalign.models.adapters import cat_cond

        pu, pc = adapter.predict(model, torch.cat([x, x]), torch.cat([t, t]), cat_cond(uncond, cond)).float().chunk(2)
        return pc + w * (pc - pu)

    # 3. truncated teacher rollout (no grad, EMA weights)
    with torch.no_grad(), teacher.swapped(), accelerator.autocast():
        for _ in range(n.rollout_steps):
            active = k > 0
            if not active.any():
                break
            k_next = (k - step).clamp_min(0)
            x0_hat, eps_hat = levels.to_x0_eps(teacher_pred(x, k), x, k)
            a_n, s_n = levels.coef(k_next, x)
            x_next = a_n * x0_hat + s_n * eps_hat  # DDIM, eta = 0
            mask = active.view(-1, *([1] * (x.dim() - 1))).to(dev)
            x, k = torch.where(mask, x_next.to(x.dtype), x), torch.where(active, k_next, k)
        x0_hat, _ = levels.to_x0_eps(teacher_pred(x, k), x, k)  # the target: the teacher's clean estimate

    # 4. re-noise to a higher level s ~ U{k+1..T-1}
    u = rand_per_sample(gens)
    k_s = (k + 1 + (u * (levels.T - 1 - k)).long()).clamp_max(levels.T - 1)
    z = randn_per_sample(x0.shape[1:], gens).to(dev)
    a_t, s_t = levels.coef(k, x)
    a_s, s_s = levels.coef(k_s, x)
    x_s = renoise(x.float(), a_t, s_t, a_s, s_s, z)

    # 5. student with the real prompt -> x0_phi
    with accelerator.autocast():
        pred = adapter.predict(model, x_s, levels.model_t[k_s].to(dev), cond)
    x0_phi, _ = levels.to_x0_eps(pred.float(), x_s, k_s)
    if n.loss == "huber":
        losses = pseudo_huber(x0_phi, x0_hat, n.huber_c)
    else:  # l2
        losses = (x0_phi - x0_hat.float()).pow(2).flatten(1).mean(1)
    m = {"loss": losses.mean().detach(), "t_end": k.float().mean(), "t_renoise": k_s.float().mean(),
         "target_norm": x0_hat.float().pow(2).mean().sqrt()}
    return losses.mean(), m
