"""PairTransform: one geometry for both images, SDXL micro-conditioning, determinism per (seed, epoch, index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imgalign.data import PairTransform, collate_pairs, pair_generator


def coord_image(h: int, w: int, blue: int) -> Image.Image:
    """R encodes x, G encodes y, B is a constant that tells winner from loser.

    After any resize / crop / flip applied to both images, their R and G channels must be equal.
    """
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, blue)], -1).astype(np.uint8)
    return Image.fromarray(arr)


def item(h=40, w=60, loser_size=None, winner_is_jpg_0=True):
    lh, lw = loser_size or (h, w)
    return {
        "caption": "c",
        "label": 1.0,
        "winner": coord_image(h, w, 0),
        "loser": coord_image(lh, lw, 255),
        "winner_is_jpg_0": winner_is_jpg_0,
    }


def test_center_crop_geometry_and_metadata():
    out = PairTransform(16, random_crop=False, hflip=False)(item(40, 60), index=0)
    assert out["pixels_w"].shape == (3, 16, 16) and out["pixels_l"].shape == (3, 16, 16)
    assert out["pixels_w"].min() >= -1 and out["pixels_w"].max() <= 1
    assert out["original_size"] == (40, 60)
    # shorter side 40 -> 16, so width 60 -> 24 and the centre crop starts at x = (24 - 16) / 2 = 4
    assert out["crop_top_left"] == (0, 4)
    assert torch.equal(out["pixels_w"][:2], out["pixels_l"][:2])
    assert torch.allclose(out["pixels_w"][2], torch.tensor(-1.0)) and torch.allclose(
        out["pixels_l"][2], torch.tensor(1.0)
    )
    # not flipped: x grows to the right
    assert out["pixels_w"][0, 8, -1] > out["pixels_w"][0, 8, 0]


def test_random_crop_and_flip_are_joint():
    t = PairTransform(16, random_crop=True, hflip=True, seed=7)
    crops, flips = set(), set()
    for index in range(24):
        out = t(item(40, 60), index=index)
        assert torch.equal(out["pixels_w"][:2], out["pixels_l"][:2]), index  # same geometry
        top, left = out["crop_top_left"]
        assert top == 0 and 0 <= left <= 8
        crops.add(left)
        flips.add(bool(out["pixels_w"][0, 8, -1] < out["pixels_w"][0, 8, 0]))
    assert flips == {True, False} and len(crops) > 2


def test_loser_is_resized_to_jpg_0_size_first():
    # winner (jpg_0) 40x60, loser (jpg_1) 20x30: both end up with the same geometry
    out = PairTransform(16, hflip=False)(item(40, 60, loser_size=(20, 30)))
    assert out["original_size"] == (40, 60)
    assert (out["pixels_w"][:2] - out["pixels_l"][:2]).abs().max() < 0.1
    # winner is jpg_1 (label_0 == 0): jpg_0 is the loser and its size is the original size
    swapped = item(20, 30, loser_size=(40, 60), winner_is_jpg_0=False)
    out = PairTransform(16, hflip=False)(swapped)
    assert out["original_size"] == (40, 60)
    assert (out["pixels_w"][:2] - out["pixels_l"][:2]).abs().max() < 0.1


def test_deterministic_per_seed_epoch_index():
    t = PairTransform(16, random_crop=True, hflip=True, seed=3)
    a, b = t(item(), index=5, epoch=2), t(item(), index=5, epoch=2)
    assert torch.equal(a["pixels_w"], b["pixels_w"]) and a["crop_top_left"] == b["crop_top_left"]
    draws = {
        (
            t(item(), index=5, epoch=e)["crop_top_left"],
            bool(t(item(), index=5, epoch=e)["pixels_w"][0, 8, -1] < 0),
        )
        for e in range(12)
    }
    assert len(draws) > 1  # the epoch changes the augmentation
    g1, g2 = pair_generator(3, 2, 5), pair_generator(3, 2, 5)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    c = t(item(), index=0, generator=torch.Generator().manual_seed(0))
    d = t(item(), index=9, generator=torch.Generator().manual_seed(0))
    assert c["crop_top_left"] == d["crop_top_left"]  # an explicit generator wins


def test_collate_shapes_and_dtypes():
    t = PairTransform(8, hflip=False)
    batch = collate_pairs([t(item(), index=i) for i in range(3)])
    assert batch["pixels_w"].shape == (3, 3, 8, 8) and batch["pixels_l"].shape == (3, 3, 8, 8)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (3,)
    assert batch["original_sizes"].tolist() == [[40, 60]] * 3
    assert batch["crops_top_left"].shape == (3, 2) and batch["crops_top_left"].dtype == torch.long
    assert batch["captions"] == ["c"] * 3
    with pytest.raises(ValueError, match="PairTransform"):
        collate_pairs([item()])
