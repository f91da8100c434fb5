"""One seed scheme for every recipe: per-sample randomness keyed by what the sample is, not where it ran.

A run must be a function of (data, seed, effective batch): the same whether its optimizer step is built by
1 process with 4 accumulation micro-steps or by 4 processes with 1. So nothing random is seeded by the rank
or the micro-step. Each sample of an optimizer step has a global position p in the step's effective batch
(0 <= p < batch_size * world * grad_accum, `global_positions`), and its generator is seeded by
(seed, purpose, step, p) through a hash (`derive_seed`), so nearby seeds do not give correlated streams.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, e.g. derive_seed(seed, "noise", step, position)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


def global_positions(rank: int, world: int, accum_index: int, batch_size: int) -> list[int]:
    """Positions in the optimizer step's effective batch of this micro-batch's samples.

    Sample i of micro-batch `accum_index` on `rank` is position rank + world * (accum_index * batch_size + i),
    the same rule `train.data_order` uses to deal a step's items, so position p is the same data item in
    every process layout.
    """
    return [rank + world * (accum_index * batch_size + i) for i in range(batch_size)]


def sample_generators(seed: int, purpose: str, step: int, positions: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample: its noise, timestep and choices depend only on (seed, step, position)."""
    return [torch.Generator().manual_seed(derive_seed(seed, purpose, step, p)) for p in positions]


def randn_per_sample(shape, generators: list[torch.Generator]) -> torch.Tensor:
    """[len(generators), *shape] standard normal, row i drawn from generators[i]."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def rand_per_sample(generators: list[torch.Generator]) -> torch.Tensor:
    """[len(generators)] uniform [0, 1), one draw from each generator."""
    return torch.cat([torch.rand(1, generator=g) for g in generators])
