"""The bookkeeping of a training run, shared by every recipe; the loop itself stays in the recipe.

A recipe reads top to bottom as

    book = Run(cfg, "diffusion-dpo")                        # accelerator, dtype, output folder, run record
    ... load the model, make it trainable ...
    model, optimizer, scheduler = book.prepare(net, cfg.optim, layout, save_weights, load_weights)
    state = book.resume()                                   # {} for a fresh run
    book.banner("imgalign diffusion-dpo", {...})
    book.start(validate)                                    # step-0 validation, progress bar
    while step < run.max_steps:
        with accelerator.accumulate(model):
            loss, m = _step(...)
            book.backward(loss)
            if accelerator.sync_gradients:
                book.apply_gradients()                      # clip, non-finite guard, step, schedule
        ... on an optimizer step boundary: step += 1; book.end_step(step, logs, state)
    return book.finish(step, state, save_final)

What it promises (tested in tests/unit/test_train_loop.py and the recipe tests):
- Non-finite policy: an optimizer step whose loss (on any rank) or gradient norm is NaN/inf is skipped: no
  parameter update, the learning-rate schedule moves on, the step is counted (`train/nonfinite_skipped`) and
  reported; `run.max_nonfinite_steps` skipped steps in a row stop the run with a NonFiniteError that names
  the step and the last checkpoint. A checkpoint is never written with non-finite trainable weights.
- Checkpoints on schedule (never at max_steps inside the loop: the final save does that once), the final
  checkpoint unless a resumed run made no progress, and trainer_state.json with the recipe, the trainable
  layout and a fingerprint of the trainable parameters, checked on resume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgalign.config import ConfigError, save_run_info
from imgalign.errors import NonFiniteError
from imgalign.train.checkpoint import (
    check_finite_params,
    clean_stale,
    list_checkpoints,
    load_checkpoint,
    params_fingerprint,
    resolve_resume,
    save_checkpoint,
    trainable_fingerprint,
    trainable_named,
)
from imgalign.train.setup import (
    MeanMetrics,
    banner,
    make_accelerator,
    make_optimizer,
    progress_bar,
    weight_dtype,
)


@dataclass
class _Network:
    """A trained network of a run, with its own optimizer and schedule."""

    name: str
    module: torch.nn.Module  # as accelerate prepared it
    optimizer: Any
    scheduler: Any
    optim_cfg: Any
    layout: str
    fingerprint: str
    save: Callable[[torch.nn.Module, Path], None]
    load: Callable[[torch.nn.Module, Path], None]
    folder: str  # "" for the first network (the checkpoint folder itself), else its name
    raw: torch.nn.Module | None = None  # the module as given to prepare (to spot a module shared by two networks)
    params: list[tuple[str, torch.nn.Parameter]] | None = None  # explicit trained parameters; None: all of `module`

    def named(self) -> list[tuple[str, torch.nn.Parameter]]:
        """What this network's optimizer trains, by name (the finite-weight check)."""
        return self.params if self.params is not None else trainable_named(self.module)

    def parameters(self) -> list[torch.nn.Parameter]:
        """For gradient clipping: the explicit parameters, else all of the module (accelerate's FSDP clipping
        recognises the model by its full parameter list)."""
        return [p for _, p in self.params] if self.params is not None else list(self.module.parameters())


def check_reduced_gradients_backend(acc, name: str) -> None:
    from accelerate.utils import DistributedType

    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(f"network {name!r} trains named parameters of a shared module (two adapters taking turns), "
                          f"which runs data-parallel only; {acc.distributed_type.value} shards the module. Launch "
                          "with a DDP config (accelerate launch --multi_gpu, or torchrun)")


def broadcast_from_main(params: list[torch.nn.Parameter], acc) -> None:
    from accelerate.utils import broadcast

    with torch.no_grad():
        for p in params:
            p.copy_(broadcast(p.detach().clone(), from_process=0))


def average_gradients(acc, params: list[torch.nn.Parameter], bucket: int = 2**25) -> None:
    """Average the gradients of `params` over the processes, as DDP would: all-reduces of the flattened gradients
    in buckets of at most `bucket` elements (a bounded extra buffer for full-size networks), and one of a
    has-a-gradient flag per parameter; a parameter with no gradient on any process keeps none (AdamW then skips it,
    as it would on one process)."""
    dev = params[0].device
    flags = acc.reduce(torch.tensor([float(p.grad is not None) for p in params], device=dev), reduction="sum")
    buckets, size = [[]], 0
    for p, flag in zip(params, flags):
        if buckets[-1] and size + p.numel() > bucket:
            buckets, size = [*buckets, []], 0
        buckets[-1].append((p, flag))
        size += p.numel()
    for group in buckets:
        flat = acc.reduce(torch.cat([p.grad.detach().flatten().float() if p.grad is not None else
                                     torch.zeros(p.numel(), device=dev) for p, _ in group]), reduction="sum")
        for part, (p, flag) in zip(flat.split([p.numel() for p, _ in group]), group):
            p.grad = (part.view_as(p) / acc.num_processes).to(p.dtype) if flag > 0 else None


def trainable_fingerprint_of(parts) -> str:
    import hashlib

    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def lora_layout(lora) -> str:
    """The trainable layout a checkpoint must match: LoRA rank/alpha/targets, or full fine-tuning."""
    if not lora.enabled:
        return "full"
    return f"lora r={lora.rank} alpha={lora.alpha or lora.rank} targets={','.join(sorted(lora.target_modules))}"


class Run:
    """Accelerator, output folder, optimizer step with the non-finite guard, logs, checkpoints, validation."""

    def __init__(self, cfg, recipe: str, unit: str = "steps"):
        self.cfg, self.run, self.recipe, self.unit = cfg, cfg.run, recipe, unit
        self.accelerator = make_accelerator(cfg.run, project=recipe.replace("-", "_"))
        self.dtype = weight_dtype(self.accelerator)
        self.out_dir = Path(cfg.run.output_dir)
        if self.accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            clean_stale(self.out_dir)
            save_run_info(cfg, self.out_dir)
        self.networks: dict[str, _Network] = {}
        self.states: dict[str, tuple[Callable[[Path], None], Callable[[Path], None]]] = {}
        self.metrics = MeanMetrics()
        self.history: list[dict] = []
        self.validation: list[dict] = []
        self.start_step, self.resumed_from = 0, None
        self.skipped, self.skipped_in_row = 0, 0
        self._bad_loss: torch.Tensor | None = None  # 1 once a loss of this optimizer step was NaN/inf
        self._step_skipped, self._grad_norm = False, math.nan
        self._validate: Callable[[int], dict] | None = None
        self._validate_every = 0
        self.bar = None
        self.t0 = time.time()

    # ---- set-up ---------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, optim_cfg, layout: str, save_weights, load_weights,
                max_steps: int | None = None, name: str = "model", params=None):
        """Register a trained network: its AdamW over the trainable parameters and schedule, accelerate's wrapping,
        and how its weights are saved -> (model, optimizer, scheduler). `max_steps`: optimizer steps of the
        schedule (default run.max_steps).

        Call once per trained network, in the same order in every run (accelerate restores optimizers by order).
        The first network's weights go to the checkpoint folder itself (`pipe.load_lora_weights(checkpoint-N)`
        works as before); every further network to a subfolder named `name`, each loadable on its own.

        `params`: (name, parameter) pairs this network trains, all requiring grad now, when that is not "every
        parameter of `model` that requires grad": two networks that are named LoRA adapters on one module
        (Flash-DMD's student and fake score), or a network with parameters outside the module (a GAN head). The
        optimizer, gradient clipping, fingerprint and finite-weight check then use exactly these, and a module
        already registered by another network is not prepared by accelerate a second time.
        Under several processes such a network is not wrapped in DDP (DDP's reducer serves one fixed set of trained
        parameters per module, while two adapters of one module take turns): `apply_gradients` averages its
        gradients over the processes with accelerate's reduce, once per optimizer step, before clipping. That
        needs data parallelism (DDP-style launches); FSDP and DeepSpeed shard the module and are refused here.
        """
        acc = self.accelerator
        if name in self.networks:
            raise ValueError(f"a network named {name!r} is already registered")
        named = list(params) if params is not None else None
        if named is not None and not all(p.requires_grad for _, p in named):
            raise ValueError(f"network {name!r}: every parameter in `params` must require grad when registered")
        if not self.networks:
            acc.register_save_state_pre_hook(self._save_hook)
            acc.register_load_state_pre_hook(self._load_hook)
        optimizer, scheduler = make_optimizer([p for _, p in named] if named is not None else model.parameters(),
                                              optim_cfg, max_steps or self.run.max_steps, acc.num_processes)
        fingerprint = params_fingerprint(named) if named is not None else trainable_fingerprint(model)
        shared = next((n for n in self.networks.values() if n.raw is model), None)
        if named is not None and acc.num_processes > 1:
            check_reduced_gradients_backend(acc, name)
            prepared = model.to(acc.device)  # not DDP-wrapped: apply_gradients averages the gradients
            broadcast_from_main([p for _, p in named], acc)  # as DDP does at wrapping: every rank starts alike
            optimizer, scheduler = acc.prepare(optimizer, scheduler)
        elif shared is not None:  # one module, two networks: accelerate wraps it once
            prepared = shared.module
            optimizer, scheduler = acc.prepare(optimizer, scheduler)
        else:
            prepared, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        self.networks[name] = _Network(name, prepared, optimizer, scheduler, optim_cfg, layout, fingerprint,
                                       save_weights, load_weights, folder="" if not self.networks else name,
                                       raw=model, params=named)
        if len(self.networks) == 1:
            self.model, self.optimizer, self.scheduler, self.optim_cfg = prepared, optimizer, scheduler, optim_cfg
        return prepared, optimizer, scheduler

    def add_state(self, name: str, save: Callable[[Path], None], load: Callable[[Path], None]) -> None:
        """Extra state saved in every checkpoint and restored on resume (an EMA, a reward tracker, a replay
        buffer): save(folder) / load(folder) write and read their own files in the checkpoint folder."""
        if name in self.states:
            raise ValueError(f"a state named {name!r} is already registered")
        self.states[name] = (save, load)

    @property
    def identity(self) -> dict[str, str]:
        """What a checkpoint must match to be resumed by this run."""
        nets = list(self.networks.values())
        if len(nets) == 1:
            layout, fingerprint = nets[0].layout, nets[0].fingerprint
        else:
            layout = "; ".join(f"{n.name}: {n.layout}" for n in nets)
            fingerprint = trainable_fingerprint_of(n.fingerprint for n in nets)
        return {"recipe": self.recipe, "layout": layout, "fingerprint": fingerprint}

    def _save_hook(self, models, weights, output_dir) -> None:
        if self.accelerator.is_main_process:
            for net in self.networks.values():
                folder = Path(output_dir) / net.folder
                folder.mkdir(parents=True, exist_ok=True)
                net.save(self.accelerator.unwrap_model(net.module), folder)
            for save, _ in self.states.values():
                save(Path(output_dir))
        weights.clear()  # accelerate writes no model file of its own

    def _load_hook(self, models, input_dir) -> None:
        for net in self.networks.values():
            net.load(self.accelerator.unwrap_model(net.module), Path(input_dir) / net.folder)
        for _, load in self.states.values():
            load(Path(input_dir))
        models.clear()

    def resume(self) -> dict[str, Any]:
        """Restore the checkpoint named by run.resume_from -> its trainer state ({} for a fresh run)."""
        path = resolve_resume(self.out_dir, self.run.resume_from)
        if path is None:
            return {}
        state = load_checkpoint(self.accelerator, path, self.identity)
        self.start_step, self.resumed_from = state["step"], path
        self.skipped = state.get("nonfinite_skipped", 0)
        return state

    def banner(self, title: str, rows: dict[str, str]) -> None:
        rows = dict(rows)
        rows[self.unit] = f"{self.start_step} -> {self.run.max_steps}" + (
            f" (resumed from {self.resumed_from})" if self.resumed_from else "")
        rows["output"] = str(self.out_dir)
        banner(self.accelerator, title, rows)

    def start(self, validate: Callable[[int], dict] | None = None, every: int = 0) -> None:
        """Step-0 validation of a fresh run, and the progress bar."""
        self._validate, self._validate_every = validate, every
        if self.start_step == 0 and validate is not None:
            self.validation.append({"step": 0, **validate(0)})
        self.bar = progress_bar(self.accelerator, self.run.max_steps, self.start_step, self.run.progress,
                                self.recipe)

    # ---- the optimizer step ---------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)  # stays on the device: no sync per micro-step
        self._bad_loss = bad if self._bad_loss is None else torch.maximum(self._bad_loss, bad)
        self.accelerator.backward(loss)

    def apply_gradients(self, name: str | None = None) -> bool:
        """At an optimizer-step boundary (gradients synchronised): clip, then update network `name` (default: the
        first) unless the loss on any rank or the gradient norm is non-finite. Returns whether it was updated."""
        acc = self.accelerator
        net = self.networks[name] if name is not None else next(iter(self.networks.values()))
        if net.params is not None and acc.num_processes > 1:
            average_gradients(acc, [p for _, p in net.params])
        max_norm = net.optim_cfg.max_grad_norm
        norm = acc.clip_grad_norm_(net.parameters(), max_norm if max_norm > 0 else math.inf)
        bad = (self._bad_loss if self._bad_loss is not None else torch.zeros(1)).to(acc.device)
        bad = acc.reduce(bad, reduction="sum") if acc.num_processes > 1 else bad  # every rank skips together
        # DeepSpeed clips inside its engine and accelerate returns no norm: then only the loss decides
        self._grad_norm = float(norm) if norm is not None else math.nan
        skip = bool(bad.item() > 0) or (norm is not None and not math.isfinite(self._grad_norm))
        if not skip:
            net.optimizer.step()
        net.scheduler.step()
        net.optimizer.zero_grad(set_to_none=True)
        self._bad_loss = None
        self._step_skipped = self._step_skipped or skip
        return not skip

    @property
    def grad_norm(self) -> float:
        """The gradient norm of the latest apply_gradients (before clipping; NaN where the backend gives none)."""
        return self._grad_norm

    def micro_step(self, model: torch.nn.Module, compute: Callable[..., tuple[torch.Tensor, dict]], *args) -> bool:
        """One micro-batch under accelerate's gradient accumulation: (loss, metrics) = compute(*args), backward, and at an
        optimizer-step boundary apply_gradients() (clip, non-finite guard, update); the metrics are accumulated.
        Returns whether an optimizer step ended."""
        acc = self.accelerator
        with acc.accumulate(model):
            loss, metrics = compute(*args)
            self.backward(loss)
            if acc.sync_gradients:
                self.apply_gradients()
        self.metrics.add(metrics)
        return acc.sync_gradients

    def step_metrics(self) -> dict[str, float]:
        """This optimizer step's metrics, averaged over its micro-steps and the processes, as train/<name>."""
        return {f"train/{k}": v for k, v in self.metrics.reduce(self.accelerator).items()}

    # ---- after each step ------------------------------------------------------------------------------
    def end_step(self, step: int, logs: dict[str, float], state: dict[str, Any],
                 postfix: dict[str, str] | None = None) -> dict[str, float]:
        """Log, record, advance the bar, then checkpoint and validate on schedule. `logs` are this step's metrics."""
        run, acc = self.run, self.accelerator
        if self._step_skipped:
            self.skipped += 1
            self.skipped_in_row += 1
            if acc.is_main_process:
                from tqdm.auto import tqdm

                tqdm.write(f"warning: step {step}: non-finite loss or gradient norm ({self._grad_norm}); the update "
                           f"was skipped ({self.skipped_in_row} in a row, {self.skipped} in all)")
        else:
            self.skipped_in_row = 0
        self._step_skipped = False
        logs = {**logs, "train/lr": self.scheduler.get_last_lr()[0], "train/grad_norm": self._grad_norm,
                "train/nonfinite_skipped": float(self.skipped)}
        self.history.append({"step": step, **logs})
        if step % run.log_every == 0:
            acc.log(logs, step=step)
        if self.skipped_in_row >= run.max_nonfinite_steps:
            last = list_checkpoints(self.out_dir)
            raise NonFiniteError(
                f"step {step}: the loss or gradient norm was NaN/inf for {self.skipped_in_row} optimizer steps in a "
                f"row (run.max_nonfinite_steps={run.max_nonfinite_steps}); the run stopped without saving. "
                f"Last checkpoint: {last[-1] if last else 'none'}. Lower optim.lr (or the loss's beta), check "
                "the data, then resume with run.resume_from=latest")
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(**postfix)
        # validation first: state it updates (e.g. RPO's best score) is then in this step's checkpoint
        if self._validate and self._validate_every and step % self._validate_every == 0 and step < run.max_steps:
            self.validation.append({"step": step, **self._validate(step)})
        if run.checkpoint_every and step % run.checkpoint_every == 0 and step < run.max_steps:
            self.save(step, state)
        return logs

    def _check_finite(self, step: int) -> None:
        """No checkpoint or final weights with NaN/inf among what the networks train (named where there are several)."""
        for net in self.networks.values():
            check_finite_params(net.named(), step, net.name if len(self.networks) > 1 else "")

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self._check_finite(step)
        return save_checkpoint(self.accelerator, self.out_dir, step,
                               {**state, **self.identity, "nonfinite_skipped": self.skipped}, self.run.keep_last)

    def finish(self, step: int, state: dict[str, Any], save_final: Callable[[torch.nn.Module], None]) -> dict:
        """Final validation, final checkpoint (unless a resumed run made no progress), final weights via
        `save_final(unwrapped model)` on the main process -> the run's result (the same keys for every recipe)."""
        acc = self.accelerator
        self.bar.close()
        if self._validate is not None and acc.is_main_process:  # before the final checkpoint, as in end_step
            self.validation.append({"step": step, **self._validate(step)})
        if step > self.start_step or self.resumed_from is None:
            self.save(step, state)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._check_finite(step)
            save_final(acc.unwrap_model(self.model))
        acc.end_training()
        return {"steps": step, "history": self.history, "validation": self.validation,
                "seconds": time.time() - self.t0, "output_dir": str(self.out_dir)}
