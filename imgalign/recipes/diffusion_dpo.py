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

Two losses of this recipe go beyond the core's pairwise ones (loss.loss_type, each alone):
  mapo  MaPO (Hong et al. 2024, arXiv 2406.06424), margin-aware and reference-free, on pairs: step 4's reference
        forward is skipped (as for the core's reference-free simpo, cpo, orpo, sft). loss.beta = MaPO's beta, the
        weight of the margin term (default 0.1); loss.params: snr_value (0.5), num_train_timesteps (1000).
  kto   Diffusion-KTO (Li et al. 2024, arXiv 2404.04465) on unpaired images, each desirable or not: a JSONL of
        {image, caption, label: true|false} rows, or pairs split in two (winner desirable, loser undesirable, ties
        dropped). Each image gets its own noise and timestep, drawn from (seed, step, its position in the effective
        batch); no partner shares them. With g = err_ref - err (no 1/2: Diffusion-KTO's own convention, default
        beta 1000) the loss is lambda_d (1 - sigma(beta (g - z))) for a desirable image and
        lambda_u (1 - sigma(-beta (g - z))) for an undesirable one; the reference point z = max(0, mean g) over the
        micro-batch of every process, detached, as in the paper's code (loss.params: lambda_d, lambda_u).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from imgalign.config import MISSING, ConfigError, cfg_field, check_local_source
from imgalign.losses import (
    LOSS_NAMES,
    REFERENCE_FREE_LOSSES,
    diffusion_kto_loss,
    diffusion_preference_loss,
    implicit_accuracy,
    mapo_loss,
)
from imgalign.models.adapters import repeat_cond
from imgalign.recipes.common import (
    LoraConfig,
    ModelConfig,
    ValidationConfig,
    denoising_errors,
    load_model,
    load_weights,
    make_trainable,
    make_validator,
    reference_errors,
    save_weights,
)
from imgalign.train.data_order import deterministic_loader
from imgalign.train.loop import Run, lora_layout
from imgalign.train.seeding import global_positions, randn_per_sample, sample_generators
from imgalign.train.setup import OptimConfig, RunConfig, count_params


@dataclass
class DataConfig:
    source: str = cfg_field(MISSING, "Pick-a-Pic-layout pairs: a parquet file/folder, a JSONL file (with an image "
                            "root), a saved `datasets` folder, or a hub dataset id; or (loss.loss_type=[kto]) a JSONL "
                            "of unpaired images {image, caption, label: true|false}")
    layout: Literal["auto", "pairs", "unpaired"] = cfg_field(
        "auto", "pairs: Pick-a-Pic pairs (caption, jpg_0, jpg_1, label_0); unpaired: one image per JSONL row, "
        "{image: path under image_root, caption, label: true = desirable, false = undesirable} (loss.loss_type=[kto] "
        "only); auto: unpaired when the JSONL's first row has an `image` field, else pairs. With [kto], pairs are "
        "split into two unpaired images: the winner desirable, the loser undesirable, ties dropped")
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


# Losses of this recipe beyond the core's pairwise ones, each trained alone: name -> (default beta, loss.params read)
DIFFUSION_ONLY_LOSSES = {
    "mapo": (0.1, ("snr_value", "num_train_timesteps")),  # imgalign.losses.mapo_loss: pairs, reference-free
    "kto": (1000.0, ("lambda_d", "lambda_u")),  # imgalign.losses.diffusion_kto_loss: unpaired images
}
DPO_BETA = 5000.0  # the paper's (Salesforce) convention, SD1.5 and SDXL
REFERENCE_FREE = REFERENCE_FREE_LOSSES | {"mapo"}  # no reference forward when every selected loss is one of these


@dataclass
class LossConfig:
    loss_type: list[str] = cfg_field(["sigmoid"], "losses by name: core pairwise losses (imgalign.losses.LOSS_NAMES: "
                                     "sigmoid = Diffusion-DPO, ipo, hinge, robust, ...) summed with loss_weights; or, "
                                     "alone, mapo (MaPO: margin-aware, reference-free, on pairs) or kto (Diffusion-KTO: "
                                     "desirable / undesirable images, unpaired or pairs split in two)")
    loss_weights: list[float] | None = cfg_field(None, "one weight per loss_type (null: all 1)")
    beta: float | None = cfg_field(None, "loss strength (null: the loss's default). DPO family: KL strength in the "
                                   "paper's convention, 5000 (SD1.5/SDXL; = diffusers' 2500); mapo: weight of the "
                                   "margin term, 0.1; kto: Diffusion-KTO's beta on err_ref - err, 1000", gt=0)
    params: dict[str, Any] = cfg_field({}, "extra loss parameters, e.g. {label_smoothing: 0.1} or {f_divergence: "
                                       "js_divergence}; mapo: {snr_value: 0.5, num_train_timesteps: 1000}; kto: "
                                       "{lambda_d: 1.0, lambda_u: 1.0} (weights of desirable / undesirable images)")
    noise_range: list[float] = cfg_field([0.0, 1.0], "[lo, hi]: train on this fraction of the noise schedule only "
                                         "(0 clean, 1 pure noise; DDPM t/T, flow pre-shift u). [0.6, 1] keeps the "
                                         "high-noise steps where a sample's layout and global modes are decided")

    def __post_init__(self):
        from imgalign.models.adapters import check_noise_range

        try:
            check_noise_range(self.noise_range)
        except ValueError as err:
            raise ValueError(f"loss.noise_range: {err}; e.g. loss.noise_range=[0.6,1.0]") from None
        names = list(self.loss_type)
        if not names:
            raise ValueError("loss.loss_type is empty; give at least one loss, e.g. loss.loss_type=[sigmoid]")
        valid = (*LOSS_NAMES, *DIFFUSION_ONLY_LOSSES)
        for name in names:  # unknown loss names and parameters fail now, not after the model has loaded
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)[0]
                raise ValueError(f"loss.loss_type: unknown loss type {name!r}; did you mean {close!r}? "
                                 f"Valid: {', '.join(valid)}")
        alone = [n for n in names if n in DIFFUSION_ONLY_LOSSES]
        if alone:
            name, readable = alone[0], DIFFUSION_ONLY_LOSSES[alone[0]][1]
            if len(names) > 1:
                raise ValueError(f"loss.loss_type: {name} is trained alone, not with {[n for n in names if n != name]};"
                                 f" use loss.loss_type=[{name}]")
            if self.loss_weights is not None:
                raise ValueError(f"loss.loss_weights: {name} is a single loss; leave loss.loss_weights null")
            for key in self.params:
                if key not in readable:
                    close = difflib.get_close_matches(key, readable, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"loss.params: parameter {key!r} is not read by loss type {name!r}{hint}. "
                                     f"Parameters it reads: {', '.join(readable)}")
            return
        z = torch.zeros(2)
        try:
            diffusion_preference_loss(self.loss_type, z, z, z, z, beta=self.resolved_beta, weights=self.loss_weights,
                                      **self.params)
        except (ValueError, TypeError, KeyError) as err:
            text = str(err)
            key = "loss.loss_type" if "loss type" in text else "loss.loss_weights" if "weight" in text else "loss.params"
            raise ValueError(f"{key}: {text}") from None

    @property
    def resolved_beta(self) -> float:
        """beta, or with beta null the selected loss's default (5000 for the DPO family, 0.1 mapo, 1000 kto). Resolved
        here, not in __post_init__: the config system builds the defaults before the overrides pick the loss."""
        if self.beta is not None:
            return float(self.beta)
        return DIFFUSION_ONLY_LOSSES.get(self.loss_type[0], (DPO_BETA,))[0]


@dataclass
class DiffusionDPOConfig:
    model: ModelConfig = cfg_field(ModelConfig, "which pipeline to align")
    lora: LoraConfig = cfg_field(LoraConfig, "LoRA or full fine-tuning")
    data: DataConfig = cfg_field(DataConfig, "preference pairs")
    loss: LossConfig = cfg_field(LossConfig, "preference loss")
    optim: OptimConfig = cfg_field(OptimConfig, "optimizer and learning-rate schedule")
    run: RunConfig = cfg_field(RunConfig, "steps, batch, precision, checkpoints, logging")
    validation: ValidationConfig = cfg_field(ValidationConfig, "validation image grids")

    def __post_init__(self):
        kto = is_unpaired(self.loss)
        if kto and self.data.keep_ties:
            raise ValueError("data.keep_ties=true: loss.loss_type=[kto] splits each pair into a desirable winner and "
                             "an undesirable loser, and a tie has neither; set data.keep_ties=false")
        if self.data.layout == "unpaired" and not kto:
            raise ValueError(f"data.layout=unpaired: unpaired images (one desirable or undesirable image per row) "
                             f"train only with loss.loss_type=[kto], not {self.loss.loss_type}")


Config = DiffusionDPOConfig


def is_unpaired(loss: LossConfig) -> bool:
    """Whether the loss trains on unpaired images (Diffusion-KTO) rather than on pairs."""
    return list(loss.loss_type) == ["kto"]


def dpo_losses(model_err, ref_err, labels, loss: LossConfig):
    """Per-sample errors [2B] (winners first; ref_err None for reference-free losses) and pair labels [B] -> per-pair
    loss [B] and the implicit rewards of winner and loser [B].

    label 1: winner preferred; label 0.5: tie, trained as 0.5 L(w, l) + 0.5 L(l, w).
    MaPO's rewards are f(err) = s err / (exp(s err) - 1), decreasing in the error (1 at err 0): how well the policy
    itself denoises the winner and the loser, with no reference. So for mapo rewards/chosen and rewards/rejected are
    the mean f of winners and losers, rewards/margins the mean f(err_w) - f(err_l) (MaPO's log-odds before the factor
    T), and rewards/accuracies the fraction of pairs whose winner the policy denoises better (not 0.5 at step 0).
    """
    err_w, err_l = model_err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2) if ref_err is not None else (None, None)

    def pair_loss(a, b, ref_a, ref_b):
        if list(loss.loss_type) == ["mapo"]:
            return mapo_loss(a, b, beta=loss.resolved_beta, **loss.params)
        return diffusion_preference_loss(loss.loss_type, a, b, ref_a, ref_b, beta=loss.resolved_beta,
                                         weights=loss.loss_weights, **loss.params)

    out = pair_loss(err_w, err_l, ref_w, ref_l)
    losses = out.losses
    if (labels != 1).any():
        swapped = pair_loss(err_l, err_w, ref_l, ref_w)
        losses = labels * losses + (1 - labels) * swapped.losses
    return losses, out.chosen_rewards, out.rejected_rewards


def train(cfg: DiffusionDPOConfig) -> dict:
    from imgalign.data import detect_layout

    run, d = cfg.run, cfg.data
    kto = is_unpaired(cfg.loss)
    layout = d.layout if d.layout != "auto" else detect_layout(d.source)
    if layout == "unpaired" and not kto:
        raise ConfigError(f"data.source={d.source} holds unpaired images ({{image, caption, label}} rows), which train "
                          f"only with loss.loss_type=[kto], not {cfg.loss.loss_type}; for pairs give Pick-a-Pic rows "
                          "(caption, jpg_0, jpg_1, label_0)")
    reference_free = set(cfg.loss.loss_type) <= REFERENCE_FREE
    book = Run(cfg, "diffusion-dpo")
    accelerator, dtype = book.accelerator, book.dtype

    # ---- model, trainable part, reference -------------------------------------------------------
    adapter = load_model(cfg.model, accelerator.device, dtype)
    reference = make_trainable(adapter, cfg.lora, run.gradient_checkpointing, dtype)
    use_lora = cfg.lora.enabled

    # ---- data: pairs, or (kto) unpaired images -----------------------------------------------------
    from imgalign.data import (
        ImageTransform,
        PairTransform,
        collate_images,
        collate_pairs,
        load_preference_pairs,
        load_unpaired_images,
        split_pairs,
    )

    if layout == "unpaired":
        data = load_unpaired_images(d.source, image_root=d.image_root, on_error=d.on_error, max_rows=d.max_rows)
    else:
        data = load_preference_pairs(d.source, split=d.split, image_root=d.image_root, keep_ties=d.keep_ties,
                                     on_error=d.on_error, max_rows=d.max_rows)
        if kto:
            data = split_pairs(data)  # item 2i: pair i's winner (desirable), 2i + 1: its loser
    make_transform, collate = (ImageTransform, collate_images) if kto else (PairTransform, collate_pairs)
    transform = make_transform(d.resolution, random_crop=d.random_crop, hflip=d.hflip, seed=run.seed)
    num_workers = d.num_workers
    if d.cache_latents:  # the cache lives in this process, so no worker processes
        transform, collate, num_workers = _CachedLatents(adapter, transform), collate_cached, 0

    # ---- optimizer, resume -------------------------------------------------------------------------
    model, optimizer, scheduler = book.prepare(adapter.denoiser, cfg.optim, lora_layout(cfg.lora),
                                               lambda m, folder: save_weights(adapter, m, folder, use_lora),
                                               lambda m, folder: load_weights(adapter, m, folder, use_lora))
    book.resume()
    start_step = book.start_step
    rank, world = accelerator.process_index, accelerator.num_processes
    loader = deterministic_loader(data, transform, collate, run.batch_size, run.seed, rank, world,
                                  start_step * run.grad_accum, num_workers, run.grad_accum)

    trainable, total = count_params(adapter.denoiser)
    unit = "images" if kto else "pairs"
    convention = {"mapo": "MaPO's margin weight", "kto": "Diffusion-KTO's, on err_ref - err"}
    book.banner("imgalign diffusion-dpo", {
        "model": f"{cfg.model.pretrained} ({adapter.family}, {adapter.prediction_type})",
        "trainable": f"{trainable:,} of {total:,} params ({f'LoRA r={cfg.lora.rank}' if use_lora else 'full'})",
        "reference": f"none: {'+'.join(cfg.loss.loss_type)} is reference-free (no reference forward)"
                     if reference_free else "same network, adapter disabled" if use_lora else "frozen copy",
        unit: data.stats.summary(),
        "loss": f"{'+'.join(cfg.loss.loss_type)}, beta={cfg.loss.resolved_beta:g} "
                f"({convention.get(cfg.loss.loss_type[0], 'paper convention')})",
        "effective batch": f"{run.batch_size} {unit} x {run.grad_accum} accum x {world} procs"
                           f" = {run.batch_size * run.grad_accum * world} {unit}/step",
    })
    book.start(make_validator(accelerator, adapter, cfg.validation, d.resolution, book.out_dir),
               cfg.validation.every)

    # ---- loop ---------------------------------------------------------------------------------------
    step, micro = start_step, start_step * run.grad_accum
    data_iter = iter(loader)
    model.train()
    step_fn = _kto_step if kto else _step  # looked up here, after any test's monkeypatch
    while step < run.max_steps:
        batch = next(data_iter)
        # noise, timesteps and VAE samples are drawn per pair (kto: per image) from (seed, step, its position in the
        # effective batch): resume reproduces them, and so does any split over processes and micro-steps
        positions = global_positions(rank, world, micro % run.grad_accum, len(batch["labels"]))
        gens = sample_generators(run.seed, "dpo", micro // run.grad_accum, positions)
        done = book.micro_step(model, step_fn, adapter, model, reference, batch, gens, cfg, accelerator)
        micro += 1
        if not done:
            continue
        step += 1
        logs = book.end_step(step, book.step_metrics(),
                             {"micro_step": micro})
        book.bar.set_postfix(loss=f"{logs['train/loss']:.4f}", acc=f"{logs['train/rewards/accuracies']:.2f}",
                             lr=f"{logs['train/lr']:.2e}")
    return book.finish(step, {"micro_step": micro}, lambda m: save_weights(adapter, m, book.out_dir, use_lora))


def _encode(adapter, batch, gens, accelerator):
    """A batch of B pairs (or B images) -> latents [kB, C, h, w] (k = 2: winners first, then losers; k = 1: images)
    and the conditioning of the B captions. Sample j's VAE draws come from gens[j]: a pair's winner, then its loser."""
    b = len(batch["labels"])
    if "latents" in batch:  # cached: sample from the stored latent distribution with the samples' generators
        mean, std = batch["latents"].chunk(2, dim=1)
        latents = (mean + std * randn_per_sample(mean.shape[1:], gens * (mean.shape[0] // b))).to(accelerator.device)
        return latents, {k: v.to(accelerator.device) for k, v in batch["cond"].items()}
    pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]]) if "pixels_w" in batch else batch["pixels"]
    latents = adapter.encode_images(pixels, generator=gens * (pixels.shape[0] // b))  # [kB, C, h, w]
    cond = adapter.encode_prompts(batch["captions"], original_sizes=batch["original_sizes"],
                                  crops_top_left=batch["crops_top_left"], target_size=pixels.shape[-2:])
    return latents, cond


def _step(adapter, model, reference, batch, gens, cfg: DiffusionDPOConfig, accelerator):
    """One micro-batch of B pairs, one generator per pair -> (mean loss, metrics).

    Pair j draws, in this order from gens[j]: the winner's VAE sample, the loser's, the noise, the timestep.
    """
    labels = batch["labels"].to(accelerator.device)  # [B]
    b = labels.shape[0]
    latents, cond = _encode(adapter, batch, gens, accelerator)  # [2B, C, h, w]
    noise = randn_per_sample(latents.shape[1:], gens).to(latents.device).repeat(2, 1, 1, 1)  # same noise per pair
    t = torch.cat([adapter.sample_timesteps(1, generator=g, noise_range=cfg.loss.noise_range) for g in gens])
    t = t.repeat(2)  # same t per pair
    noisy, target = adapter.noise_and_target(latents, noise, t)
    cond = repeat_cond(cond, 2)

    with accelerator.autocast():
        pred = adapter.predict(model, noisy, t, cond)
    model_err = denoising_errors(pred, target)  # [2B]
    ref_err = None  # reference-free losses (mapo, simpo, ...) never read it: no reference forward
    if not set(cfg.loss.loss_type) <= REFERENCE_FREE:
        ref_err = reference_errors(adapter, model, reference, noisy, t, cond, target, accelerator)  # [2B]

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
    }
    if ref_err is not None:
        m.update({"ref_err_w": ref_err[:b].mean(), "ref_err_l": ref_err[b:].mean()})
    return losses.mean(), m


def _mean_where(x, mask):
    """Mean of x over mask, NaN when the mask is empty (a micro-batch without desirable or undesirable images)."""
    return x[mask].mean() if mask.any() else torch.tensor(math.nan)


def _kto_step(adapter, model, reference, batch, gens, cfg: DiffusionDPOConfig, accelerator):
    """Diffusion-KTO on one micro-batch of B unpaired images, one generator per image -> (mean loss, metrics).

    Image j draws, in this order from gens[j]: its VAE sample, its noise, its timestep (its own: unpaired images
    share nothing). Metrics as DPO's where they mean something: rewards/chosen and rewards/rejected are the mean
    implicit reward beta * g of the desirable and the undesirable images (g = err_ref - err), rewards/margins their
    difference, rewards/accuracies the fraction of images on their label's side of the reference point z (g > z for
    desirable, g < z for undesirable; on it counts one half, so 0.5 at step 0), kl the reference point z;
    model_err_w / _l and ref_err_w / _l are the errors of desirable / undesirable images.
    """
    desirable = batch["labels"].to(accelerator.device) == 1  # [B]
    latents, cond = _encode(adapter, batch, gens, accelerator)  # [B, C, h, w]
    noise = randn_per_sample(latents.shape[1:], gens).to(latents.device)
    t = torch.cat([adapter.sample_timesteps(1, generator=g, noise_range=cfg.loss.noise_range) for g in gens])
    noisy, target = adapter.noise_and_target(latents, noise, t)

    with accelerator.autocast():
        pred = adapter.predict(model, noisy, t, cond)
    model_err = denoising_errors(pred, target)  # [B]
    ref_err = reference_errors(adapter, model, reference, noisy, t, cond, target, accelerator)  # [B]
    g = (ref_err - model_err).detach()  # [B] implicit reward
    mean_g = g.mean().reshape(1)
    if accelerator.num_processes > 1:  # the micro-batch of every process (collective: every rank calls it)
        mean_g = accelerator.reduce(mean_g, reduction="mean")
    kl = mean_g[0].clamp(min=0)  # reference point z, detached
    beta = cfg.loss.resolved_beta
    losses = diffusion_kto_loss(model_err, ref_err, desirable, beta=beta, kl=kl, **cfg.loss.params)  # [B]

    reward = beta * g
    signed = torch.where(desirable, g - kl, kl - g)  # > 0: on the label's side of z
    chosen, rejected = _mean_where(reward, desirable), _mean_where(reward, ~desirable)
    m = {
        "loss": losses.mean().detach(),
        "rewards/accuracies": implicit_accuracy(signed, torch.zeros_like(signed)),
        "rewards/margins": chosen - rejected,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "kl": kl,
        "model_err_w": _mean_where(model_err.detach(), desirable),
        "model_err_l": _mean_where(model_err.detach(), ~desirable),
        "ref_err_w": _mean_where(ref_err, desirable),
        "ref_err_l": _mean_where(ref_err, ~desirable),
    }
    return losses.mean(), m


class _CachedLatents:
    """Transform wrapper that stores each item's VAE latent distribution (a pair: winner and loser; an unpaired item:
    its image) and text conditioning once."""

    def __init__(self, adapter, transform):
        self.adapter, self.transform, self.cache = adapter, transform, {}

    @torch.no_grad()
    def __call__(self, item, index: int, epoch: int):
        if index not in self.cache:
            x = self.transform(item, index=index, epoch=0)
            images = [x["pixels_w"], x["pixels_l"]] if "pixels_w" in x else [x["pixels"]]
            pixels = torch.stack(images).to(self.adapter.vae.device, self.adapter.vae.dtype)  # [k, 3, R, R]
            dist = self.adapter.vae.encode(pixels).latent_dist
            cfg = self.adapter.vae.config
            shift, scale = (cfg.get("shift_factor") or 0.0), cfg.scaling_factor
            mean, std = ((dist.mean - shift) * scale).float().cpu(), (dist.std * scale).float().cpu()  # [k, C, h, w]
            cond = self.adapter.encode_prompts([x["caption"]], original_sizes=torch.tensor([x["original_size"]]),
                                               crops_top_left=torch.tensor([x["crop_top_left"]]),
                                               target_size=pixels.shape[-2:])
            self.cache[index] = {"caption": x["caption"], "label": x["label"], "mean": mean, "std": std,
                                 "cond": {k: v[0].cpu() for k, v in cond.items()}}
        return self.cache[index]


def collate_cached(items):
    """Cached items -> latents [kB, 2C, h, w] (mean | std; pairs, k = 2: winners first; unpaired images, k = 1) and
    stacked conditioning."""
    k = items[0]["mean"].shape[0]
    mean = torch.cat([torch.stack([it["mean"][j] for it in items]) for j in range(k)])
    std = torch.cat([torch.stack([it["std"][j] for it in items]) for j in range(k)])
    return {
        "latents": torch.cat([mean, std], dim=1),
        "cond": {key: torch.stack([it["cond"][key] for it in items]) for key in items[0]["cond"]},
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.float32),
        "captions": [it["caption"] for it in items],
    }
