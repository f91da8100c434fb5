"""Data order: per-epoch permutations cut into optimizer steps, exact resume, and the same items per optimizer
step whatever the process layout (world x grad_accum), with `seeding.global_positions` as the inverse."""

from __future__ import annotations

import itertools

import pytest
import torch

from imgalign.train.data_order import EpochBatches, deterministic_loader
from imgalign.train.seeding import global_positions

SEED = 7


def _perm(n: int, epoch: int, seed: int = SEED) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def _step_items(n, bs, world, accum, step, seed=SEED) -> list[tuple[int, int]]:
    """Every (epoch, index) the optimizer step `step` trains on, over all ranks and micro-steps."""
    out = []
    for rank in range(world):
        s = EpochBatches(n, bs, seed, rank=rank, world=world, grad_accum=accum)
        for a in range(accum):
            out += s.batch(step * accum + a)
    return out


def test_epoch_is_a_permutation_prefix_in_order():
    """n=10, bs=3: 3 steps per epoch take perm(seed+0)[:9] in order, 3 at a time; index perm[9] is dropped."""
    s = EpochBatches(10, 3, SEED)
    assert s.steps_per_epoch == 3
    got = [i for m in range(3) for (e, i) in s.batch(m)]
    assert all(e == 0 for m in range(3) for (e, _) in s.batch(m))
    # catches: `perm[s * per_step: ...]` -> `perm[s: s + per_step]` (overlapping steps) or seed without epoch
    assert got == _perm(10, 0)[:9]
    assert len(set(got)) == 9
    # the 4th step is epoch 1's first
    assert s.batch(3) == [(1, i) for i in _perm(10, 1)[:3]]


def test_new_permutation_each_epoch():
    """n=16, bs=4: epoch 0 (micro-steps 0..3) and epoch 1 (4..7) each cover all 16 items, in different orders."""
    s = EpochBatches(16, 4, SEED)
    e0 = [i for m in range(4) for (_, i) in s.batch(m)]
    e1 = [i for m in range(4, 8) for (_, i) in s.batch(m)]
    assert sorted(e0) == sorted(e1) == list(range(16))
    # catches: `manual_seed(self.seed)` (the same order every epoch)
    assert e0 != e1
    assert {e for m in range(4, 8) for (e, _) in s.batch(m)} == {1}


def test_start_resumes_at_the_exact_batch():
    """EpochBatches(start=m) yields batch(m), batch(m+1), ... (m=5 spans an epoch boundary: 4 steps/epoch)."""
    full = EpochBatches(16, 4, SEED)
    for m in (0, 3, 5):
        resumed = list(itertools.islice(iter(EpochBatches(16, 4, SEED, start=m)), 4))
        # catches: `m = 0` in __iter__ (start ignored) or an off-by-one `m = self.start + 1`
        assert resumed == [full.batch(k) for k in range(m, m + 4)]


@pytest.mark.parametrize("world, accum", [(2, 1), (1, 2), (4, 1)])
def test_ranks_of_one_step_read_disjoint_items(world, accum):
    """n=15, bs=2, E=4 (world 4: E=8): the micro-batches of one step never share an item."""
    bs, n = 2, 15
    for step in range(4):
        batches = []
        for rank in range(world):
            s = EpochBatches(n, bs, SEED, rank=rank, world=world, grad_accum=accum)
            batches += [s.batch(step * accum + a) for a in range(accum)]
        flat = [k for b in batches for k in b]
        assert all(len(b) == bs for b in batches)
        # catches: `items[self.rank::self.world]` -> `items[::self.world]` (every rank reads rank 0's shard)
        assert len(set(flat)) == len(flat) == bs * world * accum


def test_layouts_with_the_same_effective_batch_see_the_same_items():
    """n=15, bs=2: 2 processes x 1 micro-step and 1 process x 2 micro-steps train on the same 4 items in each of
    the 9 optimizer steps of 3 epochs, and both drop the same 15 mod 4 = 3 items (perm[12:]) per epoch."""
    n, bs = 15, 2
    assert EpochBatches(n, bs, SEED, world=2).steps_per_epoch == EpochBatches(n, bs, SEED, grad_accum=2).steps_per_epoch == 3
    for epoch in range(3):
        seen_a, seen_b = set(), set()
        for step in range(3 * epoch, 3 * epoch + 3):
            a = _step_items(n, bs, world=2, accum=1, step=step)
            b = _step_items(n, bs, world=1, accum=2, step=step)
            # catches: cutting steps per process (`per_step = batch_size * grad_accum`): each layout would then
            # walk the permutation at its own pace
            assert sorted(a) == sorted(b)
            assert len(a) == 4 and {e for e, _ in a} == {epoch}
            seen_a |= {i for _, i in a}
            seen_b |= {i for _, i in b}
        dropped = set(_perm(n, epoch)[12:])
        assert len(dropped) == 3
        assert seen_a == seen_b == set(range(n)) - dropped


def test_global_positions_is_the_inverse_of_the_deal():
    """world=2, accum=2, bs=3 -> E=12. Micro-batch (rank r, accum a) of step s holds items[p] for p in
    global_positions(r, 2, a, 3), items = perm[12 s: 12 s + 12]. E.g. rank 1, a 1: positions 1+2*(3+i) = 7, 9, 11."""
    n, bs, world, accum = 30, 3, 2, 2
    assert global_positions(1, world, 1, bs) == [7, 9, 11]
    assert global_positions(0, world, 0, bs) == [0, 2, 4]
    for step in range(4):  # 2 steps per epoch: crosses into epoch 1
        epoch, s_in = divmod(step, 2)
        items = _perm(n, epoch)[s_in * 12:(s_in + 1) * 12]
        for rank in range(world):
            sampler = EpochBatches(n, bs, SEED, rank=rank, world=world, grad_accum=accum)
            for a in range(accum):
                got = [i for _, i in sampler.batch(step * accum + a)]
                # catches: a contiguous deal on either side (`items[(rank * accum + a) * bs:...]` in batch(), or
                # `rank * bs * accum + a * bs + i` in global_positions) instead of `rank + world * (a * bs + i)`
                assert got == [items[p] for p in global_positions(rank, world, a, bs)]


def test_dataset_smaller_than_one_effective_batch_is_refused():
    """n=7 < 2 x 2 x 2 = 8: no full optimizer step -> ValueError naming run.batch_size (and the 8)."""
    # catches: dropping the steps_per_epoch == 0 check (divmod by zero later, with no hint)
    with pytest.raises(ValueError, match=r"run\.batch_size") as e:
        EpochBatches(7, 2, SEED, world=2, grad_accum=2)
    assert "= 8" in str(e.value) and "7 items" in str(e.value)
    EpochBatches(8, 2, SEED, world=2, grad_accum=2)  # exactly one step is fine


def test_deterministic_loader_passes_index_and_epoch_to_the_transform():
    """n=4, bs=2: the loader's first 3 batches are the transform of (epoch, index) keys of batch(0..2)."""
    base = [f"item{i}" for i in range(4)]
    loader = deterministic_loader(base, lambda x, index, epoch: (x, index, epoch), list, batch_size=2, seed=SEED,
                                  rank=0, world=1, start_micro_step=1)
    got = list(itertools.islice(iter(loader), 3))
    ref = EpochBatches(4, 2, SEED)
    assert got == [[(f"item{i}", i, e) for e, i in ref.batch(m)] for m in (1, 2, 3)]
