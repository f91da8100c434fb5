"""Exponential moving average of the trainable weights (Flow-GRPO's EMA, Self-NPO's EMA teacher)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


class EMA:
    """fp32 shadow copies of the trainable parameters of `module`, updated every `every` optimizer steps with
    shadow <- decay * shadow + (1 - decay) * param. Saved in checkpoints as `<name>.safetensors`."""

    def __init__(self, module: torch.nn.Module, decay: float, every: int = 1, name: str = "ema"):
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.decay, self.every, self.name, self.num_updates = decay, max(1, every), name, 0
        self.shadow = {n: p.detach().clone().float() for n, p in self.params}

    @torch.no_grad()
    def step(self, optimizer_step: int) -> None:
        if optimizer_step % self.every:
            return
        self.num_updates += 1
        for n, p in self.params:
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        """Use the EMA weights inside the block (teacher forward, validation, EMA export)."""
        with torch.no_grad():
            backup = [p.detach().clone() for _, p in self.params]
            for n, p in self.params:
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), b in zip(self.params, backup):
                    p.copy_(b)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in self.shadow.items()}
        save_file(tensors, str(Path(folder) / f"{self.name}.safetensors"),
                  metadata={"num_updates": str(self.num_updates)})

    def load(self, folder: Path) -> None:
        from safetensors import safe_open

        path = Path(folder) / f"{self.name}.safetensors"
        with safe_open(str(path), "pt") as f:
            if set(f.keys()) != self.shadow.keys():
                raise KeyError(f"{path} does not match the trainable parameters of this run (other LoRA or model?)")
            for k in f.keys():
                self.shadow[k].copy_(f.get_tensor(k))
            self.num_updates = int(f.metadata().get("num_updates", 0))
