"""Pref-GRPO (arXiv 2508.20751), with Flow-GRPO (arXiv 2505.05470) and DDPO (arXiv 2305.13301) as configurations.

One iteration (= one "step" of `run.max_steps`), read top to bottom:
  1. P prompts are drawn; each is repeated k times (a group); the P*k samples are split across processes
     (a group may span processes)
  2. rollout: each process samples its share with a stochastic sampler that records every transition's
     log-probability (flow SDE / CPS / DanceGRPO for SD3 and FLUX, DDIM eta=1 for SD-type models); CFG inside
  3. rewards on the decoded images, per group:
       reward.mode = pairwise (Pref-GRPO): every pair of a group is judged (optionally in both orders; ties and
                     failures 0.5) and each image's win rate is its reward
       reward.mode = pointwise (Flow-GRPO / DDPO): the reward's score
  4. group advantages (imgalign.losses.policy): per prompt, group or global std, several rewards normalised then
     weighted (Pref-GRPO) or weighted then normalised (Flow-GRPO); zero-std groups dropped; advantage clip
  5. training: for the trained steps of every kept sample, the log-probability of the stored transition is
     recomputed with the current policy and the PPO clipped surrogate (clip ~1e-4) is minimised, plus optionally
     beta * KL to the reference (LoRA adapter off, or a frozen copy); `train.updates_per_iteration` optimizer
     steps per iteration; EMA of the trainable weights.

The training forward uses exactly the rollout's micro-batches (same samples, same batch size, same CFG path), so
before the first update of an iteration the recomputed log-probs equal the rollout's bit for bit and the ratio
is exactly 1 (logged as train/ratio_dev_before_update, which must be 0).

Presets: configs/pref_grpo/{sd15,sdxl,sd3,flux,toy}.yaml. Flow-GRPO = reward.mode=pointwise,
advantage.std=global, reward.combine=weight_then_normalize, train.beta=0.04; DDPO = pointwise + sampler ddim +
train.timestep_order=random.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import torch

from imgalign._paths import TOY_ASSETS
from imgalign.config import ConfigError, cfg_field
from imgalign.losses.policy import (
    PromptStatTracker,
    clipped_surrogate,
    combine_advantages,
    gaussian_mean_kl,
    ratio_norm_log_ratio,
    zero_std_groups,
)
from imgalign.models.adapters import adapters_disabled
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
from imgalign.rewards.online import build_reward_list, compute_rewards, reward_logs
from imgalign.sampling.rollout import make_predict, make_sampler, rollout, step_dt
from imgalign.train import setup
from imgalign.train.ema import EMA
from imgalign.train.loop import Run, lora_layout
from imgalign.train.seeding import derive_seed, sample_generators
from imgalign.train.setup import MeanMetrics, OptimConfig, count_params, image_grid

TOY_PROMPTS = TOY_ASSETS / "prompts" / "train.txt"


@dataclass
class DataConfig:
    prompts: str | None = cfg_field(None, "training prompts file (.txt/.jsonl/.csv); null: the toy train prompts")
    max_prompts: int | None = cfg_field(None, "use only the first N prompts")


@dataclass
class SampleConfig:
    groups_per_iteration: int = cfg_field(2, "prompts P per iteration (all processes together); with group_size this is "
                                          "the effective batch of an iteration, what run.grad_accum sets elsewhere", ge=1)
    group_size: int = cfg_field(4, "images k per prompt (the group)", ge=2)
    batch_size: int = cfg_field(2, "rollout micro-batch per forward; the training recompute uses the same batches", ge=1)
    num_steps: int = cfg_field(10, "sampler steps of a training rollout", ge=2)
    guidance_scale: float = cfg_field(4.5, "CFG scale in rollout and training forwards (1: no CFG)")
    resolution: int = cfg_field(512, "image size", ge=8)
    sampler: Literal["auto", "ddim", "sde", "cps", "dance"] = cfg_field("auto", "auto (ddim for SD-type, sde for flow) | ddim | sde | cps | dance")
    noise_level: float | None = cfg_field(None, "flow: a of sde/cps, eta of dance (null: 0.7 / 0.8 / 0.3)")
    eta: float = cfg_field(1.0, "DDIM eta (DDPO samples with 1)")
    flow_spacing: Literal["auto", "diffusers", "uniform"] = cfg_field("auto", "flow sigma grid: auto (uniform for dynamic-shift FLUX, else diffusers) | "
                                  "diffusers | uniform")
    sde_window_size: int = cfg_field(0, "Flow-GRPO-Fast: only this many consecutive steps are stochastic and "
                                     "trained (0: all steps stochastic)")
    sde_window_range: list[int] = cfg_field([0, 5], "the window start is drawn uniformly so the window fits here")
    same_latent: bool = cfg_field(False, "one initial noise per group (DanceGRPO --init_same_noise)")


@dataclass
class RewardConfig:
    mode: Literal["pairwise", "pointwise"] = cfg_field("pairwise", "pairwise: win rate inside each group (Pref-GRPO) | pointwise: the score "
                          "(Flow-GRPO, DDPO)")
    rewards: list[str] = cfg_field(["toy"], "reward specs NAME or NAME:WEIGHT (imgalign.rewards registry)")
    kwargs: dict[str, dict[str, Any]] = cfg_field({}, "constructor arguments per reward name, e.g. "
                                                  "{vlm_judge: {base_url: 'http://localhost:8000/v1', swap: false}}")
    combine: Literal["normalize_then_weight", "weight_then_normalize"] = cfg_field("normalize_then_weight", "several rewards: normalize_then_weight (Pref-GRPO) | "
                             "weight_then_normalize (Flow-GRPO)")
    swap_order: bool = cfg_field(False, "pairwise judges: judge every pair in both orders and average")
    hard_wins: bool = cfg_field(True, "win rate counts verdicts (win 1, tie 1/2) as Pref-GRPO; false: mean P(win)")


@dataclass
class AdvantageConfig:
    std: Literal["group", "global"] = cfg_field("group", "group (Pref-GRPO) | global (Flow-GRPO) std in the normalisation")
    eps: float = cfg_field(1e-4, "added to the std")
    unbiased: bool = cfg_field(False, "std with n - 1 (torch, Pref-GRPO) instead of n (numpy, Flow-GRPO)")
    clip_max: float = cfg_field(5.0, "advantages clamped to [-clip_max, clip_max]")
    filter_zero_std: bool = cfg_field(True, "drop the samples of groups whose rewards are all equal (not with "
                                      "buffer_size: a constant group can still differ from its prompt's history)")
    buffer_size: int = cfg_field(0, "DDPO per-prompt stat tracking: keep each prompt's last N rewards across "
                                 "iterations and normalise with their mean/std (DDPO 16 or 32; several rewards are weighted, then "
                                 "normalised); 0: current groups only")
    min_count: int = cfg_field(16, "with buffer_size: fewer stored rewards than this -> the batch's mean/std")


@dataclass
class TrainConfig:
    clip_range: float = cfg_field(1e-4, "PPO clip range of the ratio (1e-4 Flow-GRPO / DDPO / Pref-GRPO)", gt=0)
    beta: float = cfg_field(0.0, "KL-to-reference weight (Flow-GRPO SD3: 0.04 GenEval/OCR, 0.01 PickScore)", ge=0)
    kl_form: Literal["flow_grpo", "gaussian"] = cfg_field("flow_grpo", "flow_grpo: ||mu - mu_ref||^2 / (2 std^2 / dt) | gaussian: true step KL")
    timestep_fraction: float = cfg_field(1.0, "train int(fraction * S) of the S trainable steps per sample", gt=0, le=1)
    timestep_order: Literal["ordered", "random"] = cfg_field("ordered", "ordered: the first steps in order (Flow-GRPO) | random: a random "
                                    "permutation per sample (DDPO, DanceGRPO, Pref-GRPO)")
    skip_last_step: bool = cfg_field(True, "never train the final denoising step (its Gaussian is very sharp)")
    num_inner_epochs: int = cfg_field(1, "passes over each rollout", ge=1)
    updates_per_iteration: int = cfg_field(1, "optimizer steps per pass (the rollout batches are split evenly)", ge=1)
    ratio_norm: bool = cfg_field(False, "RatioNorm (GRPO-Guard): re-centre and rescale the log-ratio per step")
    ema_decay: float = cfg_field(0.0, "EMA of the trainable weights (Flow-GRPO 0.9; 0 disables)")
    ema_every: int = cfg_field(8, "EMA update interval in optimizer steps")
    sample_grid_every: int = cfg_field(1, "save a grid of rollout images every N iterations (0: never)")


@dataclass
class RunConfig(setup.RunConfig):
    max_steps: int = cfg_field(1000, "iterations: each samples sample.groups_per_iteration x sample.group_size images, "
                               "then makes train.num_inner_epochs x train.updates_per_iteration optimizer steps", ge=1)
    grad_accum: int = cfg_field(1, "must stay 1: each iteration's gradients are accumulated over its whole rollout "
                                "(raise sample.groups_per_iteration for a larger effective batch)", ge=1)


@dataclass
class PrefGRPOConfig:
    model: ModelConfig = cfg_field(ModelConfig, "which pipeline to align")
    lora: LoraConfig = cfg_field(LoraConfig, "LoRA or full fine-tuning")
    data: DataConfig = cfg_field(DataConfig, "training prompts")
    sample: SampleConfig = cfg_field(SampleConfig, "rollouts")
    reward: RewardConfig = cfg_field(RewardConfig, "rewards and how they become per-sample values")
    advantage: AdvantageConfig = cfg_field(AdvantageConfig, "group advantages")
    train: TrainConfig = cfg_field(TrainConfig, "policy update")
    optim: OptimConfig = cfg_field(OptimConfig, "optimizer and learning-rate schedule")
    run: RunConfig = cfg_field(RunConfig, "iterations (max_steps), precision, checkpoints, logging")
    validation: ValidationConfig = cfg_field(ValidationConfig, "validation image grids")

    def __post_init__(self):
        if self.run.grad_accum != 1:
            raise ValueError("run.grad_accum is not used by pref-grpo: each iteration's gradients are accumulated over "
                             "its whole rollout (sample.groups_per_iteration x sample.group_size images, split over "
                             "the processes); raise sample.groups_per_iteration for a larger effective batch, or "
                             "train.updates_per_iteration for more optimizer steps per rollout")


Config = PrefGRPOConfig


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _prompt_indices(n_prompts: int, iteration: int, count: int, seed: int) -> list[int]:
    """The prompts of iteration `iteration`: consecutive slices of a fresh random permutation per pass."""
    out = []
    for g in range(iteration * count, (iteration + 1) * count):
        pass_, pos = divmod(g, n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(derive_seed(seed, "prompts", pass_)))
        out.append(int(perm[pos]))
    return out


def train(cfg: PrefGRPOConfig) -> dict:
    run, sample, tcfg = cfg.run, cfg.sample, cfg.train
    book = Run(cfg, "pref-grpo", unit="iterations")
    accelerator, dtype = book.accelerator, book.dtype
    world = accelerator.num_processes
    n_global = sample.groups_per_iteration * sample.group_size
    if n_global % world:
        raise ConfigError(f"sample.groups_per_iteration * sample.group_size = {n_global} must divide by the {world} "
                          "processes; change sample.groups_per_iteration")
    n_local = n_global // world
    if n_local % sample.batch_size:
        raise ConfigError(f"each process samples {n_local} images: sample.batch_size={sample.batch_size} must "
                          "divide it")
    n_chunks = n_local // sample.batch_size
    if n_chunks % tcfg.updates_per_iteration:
        raise ConfigError(f"train.updates_per_iteration={tcfg.updates_per_iteration} must divide the {n_chunks} "
                          "rollout batches per process")

    # ---- model, trainable part, reference, sampler, rewards --------------------------------------
    adapter = load_model(cfg.model, accelerator.device, dtype)
    reference = make_trainable(adapter, cfg.lora, run.gradient_checkpointing, dtype, reference=tcfg.beta > 0)
    use_lora = cfg.lora.enabled
    sampler = make_sampler(adapter, sample)
    specs, rewards = build_reward_list(cfg.reward, accelerator.device)
    weights = [s.weight for s in specs]

    from imgalign.data import load_prompt_file

    prompt_file = cfg.data.prompts or str(TOY_PROMPTS)
    all_prompts = load_prompt_file(prompt_file)[: cfg.data.max_prompts]
    if not all_prompts:
        raise ConfigError(f"data.prompts: no prompts in {prompt_file}")

    # ---- optimizer, EMA, checkpoint hooks, resume --------------------------------------------------
    ema = EMA(adapter.denoiser, tcfg.ema_decay, tcfg.ema_every) if tcfg.ema_decay > 0 else None
    acfg = cfg.advantage
    tracker = PromptStatTracker(acfg.buffer_size, acfg.min_count, eps=acfg.eps, unbiased=acfg.unbiased) \
        if acfg.buffer_size > 0 else None

    opt_steps = run.max_steps * tcfg.num_inner_epochs * tcfg.updates_per_iteration
    model, optimizer, scheduler = book.prepare(adapter.denoiser, cfg.optim, lora_layout(cfg.lora),
                                               lambda m, d: save_weights(adapter, m, d, use_lora),
                                               lambda m, d: load_weights(adapter, m, d, use_lora),
                                               max_steps=opt_steps)
    if ema is not None:
        book.add_state("ema", ema.save, ema.load)
    if tracker is not None:
        stats = "prompt_stats.json"
        book.add_state("prompt_stats", lambda d: (d / stats).write_text(json.dumps(tracker.state_dict())),
                       lambda d: tracker.load_state_dict(json.loads((d / stats).read_text())))
    book.resume()
    start = book.start_step

    trainable, total = count_params(adapter.denoiser)
    n_trainable_steps = len(_candidate_steps(sampler.num_steps, None, tcfg))
    if sample.sde_window_size:  # only the window's steps are stochastic, hence trainable
        n_trainable_steps = min(n_trainable_steps, sample.sde_window_size)
    book.banner("imgalign pref-grpo", {
        "model": f"{cfg.model.pretrained} ({adapter.family}, {adapter.prediction_type})",
        "trainable": f"{trainable:,} of {total:,} params ({f'LoRA r={cfg.lora.rank}' if use_lora else 'full'})",
        "reference": "none (train.beta = 0)" if tcfg.beta == 0 else
                     "same network, adapter disabled" if use_lora else "frozen copy",
        "sampler": f"{type(sampler).__name__}({getattr(sampler, 'method', 'ddim')}), {sampler.num_steps} steps, "
                   f"CFG {sample.guidance_scale:g}" + (f", SDE window {sample.sde_window_size}" if sample.sde_window_size else ""),
        "reward": f"{cfg.reward.mode}: {', '.join(map(str, specs))} ({cfg.reward.combine})",
        "rollout": f"{sample.groups_per_iteration} prompts x {sample.group_size} images = {n_global}/iteration "
                   f"({n_local} per process x {world} procs, batches of {sample.batch_size})",
        "updates": f"{tcfg.updates_per_iteration} optimizer steps x {tcfg.num_inner_epochs} passes per iteration, "
                   f"<= {n_trainable_steps} trained steps/sample, clip {tcfg.clip_range:g}, beta {tcfg.beta:g}",
        "prompts": f"{len(all_prompts)} from {prompt_file}",
    })
    book.start(make_validator(accelerator, adapter, cfg.validation, sample.resolution, book.out_dir,
                              weights=ema.swapped if ema is not None else None), cfg.validation.every)

    # ---- loop over iterations ------------------------------------------------------------------------
    opt_step = start * tcfg.num_inner_epochs * tcfg.updates_per_iteration
    it = start
    while it < run.max_steps:
        logs, opt_step = _iteration(it, opt_step, cfg, adapter, model, reference, sampler, specs, rewards, weights,
                                    all_prompts, book, ema, tracker)
        it += 1
        logs = book.end_step(it, logs, {"optimizer_step": opt_step})
        book.bar.set_postfix(reward=f"{logs['train/reward_mean']:.3f}", kl=f"{logs.get('train/approx_kl', 0):.1e}")

    def save_final(unwrapped):
        save_weights(adapter, unwrapped, book.out_dir, use_lora)
        if ema is not None:
            with ema.swapped():
                save_weights(adapter, unwrapped, book.out_dir / "ema", use_lora)

    return book.finish(it, {"optimizer_step": opt_step}, save_final)


def _candidate_steps(num_steps: int, window, tcfg: TrainConfig) -> list[int]:
    """Trainable steps: the stochastic ones (the SDE window, or all), without the final step if skip_last_step."""
    lo, hi = window if window is not None else (0, num_steps)
    if tcfg.skip_last_step:
        hi = min(hi, num_steps - 1)
    return list(range(lo, hi))


def _iteration(it, opt_step, cfg, adapter, model, reference, sampler, specs, rewards, weights, all_prompts,
               book: Run, ema, tracker=None):
    """Rollout, rewards, advantages and the policy update of one iteration -> (logs, optimizer step)."""
    sample, tcfg, acfg = cfg.sample, cfg.train, cfg.advantage
    accelerator, out_dir = book.accelerator, book.out_dir
    world, rank = accelerator.num_processes, accelerator.process_index
    dtype = book.dtype
    seed = cfg.run.seed
    k = sample.group_size
    n_local = sample.groups_per_iteration * k // world

    # ---- 1. prompts and this process's share of the P*k samples ---------------------------------------
    chosen = _prompt_indices(len(all_prompts), it, sample.groups_per_iteration, seed)
    flat = [(g, c) for g in range(sample.groups_per_iteration) for c in range(k)]  # (group, copy), N of them
    mine = flat[rank * n_local:(rank + 1) * n_local]
    prompts = [all_prompts[chosen[g]] for g, _ in mine]
    groups = torch.tensor([it * sample.groups_per_iteration + g for g, _ in mine])
    seeds = [derive_seed(seed, "noise", it, g, c) for g, c in mine]
    noise_seeds = [derive_seed(seed, "noise", it, g, 0) for g, c in mine] if sample.same_latent else seeds
    window = None
    if sample.sde_window_size:
        from imgalign.sampling import sample_sde_window

        window = sample_sde_window(sample.sde_window_size, tuple(sample.sde_window_range),
                                   torch.Generator().manual_seed(derive_seed(seed, "window", it)))

    # ---- 2. rollout in micro-batches (the training recompute reuses exactly these batches) --------------
    model.eval()
    chunks = []
    bs = sample.batch_size
    for c0 in range(0, n_local, bs):
        with accelerator.autocast():
            traj, images, cond, uncond = rollout(adapter, model, sampler, prompts[c0:c0 + bs], seeds[c0:c0 + bs],
                                                 sample, dtype, sde_window=window, noise_seeds=noise_seeds[c0:c0 + bs])
        chunks.append({"traj": traj, "cond": cond, "uncond": uncond, "images": images})
    images = torch.cat([c["images"] for c in chunks])  # [L, 3, H, W] in [-1, 1]

    # ---- 3. rewards of all N samples (identical on every process) ---------------------------------------
    values, extra = compute_rewards(specs, rewards, cfg.reward, images, prompts, groups, accelerator)
    all_groups = accelerator.gather(groups.to(accelerator.device)).cpu()

    # ---- 4. advantages ---------------------------------------------------------------------------------
    adv, zero, keep = advantages(values, weights, all_groups, [all_prompts[chosen[g]] for g, _ in flat], acfg,
                                 cfg.reward.combine, tracker)
    adv_local = adv[rank * n_local:(rank + 1) * n_local].to(accelerator.device)
    keep_local = keep[rank * n_local:(rank + 1) * n_local].to(accelerator.device)

    logs = reward_logs(specs, values, extra, all_groups, zero, adv, keep, cfg.reward.mode)
    if tcfg.sample_grid_every and it % tcfg.sample_grid_every == 0 and accelerator.is_main_process:
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        image_grid(images[: 4 * k].float(), nrow=k).save(out_dir / "samples" / f"iter-{it:06d}.png")

    # ---- 5. policy update ------------------------------------------------------------------------------
    candidates = _candidate_steps(sampler.num_steps, window, tcfg)
    n_train = max(1, int(len(candidates) * tcfg.timestep_fraction))
    cand = torch.tensor(candidates)
    metrics = MeanMetrics()
    ratio_dev = torch.zeros((), device=accelerator.device)
    model.train()
    per_update = len(chunks) // tcfg.updates_per_iteration
    for epoch in range(tcfg.num_inner_epochs):
        if tcfg.timestep_order == "random":  # per sample, keyed by its global index: the layout does not matter
            gens = sample_generators(seed, f"timesteps-{epoch}", it, range(rank * n_local, (rank + 1) * n_local))
            steps = torch.stack([cand[torch.randperm(len(cand), generator=g)[:n_train]] for g in gens])
        else:
            steps = cand[:n_train].expand(n_local, n_train)
        for u in range(tcfg.updates_per_iteration):
            part = range(u * per_update, (u + 1) * per_update)
            n_terms = sum(int(keep_local[c * bs:(c + 1) * bs].sum()) for c in part) * n_train
            calls = [(c, s) for c in part for s in range(n_train)
                     if world > 1 or keep_local[c * bs:(c + 1) * bs].any()]
            for n, (c, s) in enumerate(calls):
                rows = slice(c * bs, (c + 1) * bs)
                sync = n == len(calls) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    loss, m = _policy_step(adapter, model, reference, sampler, chunks[c], steps[rows, s],
                                           adv_local[rows], keep_local[rows], max(n_terms, 1), cfg, accelerator)
                    book.backward(loss)
                metrics.add(m)
                if epoch == 0 and u == 0:
                    ratio_dev = torch.maximum(ratio_dev, m["_ratio_dev"])
            book.apply_gradients()
            opt_step += 1
            if ema is not None:
                ema.step(opt_step)

    train_logs = metrics.reduce(accelerator)
    train_logs.pop("_ratio_dev", None)
    logs.update({f"train/{k_}": v for k_, v in train_logs.items()})
    logs["train/ratio_dev_before_update"] = float(accelerator.reduce(ratio_dev, reduction="sum"))
    return logs, opt_step


def advantages(values: torch.Tensor, weights: list[float], groups: torch.Tensor, prompts: list[str],
               acfg: AdvantageConfig, combine: str, tracker: PromptStatTracker | None = None):
    """Rewards [K, N] of all N samples -> (advantages [N], zero-std group mask [N], samples to train on [N]).

    Group advantages (zeroed in constant groups, which are dropped with filter_zero_std), or, with DDPO's
    tracker, the weighted reward normalised by each prompt's history: a constant group then still differs
    from its prompt's past, so nothing is zeroed or dropped.
    """
    zero = zero_std_groups(values, groups)
    if tracker is not None:
        combined = (torch.as_tensor(weights, dtype=torch.float64)[:, None] * values.double()).sum(0)
        return tracker.update(prompts, combined), zero, torch.ones_like(zero)
    adv = combine_advantages(values, weights, groups, order=combine, std=acfg.std, eps=acfg.eps,
                             unbiased=acfg.unbiased)
    adv = torch.where(zero, torch.zeros_like(adv), adv)
    return adv, zero, ~zero if acfg.filter_zero_std else torch.ones_like(zero)


def _policy_step(adapter, model, reference, sampler, chunk, j, adv, keep, n_terms, cfg, accelerator):
    """Recompute the log-prob of stored transitions at steps j [b] and return (loss share, metrics)."""
    tcfg, sample = cfg.train, cfg.sample
    tr = chunk["traj"].transition(j.to(chunk["traj"].log_probs.device))
    predict = make_predict(adapter, model, chunk["cond"], chunk["uncond"], sample.guidance_scale)
    with accelerator.autocast():
        pred = predict(tr.x_t, tr.timestep)
    out = sampler.step(tr.step_index, pred, tr.x_t, prev_sample=tr.prev_sample)
    if tcfg.ratio_norm:
        log_ratio = ratio_norm_log_ratio(out.log_prob, tr.log_prob, out.mean, tr.mean, out.std)
    else:
        log_ratio = out.log_prob - tr.log_prob
    sur = clipped_surrogate(out.log_prob, tr.log_prob, adv, tcfg.clip_range, cfg.advantage.clip_max,
                            log_ratio=log_ratio)
    w = keep.float()
    loss = (sur.loss * w).sum() / n_terms
    m = {"policy_loss": (sur.loss * w).sum() / w.sum().clamp(min=1)}
    if tcfg.beta > 0:
        with torch.no_grad(), accelerator.autocast():
            if reference is None:
                with adapters_disabled(model):
                    ref_pred = predict(tr.x_t, tr.timestep)
            else:
                ref_pred = make_predict(adapter, reference, chunk["cond"], chunk["uncond"],
                                        sample.guidance_scale)(tr.x_t, tr.timestep)
        ref_mean = sampler.step(tr.step_index, ref_pred, tr.x_t, prev_sample=tr.prev_sample).mean
        var = out.std.reshape(-1) ** 2
        if tcfg.kl_form == "flow_grpo":
            var = var / step_dt(sampler, tr.step_index)
        kl = gaussian_mean_kl(out.mean, ref_mean, var)
        loss = loss + tcfg.beta * (kl * w).sum() / n_terms
        m["kl"] = (kl.detach() * w).sum() / w.sum().clamp(min=1)
    live = keep.bool()
    ratio = sur.ratio.detach()
    m.update({
        "loss": loss.detach() * n_terms / w.sum().clamp(min=1),
        "ratio_mean": ratio[live].mean() if live.any() else torch.tensor(1.0),
        "clip_frac": sur.clipped[live].float().mean() if live.any() else torch.tensor(0.0),
        "approx_kl": sur.approx_kl[live].mean() if live.any() else torch.tensor(0.0),
        "_ratio_dev": (ratio[live] - 1).abs().max() if live.any() else torch.tensor(0.0),
    })
    return loss, m
