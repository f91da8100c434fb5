"""Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908), and every core preference loss, on any family.

One training step, read top to bottom:
  1. a batch of B preference pairs, winner first: pixels [2B, 3, R, R] = [w_1..w_B, l_1..l_B]
  2. VAE latents; the SAME noise and the SAME timestep for both images of a pair
  3. text conditioning computed once per pair and repeated for the two halves
  4. one trainable forward over 2B; one reference forward on identical inputs without grad
     (LoRA: the same network with its adapter disabled; full fine-tuning: a frozen copy)
  5. per-sample errors err = mean_{C,H,W} (prediction - target)^2, target by the family's prediction type
     (epsilon, v, or flow velocity)
  6. errors -> log-likelihoods log p = -err/2 -> the shared loss core (sigmoid DPO by default)

Beta convention (one for the whole toolkit): the original paper's / Salesforce code's,
    loss = -log sigmoid( -(beta/2) * [(errθ_w - errθ_l) - (err_ref_w - err_ref_l)] ),
beta = 5000 for SD1.5 and SDXL. diffusers' research script writes -log sigmoid(beta_hf * (ref_diff - model_diff)),
so its beta_hf = 2500 is our 5000 (`imgalign.losses.diffusion.beta_from_diffusers`).

Ties (label 0.5), when kept, are trained symmetrically: loss = 0.5 L(w, l) + 0.5 L(l, w), which pushes the
implicit reward margin of the pair toward zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from imgalign.config import MISSING, cfg_field, check_local_source
from imgalign.losses import diffusion_preference_loss, implicit_accuracy
from imgalign.models.adapters import adapters_disabled, repeat_cond
from imgalign.recipes.common import (
    LoraConfig,
    ModelConfig,
    ValidationConfig,
    load_model,
    load_weights,
    make_trainable,
    make_validator,
    save_weights,
)
from imgalign.train.data_order import deterministic_loader
from imgalign.train.loop import Run, lora_layout
from imgalign.train.seeding import global_positions, randn_per_sample, sample_generators
from imgalign.train.setup import OptimConfig, RunConfig, count_params


@dataclass
class DataConfig:
    source: str = cfg_field(MISSING, "Pick-a-Pic-layout pairs: a parquet file/folder, a JSONL file (with an image "
                            "root), a saved `datasets` folder, or a hub dataset id")
    split: str = cfg_field("train", "split name for `datasets` sources")
    image_root: str | None = cfg_field(None, "JSONL sources: folder the image paths are relative to (default: the JSONL's folder)")
    resolution: int = cfg_field(512, "training resolution R (shorter side resized to R, then an R x R crop)", ge=8)
    random_crop: bool = cfg_field(False, "random instead of centre crop (the same crop for both images of a pair)")
    hflip: bool = cfg_field(True, "random horizontal flip (the same flip for both images of a pair)")
    keep_ties: bool = cfg_field(False, "keep label_0 == 0.5 pairs (trained symmetrically); default drops and counts them")
    on_error: Literal["raise", "skip"] = cfg_field("raise", "bad rows: raise (error names file and row) | skip "
                                                  "(counted and logged)")
    max_rows: int | None = cfg_field(None, "use only the first N rows", ge=1)
    cache_latents: bool = cfg_field(False, "encode each pair's VAE latent distribution and text conditioning once and "
                                    "reuse them (augmentation is then fixed per item: epoch 0's crop/flip)")
    num_workers: int = cfg_field(0, "DataLoader worker processes", ge=0)

    def __post_init__(self):
        check_local_source("data.source", self.source)


@dataclass
class LossConfig:
    loss_type: list[str] = cfg_field(["sigmoid"], "core preference losses by name (imgalign.losses), summed with loss_weights")
    loss_weights: list[float] | None = cfg_field(None, "one weight per loss_type (null: all 1)")
    beta: float = cfg_field(5000.0, "KL strength in the paper's convention (SD1.5/SDXL: 5000 = diffusers' 2500)",
                            gt=0)
    params: dict[str, Any] = cfg_field({}, "extra loss parameters, e.g. {label_smoothing: 0.1}, {gamma: 0.5} or "
                                       "{f_divergence: js_divergence}")
    noise_range: list[float] = cfg_field([0.0, 1.0], "[lo, hi]: train on this fraction of the noise schedule only "
                                         "(0 clean, 1 pure noise; DDPM t/T, flow pre-shift u). [0.6, 1] keeps the "
                                         "high-noise steps where a sample's layout and global modes are decided")

    def __post_init__(self):
        from imgalign.models.adapters import check_noise_range

        try:
            check_noise_range(self.noise_range)
        except ValueError as err:
            raise ValueError(f"loss.noise_range: {err}; e.g. loss.noise_range=[0.6,1.0]") from None
        z = torch.zeros(2)  # unknown loss names and parameters fail now, not after the model has loaded
        try:
            diffusion_preference_loss(self.loss_type, z, z, z, z, beta=self.beta, weights=self.loss_weights,
                                      **self.params)
        except (ValueError, TypeError, KeyError) as err:
            text = str(err)
            key = "loss.loss_type" if "loss type" in text else "loss.loss_weights" if "weight" in text else "loss.params"
            raise ValueError(f"{key}: {text}") from None


@dataclass
class DiffusionDPOConfig:
    model: ModelConfig = cfg_field(ModelConfig, "which pipeline to align")
    lora: LoraConfig = cfg_field(LoraConfig, "LoRA or full fine-tuning")
    data: DataConfig = cfg_field(DataConfig, "preference pairs")
    loss: LossConfig = cfg_field(LossConfig, "preference loss")
    optim: OptimConfig = cfg_field(OptimConfig, "optimizer and learning-rate schedule")
    run: RunConfig = cfg_field(RunConfig, "steps, batch, precision, checkpoints, logging")
    validation: ValidationConfig = cfg_field(ValidationConfig, "validation image grids")


Config = DiffusionDPOConfig


def dpo_losses(model_err, ref_err, labels, loss: LossConfig):
    """Per-sample errors [2B] (winners first) and pair labels [B] -> per-pair loss [B] and rewards.

    label 1: winner preferred; label 0.5: tie, trained as 0.5 L(w, l) + 0.5 L(l, w).
    """
    err_w, err_l = model_err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2)
    kw = dict(beta=loss.beta, weights=loss.loss_weights, **loss.params)
    out = diffusion_preference_loss(loss.loss_type, err_w, err_l, ref_w, ref_l, **kw)
    losses = out.losses
    if (labels != 1).any():
        swapped = diffusion_preference_loss(loss.loss_type, err_l, err_w, ref_l, ref_w, **kw)
        losses = labels * losses + (1 - labels) * swapped.losses
    return losses, out.chosen_rewards, out.rejected_rewards


def train(cfg: DiffusionDPOConfig) -> dict:
    run = cfg.run
    book = Run(cfg, "diffusion-dpo")
    accelerator, dtype = book.accelerator, book.dtype

    # ---- model, trainable part, reference -------------------------------------------------------
    adapter = load_model(cfg.model, accelerator.device, dtype)
    reference = make_trainable(adapter, cfg.lora, run.gradient_checkpointing, dtype)
    use_lora = cfg.lora.enabled

    # ---- data -------------------------------------------------------------------------------------
    from imgalign.data import PairTransform, collate_pairs, load_preference_pairs

    pairs = load_preference_pairs(cfg.data.source, split=cfg.data.split, image_root=cfg.data.image_root,
                                  keep_ties=cfg.data.keep_ties, on_error=cfg.data.on_error, max_rows=cfg.data.max_rows)
    transform = PairTransform(cfg.data.resolution, random_crop=cfg.data.random_crop, hflip=cfg.data.hflip, seed=run.seed)
    collate, num_workers = collate_pairs, cfg.data.num_workers
    if cfg.data.cache_latents:  # the cache lives in this process, so no worker processes
        transform, collate, num_workers = _CachedPairs(adapter, transform), collate_cached, 0

    # ---- optimizer, resume -------------------------------------------------------------------------
    model, optimizer, scheduler = book.prepare(adapter.denoiser, cfg.optim, lora_layout(cfg.lora),
                                               lambda m, d: save_weights(adapter, m, d, use_lora),
                                               lambda m, d: load_weights(adapter, m, d, use_lora))
    book.resume()
    start_step = book.start_step
    rank, world = accelerator.process_index, accelerator.num_processes
    loader = deterministic_loader(pairs, transform, collate, run.batch_size, run.seed, rank, world,
                                  start_step * run.grad_accum, num_workers, run.grad_accum)

    trainable, total = count_params(adapter.denoiser)
    book.banner("imgalign diffusion-dpo", {
        "model": f"{cfg.model.pretrained} ({adapter.family}, {adapter.prediction_type})",
        "trainable": f"{trainable:,} of {total:,} params ({f'LoRA r={cfg.lora.rank}' if use_lora else 'full'})",
        "reference": "same network, adapter disabled" if use_lora else "frozen copy",
        "pairs": pairs.stats.summary(),
        "loss": f"{'+'.join(cfg.loss.loss_type)}, beta={cfg.loss.beta:g} (paper convention)",
        "effective batch": f"{run.batch_size} pairs x {run.grad_accum} accum x {world} procs"
                           f" = {run.batch_size * run.grad_accum * world} pairs/step",
    })
    book.start(make_validator(accelerator, adapter, cfg.validation, cfg.data.resolution, book.out_dir),
               cfg.validation.every)

    # ---- loop ---------------------------------------------------------------------------------------
    step, micro = start_step, start_step * run.grad_accum
    data_iter = iter(loader)
    model.train()
    while step < run.max_steps:
        batch = next(data_iter)
        # noise, timesteps and VAE samples are drawn per pair from (seed, step, the pair's position in the
        # effective batch): resume reproduces them, and so does any split over processes and micro-steps
        positions = global_positions(rank, world, micro % run.grad_accum, len(batch["labels"]))
        gens = sample_generators(run.seed, "dpo", micro // run.grad_accum, positions)
        with accelerator.accumulate(model):
            loss, m = _step(adapter, model, reference, batch, gens, cfg, accelerator)
            book.backward(loss)
            if accelerator.sync_gradients:
                book.apply_gradients()
        book.metrics.add(m)
        micro += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        logs = book.end_step(step, {f"train/{k}": v for k, v in book.metrics.reduce(accelerator).items()},
                             {"micro_step": micro})
        book.bar.set_postfix(loss=f"{logs['train/loss']:.4f}", acc=f"{logs['train/rewards/accuracies']:.2f}",
                             lr=f"{logs['train/lr']:.2e}")
    return book.finish(step, {"micro_step": micro}, lambda m: save_weights(adapter, m, book.out_dir, use_lora))


def _step(adapter, model, reference, batch, gens, cfg: DiffusionDPOConfig, accelerator):
    """One micro-batch of B pairs, one generator per pair -> (mean loss, metrics).

    Pair j draws, in this order from gens[j]: the winner's VAE sample, the loser's, the noise, the timestep.
    """
    labels = batch["labels"].to(accelerator.device)  # [B]
    b = labels.shape[0]
    if "latents" in batch:  # cached: sample from the stored latent distribution with the pairs' generators
        mean, std = batch["latents"].chunk(2, dim=1)
        latents = (mean + std * randn_per_sample(mean.shape[1:], gens + gens)).to(accelerator.device)
        cond = {k: v.to(accelerator.device) for k, v in batch["cond"].items()}
    else:
        pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]])  # [2B, 3, R, R], winners first
        latents = adapter.encode_images(pixels, generator=gens + gens)  # [2B, C, h, w]
        cond = adapter.encode_prompts(batch["captions"], original_sizes=batch["original_sizes"],
                                      crops_top_left=batch["crops_top_left"], target_size=pixels.shape[-2:])
    noise = randn_per_sample(latents.shape[1:], gens).to(latents.device).repeat(2, 1, 1, 1)  # same noise per pair
    t = torch.cat([adapter.sample_timesteps(1, generator=g, noise_range=cfg.loss.noise_range) for g in gens])
    t = t.repeat(2)  # same t per pair
    noisy, target = adapter.noise_and_target(latents, noise, t)
    cond = repeat_cond(cond, 2)

    with accelerator.autocast():
        pred = adapter.predict(model, noisy, t, cond)
    model_err = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # [2B]
    with torch.no_grad(), accelerator.autocast():
        if reference is None:
            with adapters_disabled(model):
                ref_pred = adapter.predict(model, noisy, t, cond)
        else:
            ref_pred = adapter.predict(reference, noisy, t, cond)
    ref_err = (ref_pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # [2B]

    losses, chosen, rejected = dpo_losses(model_err, ref_err, labels, cfg.loss)
    decided = labels == 1
    m = {
        "loss": losses.mean().detach(),
        "rewards/accuracies": implicit_accuracy(chosen[decided], rejected[decided]) if decided.any() else torch.tensor(math.nan),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "model_err_w": model_err[:b].mean().detach(),
        "model_err_l": model_err[b:].mean().detach(),
        "ref_err_w": ref_err[:b].mean(),
        "ref_err_l": ref_err[b:].mean(),
    }
    return losses.mean(), m


class _CachedPairs:
    """Transform wrapper that stores each item's VAE latent distribution and text conditioning once."""

    def __init__(self, adapter, transform):
        self.adapter, self.transform, self.cache = adapter, transform, {}

    @torch.no_grad()
    def __call__(self, item, index: int, epoch: int):
        if index not in self.cache:
            x = self.transform(item, index=index, epoch=0)
            pixels = torch.stack([x["pixels_w"], x["pixels_l"]]).to(self.adapter.vae.device, self.adapter.vae.dtype)
            dist = self.adapter.vae.encode(pixels).latent_dist
            cfg = self.adapter.vae.config
            shift, scale = (cfg.get("shift_factor") or 0.0), cfg.scaling_factor
            mean, std = ((dist.mean - shift) * scale).float().cpu(), (dist.std * scale).float().cpu()  # [2, C, h, w]
            cond = self.adapter.encode_prompts([x["caption"]], original_sizes=torch.tensor([x["original_size"]]),
                                               crops_top_left=torch.tensor([x["crop_top_left"]]),
                                               target_size=pixels.shape[-2:])
            self.cache[index] = {"caption": x["caption"], "label": x["label"], "mean": mean, "std": std,
                                 "cond": {k: v[0].cpu() for k, v in cond.items()}}
        return self.cache[index]


def collate_cached(items):
    """Cached items -> latents [2B, 2C, h, w] (mean | std, winners first) and stacked conditioning."""
    mean = torch.cat([torch.stack([it["mean"][0] for it in items]), torch.stack([it["mean"][1] for it in items])])
    std = torch.cat([torch.stack([it["std"][0] for it in items]), torch.stack([it["std"][1] for it in items])])
    return {
        "latents": torch.cat([mean, std], dim=1),
        "cond": {k: torch.stack([it["cond"][k] for it in items]) for k in items[0]["cond"]},
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.float32),
        "captions": [it["caption"] for it in items],
    }
