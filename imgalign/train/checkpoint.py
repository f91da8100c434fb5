"""Checkpoints: `checkpoint-N/` folders, written atomically, pruned to the last K, resumable.

Layout of one checkpoint (everything accelerate needs to restore the run, plus the weights in the
ecosystem's formats so a checkpoint is also a usable artifact):
    checkpoint-N/
      pytorch_lora_weights.safetensors   LoRA runs (diffusers format; `pipe.load_lora_weights` loads it)
      denoiser/                          full fine-tuning (`save_pretrained`, safetensors)
      optimizer.bin, scheduler.bin, random_states_*.pkl   accelerate's state (all ranks take part)
      trainer_state.json                 step and anything else the recipe needs to continue

Each checkpoint is first written to `.checkpoint-N.tmp/` and renamed when complete, so a run killed
mid-save never leaves a half checkpoint that `resume_from: latest` would pick up.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """`None`/"" -> fresh run; "latest" -> newest checkpoint in output_dir (or fresh if none); else a path."""
    if not resume_from:
        return None
    if resume_from == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    p = Path(resume_from)
    if not (p / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"resume_from={resume_from!r} is not a checkpoint folder (no trainer_state.json); "
            f"pass 'latest' or a path like {Path(output_dir) / 'checkpoint-100'}"
        )
    return p


def register_weight_hooks(accelerator, save_weights, load_weights) -> None:
    """Make `accelerator.save_state/load_state` write our weight formats instead of its own full dump.

    save_weights(model, folder) and load_weights(model, folder) handle one unwrapped trainable network.
    """

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_weights(accelerator.unwrap_model(model), Path(output_dir))
        weights.clear()  # accelerate writes no model file of its own

    def load_hook(models, input_dir):
        while models:
            load_weights(accelerator.unwrap_model(models.pop()), Path(input_dir))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict[str, Any], keep_last: int | None) -> Path:
    """Write checkpoint-`step` atomically on all ranks, then prune to the newest `keep_last`."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank: sharded backends need all of them
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in list_checkpoints(out)[:-keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states; returns trainer_state.json."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / "trainer_state.json").read_text())
