"""Checkpoints: `checkpoint-N/` folders, written atomically, pruned to the last K, resumable.

Layout of one checkpoint (everything accelerate needs to restore the run, plus the weights in the
ecosystem's formats so a checkpoint is also a usable artifact):
    checkpoint-N/
      pytorch_lora_weights.safetensors   LoRA runs (diffusers format; `pipe.load_lora_weights` loads it)
      denoiser/                          full fine-tuning (`save_pretrained`, safetensors)
      optimizer.bin, scheduler.bin, random_states_*.pkl   accelerate's state (all ranks take part)
      trainer_state.json                 step, the recipe, the trainable layout and its fingerprint, and
                                         anything else the recipe needs to continue

The order of a save, on every rank: the main process clears `.checkpoint-N.tmp/`; all ranks write their part
into it; all ranks wait until every rank has finished; the main process writes trainer_state.json, renames
the folder to `checkpoint-N/` and prunes; all ranks wait again. So a published checkpoint always holds every
rank's state, and a run killed mid-save never leaves a half checkpoint that `resume_from: latest` would pick.
Pruning first renames an old checkpoint to `.checkpoint-N.deleting/` (atomic), then deletes it: a kill during
pruning leaves only complete checkpoints under their own names.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from imgalign.errors import CheckpointError

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (by step number, so checkpoint-9 before -10)."""
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
        raise CheckpointError(
            f"run.resume_from={resume_from!r} is not a checkpoint folder (no trainer_state.json); "
            f"pass 'latest' or a path like {Path(output_dir) / 'checkpoint-100'}"
        )
    step = _step_of(p)
    newer = [c for c in list_checkpoints(output_dir) if step is not None and _step_of(c) > step]
    if newer:  # the run would write its new history beside a future it abandons; `latest` would pick that future
        raise CheckpointError(
            f"run.resume_from={resume_from!r}: {newer[-1]} in run.output_dir is newer than the checkpoint to resume "
            "from. Resume into another run.output_dir, or delete the newer checkpoint-N folders first")
    return p


def _step_of(path: Path) -> int | None:
    m = _CKPT.match(path.name)
    return int(m.group(1)) if m else None


def trainable_named(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs of `model` that require grad."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def params_fingerprint(named) -> str:
    """A short hash of (name, parameter) pairs' names and shapes: what a checkpoint's weights must fit."""
    h = hashlib.sha256()
    for name, p in named:
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def trainable_fingerprint(model: torch.nn.Module) -> str:
    """`params_fingerprint` of the trainable parameters."""
    return params_fingerprint(trainable_named(model))


def check_finite_params(named, step: int, owner: str = "") -> None:
    """Refuse to save non-finite weights among (name, parameter) pairs (a checkpoint must never poison a resume);
    `owner` names the network in the message."""
    bad = [n for n, p in named if not torch.isfinite(p.detach()).all()]
    if bad:
        where = f" of {owner}" if owner else ""
        raise CheckpointError(f"step {step}: {len(bad)} trainable tensors{where} hold NaN/inf (e.g. {bad[0]}); no "
                              "checkpoint was written. Lower optim.lr (or loss.beta) and resume from the last checkpoint")


def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    """`check_finite_params` over the trainable parameters of `model`."""
    check_finite_params(trainable_named(model), step)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict[str, Any], keep_last: int | None) -> Path:
    """Write checkpoint-`step` atomically with every rank's state, then prune to the newest `keep_last`
    (0 or None keeps all; the checkpoint just written is never pruned). Every rank must call this."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank: its random states, and sharded backends need all of them
    accelerator.wait_for_everyone()  # every rank has finished writing before the folder is published
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        if final.exists():  # a rerun of the same step (e.g. resumed without progress): replace it
            _delete(final)
        tmp.rename(final)
        prune_checkpoints(out, keep_last, final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, keep_last: int | None, newest: Path | None = None) -> None:
    """Delete all but the newest `keep_last` checkpoints; `newest` (the one just written) is never deleted."""
    if not keep_last or keep_last < 1:
        return
    for old in list_checkpoints(output_dir)[:-keep_last]:
        if newest is None or old.resolve() != newest.resolve():
            _delete(old)


def _delete(folder: Path) -> None:
    """Rename out of the checkpoint namespace first (atomic), then delete."""
    doomed = folder.with_name(f".{folder.name}.deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    folder.rename(doomed)
    shutil.rmtree(doomed)


def clean_stale(output_dir: str | Path) -> None:
    """Remove leftovers of killed saves and prunes (main process, at start-up)."""
    d = Path(output_dir)
    if d.is_dir():
        for p in d.iterdir():
            if p.is_dir() and p.name.startswith(".checkpoint-") and p.name.endswith((".tmp", ".deleting")):
                shutil.rmtree(p, ignore_errors=True)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "trainer_state.json"
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot be read ({e}); resume from another checkpoint-N folder") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{f}: has no integer 'step'; the checkpoint is incomplete or not one of imgalign's. "
                              "Resume from another checkpoint-N folder")
    return state


def check_compatible(path: Path, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a checkpoint written by another recipe or for another trainable layout, naming both."""
    for key in ("recipe", "layout", "fingerprint"):
        if key in saved and key in expected and saved[key] != expected[key]:
            raise CheckpointError(
                f"{path} was written by a run with {key} {saved[key]!r}, this run has {expected[key]!r}; resume "
                "only with the settings that wrote it (same recipe, LoRA rank/targets or full fine-tuning), or "
                "start fresh in another run.output_dir")


def load_checkpoint(accelerator, path: str | Path, expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states; returns trainer_state.json.

    `expected` ({"recipe", "layout", "fingerprint"}) is checked against the saved values before anything loads.
    """
    path = Path(path)
    state = read_trainer_state(path)
    check_compatible(path, state, expected or {})
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # truncated safetensors, missing optimizer.bin, ...: name the folder
        raise CheckpointError(f"{path}: cannot be restored ({type(e).__name__}: {e}); the checkpoint is corrupt "
                              "or incomplete. Resume from an older checkpoint-N folder") from e
    return state


def read_safetensors_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a `save_pretrained` folder: every *.safetensors shard, merged."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state
