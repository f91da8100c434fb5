"""A data order that is a pure function of (seed, epoch) and the effective batch: resume lands on the exact
next batch, and the process layout does not change which items an optimizer step sees.

Each epoch is a permutation of the dataset drawn from `seed + epoch`, cut into optimizer steps of E =
batch_size x world x grad_accum items (the incomplete tail, n mod E items, is dropped: the same items for
every layout with the same E). The E items of a step are dealt to micro-batches by position: position p goes
to rank p mod world, micro-batch (p div world) div batch_size (`imgalign.train.seeding.global_positions` is
the inverse). So 2 processes x 1 micro-step and 1 process x 2 micro-steps train on the same items per step,
and micro-step m of process r needs only m to find its batch.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from imgalign.errors import UserError


class EpochBatches(torch.utils.data.Sampler):
    """Yields lists of (epoch, index) keys, starting at micro-step `start` of this process."""

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0,
                 grad_accum: int = 1):
        self.n, self.bs, self.seed, self.rank, self.world, self.start = n_items, batch_size, seed, rank, world, start
        self.accum = grad_accum
        self.per_step = batch_size * world * grad_accum
        self.steps_per_epoch = n_items // self.per_step
        if self.steps_per_epoch == 0:
            raise UserError(f"the dataset has {n_items} items, fewer than one optimizer step's effective batch "
                             f"({batch_size} per micro-batch x {grad_accum} accum x {world} processes = "
                             f"{self.per_step}); lower run.batch_size or run.grad_accum, or add data")

    def batch(self, micro_step: int) -> list[tuple[int, int]]:
        step, a = divmod(micro_step, self.accum)
        epoch, s = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        items = perm[s * self.per_step:(s + 1) * self.per_step]  # this optimizer step's E items
        mine = items[self.rank::self.world][a * self.bs:(a + 1) * self.bs]
        return [(epoch, int(i)) for i in mine]

    def __iter__(self):
        m = self.start
        while True:
            yield self.batch(m)
            m += 1

    def __len__(self):  # infinite stream; DataLoader only needs this for len(loader)
        return 2**62


class KeyedDataset(Dataset):
    """Looks items up by (epoch, index) so per-item augmentation can depend on both."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __getitem__(self, key):
        epoch, index = key
        return self.transform(self.base[index], index=index, epoch=epoch)

    def __len__(self):
        return len(self.base)


def deterministic_loader(base, transform, collate_fn, batch_size: int, seed: int, rank: int, world: int,
                         start_micro_step: int, num_workers: int = 0, grad_accum: int = 1) -> DataLoader:
    sampler = EpochBatches(len(base), batch_size, seed, rank, world, start_micro_step, grad_accum)
    return DataLoader(KeyedDataset(base, transform), batch_sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, persistent_workers=num_workers > 0)
