"""Per-sample seeding: derive_seed is a stable hash of its parts; a sample's generator depends only on
(seed, purpose, step, position), so its noise does not depend on which other samples share the batch."""

from __future__ import annotations

import hashlib

import torch

from imgalign.train.seeding import derive_seed, rand_per_sample, randn_per_sample, sample_generators


def test_derive_seed_is_a_stable_63_bit_hash():
    """derive_seed(0, "noise", 3, 1) = first 8 sha256 bytes of "0:noise:3:1", little endian, top bit cleared."""
    expected = int.from_bytes(hashlib.sha256(b"0:noise:3:1").digest()[:8], "little") & (2**63 - 1)
    assert derive_seed(0, "noise", 3, 1) == expected == derive_seed(0, "noise", 3, 1)
    assert 0 <= expected < 2**63  # a valid torch manual_seed


def test_derive_seed_differs_across_every_part():
    base = derive_seed(0, "noise", 3, 1)
    # catches: a hash of only some parts (e.g. dropping purpose or position)
    variants = [derive_seed(1, "noise", 3, 1), derive_seed(0, "timestep", 3, 1), derive_seed(0, "noise", 4, 1),
                derive_seed(0, "noise", 3, 2)]
    assert len(set(variants + [base])) == 5
    # catches: joining without a separator ("1" + "23" == "12" + "3")
    assert derive_seed(1, 23) != derive_seed(12, 3)


def test_sample_generators_same_key_same_draws():
    g1 = sample_generators(5, "noise", 2, [0, 1, 2])
    g2 = sample_generators(5, "noise", 2, [0, 1, 2])
    a, b = randn_per_sample((4,), g1), randn_per_sample((4,), g2)
    assert torch.equal(a, b)
    # rows differ: each position has its own stream
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    # catches: seeding by (seed, step) only (every position would draw the same noise)
    other_step = randn_per_sample((4,), sample_generators(5, "noise", 3, [0, 1, 2]))
    assert not torch.equal(a, other_step)
    other_purpose = randn_per_sample((4,), sample_generators(5, "timestep", 2, [0, 1, 2]))
    assert not torch.equal(a, other_purpose)


def test_randn_rows_independent_of_the_batch():
    """Row i is torch.randn(shape) from a fresh generator seeded derive_seed(seed, purpose, step, p_i), so
    positions [2, 3] give the same rows as rows 2, 3 of positions [0, 1, 2, 3]."""
    shape = (2, 3)
    full = randn_per_sample(shape, sample_generators(9, "noise", 4, [0, 1, 2, 3]))
    part = randn_per_sample(shape, sample_generators(9, "noise", 4, [2, 3]))
    assert full.shape == (4, 2, 3)
    # catches: one shared generator for the batch (row 2 would then depend on rows 0 and 1 drawn before it)
    assert torch.equal(full[2:], part)
    for i, p in enumerate([0, 1, 2, 3]):
        ref = torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(9, "noise", 4, p)))
        assert torch.equal(full[i], ref)


def test_rand_per_sample_one_uniform_per_generator():
    u = rand_per_sample(sample_generators(1, "t", 0, [0, 1, 2]))
    assert u.shape == (3,) and bool(((u >= 0) & (u < 1)).all())
    ref = torch.rand(1, generator=torch.Generator().manual_seed(derive_seed(1, "t", 0, 1)))
    assert torch.equal(u[1:2], ref)
    assert torch.equal(rand_per_sample(sample_generators(1, "t", 0, [1])), ref)
