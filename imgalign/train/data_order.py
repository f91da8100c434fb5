"""A data order that is a pure function of (seed, epoch): resume lands on the exact next batch.

Each epoch is a permutation of the dataset drawn from `seed + epoch`, sharded round-robin over processes
and cut into batches (the incomplete last batch is dropped). Micro-step m of process r reads batch
m mod batches_per_epoch of epoch m div batches_per_epoch, so a resumed run needs only its step count.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


class EpochBatches(torch.utils.data.Sampler):
    """Yields lists of (epoch, index) keys, starting at micro-step `start`."""

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.n, self.bs, self.seed, self.rank, self.world, self.start = n_items, batch_size, seed, rank, world, start
        self.per_epoch = (n_items // world) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"dataset of {n_items} items is smaller than one batch ({batch_size} x {world} processes)")

    def batch(self, micro_step: int) -> list[tuple[int, int]]:
        epoch, b = divmod(micro_step, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        mine = perm[self.rank :: self.world]
        return [(epoch, int(i)) for i in mine[b * self.bs : (b + 1) * self.bs]]

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
                         start_micro_step: int, num_workers: int = 0) -> DataLoader:
    sampler = EpochBatches(len(base), batch_size, seed, rank, world, start_micro_step)
    return DataLoader(KeyedDataset(base, transform), batch_sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, persistent_workers=num_workers > 0)
