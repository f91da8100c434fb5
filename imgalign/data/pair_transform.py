"""Joint augmentation of a preference pair, and the batch collate for Diffusion-DPO style recipes.

Both images of a pair get the *same* geometry (resize, flip, crop), as in the Diffusion-DPO SDXL
script: jpg_1 is first resized to jpg_0's size, the two are stacked into one 6-channel tensor, and that
tensor is resized (shorter side to `resolution`), flipped and cropped once. SDXL's micro-conditioning
needs jpg_0's original (h, w) and the crop's top-left (y, x), which are returned with the pixels.

Randomness comes from a generator seeded with (seed, epoch, index), so a resumed run sees the same
flips and crops as the uninterrupted one, whatever the DataLoader worker layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from imgalign.data.images import to_rgb

__all__ = ["PairTransform", "collate_pairs", "pair_generator"]


def pair_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch.Generator that depends only on (seed, epoch, index); all three must be >= 0."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class PairTransform:
    """Resize / crop / flip a winner-loser pair jointly and map it to tensors in [-1, 1].

    Args:
        resolution: side R of the square output; the shorter image side is resized to R (bilinear).
        random_crop: random R x R crop instead of the centre crop.
        hflip: flip both images horizontally with probability 0.5.
        seed: base seed (>= 0); the generator of item `index` in `epoch` is `pair_generator(seed, epoch, index)`.

    Call with an item of `PreferencePairs` (`caption`, `winner`, `loser`, `label`, optionally
    `winner_is_jpg_0`); returns `caption`, `label`, `pixels_w` [3, R, R], `pixels_l` [3, R, R],
    `original_size` (h, w) of jpg_0 and `crop_top_left` (y, x) in the resized (and flipped) image.
    """

    def __init__(self, resolution: int, random_crop: bool = False, hflip: bool = True, seed: int = 0):
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = int(resolution)
        self.random_crop = random_crop
        self.hflip = hflip
        self.seed = int(seed)

    def __repr__(self) -> str:
        return (
            f"PairTransform(resolution={self.resolution}, random_crop={self.random_crop}, "
            f"hflip={self.hflip}, seed={self.seed})"
        )

    def __call__(
        self,
        item: dict[str, Any],
        index: int = 0,
        epoch: int = 0,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        R = self.resolution
        g = generator if generator is not None else pair_generator(self.seed, epoch, index)
        # items from load_preference_pairs are RGB already; others get the same conversion (16-bit, alpha)
        winner, loser = (im if im.mode == "RGB" else to_rgb(im) for im in (item["winner"], item["loser"]))
        winner_is_ref = bool(item.get("winner_is_jpg_0", True))
        ref, other = (winner, loser) if winner_is_ref else (loser, winner)
        if other.size != ref.size:  # jpg_1 takes jpg_0's size, so one geometry fits both
            other = other.resize(ref.size, Image.BILINEAR)
        original_size = (ref.height, ref.width)
        winner, loser = (ref, other) if winner_is_ref else (other, ref)

        # one 6-channel tensor: whatever happens to it happens to both images
        x = torch.cat([TF.pil_to_tensor(winner), TF.pil_to_tensor(loser)])
        x = x.float().div_(255.0)  # [6, H, W] in [0, 1]
        x, top, left = resize_flip_crop(x, R, self.hflip, self.random_crop, g)  # [6, R, R] in [-1, 1]

        return {
            "caption": item["caption"],
            "label": float(item["label"]),
            "pixels_w": x[:3].contiguous(),  # [3, R, R]
            "pixels_l": x[3:].contiguous(),  # [3, R, R]
            "original_size": original_size,  # (h, w) of jpg_0
            "crop_top_left": (top, left),  # (y, x)
        }


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack transformed pairs: pixels_w / pixels_l [B, 3, R, R], captions list[str], labels [B],
    original_sizes [B, 2] (h, w), crops_top_left [B, 2] (y, x)."""
    if not items:
        raise ValueError("collate_pairs got an empty batch")
    if "pixels_w" not in items[0]:
        raise ValueError(
            "collate_pairs needs items with pixels: give the dataset a PairTransform "
            "(load_preference_pairs(..., transform=PairTransform(resolution)))"
        )
    return {
        "pixels_w": torch.stack([it["pixels_w"] for it in items]),
        "pixels_l": torch.stack([it["pixels_l"] for it in items]),
        "captions": [it["caption"] for it in items],
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.float32),
        "original_sizes": torch.tensor([it["original_size"] for it in items], dtype=torch.long),
        "crops_top_left": torch.tensor([it["crop_top_left"] for it in items], dtype=torch.long),
    }


def resize_flip_crop(x: torch.Tensor, resolution: int, hflip: bool, random_crop: bool,
                     g: torch.Generator) -> tuple[torch.Tensor, int, int]:
    """x [C, H, W] in [0, 1] -> ([C, R, R] in [-1, 1], crop top, crop left): the shorter side to R (bilinear), a
    flip with probability 0.5 when `hflip`, an R x R crop (random or centre). The flip is drawn even when unused,
    then the crop, always in this order, so the stream of random numbers is stable."""
    R = resolution
    x = TF.resize(x, R, interpolation=InterpolationMode.BILINEAR, antialias=True)
    flip = torch.rand((), generator=g).item() < 0.5
    if hflip and flip:
        x = x.flip(-1)
    h, w = x.shape[-2:]
    if random_crop:
        top = int(torch.randint(0, h - R + 1, (), generator=g))
        left = int(torch.randint(0, w - R + 1, (), generator=g))
    else:
        top, left = int(round((h - R) / 2.0)), int(round((w - R) / 2.0))
    return x[:, top:top + R, left:left + R].clamp_(0.0, 1.0).mul_(2.0).sub_(1.0), top, left
