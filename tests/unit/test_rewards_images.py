"""Image inputs (value ranges, PIL, lists) and the differentiable preprocessing shared by the rewards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imgalign.rewards.images import (
    IMAGENET_MEAN,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Preprocess,
    preprocess_from_hf,
    to_unit_range,
)


def _pil(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def test_value_ranges_agree():
    """The same pixels given as uint8 0-255, float [0, 1], float [-1, 1] and PIL all become the same [0, 1] floats."""
    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    unit = pixels.float() / 255
    assert torch.equal(to_unit_range(pixels), unit)
    assert torch.allclose(to_unit_range(unit), unit)
    assert torch.allclose(to_unit_range(unit * 2 - 1, value_range=(-1, 1)), unit, atol=1e-6)
    assert torch.allclose(to_unit_range(unit * 255, value_range=(0, 255)), unit, atol=1e-6)
    pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    assert torch.equal(to_unit_range(pil), unit)
    assert to_unit_range(pil[0]).shape == (1, 3, 5, 7)  # a single PIL image is a batch of one
    assert to_unit_range(unit[0]).shape == (1, 3, 5, 7)  # so is a [3, H, W] tensor
    gray = to_unit_range(unit[:, :1])
    assert gray.shape == (2, 3, 5, 7) and torch.equal(gray[:, 0], gray[:, 2])


def test_wrong_value_range_is_an_error_not_garbage():
    with pytest.raises(ValueError, match="0-255 pixels"):
        to_unit_range(torch.rand(1, 3, 4, 4) * 255)  # 0-255 floats passed as the default (0, 1)
    with pytest.raises(ValueError, match=r"value_range=\(-1, 1\)"):
        to_unit_range(torch.rand(1, 3, 4, 4) * 2 - 1)  # VAE output passed as (0, 1)
    with pytest.raises(ValueError, match="uint8"):
        to_unit_range(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), value_range=(0, 1))
    with pytest.raises(ValueError, match="channels-last"):
        to_unit_range(torch.rand(2, 8, 8, 3))
    with pytest.raises(TypeError):
        to_unit_range("image.png")
    # slight overshoot (a decoder's output) is clamped, not rejected
    assert to_unit_range(torch.tensor([1.04, -0.03]).view(1, 1, 1, 2).expand(1, 3, 1, 2)).max() == 1.0


def test_mixed_sizes_stay_a_list_and_preprocess_to_one_batch():
    images = to_unit_range([_pil(40, 30), _pil(30, 50, 1)])
    assert isinstance(images, list) and images[0].shape == (3, 30, 40)
    out = Preprocess(size=16)(images)
    assert out.shape == (2, 3, 16, 16)


def test_shortest_side_resize_and_center_crop_match_pil():
    """CLIP-style preprocessing of a PIL image matches PIL bicubic resize + center crop within ~1/255."""
    image = _pil(60, 40)  # W=60, H=40
    pre = Preprocess(size=20, mean=(0, 0, 0), std=(1, 1, 1))
    ours = pre(to_unit_range([image]))[0]
    # shorter side 40 -> 20, longer 60 -> 30; crop 5 px from left and right
    ref = np.asarray(image.resize((30, 20), Image.BICUBIC), dtype=np.float32)[:, 5:25] / 255
    assert ours.shape == (3, 20, 20)
    assert np.abs(ours.permute(1, 2, 0).numpy() - ref).max() < 0.02


def test_normalisation_constants():
    pre = Preprocess(size=4)
    out = pre(torch.zeros(1, 3, 4, 4))  # black
    expected = -torch.tensor(OPENAI_CLIP_MEAN) / torch.tensor(OPENAI_CLIP_STD)
    assert torch.allclose(out[0, :, 0, 0], expected)
    assert pre.mean == (0.48145466, 0.4578275, 0.40821073) and pre.std == (0.26862954, 0.26130258, 0.27577711)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    # affine rescale (ALIGN-style [-1, 1] inputs): white -> 1
    assert torch.allclose(Preprocess(size=4, rescale=(2.0, -1.0), mean=(0, 0, 0), std=(1, 1, 1))(torch.ones(1, 3, 4, 4)),
                          torch.ones(1, 3, 4, 4))


def test_longest_side_resize_pads_to_square_with_black():
    """HPSv2: a 2:1 image becomes 16x8 content centred in a 16x16 square, black above and below."""
    white = torch.ones(1, 3, 20, 40)
    out = Preprocess(size=16, resize_mode="longest", mean=(0, 0, 0), std=(1, 1, 1))(white)
    assert out.shape == (1, 3, 16, 16)
    rows = out[0, 0, :, 8]
    assert rows[:4].eq(0).all() and rows[12:].eq(0).all() and torch.allclose(rows[4:12], torch.ones(8))
    # odd padding: 15 px of content -> 0 rows on top ... extra pixel at the bottom
    out = Preprocess(size=16, resize_mode="longest", mean=(0, 0, 0), std=(1, 1, 1))(torch.ones(1, 3, 15, 16))
    assert out[0, 0, 0].eq(1).all() and out[0, 0, 15].eq(0).all()


def test_squash_and_dino_resize():
    assert Preprocess(size=(8, 12), resize_mode="squash")(torch.rand(1, 3, 30, 10)).shape == (1, 3, 8, 12)
    # DINO: shorter side to 256/224 * size, then crop size
    pre = Preprocess(size=224, resize_size=256, mean=(0, 0, 0), std=(1, 1, 1))
    x = torch.zeros(1, 3, 256, 256)
    x[..., 16:240, 16:240] = 1.0  # a centred 224 square survives the crop exactly
    assert pre(x).eq(1).all()


def test_preprocessing_is_differentiable():
    x = torch.rand(2, 3, 40, 30, requires_grad=True)
    for mode in ("shortest", "longest", "squash"):
        Preprocess(size=16, resize_mode=mode)(x).square().sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        x.grad = None


def test_preprocess_from_hf_matches_the_clip_image_processor():
    """Our torch version of a CLIPImageProcessor (which rescales 0-255 by 1/255) gives its pixel values."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    pre = preprocess_from_hf(processor)
    assert (pre.resize_mode, pre.output_size, pre.rescale) == ("shortest", (24, 24), (1.0, 0.0))
    image = _pil(48, 36, seed=3)
    theirs = processor(images=[image], return_tensors="pt")["pixel_values"]
    ours = pre(to_unit_range([image]))
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().mean() < 0.02  # small resampling differences only (normalised units)
