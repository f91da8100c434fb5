"""Run set-up shared by every recipe: accelerate, optimizer, schedule, banner, progress, image grids."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from imgalign.config import cfg_field

log = logging.getLogger("imgalign")


SchedulerName = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


@dataclass
class OptimConfig:
    lr: float = cfg_field(1e-4, "peak learning rate", gt=0)
    lr_scheduler: SchedulerName = cfg_field("constant_with_warmup", "diffusers/transformers schedule name")
    warmup_steps: int = cfg_field(0, "linear warm-up steps", ge=0)
    adam_beta1: float = cfg_field(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = cfg_field(0.999, "AdamW beta2", ge=0, lt=1)
    weight_decay: float = cfg_field(1e-2, "AdamW weight decay", ge=0)
    adam_eps: float = cfg_field(1e-8, "AdamW epsilon", gt=0)
    max_grad_norm: float = cfg_field(1.0, "gradient clipping norm (0 disables clipping; the norm is still logged "
                                     "and checked for NaN/inf)", ge=0)


@dataclass
class RunConfig:
    output_dir: str = cfg_field("outputs/run", "folder for checkpoints, logs, validation images and the run record")
    seed: int = cfg_field(0, "seed of noise, timesteps, data order and augmentation (per sample, so a run does not "
                          "depend on how the effective batch is split over processes and micro-steps)", ge=0)
    max_steps: int = cfg_field(1000, "optimizer steps (pref-grpo: iterations, see its banner)", ge=1)
    batch_size: int = cfg_field(1, "examples per device per micro-step", ge=1)
    grad_accum: int = cfg_field(1, "gradient accumulation micro-steps per optimizer step", ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = cfg_field(
        "no", "frozen weights in this dtype; trainable params stay fp32")
    gradient_checkpointing: bool = cfg_field(False, "trade compute for activation memory in the denoiser")
    checkpoint_every: int = cfg_field(500, "write checkpoint-N every this many optimizer steps (0: only at the end)",
                                      ge=0)
    keep_last: int = cfg_field(3, "keep the newest K checkpoints (0 keeps all; the newest is never removed)", ge=0)
    resume_from: str | None = cfg_field(None, "'latest' (newest checkpoint in output_dir, or a fresh run if none), "
                                        "a checkpoint folder, or null for a fresh run")
    max_nonfinite_steps: int = cfg_field(3, "a step whose loss or gradient norm is NaN/inf is skipped (no update), "
                                         "counted and logged; this many in a row stop the run with an error", ge=1)
    log_with: Literal["tensorboard", "wandb", "none"] = cfg_field("tensorboard", "metrics logger")
    log_every: int = cfg_field(1, "log metrics every N optimizer steps", ge=1)
    progress: bool = cfg_field(True, "show a progress bar on the main process")

    def __post_init__(self):
        if self.resume_from not in (None, "", "latest") and not (Path(self.resume_from) / "trainer_state.json").is_file():
            raise ValueError(f"run.resume_from={self.resume_from!r} is not a checkpoint folder (no trainer_state.json); "
                             f"pass 'latest' or a folder like {Path(self.output_dir) / 'checkpoint-100'}")


def make_accelerator(run: RunConfig, project: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration, set_seed

    # accelerate keeps process-wide singletons; a second run in the same process (a notebook sweep, the demo,
    # a test session) with another mixed precision or accumulation would be refused. The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    out = Path(run.output_dir)
    log_with = None if run.log_with in ("none", "", None) else run.log_with
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # lets torchrun start gloo multi-process runs on CPU-only machines
        gradient_accumulation_steps=run.grad_accum,
        mixed_precision=run.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(run.seed + accelerator.process_index)
    if log_with:
        accelerator.init_trackers(project)
    return accelerator


def weight_dtype(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(params, cfg: OptimConfig, max_steps: int, num_processes: int = 1):
    from diffusers.optimization import get_scheduler

    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: enable LoRA (lora.enabled=true) or full fine-tuning")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    # accelerate steps a prepared scheduler once per process per optimizer step
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps * num_processes,
                          num_training_steps=max_steps * num_processes)
    return opt, sched


def banner(accelerator, title: str, rows: dict) -> None:
    if not accelerator.is_main_process:
        return
    width = max(len(k) for k in rows) + 2
    lines = [f"== {title} =="] + [f"  {k:<{width}}{v}" for k, v in rows.items()]
    print("\n".join(lines), flush=True)


def progress_bar(accelerator, total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and accelerator.is_main_process),
                dynamic_ncols=True)


def count_params(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def image_grid(images: Tensor, nrow: int | None = None):
    """images [N, 3, H, W] in [-1, 1] -> one PIL image, `nrow` images per row."""
    from PIL import Image

    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.ones(3, rows * h, nrow * w)
    for i, img in enumerate(images.float().cpu()):
        r, c = divmod(i, nrow)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = (img + 1) / 2
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


class MeanMetrics:
    """Averages scalar metrics over the micro-steps of one optimizer step (and across processes)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, metrics: dict[str, Tensor | float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach().mean() if isinstance(v, Tensor) else v)
        self.n += 1

    def reduce(self, accelerator) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        t = torch.tensor([self.sums[k] / self.n for k in keys], device=accelerator.device)
        t = accelerator.reduce(t, reduction="mean")  # every rank calls this: it is a collective
        self.sums, self.n = {}, 0
        return dict(zip(keys, t.tolist()))
