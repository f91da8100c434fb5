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
from imgalign.errors import UserError

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
    max_steps: int = cfg_field(1000, "optimizer steps", ge=1)
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
    if _single_process_from_a_multi_process_launch(accelerator):
        print("warning: accelerate launch was asked for several processes but started one (without GPUs, "
              "`accelerate launch --cpu --num_processes N` runs a single process); for N CPU processes use "
              "`torchrun --nproc_per_node N -m imgalign.cli train ...` (gloo)", flush=True)
    if log_with:
        accelerator.init_trackers(project)
    return accelerator


def _single_process_from_a_multi_process_launch(accelerator) -> bool:
    """accelerate's simple launcher sets MASTER_ADDR/MASTER_PORT when it was asked for more than one process, but
    starts one process (no WORLD_SIZE) when it cannot run them, e.g. `--cpu` without `--multi_cpu` backends."""
    import os

    env = os.environ
    return (accelerator.num_processes == 1 and "MASTER_ADDR" in env and "WORLD_SIZE" not in env
            and "ACCELERATE_MIXED_PRECISION" in env)


def weight_dtype(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(params, cfg: OptimConfig, max_steps: int, num_processes: int = 1):
    from diffusers.optimization import get_scheduler

    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("no trainable parameters: enable LoRA (lora.enabled=true) or full fine-tuning")
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


def grid_font(size: int):
    """PIL's bundled font at `size` px (Pillow >= 10.1 with FreeType); the fixed bitmap font on older Pillow."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def wrap_text(text: str, font, width: int, max_lines: int | None = None) -> list[str]:
    """Greedy word wrap of `text` to lines at most `width` px wide in `font` (explicit newlines kept; a word
    longer than a line is broken); beyond `max_lines` the last kept line ends with an ellipsis."""
    lines: list[str] = []
    for para in str(text).split("\n"):
        line = ""
        for word in para.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width and len(word) > 1:  # break a word wider than the line
                cut = 1
                while cut < len(word) and font.getlength(word[:cut + 1]) <= width:
                    cut += 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max(max_lines, 1)]
        last = lines[-1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "…"
    return lines


def captioned_grid(images: Tensor, row_labels: list[str], col_labels: list[str] | None = None, tile: int = 128,
                   tile_captions: list[str | None] | None = None, title: str | None = None,
                   label_width: int | None = None, font_size: int | None = None, gap: int = 4):
    """A grid to look at: images [N, 3, H, W] in [-1, 1] (as `image_grid`), one row per entry of `row_labels`
    (N / len(row_labels) images per row, row-major), upscaled nearest-neighbour by an integer factor to tiles of at
    least `tile` px, with the row labels wrapped left of each row, optional `col_labels` wrapped under each column,
    optional `tile_captions` (one per image; None or "" for none, drawn in red under the tile) and a `title` line.

    Layout (all px): a `label_width` column (default 1.5 tiles) then the columns, each tile plus `gap`; each row is
    the tile height plus `gap`, plus one caption line where any tile of the grid has a caption.
    """
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    rows = len(row_labels)
    if rows < 1 or n % rows:
        raise ValueError(f"captioned_grid: {n} images do not fill {rows} rows")
    ncol = n // rows
    if col_labels is not None and len(col_labels) != ncol:
        raise ValueError(f"captioned_grid: {len(col_labels)} column labels for {ncol} columns")
    if tile_captions is not None and len(tile_captions) != n:
        raise ValueError(f"captioned_grid: {len(tile_captions)} tile captions for {n} images")
    scale = max(1, math.ceil(tile / max(h, w)))
    th, tw = h * scale, w * scale
    font = grid_font(font_size or max(10, min(th, tw) // 9))
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (font.getbbox("Ag")[3], 0)
    line_h = ascent + descent + 2
    label_w = label_width if label_width is not None else (tw * 3) // 2
    has_captions = tile_captions is not None and any(tile_captions)
    row_h = th + gap + (line_h if has_captions else 0)
    title_lines = wrap_text(title, font, label_w + ncol * (tw + gap) - 2 * gap) if title else []
    top = len(title_lines) * line_h + (gap if title_lines else 0)
    col_lines = [wrap_text(c, font, tw - 2) for c in col_labels] if col_labels is not None else []
    bottom = max((len(c) for c in col_lines), default=0) * line_h + (gap if col_lines else 0)
    width, height = label_w + ncol * (tw + gap), top + rows * row_h + bottom

    pixels = ((images.float().cpu() + 1) / 2).clamp(0, 1).mul(255).round().byte()
    pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3).permute(0, 2, 3, 1).numpy()
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(title_lines):
        draw.text((gap, k * line_h), line, fill="black", font=font)
    max_label_lines = max(1, th // line_h)
    for r, label in enumerate(row_labels):
        y = top + r * row_h
        lines = wrap_text(label, font, label_w - 2 * gap, max_lines=max_label_lines)
        y_text = y + max(0, (th - len(lines) * line_h) // 2)
        for k, line in enumerate(lines):
            draw.text((gap, y_text + k * line_h), line, fill="black", font=font)
        for c in range(ncol):
            i, x = r * ncol + c, label_w + c * (tw + gap)
            canvas.paste(Image.fromarray(pixels[i]), (x, y))
            if gap >= 2:  # a thin frame, so tiles with a white background do not melt into the page
                draw.rectangle((x - 1, y - 1, x + tw, y + th), outline=(170, 170, 170))
            if has_captions and tile_captions[i]:
                (line,) = wrap_text(tile_captions[i], font, tw, max_lines=1)
                draw.text((x, y + th + 1), line, fill=(200, 0, 0), font=font)
    y0 = top + rows * row_h
    for c, lines in enumerate(col_lines):
        for k, line in enumerate(lines):
            draw.text((label_w + c * (tw + gap) + 1, y0 + k * line_h), line, fill="black", font=font)
    return canvas


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
