"""Image inputs and differentiable preprocessing shared by every reward.

Every reward accepts the same image inputs and turns them into float tensors in [0, 1] first:

- a list of PIL images (any size and mode; converted to RGB by :func:`imgalign.data.images.to_rgb`: 16-bit and
  float images scaled, transparency composited on white), or a single PIL image;
- a ``uint8`` tensor ``[B, 3, H, W]`` holding 0-255 pixels (``value_range`` must be left unset or be ``(0, 255)``);
- a float tensor ``[B, 3, H, W]`` with an explicit ``value_range``: ``(0, 1)`` (the default for float tensors),
  ``(-1, 1)`` (what diffusion VAEs decode to) or ``(0, 255)``;
- a list of ``[3, H, W]`` tensors (sizes may differ), with the same rules.

A float tensor far outside its declared range is an error, because that is how the classic bug shows up
(torchmetrics' CLIPScore expects 0-255 pixels; a [0, 1] tensor passed there silently scores garbage).

Model preprocessing (:class:`Preprocess`) is written in torch so it is differentiable: bicubic resize with
antialiasing (within ~1/255 of PIL's bicubic), center crop or pad-to-square, an optional affine rescale and
mean/std normalisation. Reward-gradient methods (ReFL, DRaFT, distillation with a reward) backpropagate through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# What callers may pass as images; see the module docstring.
ImageInput = Union["PIL.Image.Image", Sequence[Any], torch.Tensor]  # noqa: F821
# Images after :func:`to_unit_range`: one [B, 3, H, W] tensor, or a list of [3, H, W] tensors of different sizes.
UnitImages = Union[torch.Tensor, list]


def _is_pil(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a core dependency
        return False
    return isinstance(x, Image.Image)


def pil_to_tensor(image) -> torch.Tensor:
    """PIL image (any mode, converted by :func:`imgalign.data.images.to_rgb`) -> float tensor [3, H, W] in [0, 1]."""
    import numpy as np

    if image.mode != "RGB" or "transparency" in image.info:
        from imgalign.data.images import to_rgb

        image = to_rgb(image)
    array = np.asarray(image, dtype=np.uint8).copy()  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def tensor_to_pil(image: torch.Tensor):
    """Float tensor [3, H, W] in [0, 1] -> RGB PIL image (rounded to uint8)."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def _check_channels(x: torch.Tensor) -> torch.Tensor:
    # x: [B, C, H, W]
    channels = x.shape[1]
    if channels == 3:
        return x
    if channels == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[-1] in (1, 3, 4) and channels not in (1, 3, 4):
        raise ValueError(
            f"images have shape {tuple(x.shape)}, which looks channels-last; pass [B, 3, H, W] "
            "(e.g. images.permute(0, 3, 1, 2))"
        )
    raise ValueError(f"images must have 3 (RGB) or 1 channels, got shape {tuple(x.shape)}; drop any alpha channel")


def _tensor_to_unit(x: torch.Tensor, value_range: tuple[float, float] | None) -> torch.Tensor:
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"image tensors must be [B, 3, H, W] or [3, H, W], got shape {tuple(x.shape)}")
    x = _check_channels(x)
    if x.dtype == torch.uint8:
        if value_range not in (None, (0, 255), (0.0, 255.0)):
            raise ValueError(f"uint8 images always hold 0-255 pixels; value_range={value_range} makes no sense")
        return x.float() / 255.0
    if not torch.is_floating_point(x):
        raise TypeError(f"image tensors must be uint8 or floating point, got {x.dtype}")
    low, high = (0.0, 1.0) if value_range is None else (float(value_range[0]), float(value_range[1]))
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    if x.numel():
        # A tensor far outside its declared range was almost surely passed with the wrong range.
        slack = 0.5 * (high - low)
        lo_seen, hi_seen = float(x.detach().amin()), float(x.detach().amax())
        if lo_seen < low - slack or hi_seen > high + slack:
            hint = ""
            if hi_seen > 2.0 and high <= 1.0:
                hint = " These look like 0-255 pixels: pass a uint8 tensor or value_range=(0, 255)."
            elif lo_seen < 0.0 <= low:
                hint = " Negative values: if the images come from a VAE decoder pass value_range=(-1, 1)."
            raise ValueError(
                f"image values span [{lo_seen:.3g}, {hi_seen:.3g}] but value_range={(low, high)}.{hint}"
            )
    x = (x - low) / (high - low)
    return x.clamp(0.0, 1.0)


def to_unit_range(images: ImageInput, value_range: tuple[float, float] | None = None) -> UnitImages:
    """Convert any supported image input to floats in [0, 1].

    Returns a ``[B, 3, H, W]`` float tensor when all images share a size, else a list of ``[3, H, W]`` tensors.
    Float tensors default to ``value_range=(0, 1)``. Gradients flow through (the clamp to [0, 1] aside).
    """
    if _is_pil(images):
        images = [images]
    if isinstance(images, torch.Tensor):
        return _tensor_to_unit(images, value_range)
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise TypeError(
            f"images must be a list of PIL images, a [B, 3, H, W] tensor or a list of [3, H, W] tensors; "
            f"got {type(images).__name__}"
        )
    if len(images) == 0:
        raise ValueError("got an empty list of images")
    converted = []
    for index, image in enumerate(images):
        if _is_pil(image):
            converted.append(pil_to_tensor(image))
        elif isinstance(image, torch.Tensor):
            if image.ndim != 3:
                raise ValueError(f"image {index}: list entries must be [3, H, W] tensors, got {tuple(image.shape)}")
            converted.append(_tensor_to_unit(image, value_range)[0])
        else:
            raise TypeError(f"image {index}: expected a PIL image or a tensor, got {type(image).__name__}")
    if all(t.shape == converted[0].shape for t in converted):
        return torch.stack(converted)
    return converted


def batch_size_of(images: UnitImages) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) else len(images)


def slice_images(images: UnitImages, start: int, stop: int) -> UnitImages:
    return images[start:stop]


def images_require_grad(images: Any) -> bool:
    if isinstance(images, torch.Tensor):
        return images.requires_grad
    if isinstance(images, (list, tuple)):
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in images)
    return False


def unit_to_uint8(images: UnitImages) -> list[torch.Tensor]:
    """[0, 1] images -> list of uint8 [3, H, W] CPU tensors (rounded like PIL's ToPILImage)."""
    items = images if isinstance(images, list) else list(images)
    return [(t.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu() for t in items]


def unit_to_pil(images: UnitImages) -> list:
    items = images if isinstance(images, list) else list(images)
    return [tensor_to_pil(t) for t in items]


_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "area": "area"}
# PIL resampling codes as they appear in Hugging Face image-processor configs.
_PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size[0], size[0]
    return size[0], size[1]


def resize(x: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """Differentiable resize of [B, C, H, W] to ``size`` = (H, W); antialiased when shrinking, clamped to [0, 1]."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    mode = _INTERPOLATIONS[interpolation]
    if mode in ("bicubic", "bilinear"):
        out = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
        return out.clamp(0.0, 1.0)  # bicubic overshoots; PIL clips to the pixel range
    return F.interpolate(x, size=size, mode=mode)


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Center crop [B, C, H, W] to (H, W); pads with zeros when the image is smaller (like torchvision)."""
    height, width = x.shape[-2:]
    crop_h, crop_w = size
    if height < crop_h or width < crop_w:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        height, width = x.shape[-2:]
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return x[..., top : top + crop_h, left : left + crop_w]


def pad_to_square(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Pad [B, C, H, W] to a square, image centred (extra pixel right/bottom), padded with ``fill``."""
    height, width = x.shape[-2:]
    side = max(height, width)
    pad_h, pad_w = side - height, side - width
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


@dataclass(frozen=True)
class Preprocess:
    """Differentiable model preprocessing applied to images in [0, 1].

    resize_mode:
      - ``"shortest"``: resize the shorter side to ``resize_size`` (default ``size``) keeping the aspect ratio
        (the longer side is truncated like torchvision/PIL processors do), then center-crop to ``size``.
        CLIP, PickScore, ImageReward, aesthetic; DINO uses ``resize_size=256, size=224``.
      - ``"longest"``: resize the longer side to ``size``, then pad to a square with ``fill`` (in [0, 1] units,
        before normalisation; 0 = black). HPSv2's ``ResizeMaxSize``.
      - ``"squash"``: resize both sides to ``resize_size`` (default ``size``) ignoring the aspect ratio, then
        center-crop to ``size`` if they differ (Hugging Face ViT / EfficientNet processors).
      - ``"none"``: images must already have the model's size.
    Then ``value * rescale[0] + rescale[1]`` (identity by default; ALIGN uses ``(2, -1)``) and ``(v - mean) / std``.
    """

    size: int | tuple[int, int] = 224
    resize_mode: str = "shortest"
    resize_size: int | tuple[int, int] | None = None
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    fill: float = 0.0
    rescale: tuple[float, float] = (1.0, 0.0)

    def __post_init__(self):
        if self.resize_mode not in ("shortest", "longest", "squash", "none"):
            raise ValueError(f"resize_mode must be shortest|longest|squash|none, got {self.resize_mode!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}")

    @property
    def output_size(self) -> tuple[int, int]:
        return _pair(self.size)

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Resize / crop / pad one batch [B, 3, H, W] of equal-size images (no normalisation)."""
        out_h, out_w = self.output_size
        height, width = x.shape[-2:]
        if self.resize_mode == "shortest":
            short_target = int(self.resize_size or min(out_h, out_w))
            short, long = (height, width) if height <= width else (width, height)
            new_long = int(short_target * long / short)
            new_size = (short_target, new_long) if height <= width else (new_long, short_target)
            x = resize(x, new_size, self.interpolation)
            return center_crop(x, (out_h, out_w))
        if self.resize_mode == "longest":
            side = max(out_h, out_w)
            scale = side / max(height, width)
            new_size = (max(1, round(height * scale)), max(1, round(width * scale)))
            x = resize(x, new_size, self.interpolation)
            x = pad_to_square(x, self.fill)
            return x if (out_h, out_w) == (side, side) else resize(x, (out_h, out_w), self.interpolation)
        if self.resize_mode == "squash":
            squash = _pair(self.resize_size) if self.resize_size else (out_h, out_w)
            x = resize(x, squash, self.interpolation)
            return x if squash == (out_h, out_w) else center_crop(x, (out_h, out_w))
        if (height, width) != (out_h, out_w):
            raise ValueError(f"resize_mode='none' needs {out_h}x{out_w} images, got {height}x{width}")
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        scale, offset = self.rescale
        if (scale, offset) != (1.0, 0.0):
            x = x * scale + offset
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def __call__(
        self, images: UnitImages, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """[0, 1] images (tensor or list of different sizes) -> model input [B, 3, H', W'] on device/dtype."""
        if isinstance(images, torch.Tensor):
            out = self.geometry(images.to(device=device, dtype=torch.float32))
        else:
            out = torch.cat([self.geometry(t.to(device=device, dtype=torch.float32).unsqueeze(0)) for t in images])
        out = self.normalize(out)
        return out if dtype is None else out.to(dtype)


def _size_field(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def preprocess_from_hf(image_processor: Any) -> Preprocess:
    """Build a :class:`Preprocess` equivalent to a Hugging Face image processor (CLIP, ViT, BiT, EfficientNet).

    The processor rescales 0-255 pixels by ``rescale_factor``; our images are already in [0, 1], so a factor f
    becomes a multiplication by ``255 * f`` (1 for the usual 1/255) and EfficientNet's ``rescale_offset`` a -1.
    """
    size = getattr(image_processor, "size", None)
    crop = getattr(image_processor, "crop_size", None)
    do_resize = getattr(image_processor, "do_resize", True)
    do_crop = getattr(image_processor, "do_center_crop", False) and crop is not None
    resample = getattr(image_processor, "resample", 3)
    resample = int(getattr(resample, "value", resample)) if resample is not None else 3
    interpolation = _PIL_RESAMPLE.get(resample, "bicubic")

    shortest = _size_field(size, "shortest_edge")
    height, width = _size_field(size, "height"), _size_field(size, "width")
    crop_hw = (_size_field(crop, "height"), _size_field(crop, "width")) if do_crop else None
    if not do_resize:
        mode, out, resize_size = "none", crop_hw or (height, width), None
    elif shortest:
        mode, resize_size = "shortest", int(shortest)
        out = crop_hw if crop_hw else (int(shortest), int(shortest))
    elif height and width:
        mode, resize_size = "squash", (int(height), int(width))
        out = crop_hw if crop_hw else (int(height), int(width))
    else:
        raise ValueError(f"unsupported image processor size {size!r} in {type(image_processor).__name__}")

    rescale_scale, rescale_offset = 1.0, 0.0
    if getattr(image_processor, "do_rescale", True):
        factor = float(getattr(image_processor, "rescale_factor", 1 / 255))
        rescale_scale = 255.0 * factor
        if getattr(image_processor, "rescale_offset", False):
            rescale_offset = -1.0
    else:
        rescale_scale = 255.0  # the model expects raw 0-255 values
    if getattr(image_processor, "do_normalize", True):
        mean = tuple(float(m) for m in image_processor.image_mean)
        std = tuple(float(s) for s in image_processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Preprocess(
        size=(int(out[0]), int(out[1])),
        resize_mode=mode,
        resize_size=resize_size,
        interpolation=interpolation,
        mean=mean,
        std=std,
        rescale=(rescale_scale, rescale_offset),
    )
