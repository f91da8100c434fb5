"""Diffusion-DRO (NeurIPS 2025, arXiv 2510.18353; reference code basiclab/DiffusionDRO): preference
learning as ranking expert demonstrations above the model's own online samples, on any family.

Networks: the trained policy phi; the reference (LoRA: the same network with its adapters off; full fine-tuning: a
frozen copy); a lagged sampler theta~, copied from phi every `dro.sync_every` optimizer steps (LoRA: a second
adapter "lagged" on the same base, not a third network).

One micro-step, read top to bottom:
  1. every `dro.refresh_every` micro-steps the lagged sampler draws `dro.buffer_batch` trajectories for expert rows'
     prompts (dropped to "" with probability `data.prompt_dropout`), deterministic DDIM / Euler steps on a per-sample
     jittered grid of `dro.sample_steps` noise levels; for every step it stores the latent that entered the step,
     the level and the sampler's prediction there. The FIFO replay buffer keeps the newest `dro.buffer_size`.
  2. B items: a random trajectory and a random step of it (x_t, t, pred~), with its row's expert image x0 and prompt;
     the expert is noised at the same t with fresh noise: x_bar = alpha_t x0 + sigma_t eps_bar.
  3. one 2B forward of phi and one no-grad 2B forward of the reference over [x_bar, x_t], the same t and prompt:
       E = || f(x_bar) - target(x0, eps_bar) ||^2     (the family's denoising target: eps, v or flow velocity)
       P = || f(x_t) - pred~ ||^2                       (the lagged sampler's own prediction)
  4. loss = mean max(0, (E_phi - E_ref) - (P_phi - P_ref) + margin)   (imgalign.losses.dro_ranking_loss):
     lower the expert error and raise the error on the policy's own states, both relative to the reference.

Unlike the reference code, the replay buffer and the lagged adapter are saved in every checkpoint, so a resumed run
reproduces the uninterrupted one exactly. Each process keeps its own buffer (as the reference), so a run's exact
numbers depend on the process count.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from imgalign.config import MISSING, cfg_field, check_local_source
from imgalign.losses import dro_ranking_loss
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
from imgalign.sampling.noise import NoiseLevels
from imgalign.train.checkpoint import read_safetensors_folder
from imgalign.train.ema import EMA
from imgalign.train.loop import Run, lora_layout
from imgalign.train.seeding import global_positions, randn_per_sample, sample_generators
from imgalign.train.setup import OptimConfig, RunConfig, count_params


@dataclass
class DataConfig:
    source: str = cfg_field(MISSING, "expert demonstrations: an unpaired JSONL {image, caption, label} (rows with "
                            "label true are the experts) or Pick-a-Pic-layout pairs (the winners are the experts)")
    layout: Literal["auto", "pairs", "unpaired"] = cfg_field("auto", "how to read data.source (auto: by the JSONL's "
                                                             "first row, as diffusion-dpo)")
    split: str = cfg_field("train", "split name for `datasets` sources")
    image_root: str | None = cfg_field(None, "JSONL sources: folder the image paths are relative to")
    resolution: int = cfg_field(512, "training resolution R (shorter side to R, then an R x R crop)", ge=8)
    random_crop: bool = cfg_field(False, "random instead of centre crop")
    hflip: bool = cfg_field(True, "random horizontal flip")
    prompt_dropout: float = cfg_field(0.2, "probability that a buffer trajectory's prompt is dropped to \"\" "
                                      "(reference: 0.2)", ge=0, le=1)
    max_rows: int | None = cfg_field(None, "use only the first N rows", ge=1)
    cache_latents: bool = cfg_field(False, "encode each expert's VAE latent distribution and each prompt's text "
                                    "conditioning once and reuse them (augmentation then fixed per expert: epoch 0's "
                                    "crop and flip)")

    def __post_init__(self):
        check_local_source("data.source", self.source)


class EncodingCache:
    """Experts' VAE latent distributions (mean, std per row) and prompts' text conditioning, computed once."""

    def __init__(self, adapter, data, transform):
        self.adapter, self.data, self.transform = adapter, data, transform
        self.latents: dict[int, tuple[Tensor, Tensor]] = {}
        self.cond: dict[str, dict[str, Tensor]] = {}

    @torch.no_grad()
    def expert_latents(self, rows: list[int], gens) -> Tensor:
        """[B, C, h, w]: a sample of each row's cached latent distribution, drawn from that sample's generator."""
        for r in rows:
            if r not in self.latents:
                pixels = self.transform(self.data[r], index=r, epoch=0)["pixels"][None]
                pixels = pixels.to(self.adapter.vae.device, self.adapter.vae.dtype)
                dist = self.adapter.vae.encode(pixels).latent_dist
                cfg = self.adapter.vae.config
                shift, scale = (cfg.get("shift_factor") or 0.0), cfg.scaling_factor
                self.latents[r] = (((dist.mean - shift) * scale)[0].float().cpu(), (dist.std * scale)[0].float().cpu())
        mean = torch.stack([self.latents[r][0] for r in rows])
        std = torch.stack([self.latents[r][1] for r in rows])
        return (mean + std * randn_per_sample(mean.shape[1:], gens)).to(self.adapter.device)

    @torch.no_grad()
    def prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        for p in prompts:
            if p not in self.cond:
                self.cond[p] = {k: v[0].cpu() for k, v in self.adapter.encode_prompts([p]).items()}
        return {k: torch.stack([self.cond[p][k] for p in prompts]).to(self.adapter.device) for k in self.cond[prompts[0]]}


@dataclass
class DROConfig:
    objective: Literal["dro", "sft"] = cfg_field("dro", "dro: the ranking hinge against the replay buffer; sft: the "
                                                 "baseline, plain denoising on the same experts (no buffer, no "
                                                 "reference forward)")
    margin: float = cfg_field(0.001, "hinge margin m in max(0, (E_phi - E_ref) - (P_phi - P_ref) + m)", ge=0)
    buffer_size: int = cfg_field(4, "replay buffer: the newest N trajectories per process (reference: 4)", ge=1)
    buffer_batch: int = cfg_field(4, "trajectories drawn per refresh (reference: 4)", ge=1)
    refresh_every: int = cfg_field(1, "micro-steps between buffer refreshes (reference: 1)", ge=1)
    sync_every: int = cfg_field(1, "optimizer steps between copies of the policy into the lagged sampler "
                                "(reference: 16 micro-steps = 1 optimizer step)", ge=1)
    sample_steps: int = cfg_field(20, "steps of a buffer trajectory (reference: 20)", ge=2)
    sample_guidance: float = cfg_field(1.0, "CFG scale of the buffer sampler (reference: 1, no CFG)")
    jitter: bool = cfg_field(True, "per-sample random offset of the trajectory's level grid (reference: on)")
    num_levels: int = cfg_field(1000, "T: discrete noise levels (SD-type: the scheduler's train timesteps)", ge=2)
    ema_decay: float = cfg_field(0.0, "EMA of the trained weights, stepped after every optimizer step, used for "
                                 "validation and saved beside the final weights in ema/ (reference: on, diffusers' "
                                 "EMAModel default; 0 disables)", ge=0, lt=1)

    def __post_init__(self):
        if self.sample_steps > self.num_levels:
            raise ValueError(f"dro.sample_steps={self.sample_steps} exceeds dro.num_levels={self.num_levels}")


@dataclass
class DiffusionDROConfig:
    model: ModelConfig = cfg_field(ModelConfig, "which pipeline to align")
    lora: LoraConfig = cfg_field(LoraConfig, "LoRA (lagged sampler = a second adapter) or full fine-tuning")
    data: DataConfig = cfg_field(DataConfig, "expert demonstrations")
    dro: DROConfig = cfg_field(DROConfig, "ranking objective, replay buffer, lagged sampler")
    optim: OptimConfig = cfg_field(OptimConfig, "optimizer and learning-rate schedule (reference: lr 1e-4)")
    run: RunConfig = cfg_field(RunConfig, "steps, batch, precision, checkpoints, logging")
    validation: ValidationConfig = cfg_field(ValidationConfig, "validation image grids")


Config = DiffusionDROConfig


# ------------------------------------------------------------------------------------------------
# Expert data
# ------------------------------------------------------------------------------------------------
def load_experts(cfg: DataConfig):
    """-> (dataset of {caption, image, label}, indices of the expert rows, a summary line)."""
    from imgalign.data import load_preference_pairs
    from imgalign.data.unpaired import detect_layout, load_unpaired_images, split_pairs

    layout = cfg.layout if cfg.layout != "auto" else detect_layout(cfg.source)
    if layout == "unpaired":
        data = load_unpaired_images(cfg.source, image_root=cfg.image_root, max_rows=cfg.max_rows)
        experts = [i for i, label in enumerate(data._labels) if label == 1.0]
    else:
        data = split_pairs(load_preference_pairs(cfg.source, split=cfg.split, image_root=cfg.image_root,
                                                 max_rows=cfg.max_rows))
        experts = list(range(0, len(data), 2))  # item 2i is pair i's winner
    if not experts:
        from imgalign.data.errors import DataError

        raise DataError(f"data.source={cfg.source}: no expert rows (label true, or pair winners)")
    return data, experts, f"{data.stats.summary()}; {len(experts)} experts"


# ------------------------------------------------------------------------------------------------
# Replay buffer of the lagged sampler's trajectories
# ------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """FIFO of trajectories: per trajectory its expert row, its (possibly dropped) prompt, the latents entering each
    step x [S, C, h, w], their levels k [S] and the sampler's predictions there pred [S, C, h, w]."""

    FILE = "replay_buffer.safetensors"

    def __init__(self, size: int):
        self.size = size
        self.items: list[dict] = []
        self.added = 0  # trajectories added in all (the age of an entry is `added` minus its serial)

    def add(self, rows: list[int], prompts: list[str], x: Tensor, k: Tensor, pred: Tensor) -> None:
        """x, pred [B, S, C, h, w]; k [B, S]."""
        for b in range(len(rows)):
            self.items.append({"row": rows[b], "prompt": prompts[b], "x": x[b].cpu(), "k": k[b].cpu(),
                               "pred": pred[b].cpu(), "serial": self.added})
            self.added += 1
        del self.items[: max(0, len(self.items) - self.size)]  # keep the newest

    def sample(self, gens: list[torch.Generator]) -> dict:
        """One (trajectory, step) per generator: a uniform entry, then a uniform step of it."""
        out = {"rows": [], "prompts": [], "x": [], "k": [], "pred": [], "age": []}
        for g in gens:
            item = self.items[int(torch.randint(0, len(self.items), (1,), generator=g))]
            s = int(torch.randint(0, item["k"].shape[0], (1,), generator=g))
            out["rows"].append(item["row"])
            out["prompts"].append(item["prompt"])
            out["x"].append(item["x"][s])
            out["k"].append(item["k"][s])
            out["pred"].append(item["pred"][s])
            out["age"].append(self.added - 1 - item["serial"])
        return {**out, "x": torch.stack(out["x"]), "k": torch.stack(out["k"]), "pred": torch.stack(out["pred"]),
                "size": len(self.items)}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for i, item in enumerate(self.items):
            for key in ("x", "k", "pred"):
                tensors[f"{i}.{key}"] = item[key].contiguous()
        meta = {"size": self.size, "added": self.added,
                "items": [{"row": it["row"], "prompt": it["prompt"], "serial": it["serial"]} for it in self.items]}
        save_file(tensors, str(Path(folder) / self.FILE), metadata={"buffer": json.dumps(meta)})

    def load(self, folder: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(Path(folder) / self.FILE), "pt") as f:
            meta = json.loads(f.metadata()["buffer"])
            self.items = [{**m, **{key: f.get_tensor(f"{i}.{key}") for key in ("x", "k", "pred")}}
                          for i, m in enumerate(meta["items"])]
        self.added = meta["added"]


def level_grid(num_levels: int, steps: int, gens: list[torch.Generator], jitter: bool) -> Tensor:
    """[B, S] descending level indices: k_s = r (S - 1 - s) + u_b with r = T // S and u_b ~ U{0..r-1} per sample."""
    ratio = num_levels // steps
    base = ratio * torch.arange(steps - 1, -1, -1)
    offsets = [int(torch.randint(0, ratio, (1,), generator=g)) if jitter else ratio - 1 for g in gens]
    return torch.stack([base + u for u in offsets])


@torch.no_grad()
def policy_trajectories(adapter, model, levels: NoiseLevels, prompts: list[str], gens: list[torch.Generator],
                        cfg: DROConfig, latent_shape) -> tuple[Tensor, Tensor, Tensor]:
    """Deterministic DDIM (eta 0; for flow families the Euler step) from pure noise along each sample's jittered grid
    -> x [B, S, C, h, w] (the latent entering each step), k [B, S], pred [B, S, C, h, w] (the sampler's output)."""
    dev = adapter.device
    grid = level_grid(levels.T, cfg.sample_steps, gens, cfg.jitter)
    x = randn_per_sample(latent_shape, gens).to(dev)
    cond = adapter.encode_prompts(prompts)
    uncond = adapter.encode_uncond(len(prompts), cond) if cfg.sample_guidance != 1.0 else None
    xs, preds = [], []
    for s in range(cfg.sample_steps):
        k = grid[:, s]
        t = levels.model_t[k].to(dev)
        pred = adapter.predict_cfg(model, x, t, cond, uncond, cfg.sample_guidance).float()
        xs.append(x.float().cpu())
        preds.append(pred.cpu())
        if s + 1 < cfg.sample_steps:
            x0, eps = levels.to_x0_eps(pred, x.float(), k)
            a, sg = levels.coef(grid[:, s + 1], x0)
            x = (a * x0 + sg * eps).to(x.dtype)
    return torch.stack(xs, 1), grid, torch.stack(preds, 1)


# ------------------------------------------------------------------------------------------------
# The lagged sampler
# ------------------------------------------------------------------------------------------------
class LaggedSampler:
    """theta~: LoRA -> adapter "lagged" on the policy's base; full fine-tuning -> a frozen copy of the network."""

    def __init__(self, adapter, lora: LoraConfig, dtype: torch.dtype):
        self.adapter, self.use_lora = adapter, lora.enabled
        if self.use_lora:
            adapter.add_lora(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules, init=lora.init,
                             adapter_name="lagged")
            self.net = None
        else:
            self.net = copy.deepcopy(adapter.denoiser).to(dtype).requires_grad_(False).eval()
        self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the policy's trained weights into the lagged sampler."""
        if self.use_lora:
            params = dict(self.adapter.denoiser.named_parameters())
            for name, p in params.items():
                if "lora_" in name and ".lagged." in name:
                    p.copy_(params[name.replace(".lagged.", ".default.")])
        else:
            self.net.load_state_dict(self.adapter.denoiser.state_dict())

    def model(self, policy_model):
        """(network to run, context that selects the lagged weights)."""
        if self.use_lora:
            return policy_model, self.adapter.adapter_active("lagged")
        import contextlib

        return self.net, contextlib.nullcontext()

    def save(self, folder: Path) -> None:
        if self.use_lora:
            self.adapter.save_lora(Path(folder) / "lagged", adapter_name="lagged")
        else:
            self.net.save_pretrained(Path(folder) / "lagged", safe_serialization=True)

    def load(self, folder: Path) -> None:
        if self.use_lora:
            self.adapter.load_lora_into_denoiser(Path(folder) / "lagged", adapter_name="lagged")
        else:
            self.net.load_state_dict(read_safetensors_folder(Path(folder) / "lagged"))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def train(cfg: DiffusionDROConfig) -> dict:
    run, d = cfg.run, cfg.dro
    book = Run(cfg, "diffusion-dro")
    accelerator, dtype = book.accelerator, book.dtype
    rank, world = accelerator.process_index, accelerator.num_processes

    adapter = load_model(cfg.model, accelerator.device, dtype)
    data, experts, summary = load_experts(cfg.data)
    reference = make_trainable(adapter, cfg.lora, run.gradient_checkpointing, dtype)
    lagged = LaggedSampler(adapter, cfg.lora, dtype)
    levels = NoiseLevels(adapter, d.num_levels)
    buffer = ReplayBuffer(d.buffer_size)
    use_lora = cfg.lora.enabled
    from imgalign.data.unpaired import ImageTransform

    transform = ImageTransform(cfg.data.resolution, random_crop=cfg.data.random_crop, hflip=cfg.data.hflip,
                               seed=run.seed)
    cache = EncodingCache(adapter, data, transform) if cfg.data.cache_latents else None
    f = adapter.pipe.vae_scale_factor
    latent_shape = (adapter.vae.config.latent_channels, cfg.data.resolution // f, cfg.data.resolution // f)

    model, optimizer, scheduler = book.prepare(adapter.denoiser, cfg.optim, lora_layout(cfg.lora),
                                               lambda m, p: save_weights(adapter, m, p, use_lora),
                                               lambda m, p: load_weights(adapter, m, p, use_lora))
    book.add_state("replay_buffer", buffer.save, buffer.load)
    book.add_state("lagged_sampler", lagged.save, lagged.load)
    ema = EMA(adapter.denoiser, d.ema_decay, name="ema") if d.ema_decay > 0 else None
    if ema is not None:
        book.add_state("ema", ema.save, ema.load)
    book.resume()
    start_step = book.start_step

    trainable, total = count_params(adapter.denoiser)
    book.banner("imgalign diffusion-dro", {
        "model": f"{cfg.model.pretrained} ({adapter.family}, {adapter.prediction_type})",
        "trainable": f"{trainable:,} of {total:,} params ({f'LoRA r={cfg.lora.rank}' if use_lora else 'full'})",
        "reference": "same network, adapters disabled" if use_lora else "frozen copy",
        "lagged sampler": f"{'adapter on the same base' if use_lora else 'frozen copy'}, synced every "
                          f"{d.sync_every} optimizer steps",
        "experts": summary,
        "buffer": f"{d.buffer_batch} trajectories of {d.sample_steps} steps every {d.refresh_every} micro-steps, "
                  f"newest {d.buffer_size} kept per process, CFG {d.sample_guidance:g}",
        "effective batch": f"{run.batch_size} x {run.grad_accum} accum x {world} procs"
                           f" = {run.batch_size * run.grad_accum * world}/step",
    })
    book.start(make_validator(accelerator, adapter, cfg.validation, cfg.data.resolution, book.out_dir,
                              weights=ema.swapped if ema is not None else None), cfg.validation.every)

    step, micro = start_step, start_step * run.grad_accum
    sft = d.objective == "sft"
    model.train()
    while step < run.max_steps:
        if not sft and (micro % d.refresh_every == 0 or not buffer.items):  # 1. refresh the replay buffer
            gens = sample_generators(run.seed, "dro-buffer", micro, range(rank * d.buffer_batch,
                                                                          (rank + 1) * d.buffer_batch))
            rows = [experts[int(torch.randint(0, len(experts), (1,), generator=g))] for g in gens]
            prompts = ["" if float(torch.rand(1, generator=g)) < cfg.data.prompt_dropout else data[r]["caption"]
                       for g, r in zip(gens, rows)]
            net, active = lagged.model(model)
            with active, accelerator.autocast():
                x, k, pred = policy_trajectories(adapter, net, levels, prompts, gens, d, latent_shape)
            buffer.add(rows, prompts, x, k, pred)
        positions = global_positions(rank, world, micro % run.grad_accum, run.batch_size)
        gens = sample_generators(run.seed, "dro", micro // run.grad_accum, positions)
        batch = buffer.sample(gens) if not sft else expert_batch(experts, data, levels, gens)
        experts_in = cache if cache is not None else torch.stack(  # 2. the batch's experts: pixels, or the cache
            [transform(data[r], index=r, epoch=micro)["pixels"] for r in batch["rows"]])
        done = book.micro_step(model, _step, adapter, model, reference, levels, batch, experts_in, gens, cfg, accelerator)
        micro += 1
        if not done:
            continue
        if ema is not None:
            ema.step(step)
        step += 1
        if step % d.sync_every == 0:
            lagged.sync()
        logs = book.end_step(step, book.step_metrics(),
                             {"micro_step": micro})
        book.bar.set_postfix(loss=f"{logs['train/loss']:.4f}")

    def save_final(unwrapped):
        save_weights(adapter, unwrapped, book.out_dir, use_lora)
        if ema is not None:
            with ema.swapped():
                save_weights(adapter, unwrapped, book.out_dir / "ema", use_lora)

    return book.finish(step, {"micro_step": micro}, save_final)


def expert_batch(experts: list[int], data, levels: NoiseLevels, gens) -> dict:
    """The SFT baseline's batch: a uniform expert row and a uniform noise level per sample."""
    rows = [experts[int(torch.randint(0, len(experts), (1,), generator=g))] for g in gens]
    k = torch.cat([torch.randint(0, levels.T, (1,), generator=g) for g in gens])
    return {"rows": rows, "prompts": [data[r]["caption"] for r in rows], "k": k}


def _step(adapter, model, reference, levels: NoiseLevels, batch, experts, gens, cfg, accelerator):
    """B buffer items and their experts (pixels [B, 3, R, R], or the EncodingCache) -> (mean hinge loss, metrics); the
    SFT baseline: the experts' denoising loss."""
    dev = accelerator.device
    b = len(batch["rows"])
    k = batch["k"]
    t = levels.model_t[k].to(dev)
    cached = isinstance(experts, EncodingCache)
    x0 = experts.expert_latents(batch["rows"], gens) if cached else adapter.encode_images(experts, generator=gens)
    text = experts.prompts(batch["prompts"]) if cached else adapter.encode_prompts(batch["prompts"])
    noise = randn_per_sample(x0.shape[1:], gens).to(dev)
    noisy_expert, target = adapter.noise_and_target(x0, noise, t)
    if cfg.dro.objective == "sft":
        with accelerator.autocast():
            pred = adapter.predict(model, noisy_expert, t, text)
        err = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        return err.mean(), {"loss": err.mean().detach(), "expert_err": err.mean().detach()}
    x_policy = batch["x"].to(dev, noisy_expert.dtype)
    pred_lagged = batch["pred"].to(dev)
    cond = repeat_cond(text, 2)
    inputs, tt = torch.cat([noisy_expert, x_policy]), torch.cat([t, t])  # one 2B forward, the same t per branch

    def errors(pred):
        pred = pred.float()
        e = (pred[:b] - target.float()).pow(2).mean(dim=(1, 2, 3))
        p = (pred[b:] - pred_lagged.float()).pow(2).mean(dim=(1, 2, 3))
        return e, p

    with accelerator.autocast():
        e_phi, p_phi = errors(adapter.predict(model, inputs, tt, cond))
    with torch.no_grad(), accelerator.autocast():
        if reference is None:
            with adapters_disabled(model):
                e_ref, p_ref = errors(adapter.predict(model, inputs, tt, cond))
        else:
            e_ref, p_ref = errors(adapter.predict(reference, inputs, tt, cond))
    out = dro_ranking_loss(e_phi, e_ref, p_phi, p_ref, cfg.dro.margin)
    diff = (e_phi - e_ref) - (p_phi - p_ref)
    m = {
        "loss": out.losses.mean().detach(),
        "diff": diff.mean().detach(),
        "expert_err": e_phi.mean().detach(), "expert_err_ref": e_ref.mean(),
        "policy_err": p_phi.mean().detach(), "policy_err_ref": p_ref.mean(),
        "expert_gain": out.chosen_rewards.mean(), "policy_gain": out.rejected_rewards.mean(),
        "hinge_active": (diff + cfg.dro.margin > 0).float().mean(),
        "buffer_age": torch.tensor(float(sum(batch["age"])) / b),
        "buffer_size": torch.tensor(float(batch["size"])),
    }
    return out.losses.mean(), m
