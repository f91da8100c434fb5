"""Flash-DMD (arXiv 2511.20549): few-step distillation by distribution matching (DMD2, arXiv 2405.14867, reference code
tianweiy/DMD2) with Flash-DMD's timestep-aware split and joint RL (Flash-DMD stage 2; public anchor: DMDR).

Flash-DMD has no public code and only its abstract was readable to us: what DMD2 or DMDR fix is reproduced here as
they publish it; Flash-DMD's own pieces (the split threshold, the RL loss, the GAN) are configurable and their
defaults are assumptions, said so in the config help (see ../shared/research/dmd_rlg_rpo_dreambench.md section 1).

Networks (`DMDNetworks`): the teacher = the real score mu_real (frozen); the student G (few-step generator) and the
fake score mu_fake, both initialised from the teacher. LoRA layout: student and fake are two named adapters
("student", "fake") on the one teacher network, the teacher is that network with adapters disabled (one copy of
the base in memory, as DMDR). Full layout: the pipeline's denoiser is the frozen teacher, student and fake score are
fp32 copies. A GAN head (`GANHead`, DMD2's classification branch) reads the fake network's bottleneck: the UNet's
mid-block output, or for SD3/FLUX transformers the image tokens after the middle block of the stack (laid out on their
2-D grid); the forward stops at that block. With dmd.gan_space=pixel, Flash-DMD's pixel GAN replaces it
(`PixelDiscriminator`: heads on a frozen image encoder over decoded images). Critic = fake score + GAN head, one
AdamW; the student its own AdamW.

One optimizer step i (run.max_steps of them), read top to bottom:
  1. per sample: a prompt; the student step k it trains (per step, as DMD2, or per sample); backward simulation: from
     pure noise the current student (no grad) runs steps 0..k-1 with LCM-style re-noising (fresh noise), giving the
     input x_k of step k (`simulate_input`). Student timesteps `StudentSchedule`: [999, 749, 499, 249] for 4 steps on
     SD schedules, the flow-shifted sigmas on flow teachers.
  2. student turn (i % dmd.ttur == 0, TTUR): x = G(x_k) as an x0 estimate, with grad. Per sample, by Flash-DMD's
     split (dmd.split_threshold; null = DMD2, every loss on every sample):
       DM    fresh t in [0.02, 0.98] of the schedule, the SAME x_t to the teacher (CFG dmd.real_guidance) and the fake
             score (no CFG); g = dm_gradient(x, x0_real, x0_fake); loss 0.5 mean (x - sg(x - g))^2
       GAN   softplus(-D(x_t')) on the diffusion-GAN-noised x, critic frozen (weight dmd.gan_weight)
       REG   (the GAN's side of the split; dmd.regression_weight) the distance from x to the teacher's deterministic
             sample from the same input x_k (`teacher_ode_x0`, dmd.regression_steps DDIM / Euler steps, no grad)
       RL    after rl.start_step: sum_i w_i relu(tau_i - r_i(decode(x))) (DMDR's hinge; gradient by backprop through
             the VAE and a differentiable reward, or Gaussian smoothing for a non-differentiable one); or
             (rl.algorithm=grpo) -A log p of the student's own rollouts' transitions (`GRPOTerm`)
  3. critic turn (every step): on the detached x of step 2, the family's denoising loss of the fake score over the full
     range, plus dmd.gan_critic_weight * [softplus(D(fake)) + softplus(-D(real))] on noised real and fake latents.
     Real images: a dataset, toy renders, or the teacher's own samples (`TeacherPool`, generated once before step 0).
Each turn's gradients reach only its own parameters; the other network's gradients are cleared after each update.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch
from torch import Tensor, nn

from imgalign._paths import TOY_ASSETS
from imgalign.config import ConfigError, cfg_field, check_local_source
from imgalign.losses.distill import (
    dm_gradient,
    dm_surrogate_loss,
    gan_critic_loss,
    gan_generator_loss,
    pseudo_huber,
    reward_hinge_loss,
    smoothed_gradient,
    student_timesteps,
    timestep_split,
)
from imgalign.models.adapters import adapters_disabled, cat_cond, check_noise_range
from imgalign.models.gan_head import BottleneckFeatures, GANHead, PixelDiscriminator
from imgalign.recipes.common import (
    LoraConfig,
    ModelConfig,
    ValidationConfig,
    load_model,
    read_generated_record,
    validation_images,
)
from imgalign.train.checkpoint import read_safetensors_folder
from imgalign.train.loop import Run, lora_layout
from imgalign.train.seeding import derive_seed, global_positions, randn_per_sample, sample_generators
from imgalign.train.setup import MeanMetrics, OptimConfig, RunConfig, captioned_grid

TOY_PROMPTS = TOY_ASSETS / "prompts" / "train.txt"
STUDENT_FILE = "flash_dmd_student.json"  # the student's sampling schedule, beside its weights


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
@dataclass
class FlashLoraConfig(LoraConfig):
    fake_rank: int | None = cfg_field(None, "LoRA rank of the fake-score adapter (null: lora.rank; DMDR: critic 32, "
                                      "student 64)", ge=1)
    fake_alpha: float | None = cfg_field(None, "LoRA alpha of the fake-score adapter (null: lora.alpha when fake_rank "
                                         "is null, else fake_rank)", gt=0)


@dataclass
class DataConfig:
    prompts: str | None = cfg_field(None, "the student's training prompts (.txt/.jsonl/.csv); null: the toy train "
                                    "prompts")
    max_prompts: int | None = cfg_field(None, "use only the first N prompts", ge=1)
    real_source: str | None = cfg_field(None, "real images for the GAN: 'teacher' (the teacher's own samples of the "
                                        "training prompts, generated once: data.teacher_*; LADD's synthetic data, "
                                        "no dataset needed), 'toy_renders' (the toy renderer draws the training "
                                        "prompts, which must be toy-grammar prompts), an unpaired JSONL {image, "
                                        "caption, label} (rows with label true) or Pick-a-Pic-layout pairs (the "
                                        "winners); null: none (needs dmd.gan_weight=0). DMD2: ~500k LAION images")
    teacher_images: int = cfg_field(512, "real_source=teacher: images in the pool, each of a training prompt drawn by "
                                    "seed", ge=1)
    teacher_steps: int = cfg_field(25, "real_source=teacher: the teacher's sampling steps (its pipeline's scheduler)",
                                   ge=1)
    teacher_guidance: float | None = cfg_field(None, "real_source=teacher: its CFG scale (null: dmd.real_guidance)")
    teacher_dir: str | None = cfg_field(None, "real_source=teacher: the pool's folder (PNGs + teacher_pool.json; "
                                        "reused by any run with the same settings); null: <run.output_dir>/"
                                        "teacher_pool")
    toy_watermark_fraction: float = cfg_field(0.0, "real_source=toy_renders: share of the renders that carry the "
                                              "toy watermark, as in the toy models' pretraining data (the toy SD: "
                                              "0.4 in its last phase); 0: clean renders", ge=0, le=1)
    split: str = cfg_field("train", "split name for `datasets` pair sources")
    image_root: str | None = cfg_field(None, "JSONL sources: folder the image paths are relative to")
    max_rows: int | None = cfg_field(None, "real images: use only the first N rows", ge=1)
    resolution: int = cfg_field(512, "training resolution R (student samples and real images, R x R)", ge=8)
    hflip: bool = cfg_field(False, "random horizontal flip of the real images")

    def __post_init__(self):
        check_local_source("data.prompts", self.prompts)
        if self.real_source not in ("toy_renders", "teacher"):
            check_local_source("data.real_source", self.real_source)


@dataclass
class DMDConfig:
    student_steps: int = cfg_field(4, "N: the student's sampling steps (DMD2 SDXL/Flash-DMD: 4; DMD2 SD1.5: 1)", ge=1)
    student_shift: float | None = cfg_field(None, "flow teachers: shift of the student's sigmas (null: the scheduler's "
                                            "static shift; DMDR SD3-M: 3)", gt=0)
    k_per_sample: bool = cfg_field(False, "backward simulation: draw the trained student step k per sample (false: "
                                   "one k per optimizer step, as DMD2)")
    ttur: int = cfg_field(5, "critic updates per student update (TTUR; DMD2: 5 SDXL, 10 SD1.5; DMDR: 5)", ge=1)
    real_guidance: float = cfg_field(6.0, "CFG scale of the teacher in the DM gradient (DMD2: 1.75 SD1.5, 8 SDXL, "
                                     "default 6; DMDR SD3: 7)")
    real_guidance_jitter: float = cfg_field(0.0, "the teacher's CFG scale is drawn uniformly from real_guidance +- "
                                            "this, once per optimizer step (DMDR SD3: 0.5); 0: fixed", ge=0)
    dynamic_guidance_steps: int = cfg_field(0, "DMDR's dynamic distribution guidance (LoRA only): for this many "
                                            "optimizer steps the real score is the teacher plus the fake score's "
                                            "LoRA at a scale decaying from dynamic_guidance_scale to 0 (DMDR: 2000); "
                                            "0: the plain teacher", ge=0)
    dynamic_guidance_scale: float = cfg_field(0.25, "that LoRA's scale at step 0, as a fraction of the fake score's "
                                              "own (DMDR: 0.5 against its fake score's 2.0). ASSUMPTION: the decay "
                                              "is the half-cosine s (1 + cos(pi step / steps)) / 2", ge=0)
    dm_range: list[float] = cfg_field([0.02, 0.98], "DM timesteps as a fraction of the noise schedule (DMD2: "
                                      "[0.02, 0.98]; SD: uniform t, flow: model.timestep_sampling, DMDR: logit-normal)")
    gan_weight: float = cfg_field(0.0, "generator GAN weight (DMD2: 5e-3 SDXL, 1e-3 SD1.5); 0: no GAN (no head, no real "
                                  "images)", ge=0)
    gan_critic_weight: float = cfg_field(1e-2, "critic GAN weight (DMD2: 1e-2)", ge=0)
    gan_noise_max: float = cfg_field(1.0, "diffusion-GAN: real and fake latents are noised at a t drawn from this "
                                     "fraction of the schedule before classification (DMD2: 1000 of 1000)", gt=0, le=1)
    gan_head_width: int | None = cfg_field(None, "latent: channels of the GAN head's convs (null: the bottleneck "
                                           "width, as DMD2); pixel: the token heads' width (null: 256)", ge=1)
    gan_space: Literal["latent", "pixel"] = cfg_field(
        "latent", "where the GAN looks: latent (DMD2: a head on the fake score's bottleneck, real and fake latents "
        "diffusion-noised) or pixel (Flash-DMD's pixel GAN: heads on a frozen image encoder, dmd.pixel_encoder, over "
        "decoded images; the generator's gradient passes through the VAE decoder, which costs memory at high "
        "resolution; gan_noise_max is not used)")
    pixel_encoder: str | None = cfg_field(None, "gan_space=pixel: a transformers image model (folder or hub id) whose "
                                          "hidden states the heads read: SAM (SamModel, e.g. facebook/sam-vit-base: "
                                          "Flash-DMD's choice), DINOv2 (ADD's), a CLIP; its image processor's mean/std")
    pixel_layers: list[int] | None = cfg_field(None, "gan_space=pixel: which hidden states get a head (1 = after the "
                                               "first block; negative from the end); null: four evenly spaced")
    split_threshold: float | None = cfg_field(None, "Flash-DMD's timestep-aware split as a fraction of the noise "
                                              "schedule (SD: t/T; flow: the pre-shift position, on the same 1000-step "
                                              "grid): student steps at or above it get the DM loss only, below it "
                                              "the GAN loss only; null: DMD2 "
                                              "(every loss on every step). ASSUMPTION: the paper's value is not "
                                              "public; 0.5 puts 999/749 on DM and 499/249 on GAN", gt=0, le=1)
    regression_weight: float = cfg_field(0.0, "weight of the regression loss on the low-noise student steps (every "
                                         "step without the split): the distance from the student's x0 to the "
                                         "teacher's deterministic sample (DDIM / Euler, CFG real_guidance) from the "
                                         "student's own input x_k at t_k. DMD1: 0.25 with LPIPS on precomputed "
                                         "noise-image pairs (for a one-step student, the same thing at k = 0); "
                                         "Flash-DMD: 'optionally', weight not public; 0: off", ge=0)
    regression_steps: int = cfg_field(4, "the teacher's steps from t_k to 0 for the regression target", ge=1)
    regression_distance: Literal["mse", "pseudo_huber"] = cfg_field(
        "mse", "distance in latent space, per sample (LPIPS, DMD1's, needs VGG weights: not offered)")
    regression_huber_c: float = cfg_field(0.03, "pseudo_huber: c", gt=0)

    def __post_init__(self):
        if len(self.dm_range) != 2:
            raise ValueError(f"dmd.dm_range must be [lo, hi], got {list(self.dm_range)}")
        check_noise_range(self.dm_range)
        if self.gan_space == "pixel" and self.gan_weight > 0 and not self.pixel_encoder:
            raise ValueError("dmd.gan_space=pixel needs dmd.pixel_encoder (a SAM, DINOv2 or CLIP image model folder "
                             "or hub id), or dmd.gan_space=latent")
        if self.split_threshold is not None and self.gan_weight == 0 and self.regression_weight == 0:
            raise ValueError("dmd.split_threshold routes the low-noise student steps to the GAN (and regression) "
                             "loss, but dmd.gan_weight and dmd.regression_weight are 0; set one (DMD2's GAN: 5e-3 "
                             "SDXL) or dmd.split_threshold=null")


@dataclass
class RLConfig:
    rewards: list[str] = cfg_field([], "reward specs NAME:WEIGHT (imgalign.rewards) of the joint RL term; empty: no "
                                   "RL. hinge: sum_i w_i relu(tau_i - r_i) on the student's decoded x0 (DMDR SD3: "
                                   "DFN-CLIP-H 0.3 and HPSv2.1 0.3); grpo: the weights of the advantages")
    algorithm: Literal["hinge", "grpo"] = cfg_field(
        "hinge", "hinge: DMDR's reward hinge on the student's x0 of the distillation batch; grpo: a Pref-GRPO-style "
        "policy gradient on the student's own stochastic N-step rollouts (its LCM re-noising is the policy's "
        "Gaussian transition x_k+1 ~ N(alpha_k+1 G(x_k), sigma_k+1^2)): rl.groups prompts x rl.group_size rollouts "
        "per micro-batch, group-normalised advantages of the rewards (rl.mode), -A log p of every transition, "
        "times rl.grpo_weight. ASSUMPTION: Flash-DMD's RL loss is not public")
    mode: Literal["pairwise", "pointwise"] = cfg_field("pairwise", "grpo: pairwise win rates inside each group "
                                                       "(Pref-GRPO) or pointwise scores (Flow-GRPO)")
    groups: int = cfg_field(2, "grpo: prompts per micro-batch (the first of the distillation batch's)", ge=1)
    group_size: int = cfg_field(4, "grpo: rollouts per prompt", ge=2)
    grpo_weight: float = cfg_field(1.0, "grpo: weight of the policy loss beside the distillation loss", ge=0)
    adv_clip_max: float = cfg_field(5.0, "grpo: advantages clamped to [-adv_clip_max, adv_clip_max]", gt=0)
    thresholds: list[float] = cfg_field([], "hinge: tau_i, one per reward, in the reward's own units (DMDR: 0.7 on "
                                        "cosine scores); grpo: not used")
    kwargs: dict[str, dict] = cfg_field({}, "constructor arguments per reward name")
    start_step: int = cfg_field(2000, "cold start: optimizer steps of pure distillation before the reward term joins "
                                "(DMDR: 2000); distillation continues after it", ge=0)
    estimator: Literal["auto", "backprop", "smoothed"] = cfg_field(
        "auto", "gradient of the hinge: backprop (ReFL/DMDR: through the VAE decoder and a differentiable reward), "
        "smoothed (Gaussian smoothing in latent space with antithetic pairs, for a non-differentiable reward such as "
        "the toy rater; an ASSUMPTION: Flash-DMD's RL loss is not public), auto: backprop when every reward is "
        "differentiable")
    smoothing_sigma: float = cfg_field(0.25, "smoothed: std of the latent perturbations", gt=0)
    smoothing_pairs: int = cfg_field(4, "smoothed: antithetic perturbation pairs per sample", ge=1)

    def __post_init__(self):
        if self.algorithm == "hinge" and len(self.thresholds) != len(self.rewards):
            raise ValueError(f"rl.thresholds has {len(self.thresholds)} values for {len(self.rewards)} rl.rewards; "
                             "give one threshold tau per reward")


@dataclass
class FlashDMDConfig:
    model: ModelConfig = cfg_field(ModelConfig, "the teacher pipeline")
    lora: FlashLoraConfig = cfg_field(FlashLoraConfig, "LoRA (student and fake score = two adapters on the shared "
                                      "teacher) or full copies")
    data: DataConfig = cfg_field(DataConfig, "prompts and real images")
    dmd: DMDConfig = cfg_field(DMDConfig, "student schedule, TTUR, DM and GAN losses, Flash-DMD's split")
    rl: RLConfig = cfg_field(RLConfig, "joint RL (Flash-DMD stage 2 / DMDR)")
    optim: OptimConfig = cfg_field(OptimConfig, "the student's optimizer (DMD2: lr 1e-5 SD1.5, 5e-7 SDXL, 5e-5 LoRA; "
                                   "AdamW wd 0.01, clip 10)")
    critic_optim: OptimConfig = cfg_field(OptimConfig, "the critic's optimizer (fake score + GAN head; DMD2: the "
                                          "student's settings; DMDR: lr 2e-7 vs 5e-7)")
    run: RunConfig = cfg_field(RunConfig, "optimizer steps (critic updates), batch, precision, checkpoints")
    validation: ValidationConfig = cfg_field(ValidationConfig, "grids of the teacher (num_inference_steps, CFG "
                                             "guidance_scale) beside the student (dmd.student_steps, no CFG)")

    def __post_init__(self):
        if self.lora.ref_cpu_offload:
            raise ValueError("lora.ref_cpu_offload is not supported by flash-dmd (the teacher is evaluated every "
                             "step); leave it false")
        if self.rl.rewards and self.rl.algorithm == "grpo" and self.dmd.student_steps < 2:
            raise ValueError("rl.algorithm=grpo needs dmd.student_steps >= 2: a one-step student has no stochastic "
                             "transition to take a policy gradient of; use rl.algorithm=hinge")
        if self.dmd.dynamic_guidance_steps and not self.lora.enabled:
            raise ValueError("dmd.dynamic_guidance_steps needs lora.enabled=true (the real score borrows the fake "
                             "score's LoRA at a reduced scale); set dmd.dynamic_guidance_steps=0 for full copies")
        if self.dmd.gan_weight > 0 and self.data.real_source is None:
            raise ValueError("dmd.gan_weight > 0 needs real images: set data.real_source (toy_renders, an unpaired "
                             "JSONL or preference pairs), or dmd.gan_weight=0")


Config = FlashDMDConfig


# ------------------------------------------------------------------------------------------------
# Student schedule and sampling
# ------------------------------------------------------------------------------------------------
class StudentSchedule:
    """The student's N steps: model time t_k (DDPM timesteps or flow sigmas), x = alpha_k x0 + sigma_k eps, and frac_k,
    the step's position in the noise schedule for the split: SD t_k / T; flow (u_k T - 1) / T for the pre-shift
    position u_k = (N - k) / N, the same rule on a 1000-step grid, so both give 0.999, 0.749, 0.499, 0.249 for N = 4."""

    def __init__(self, adapter, num_steps: int, shift: float | None = None):
        if adapter.is_flow:
            self.shift = shift if shift is not None else adapter.shift
            self.t = student_timesteps(num_steps, shift=self.shift)
            self.u = torch.tensor([(num_steps - k) / num_steps for k in range(num_steps)])
            self.frac = self.u - 1 / 1000
            self.alpha, self.sigma = 1 - self.t, self.t.clone()
        else:
            self.shift = None
            self.t = student_timesteps(num_steps, adapter.num_train_timesteps)
            self.frac = self.t.float() / adapter.num_train_timesteps
            ac = adapter.noise_scheduler.alphas_cumprod.double()[self.t]
            self.alpha, self.sigma = ac.sqrt().float(), (1 - ac).sqrt().float()
        self.n = num_steps

    def coef(self, k: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (-1,) + (1,) * (like.dim() - 1)
        return self.alpha[k].view(shape).to(like), self.sigma[k].view(shape).to(like)

    def renoise(self, x0: Tensor, k: Tensor, z: Tensor) -> Tensor:
        """LCM-style: the clean estimate re-noised to step k with fresh noise z."""
        a, s = self.coef(k, x0)
        return a * x0 + s * z

    def describe(self) -> dict:
        """timesteps (SD: LCMScheduler's `timesteps=`; flow: sigma * 1000), sigmas, shift and unshifted_sigmas (flow:
        FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=True) takes `sigmas=unshifted_sigmas`)."""
        if self.shift is None:
            return {"num_steps": self.n, "timesteps": [int(t) for t in self.t], "sigmas": None, "shift": None}
        return {"num_steps": self.n, "timesteps": [round(float(t) * 1000, 3) for t in self.t],
                "sigmas": [round(float(t), 6) for t in self.t], "shift": self.shift,
                "unshifted_sigmas": [round(float(u), 6) for u in self.u]}  # FlowMatchEuler's `sigmas=` (it shifts)


def student_x0(adapter, model, sched: StudentSchedule, x: Tensor, k: Tensor, cond) -> Tensor:
    """The student at its step k [B] on input x [B, C, h, w] -> its clean estimate x0 [B, C, h, w] (fp32)."""
    pred = adapter.predict(model, x, sched.t[k].to(x.device), cond)
    a, s = sched.coef(k, x)
    return adapter.to_x0_eps(pred.float(), x.float(), a.float(), s.float())[0]


def _rows(cond, idx: Tensor):
    return {key: v[idx] for key, v in cond.items()}


@torch.no_grad()
def simulate_input(adapter, model, sched: StudentSchedule, cond, k: Tensor, gens, latent_shape) -> Tensor:
    """Backward simulation (DMD2): pure noise, then the current student (no grad) through steps 0..k_b - 1 with
    re-noising by fresh noise -> the input of step k_b per sample [B, C, h, w]. Sample b draws from gens[b] its
    initial noise, then one re-noising draw per simulated step."""
    dev = adapter.device
    x = randn_per_sample(latent_shape, gens).to(dev)
    for j in range(int(k.max())):
        act = torch.nonzero(k > j).flatten()
        step = torch.full((len(act),), j)
        x0 = student_x0(adapter, model, sched, x[act.to(dev)], step, _rows(cond, act.to(dev)))
        z = randn_per_sample(latent_shape, [gens[int(b)] for b in act]).to(dev)
        x[act.to(dev)] = sched.renoise(x0, step + 1, z).to(x.dtype)
    return x


@torch.no_grad()
def sample_student(adapter, model, sched: StudentSchedule, prompts: list[str], generator: torch.Generator,
                   latent_shape, cond=None) -> Tensor:
    """The student's N-step sampler: pure noise, x0 at each step, re-noised with fresh noise to the next step (LCM-
    style; `LCMScheduler` with the student's timesteps in diffusers) -> clean latents [B, C, h, w]. Draws from the one
    CPU `generator` in the order diffusers' pipelines do (initial noise, then one draw per re-noising)."""
    dev = adapter.device
    cond = cond if cond is not None else adapter.encode_prompts(prompts)
    x = torch.randn((len(prompts), *latent_shape), generator=generator).to(dev)
    for k in range(sched.n):
        step = torch.full((len(prompts),), k)
        x0 = student_x0(adapter, model, sched, x, step, cond)
        if k + 1 < sched.n:
            x = sched.renoise(x0, step + 1, torch.randn(x.shape, generator=generator).to(dev))
    return x0


@torch.no_grad()
def teacher_ode_x0(adapter, net, x: Tensor, t_start: Tensor, cond, uncond, guidance: float, steps: int) -> Tensor:
    """The teacher's deterministic sample from x [B] at its time t_start [B] (the family's time values): `steps`
    DDIM (eta 0) steps on the grid t_start (1 - i / steps), i < steps, each re-noising its clean and noise estimates
    to the next time; for flow teachers that step is Euler's. -> the last clean estimate [B, C, h, w] (fp32)."""
    x = x.float()
    grid = [t_start.to(x.device) * (1 - i / steps) for i in range(steps)]
    grid = grid if adapter.is_flow else [t.round().long() for t in grid]
    for i, t in enumerate(grid):
        pred = adapter.predict_cfg(net, x, t, cond, uncond, guidance)
        x0, eps = adapter.to_x0_eps(pred.float(), x, *adapter.alpha_sigma(t, x))
        if i + 1 < steps:
            a, s = adapter.alpha_sigma(grid[i + 1], x)
            x = a * x0 + s * eps
    return x0


def use_student_sampler(pipe, lora_dir: Path) -> dict:
    """A Flash-DMD student (its LoRA folder holds flash_dmd_student.json): switch the pipeline to the student's
    sampler and return the call arguments of its schedule. SD-type: LCMScheduler at the student's timesteps, no CFG;
    flow: FlowMatchEulerDiscreteScheduler with the student's shift and stochastic re-noising at its sigmas. This is how
    `imgalign generate --lora` samples a student; any other LoRA folder -> {} (the pipeline left as it is)."""
    path = lora_dir / STUDENT_FILE
    if not path.is_file():
        return {}
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("shift") is None:
        from diffusers import LCMScheduler

        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        call = {"timesteps": info["timesteps"], "guidance_scale": 0.0}
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, shift=info["shift"], stochastic_sampling=True, use_dynamic_shifting=False)
        call = {"sigmas": info["unshifted_sigmas"], "guidance_scale": 1.0}
    print(f"{lora_dir} is a {info['num_steps']}-step Flash-DMD student: sampling its schedule "
          f"({', '.join(f'{k}={v}' for k, v in call.items())}); --steps and --guidance-scale are not used")
    return call


def timesteps_per_sample(adapter, gens, noise_range) -> Tensor:
    return torch.cat([adapter.sample_timesteps(1, g, tuple(noise_range)) for g in gens])


# ------------------------------------------------------------------------------------------------
# Networks: teacher, student, fake score; the GAN head on the fake score's bottleneck
# ------------------------------------------------------------------------------------------------
def fake_lora(lora: FlashLoraConfig) -> tuple[int, float]:
    """(rank, alpha) of the fake-score adapter: the student's unless lora.fake_rank / fake_alpha say otherwise."""
    if lora.fake_rank is None:
        return lora.rank, lora.fake_alpha or lora.alpha or lora.rank
    return lora.fake_rank, lora.fake_alpha or lora.fake_rank


class DMDNetworks:
    """LoRA: one base, adapters "student" and "fake", teacher = adapters disabled. Full: three modules."""

    def __init__(self, adapter, lora: FlashLoraConfig, dtype: torch.dtype, gradient_checkpointing: bool):
        self.adapter, self.use_lora = adapter, lora.enabled
        base = adapter.denoiser
        if gradient_checkpointing:
            base.enable_gradient_checkpointing()
        if self.use_lora:
            adapter.add_lora(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules, init=lora.init,
                             adapter_name="student")
            fake_rank, fake_alpha = fake_lora(lora)
            adapter.add_lora(rank=fake_rank, alpha=fake_alpha, target_modules=lora.target_modules, init=lora.init,
                             adapter_name="fake")
            self.student = self.fake = self.teacher = base
        else:
            self.teacher = base.to(dtype).requires_grad_(False).eval()
            self.student = copy.deepcopy(base).to(torch.float32).requires_grad_(True).train()
            self.fake = copy.deepcopy(base).to(torch.float32).requires_grad_(True).train()

    def named_params(self, role: str) -> list[tuple[str, nn.Parameter]]:
        if self.use_lora:
            return [(n, p) for n, p in self.student.named_parameters() if "lora_" in n and f".{role}." in n]
        return list((self.student if role == "student" else self.fake).named_parameters())

    @contextlib.contextmanager
    def fake_at_scale(self, scale: float):
        """-> the network with the fake score's LoRA at `scale` x its own strength (0: the teacher; 1: the fake score);
        the LoRA's strength is restored after. DMDR's dynamic distribution guidance."""
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.student.modules() if isinstance(m, LoraLayer)]
        with self.role("fake") as net:
            for m in layers:
                m.set_scale("fake", scale)
            try:
                yield net
            finally:
                for m in layers:
                    m.set_scale("fake", 1.0)

    @contextlib.contextmanager
    def role(self, name: str):
        """-> the network to call as `name` (teacher | student | fake). LoRA: selects the adapter (peft makes the active
        adapter's parameters the ones that require grad), restoring the student's after."""
        if not self.use_lora:
            yield {"teacher": self.teacher, "student": self.student, "fake": self.fake}[name]
        elif name == "teacher":
            with adapters_disabled(self.student):
                yield self.student
        else:
            with self.adapter.adapter_active(name):
                yield self.student

    # weights: the student into a folder that `pipe.load_lora_weights` loads; the critic beside its GAN head
    def save(self, role: str, module, folder: Path) -> None:
        if self.use_lora:
            self.adapter.save_lora(folder, module, adapter_name=role)
        else:
            module.save_pretrained(folder / self.adapter.denoiser_name, safe_serialization=True)

    def load(self, role: str, module, folder: Path) -> None:
        if self.use_lora:
            self.adapter.load_lora_into_denoiser(folder, adapter_name=role)
        else:
            module.load_state_dict(read_safetensors_folder(folder / self.adapter.denoiser_name))


# ------------------------------------------------------------------------------------------------
# Data: prompts and real images
# ------------------------------------------------------------------------------------------------
class TeacherPool:
    """data.real_source=teacher: `data.teacher_images` samples of the teacher (its pipeline, data.teacher_steps,
    CFG data.teacher_guidance) as the GAN's real images, the prompt of image i drawn from the training prompts by
    (seed, i), its noise seeded by (seed, i). LADD (arXiv 2403.12015) trains its discriminator on such synthetic
    data; on the toy world they carry the teacher's own habits (its watermark), unlike clean renders. PNGs in a
    folder with `teacher_pool.json` (the settings and each image's prompt); a killed generation continues, a folder
    made with other settings is refused."""

    FILE = "teacher_pool.json"

    def __init__(self, folder: Path, settings: dict, prompts: list[str]):
        self.folder, self.settings = Path(folder), settings
        gens = [torch.Generator().manual_seed(derive_seed(settings["seed"], "flash-dmd/pool", i))
                for i in range(settings["images"])]
        self.items = [{"file": f"{i:06d}.png", "prompt": prompts[int(torch.randint(len(prompts), (1,), generator=g))]}
                      for i, g in enumerate(gens)]

    def check(self) -> None:
        read_generated_record(self.folder / self.FILE, self.settings, "these teacher samples",
                              "set data.teacher_dir to another folder")

    def prepare(self, pipe, batch: int, progress: bool) -> int:
        """Generate the missing images (main process) -> how many were generated."""
        from tqdm.auto import tqdm

        from imgalign.data.images import save_image_whole

        self.check()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / self.FILE).write_text(json.dumps({"settings": self.settings, "items": self.items}, indent=1)
                                             + "\n", encoding="utf-8")
        todo = [i for i, it in enumerate(self.items) if not (self.folder / it["file"]).is_file()]
        pipe.set_progress_bar_config(disable=True)
        s = self.settings
        for start in tqdm(range(0, len(todo), batch), desc="teacher pool", disable=not progress or not todo):
            chunk = todo[start:start + batch]
            gens = [torch.Generator().manual_seed(derive_seed(s["seed"], "flash-dmd/pool-noise", i)) for i in chunk]
            images = pipe(prompt=[self.items[i]["prompt"] for i in chunk], generator=gens,
                          num_inference_steps=s["steps"], guidance_scale=s["guidance"], height=s["resolution"],
                          width=s["resolution"]).images
            for i, image in zip(chunk, images):
                save_image_whole(image, self.folder / self.items[i]["file"])
        return len(todo)


def teacher_pool(cfg: FlashDMDConfig, prompts: list[str]) -> TeacherPool:
    d = cfg.data
    folder = Path(d.teacher_dir) if d.teacher_dir else Path(cfg.run.output_dir) / "teacher_pool"
    settings = {"model": cfg.model.pretrained, "images": d.teacher_images, "steps": d.teacher_steps,
                "guidance": d.teacher_guidance if d.teacher_guidance is not None else cfg.dmd.real_guidance,
                "resolution": d.resolution, "seed": cfg.run.seed, "prompts": d.prompts or "toy train prompts",
                "max_prompts": d.max_prompts}
    return TeacherPool(folder, settings, prompts)


class RealImages:
    """Real images with their captions for the GAN: the teacher's pool, toy renders of the prompts, or a folder of
    images in the unpaired JSONL / Pick-a-Pic pair layouts. `batch(gens, epoch)` -> (pixels [B, 3, R, R] in [-1, 1],
    captions)."""

    def __init__(self, cfg: DataConfig, prompts: list[str], seed: int, pool: TeacherPool | None = None):
        self.cfg, self.prompts, self.pool = cfg, prompts, pool
        if cfg.real_source == "toy_renders":
            marked = f", {cfg.toy_watermark_fraction:.0%} watermarked" if cfg.toy_watermark_fraction else ""
            self.data, self.rows, self.summary = None, None, f"toy renders of {len(prompts)} prompts{marked}"
            return
        if cfg.real_source == "teacher":
            s = pool.settings
            self.data, self.rows = None, None
            self.summary = (f"the teacher's {s['images']} samples ({s['steps']} steps, CFG {s['guidance']:g}) in "
                            f"{pool.folder}")
            return
        from imgalign.data import load_preference_pairs
        from imgalign.data.unpaired import ImageTransform, detect_layout, load_unpaired_images, split_pairs

        if detect_layout(cfg.real_source) == "unpaired":
            self.data = load_unpaired_images(cfg.real_source, image_root=cfg.image_root, max_rows=cfg.max_rows)
            self.rows = [i for i, label in enumerate(self.data._labels) if label == 1.0]
        else:
            self.data = split_pairs(load_preference_pairs(cfg.real_source, split=cfg.split, image_root=cfg.image_root,
                                                          max_rows=cfg.max_rows))
            self.rows = list(range(0, len(self.data), 2))  # item 2i is pair i's winner
        if not self.rows:
            from imgalign.data.errors import DataError

            raise DataError(f"data.real_source={cfg.real_source}: no real images (label true, or pair winners)")
        self.transform = ImageTransform(cfg.resolution, hflip=cfg.hflip, seed=seed)
        self.summary = f"{len(self.rows)} images of {self.data.stats.summary()}"

    def batch(self, gens, epoch: int) -> tuple[Tensor, list[str]]:
        import numpy as np
        import torchvision.transforms.functional as TF

        if self.pool is not None:
            from imgalign.data.images import read_image

            items = [self.pool.items[int(torch.randint(len(self.pool.items), (1,), generator=g))] for g in gens]
            pixels = [TF.pil_to_tensor(read_image(self.pool.folder / it["file"])).float() / 127.5 - 1 for it in items]
            if self.cfg.hflip:
                pixels = [p.flip(-1) if bool(torch.rand((), generator=g) < 0.5) else p for p, g in zip(pixels, gens)]
            return torch.stack(pixels), [it["prompt"] for it in items]
        if self.data is None:
            from imgalign.toy import render
            from imgalign.toy.render import add_watermark

            pixels, captions = [], []
            for g in gens:
                prompt = self.prompts[int(torch.randint(len(self.prompts), (1,), generator=g))]
                rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
                image = np.array(render(prompt, rng, size=self.cfg.resolution)[0])
                if self.cfg.toy_watermark_fraction and float(torch.rand((), generator=g)) < self.cfg.toy_watermark_fraction:
                    image = add_watermark(image)
                pixels.append(torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1)
                captions.append(prompt)
            return torch.stack(pixels), captions
        rows = [self.rows[int(torch.randint(len(self.rows), (1,), generator=g))] for g in gens]
        items = [self.transform(self.data[r], index=r, epoch=epoch) for r in rows]
        return torch.stack([it["pixels"] for it in items]), [it["caption"] for it in items]


def load_prompts(cfg: DataConfig) -> list[str]:
    from imgalign.data import load_prompt_file

    source = cfg.prompts or str(TOY_PROMPTS)
    prompts = load_prompt_file(source)[: cfg.max_prompts]
    if not prompts:
        raise ConfigError(f"data.prompts: no prompts in {source}")
    return prompts


# ------------------------------------------------------------------------------------------------
# Joint RL: DMDR's reward hinge on the student's decoded x0
# ------------------------------------------------------------------------------------------------
def decode_with_grad(adapter, latents: Tensor) -> Tensor:
    """latents -> pixels [B, 3, H, W] in [-1, 1], differentiable (adapter.decode_latents runs without grad)."""
    cfg = adapter.vae.config
    z = latents / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
    return adapter.vae.decode(z.to(adapter.vae.dtype)).sample.float().clamp(-1, 1)


class RewardTerm:
    """sum_i w_i relu(tau_i - r_i(decode(x0))) per sample (imgalign.losses.reward_hinge_loss), with its gradient."""

    def __init__(self, cfg: RLConfig, device):
        from imgalign.rewards.online import build_reward_list

        self.specs, self.rewards = build_reward_list(SimpleNamespace(mode="pointwise", rewards=cfg.rewards,
                                                                     kwargs=cfg.kwargs), device)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"rl.rewards names a reward twice: {cfg.rewards}")
        self.weights = {s.name: s.weight for s in self.specs}
        self.thresholds = dict(zip(names, cfg.thresholds))
        differentiable = all(r.differentiable for r in self.rewards)
        if cfg.estimator == "backprop" and not differentiable:
            rough = [s.name for s, r in zip(self.specs, self.rewards) if not r.differentiable]
            raise ConfigError(f"rl.estimator=backprop needs differentiable rewards; {rough} are not: use "
                              "rl.estimator=smoothed (or auto)")
        self.backprop = cfg.estimator == "backprop" or (cfg.estimator == "auto" and differentiable)
        self.cfg = cfg

    def describe(self) -> str:
        terms = " + ".join(f"{s.weight:g} relu({self.thresholds[s.name]:g} - {s.name})" for s in self.specs)
        how = "backprop through the VAE" if self.backprop else (
            f"Gaussian smoothing, sigma {self.cfg.smoothing_sigma:g}, {self.cfg.smoothing_pairs} pairs")
        return f"{terms} ({how}) from step {self.cfg.start_step}"

    def _scores(self, pixels: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        return {s.name: r.score(pixels, prompts, value_range=(-1, 1)).float().to(pixels.device)
                for s, r in zip(self.specs, self.rewards)}

    def __call__(self, adapter, x0: Tensor, prompts: list[str], gens) -> tuple[Tensor, dict]:
        """-> (per-sample term [B] whose value is the hinge and whose gradient reaches x0, metrics)."""
        if self.backprop:
            scores = self._scores(decode_with_grad(adapter, x0), prompts)
            hinge = reward_hinge_loss(scores, self.thresholds, self.weights)
            return hinge, {f"reward/{k}": v.detach().mean() for k, v in scores.items()}
        k = self.cfg.smoothing_pairs
        seen = {}

        def h(latents):  # [x, x + sigma xi, x - sigma xi]: the prompts of x, then each prompt k times, twice
            with torch.no_grad():
                scores = self._scores(adapter.decode_latents(latents),
                                      list(prompts) + [p for p in prompts for _ in range(k)] * 2)
                seen.update({name: v[: len(prompts)] for name, v in scores.items()})
                return reward_hinge_loss(scores, self.thresholds, self.weights)

        xi = randn_per_sample((k, *x0.shape[1:]), gens).to(x0)  # [B, K, C, h, w]
        h0, grad = smoothed_gradient(h, x0.detach(), xi, self.cfg.smoothing_sigma)
        surrogate = (grad.detach() * x0).flatten(1).sum(1)  # d/dx0 = the estimated gradient of the hinge
        return h0.to(x0) + surrogate - surrogate.detach(), {f"reward/{n}": v.mean() for n, v in seen.items()}


@torch.no_grad()
def student_rollout(adapter, model, sched: StudentSchedule, cond, gens, latent_shape) -> tuple[list[Tensor], Tensor]:
    """The student's stochastic N-step sampler, one generator per sample (initial noise, then one draw per
    re-noising) -> (the inputs x_0 .. x_N-1 of its steps, each [B, C, h, w]; the final clean estimate [B, C, h, w])."""
    x = randn_per_sample(latent_shape, gens).to(adapter.device)
    states = [x]
    for k in range(sched.n):
        step = torch.full((len(gens),), k)
        x0 = student_x0(adapter, model, sched, x, step, cond)
        if k + 1 < sched.n:
            x = sched.renoise(x0, step + 1, randn_per_sample(latent_shape, gens).to(x0)).to(x.dtype)
            states.append(x)
    return states, x0


class GRPOTerm:
    """rl.algorithm=grpo: a Pref-GRPO-style policy gradient on the student's own rollouts. Policy: the student's
    sampler, whose re-noising makes step k a Gaussian transition x_k+1 ~ N(alpha_k+1 G(x_k, k), sigma_k+1^2) (the last
    step is deterministic and has none). Per micro-batch: rl.groups prompts x rl.group_size rollouts (no grad), the
    rewards of their decoded x0 (pairwise win rates in each group, or pointwise scores), group-normalised advantages
    (imgalign.losses.policy, zero for constant groups), then with grad the on-policy clipped surrogate of the mean
    log-probability of the rollout's transitions (ratio 1: the gradient is -A grad log p)."""

    def __init__(self, cfg: RLConfig, device):
        from imgalign.rewards.online import build_reward_list

        self.cfg = cfg
        self.judge = SimpleNamespace(mode=cfg.mode, rewards=cfg.rewards, kwargs=cfg.kwargs, swap_order=False,
                                     hard_wins=True)
        self.specs, self.rewards = build_reward_list(self.judge, device)
        self.weights = [s.weight for s in self.specs]

    def describe(self) -> str:
        c = self.cfg
        return (f"GRPO on student rollouts: {c.groups} prompts x {c.group_size} per micro-batch, {c.mode} "
                f"{' + '.join(f'{s.weight:g} {s.name}' for s in self.specs)}, weight {c.grpo_weight:g}, from step "
                f"{c.start_step}")

    def __call__(self, ctx, batch: Batch, step: int, latent_shape) -> tuple[Tensor, dict]:
        from imgalign.losses.policy import clipped_surrogate, combine_advantages, zero_std_groups
        from imgalign.rewards.online import compute_rewards
        from imgalign.sampling.gaussian import gaussian_log_prob

        adapter, sched, acc, c = ctx.adapter, ctx.sched, ctx.accelerator, self.cfg
        g, n = min(c.groups, len(batch.prompts)), c.group_size
        rows = torch.arange(g).repeat_interleave(n)
        prompts = [batch.prompts[i] for i in rows.tolist()]
        groups = torch.tensor([batch.positions[i] for i in rows.tolist()])
        gens = sample_generators(ctx.cfg.run.seed, "flash-dmd/grpo", step,
                                 [batch.positions[i] * n + j for i in range(g) for j in range(n)])
        cond = _rows(batch.cond, rows.to(adapter.device))
        with ctx.nets.role("student") as net:
            with acc.autocast():
                states, x0 = student_rollout(adapter, net, sched, cond, gens, latent_shape)
            values, _ = compute_rewards(self.specs, self.rewards, self.judge, adapter.decode_latents(x0), prompts,
                                        groups, acc)
            all_groups = acc.gather(groups.to(acc.device)).cpu()
            adv = combine_advantages(values, self.weights, all_groups, std="group")
            adv = torch.where(zero_std_groups(values, all_groups), torch.zeros_like(adv), adv)
            adv = adv[acc.process_index * len(rows):(acc.process_index + 1) * len(rows)].to(x0.device)
            log_probs = []
            for k in range(sched.n - 1):
                step_k = torch.full((len(rows),), k)
                with acc.autocast():
                    x0_k = student_x0(adapter, net, sched, states[k], step_k, cond)
                a, s = sched.coef(step_k + 1, x0_k)
                log_probs.append(gaussian_log_prob(states[k + 1], a * x0_k, s.expand_as(x0_k)))
        log_p = torch.stack(log_probs, 1).mean(1)
        out = clipped_surrogate(log_p, log_p.detach(), adv, adv_clip_max=c.adv_clip_max)
        combined = sum(w * v for w, v in zip(self.weights, values))
        return c.grpo_weight * out.loss.mean(), {"loss_grpo": out.loss.mean().detach(),
                                                 "grpo_reward": combined.mean(), "grpo_adv_abs": adv.abs().mean()}


# ------------------------------------------------------------------------------------------------
# Losses of one micro-batch
# ------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    prompts: list[str]
    cond: dict
    uncond: dict | None
    k: Tensor          # [B] the student step each sample trains
    positions: list[int]
    x_in: Tensor | None = None  # [B, C, h, w] the student's inputs (backward simulation)


def discriminate(ctx, x: Tensor, cond, gens) -> Tensor:
    """GAN logits [B, 1] of latents x. Latent GAN (diffusion-GAN): x noised at t ~ [0, dmd.gan_noise_max) of the
    schedule, the fake network's bottleneck at (x_t, t, cond), the head; call inside nets.role("fake"). Pixel GAN:
    the pixel discriminator on the decoded x (differentiable)."""
    adapter = ctx.adapter
    if ctx.features is None:
        return ctx.head(decode_with_grad(adapter, x))
    t = timesteps_per_sample(adapter, gens, (0.0, ctx.cfg.dmd.gan_noise_max))
    xt, _ = adapter.noise_and_target(x, randn_per_sample(x.shape[1:], gens).to(x), t)
    with ctx.nets.role("fake") as net, ctx.accelerator.autocast():
        features = ctx.features(lambda: adapter.predict(net, xt, t, cond))
    return ctx.head(features)


def adversarial_term(ctx, x: Tensor, cond, gens) -> Tensor:
    """The student's GAN loss softplus(-D(x)) per sample [B] whose gradient reaches x only. The gradient is taken at
    once, inside the fake role with the critic frozen, so that gradient checkpointing recomputes the fake network
    with its own adapter; x then receives it through a surrogate (value: the loss)."""
    leaf = x.detach().requires_grad_(True)
    params = [p for _, p in ctx.critic_params]
    with ctx.nets.role("fake"):
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            loss = gan_generator_loss(discriminate(ctx, leaf, cond, gens))
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
    surrogate = (grad * x).flatten(1).sum(1)
    return loss.detach() + surrogate - surrogate.detach()


def routes(ctx, k: Tensor) -> tuple[Tensor, Tensor]:
    """Which samples get the DM loss and which the low-noise losses (GAN, regression): Flash-DMD's split by the
    student step's position in the noise schedule, or (split_threshold null, DMD2) every sample both."""
    d = ctx.cfg.dmd
    if d.split_threshold is None:
        return torch.ones_like(k, dtype=torch.bool), torch.ones_like(k, dtype=torch.bool)
    return timestep_split(ctx.sched.frac[k], d.split_threshold)


def regression_term(ctx, x0: Tensor, x_in: Tensor, k: Tensor, cond, uncond, guidance: float) -> Tensor:
    """Per sample [B]: the distance from the student's x0 (with grad) to the teacher's deterministic sample from the
    student's own input x_in at its step's time (`teacher_ode_x0`, no grad)."""
    d = ctx.cfg.dmd
    with torch.no_grad(), ctx.nets.role("teacher") as net, ctx.accelerator.autocast():
        target = teacher_ode_x0(ctx.adapter, net, x_in, ctx.sched.t[k.cpu()].to(x_in.device), cond, uncond, guidance,
                                d.regression_steps)
    if d.regression_distance == "pseudo_huber":
        return pseudo_huber(x0, target, d.regression_huber_c)
    return (x0.float() - target).pow(2).flatten(1).mean(1)


def teacher_guidance(d: DMDConfig, seed: int, step: int) -> float:
    """The teacher's CFG scale at optimizer step `step`: d.real_guidance, or with DMDR's jitter a draw from
    U(real_guidance - jitter, real_guidance + jitter) seeded by (seed, step), so a resumed run draws the same."""
    if not d.real_guidance_jitter:
        return d.real_guidance
    g = torch.Generator().manual_seed(derive_seed(seed, "flash-dmd/cfg", step))
    return d.real_guidance + d.real_guidance_jitter * (2 * float(torch.rand((), generator=g)) - 1)


def real_score_lora_scale(d: DMDConfig, step: int) -> float:
    """The fake LoRA's scale inside the real score at optimizer step `step` (dynamic distribution guidance):
    dynamic_guidance_scale (1 + cos(pi step / steps)) / 2 until dynamic_guidance_steps, then 0 (the teacher)."""
    if step >= d.dynamic_guidance_steps:
        return 0.0
    return d.dynamic_guidance_scale * (1 + math.cos(math.pi * step / d.dynamic_guidance_steps)) / 2


def student_loss(ctx, x0: Tensor, batch: Batch, step: int, rl_on: bool) -> tuple[Tensor, dict]:
    """The student's loss on its clean estimates x0 [B] (with grad) from inputs batch.x_in: per-sample DM / GAN and
    regression by the split, plus RL."""
    adapter, nets, d, seed, acc = ctx.adapter, ctx.nets, ctx.cfg.dmd, ctx.cfg.run.seed, ctx.accelerator
    b, dev = x0.shape[0], x0.device
    dm, low = routes(ctx, batch.k)
    adv = low & (ctx.head is not None)
    per_dm, per_adv, per_reg = (torch.zeros(b, device=dev) for _ in range(3))
    m = {"dm_share": dm.float().mean(), "adv_share": adv.float().mean(), "dm_grad_abs": torch.zeros(()),
         "real_lora_scale": torch.tensor(real_score_lora_scale(d, step))}
    if dm.any():
        idx = torch.nonzero(dm).flatten().to(dev)
        gens = sample_generators(seed, "flash-dmd/dm", step, [batch.positions[i] for i in idx.tolist()])
        x = x0[idx]
        t = timesteps_per_sample(adapter, gens, d.dm_range)
        xt, _ = adapter.noise_and_target(x.detach(), randn_per_sample(x.shape[1:], gens).to(x), t)
        cond, uncond = _rows(batch.cond, idx), _rows(batch.uncond, idx) if batch.uncond is not None else None
        with torch.no_grad(), acc.autocast():
            lora_scale = real_score_lora_scale(d, step)
            real = nets.fake_at_scale(lora_scale) if lora_scale else nets.role("teacher")
            with real as net:  # the same x_t to both scores
                pred_real = adapter.predict_cfg(net, xt, t, cond, uncond, teacher_guidance(d, seed, step))
            with nets.role("fake") as net:
                pred_fake = adapter.predict(net, xt, t, cond)
        a, s = adapter.alpha_sigma(t, xt)
        x0_real = adapter.to_x0_eps(pred_real.float(), xt.float(), a, s)[0]
        x0_fake = adapter.to_x0_eps(pred_fake.float(), xt.float(), a, s)[0]
        g = dm_gradient(x.detach(), x0_real, x0_fake)
        per_dm = per_dm.index_copy(0, idx, dm_surrogate_loss(x, g))
        m["dm_grad_abs"] = g.abs().mean() * len(idx) / b
    if adv.any():
        idx = torch.nonzero(adv).flatten().to(dev)
        gens = sample_generators(seed, "flash-dmd/gan-g", step, [batch.positions[i] for i in idx.tolist()])
        per_adv = per_adv.index_copy(0, idx, adversarial_term(ctx, x0[idx], _rows(batch.cond, idx), gens))
    if d.regression_weight and low.any():
        idx = torch.nonzero(low).flatten().to(dev)
        uncond = _rows(batch.uncond, idx) if batch.uncond is not None else None
        per_reg = per_reg.index_copy(0, idx, regression_term(ctx, x0[idx], batch.x_in[idx], batch.k[idx.cpu()],
                                                             _rows(batch.cond, idx), uncond,
                                                             teacher_guidance(d, seed, step)))
    distill = per_dm + d.gan_weight * per_adv + d.regression_weight * per_reg
    loss = distill.mean()
    # batch means of the per-sample terms (0 for samples routed to the other loss): what each adds to the loss
    m.update({"loss_dm": per_dm.mean().detach(), "gan_g": per_adv.mean().detach(), "loss_distill": loss.detach()})
    if d.regression_weight:
        m["loss_reg"] = per_reg.mean().detach()
    if rl_on and isinstance(ctx.reward, GRPOTerm):
        term, rm = ctx.reward(ctx, batch, step, x0.shape[1:])
        loss = loss + term
        m.update({"loss_rl": term.detach(), **rm})
    elif rl_on:
        gens = sample_generators(seed, "flash-dmd/rl", step, batch.positions)
        term, rm = ctx.reward(adapter, x0, batch.prompts, gens)
        loss = loss + term.mean()
        m.update({"loss_rl": term.detach().mean(), **rm})
    m["loss_student"] = loss.detach()
    return loss, m


def critic_loss(ctx, x0: Tensor, batch: Batch, step: int) -> tuple[Tensor, dict]:
    """The critic's loss on detached student samples x0 [B]: the fake score's denoising loss over the full range (no
    CFG), plus the GAN discriminator loss on noised real and fake latents. Run inside nets.role("fake")."""
    adapter, d, seed, acc = ctx.adapter, ctx.cfg.dmd, ctx.cfg.run.seed, ctx.accelerator
    gens = sample_generators(seed, "flash-dmd/fake", step, batch.positions)
    t = timesteps_per_sample(adapter, gens, (0.0, 1.0))
    xt, target = adapter.noise_and_target(x0, randn_per_sample(x0.shape[1:], gens).to(x0), t)
    with ctx.nets.role("fake") as net, acc.autocast():
        pred = adapter.predict(net, xt, t, batch.cond)
    l_fake = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    loss = l_fake.mean()
    m = {"loss_fake": loss.detach()}
    if ctx.head is not None:
        gens_real = sample_generators(seed, "flash-dmd/real", step, batch.positions)
        pixels, captions = ctx.real.batch(gens_real, epoch=step)
        if ctx.features is None:  # pixel GAN: the real images as they are, the student's decoded
            fake_pixels = adapter.decode_latents(x0)
            logits = ctx.head(torch.cat([pixels.to(fake_pixels), fake_pixels]))
        else:
            x_real = adapter.encode_images(pixels, generator=gens_real).to(x0)
            gens_d = (sample_generators(seed, "flash-dmd/gan-d-real", step, batch.positions)
                      + sample_generators(seed, "flash-dmd/gan-d-fake", step, batch.positions))
            logits = discriminate(ctx, torch.cat([x_real, x0]), cat_cond(adapter.encode_prompts(captions),
                                                                         batch.cond), gens_d)
        real, fake = logits.chunk(2)
        l_d = gan_critic_loss(real, fake)
        loss = loss + d.gan_critic_weight * l_d.mean()
        m.update({"gan_d": l_d.mean().detach(), "d_real": torch.sigmoid(real).mean().detach(),
                  "d_fake": torch.sigmoid(fake).mean().detach()})
    m["loss_critic"] = loss.detach()
    return loss, m


def draw_k(cfg: FlashDMDConfig, step: int, positions: list[int]) -> Tensor:
    """The student step each sample trains [B]: one per optimizer step (DMD2) or one per sample."""
    n = cfg.dmd.student_steps
    if cfg.dmd.k_per_sample:
        gens = sample_generators(cfg.run.seed, "flash-dmd/k", step, positions)
        return torch.cat([torch.randint(n, (1,), generator=g) for g in gens])
    k = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(derive_seed(cfg.run.seed, "flash-dmd/k",
                                                                                        step))))
    return torch.full((len(positions),), k)


# ------------------------------------------------------------------------------------------------
# Validation: the teacher at many steps beside the student at N steps, same prompts and seed
# ------------------------------------------------------------------------------------------------
def make_validator(ctx, vcfg: ValidationConfig, resolution: int, out_dir: Path):
    if not vcfg.enabled:
        return None
    reward = None
    if vcfg.reward:
        from imgalign.rewards import build_reward

        reward = build_reward(vcfg.reward)
    teacher_cache: dict = {}
    adapter, nets = ctx.adapter, ctx.nets
    f = adapter.pipe.vae_scale_factor

    def validate(step: int) -> dict:
        if not ctx.accelerator.is_main_process:
            return {}
        if "images" not in teacher_cache:  # the teacher does not change: sample it once
            with nets.role("teacher"):
                teacher_cache["images"], teacher_cache["prompts"] = validation_images(adapter, vcfg, resolution)
        teacher, prompts = teacher_cache["images"], teacher_cache["prompts"]
        size = vcfg.resolution or resolution
        shape = (adapter.vae.config.latent_channels, size // f, size // f)
        with nets.role("student") as net, ctx.accelerator.autocast():
            was = net.training
            net.eval()
            latents = sample_student(adapter, net, ctx.sched, prompts, torch.Generator().manual_seed(vcfg.seed), shape)
            net.train(was)
        student = (adapter.decode_latents(latents) + 1) / 2
        k = vcfg.images_per_prompt
        rows = [torch.cat([teacher[i:i + k], student[i:i + k]]) for i in range(0, len(prompts), k)]
        (out_dir / "validation").mkdir(parents=True, exist_ok=True)
        cols = [f"teacher {vcfg.num_inference_steps} steps"] * k + [f"student {ctx.sched.n} steps"] * k
        captioned_grid(torch.cat(rows) * 2 - 1, row_labels=prompts[::k], col_labels=cols,
                       title=f"validation, step {step}").save(out_dir / "validation" / f"step-{step:06d}.png")
        if reward is None:
            return {}
        logs = {f"val/{vcfg.reward}": float(reward.score(student, prompts).mean()),
                f"val/{vcfg.reward}_teacher": float(reward.score(teacher, prompts).mean())}
        ctx.accelerator.log(logs, step=step)
        return logs

    return validate


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def train(cfg: FlashDMDConfig) -> dict:
    run, d = cfg.run, cfg.dmd
    book = Run(cfg, "flash-dmd")
    acc, dtype = book.accelerator, book.dtype
    adapter = load_model(cfg.model, acc.device, dtype)
    nets = DMDNetworks(adapter, cfg.lora, dtype, run.gradient_checkpointing)
    sched = StudentSchedule(adapter, d.student_steps, d.student_shift)
    prompts = load_prompts(cfg.data)
    f = adapter.pipe.vae_scale_factor
    latent_shape = (adapter.vae.config.latent_channels, cfg.data.resolution // f, cfg.data.resolution // f)

    ctx = SimpleNamespace(cfg=cfg, adapter=adapter, nets=nets, sched=sched, accelerator=acc, head=None, features=None,
                          real=None, reward=None, critic_params=[])
    if d.gan_weight > 0:
        pool = teacher_pool(cfg, prompts) if cfg.data.real_source == "teacher" else None
        if pool is not None:
            pool.check()  # every rank, before the main process spends time generating
            if acc.is_main_process:
                with nets.role("teacher") as net, torch.autocast(acc.device.type, dtype=dtype,
                                                                 enabled=dtype != torch.float32):
                    was = net.training
                    net.eval()
                    pool.prepare(adapter.pipe, run.batch_size, run.progress)
                    net.train(was)
            acc.wait_for_everyone()
        ctx.real = RealImages(cfg.data, prompts, run.seed, pool)
    if d.gan_weight > 0 and d.gan_space == "pixel":
        ctx.head = PixelDiscriminator(d.pixel_encoder, d.pixel_layers, d.gan_head_width or 256, acc.device)
    elif d.gan_weight > 0:
        ctx.features = BottleneckFeatures(nets.fake)
        with torch.no_grad(), nets.role("fake") as net, acc.autocast():  # the bottleneck's shape, for the head
            probe = ctx.features(lambda: adapter.predict(net, torch.zeros(1, *latent_shape, device=acc.device),
                                                         sched.t[:1].to(acc.device), adapter.encode_prompts([""])))
        ctx.head = GANHead(probe.shape[1], probe.shape[-1], d.gan_head_width).to(acc.device)
    if cfg.rl.rewards:
        ctx.reward = (GRPOTerm if cfg.rl.algorithm == "grpo" else RewardTerm)(cfg.rl, acc.device)

    # ---- two trained networks: the student first (its weights are the checkpoint folder's own), then the critic --
    head_params = [(f"gan_head.{n}", p) for n, p in ctx.head.named_parameters()] if ctx.head is not None else []
    layout = lora_layout(cfg.lora)
    fake_layout = layout if not cfg.lora.enabled else "lora r={} alpha={}".format(*fake_lora(cfg.lora))
    fake_layout += f"; gan head {ctx.head.shape if ctx.head is not None else 'none'} width {d.gan_head_width}"
    n_student_updates = len(range(0, run.max_steps, d.ttur))

    def save_critic(module, folder):
        nets.save("fake", module, folder)
        if ctx.head is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in ctx.head.state_dict().items()},
                      str(folder / "gan_head.safetensors"))

    def load_critic(module, folder):
        nets.load("fake", module, folder)
        if ctx.head is not None:
            from safetensors.torch import load_file

            ctx.head.load_state_dict(load_file(str(folder / "gan_head.safetensors")))

    with nets.role("student"):
        student_params = nets.named_params("student")
        nets.student, _, _ = book.prepare(nets.student, cfg.optim, layout, lambda m, p: nets.save("student", m, p),
                                          lambda m, p: nets.load("student", m, p), max_steps=n_student_updates,
                                          name="student", params=student_params)
    with nets.role("fake"):
        ctx.critic_params = nets.named_params("fake") + head_params
        nets.fake, _, _ = book.prepare(nets.fake, cfg.critic_optim, fake_layout, save_critic, load_critic,
                                       name="critic", params=ctx.critic_params)
    state = book.resume()
    counts = {"student": state.get("student_updates", 0), "critic": state.get("critic_updates", 0)}

    count = lambda params: sum(p.numel() for _, p in params)  # noqa: E731
    total = sum(p.numel() for p in adapter.denoiser.parameters())
    book.banner("imgalign flash-dmd", {
        "teacher": f"{cfg.model.pretrained} ({adapter.family}, {adapter.prediction_type})",
        "layout": "student and fake score = LoRA adapters on the one teacher network (teacher = adapters off)"
                  if cfg.lora.enabled else "three copies: frozen teacher, student, fake score",
        "trainable": f"student {count(student_params):,}, critic {count(ctx.critic_params):,} "
                     f"(GAN head {count(head_params):,}) of {total:,} params per denoiser",
        "student": f"{sched.n} steps at {sched.describe()['timesteps']}, backward simulation "
                   f"(k per {'sample' if d.k_per_sample else 'step'}), LCM-style re-noising",
        "TTUR": f"critic every step, student every {d.ttur} ({n_student_updates} student updates)",
        "losses": f"DM (teacher CFG {d.real_guidance:g}" + (f" +- {d.real_guidance_jitter:g}" if d.real_guidance_jitter
                                                           else "") + f", t in {list(d.dm_range)})"
                  + (f" + the fake LoRA at {d.dynamic_guidance_scale:g} -> 0 over {d.dynamic_guidance_steps} steps"
                     if d.dynamic_guidance_steps else "") + ", GAN "
                  + (f"G {d.gan_weight:g} / D {d.gan_critic_weight:g} "
                     + ("on the bottleneck " if ctx.features is not None else "in pixel space: ") + str(ctx.head.shape)
                     if ctx.head is not None else "off")
                  + (f"; split at {d.split_threshold:g} (DM >=, GAN <)" if d.split_threshold is not None else
                     "; no split (DMD2)"),
        "joint RL": ctx.reward.describe() if ctx.reward is not None else "off",
        "data": f"{len(prompts)} prompts" + (f"; real images: {ctx.real.summary}" if ctx.real is not None else ""),
        "effective batch": f"{run.batch_size} x {run.grad_accum} accum x {acc.num_processes} procs = "
                           f"{run.batch_size * run.grad_accum * acc.num_processes}/step"
                           + (" (each network's gradients averaged over the processes: train.loop.average_gradients)"
                              if acc.num_processes > 1 else ""),
    })
    book.start(make_validator(ctx, cfg.validation, cfg.data.resolution, book.out_dir), cfg.validation.every)

    step = book.start_step
    while step < run.max_steps:
        logs = train_step(ctx, book, step, prompts, latent_shape, counts)
        step += 1
        logs = book.end_step(step, logs, {"student_updates": counts["student"], "critic_updates": counts["critic"]})
        book.bar.set_postfix(critic=f"{logs['train/loss_critic']:.4f}")

    def save_final(unwrapped):
        nets.save("student", unwrapped, book.out_dir)
        (book.out_dir / STUDENT_FILE).write_text(json.dumps({**sched.describe(), "family": adapter.family,
                                                             "prediction_type": adapter.prediction_type}, indent=2))

    return book.finish(step, {"student_updates": counts["student"], "critic_updates": counts["critic"]}, save_final)


def train_step(ctx, book: Run, i: int, prompts: list[str], latent_shape, counts: dict) -> dict:
    """Optimizer step i: the student's turn (every dmd.ttur-th step), then the critic's; -> this step's logs."""
    cfg, adapter, nets, acc = ctx.cfg, ctx.adapter, ctx.nets, ctx.accelerator
    run, d = cfg.run, cfg.dmd
    student_turn = i % d.ttur == 0
    rl_on = ctx.reward is not None and i >= cfg.rl.start_step
    student_metrics, critic_metrics, stash = MeanMetrics(), MeanMetrics(), []
    for a in range(run.grad_accum):  # 1. inputs by backward simulation; 2. the student's loss on its turn
        positions = global_positions(acc.process_index, acc.num_processes, a, run.batch_size)
        gens = sample_generators(run.seed, "flash-dmd/prompt", i, positions)
        chosen = [prompts[int(torch.randint(len(prompts), (1,), generator=g))] for g in gens]
        cond = adapter.encode_prompts(chosen)
        uncond = adapter.encode_uncond(len(chosen), cond) if d.real_guidance != 1.0 or d.real_guidance_jitter else None
        batch = Batch(chosen, cond, uncond, draw_k(cfg, i, positions), positions)
        sim_gens = sample_generators(run.seed, "flash-dmd/sim", i, positions)
        with nets.role("student") as net:
            with acc.autocast():
                x_in = batch.x_in = simulate_input(adapter, net, ctx.sched, cond, batch.k, sim_gens, latent_shape)
            with torch.set_grad_enabled(student_turn), acc.autocast():
                x0 = student_x0(adapter, net, ctx.sched, x_in, batch.k, cond)
            if student_turn:
                loss, m = student_loss(ctx, x0, batch, i, rl_on)
                book.backward(loss)
                student_metrics.add(m)
        stash.append((x0.detach(), batch))
    logs = {}
    if student_turn:
        with nets.role("student"):
            book.apply_gradients("student")
        logs["train/grad_norm_student"] = book.grad_norm
        counts["student"] += 1
        for _, p in ctx.critic_params:  # nothing of the student's turn may reach the critic's next update
            p.grad = None
    with nets.role("fake"):  # 3. the critic's turn, every step, on the student's samples of this step
        for x0, batch in stash:
            loss, m = critic_loss(ctx, x0, batch, i)
            book.backward(loss)
            critic_metrics.add(m)
        book.apply_gradients("critic")
    counts["critic"] += 1
    for _, p in book.networks["student"].params:
        p.grad = None
    for metrics in (student_metrics, critic_metrics):
        logs.update({f"train/{k}": v for k, v in metrics.reduce(acc).items()})
    logs["train/loss"] = logs["train/loss_critic"] + logs.get("train/loss_student", 0.0)
    logs.update({"train/grad_norm_critic": book.grad_norm, "train/lr_critic":
                 book.networks["critic"].scheduler.get_last_lr()[0], "train/student_turn": float(student_turn),
                 "train/rl_active": float(rl_on and student_turn), "train/k_mean": float(torch.cat([b.k for _, b in stash]).float().mean()),
                 "train/student_updates": float(counts["student"]), "train/critic_updates": float(counts["critic"])})
    return logs
