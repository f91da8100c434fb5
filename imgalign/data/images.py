"""Reading images: the one function every loader, `imgalign score` and every evaluator opens images with.

    stats = ImageStats()
    image = read_image("photo.png", stats=stats)                 # an RGB PIL image
    image = read_image(png_bytes, where="pairs.parquet row 3, column jpg_0", stats=stats)
    print(stats.summary())   # "3 images converted from I;16, 2 RGBA composited on white"

`image.convert("RGB")` silently corrupts some images; `to_rgb` converts every PIL mode by what it holds:

- I;16 (16-bit PNG, TIFF): value / 257, rounded, so 65535 -> 255 and 32768 -> 128 (`convert` clips at 255, so
  almost every pixel turns white);
- I (32-bit int): the 16-bit range as above when max <= 65535, else [0, 2**31 - 1] -> [0, 255]; negatives clip to 0;
- F (float): [0, 1] -> [0, 255] when max <= 1, else taken as [0, 255]; clipped, NaN -> 0;
- L, 1: grey replicated to R, G, B; P without transparency: its palette colours; CMYK, YCbCr, LAB, HSV: PIL's conversion;
- LA, La, RGBA, RGBa, PA, and P / L / RGB with a `transparency` entry: alpha-composited over `background`
  (default white, (255, 255, 255)), never dropped (dropping alpha shows what transparent pixels happen to hold).

`read_image` also refuses, with a `DataError` naming the image and the fix, an image smaller than `min_size`
pixels on a side (default 8: a 1x1 image is a broken download, not a picture to upscale 512 times) and an image
of more than `max_pixels` pixels (default 64 MP), checked from the header before anything is decoded. Pillow's
own decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 89 MP) also applies and is reported the same way.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Union

import numpy as np
from PIL import Image, ImageColor

from imgalign.data.errors import DataError

__all__ = [
    "DEFAULT_BACKGROUND",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIZE",
    "ImageSource",
    "ImageStats",
    "parse_background",
    "read_image",
    "save_image_whole",
    "to_rgb",
]

DEFAULT_MIN_SIZE = 8  # pixels per side
DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP
DEFAULT_BACKGROUND = (255, 255, 255)  # white: what a transparent PNG shows on a web page

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes]]
Colour = Union[str, Sequence[int]]

_ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")
_NAMED = {(255, 255, 255): "white", (0, 0, 0): "black"}
# what a broken file raises from Pillow's decoders besides OSError (UnidentifiedImageError is an OSError)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, Image.DecompressionBombError)


@dataclass
class ImageStats:
    """Counts of what `read_image` / `to_rgb` did, for a loader's summary. Pass one to every call of a load.

    `conversions` maps what happened to how many images, e.g. {"converted from I;16": 3,
    "RGBA composited on white": 2}; RGB images are counted in `n_images` only.
    """

    n_images: int = 0
    conversions: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.conversions[what] = self.conversions.get(what, 0) + 1

    def update(self, other: ImageStats) -> None:
        self.n_images += other.n_images
        for what, n in other.conversions.items():
            self.conversions[what] = self.conversions.get(what, 0) + n

    @property
    def n_converted(self) -> int:
        return sum(self.conversions.values())

    def summary(self) -> str:
        """'3 images converted from I;16, 2 RGBA composited on white', or '' when every image was RGB."""
        parts = []
        for what, n in sorted(self.conversions.items(), key=lambda kv: -kv[1]):  # most first, then first seen
            noun = "image" if n == 1 else "images"
            # "3 images converted from L" / "2 RGBA composited on white" (the mode already says what it is)
            parts.append(f"{n} {noun} {what}" if what.startswith("converted") else f"{n} {what}")
        return ", ".join(parts)


def parse_background(background: Colour) -> tuple[int, int, int]:
    """(r, g, b) from a colour name ('white'), '#rrggbb', 'r,g,b' or a 3-sequence of 0-255 ints."""
    if isinstance(background, str):
        text = background.strip()
        try:
            if "," in text:
                rgb = tuple(int(v) for v in text.split(","))
            else:
                rgb = ImageColor.getrgb(text)[:3]
        except ValueError:
            raise DataError(
                f"background colour {background!r} is not a colour; give a name (white), #rrggbb or r,g,b"
            ) from None
    else:
        rgb = tuple(int(v) for v in background)
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise DataError(f"background colour {background!r} must be three 0-255 values (r, g, b)")
    return rgb  # type: ignore[return-value]


def _background_name(rgb: tuple[int, int, int]) -> str:
    return _NAMED.get(rgb, "#{:02x}{:02x}{:02x}".format(*rgb))


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    """uint8 [H, W] -> RGB image with the grey value in every channel."""
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """[0, 65535] integers -> [0, 255] uint8, rounded (v / 257: 65535 -> 255, 32768 -> 128, 257 -> 1)."""
    v = np.clip(values.astype(np.int64), 0, 65535)
    return ((v + 128) // 257).astype(np.uint8)


def to_rgb(
    image: Image.Image,
    background: Colour = DEFAULT_BACKGROUND,
    stats: ImageStats | None = None,
    where: str = "image",
) -> Image.Image:
    """An RGB copy of `image`, converted by what its mode holds (see the module docstring).

    Args:
        image: a PIL image of any mode (decoded here if it is still lazy).
        background: colour transparent pixels are composited on (default white); see `parse_background`.
        stats: counts what was converted (`ImageStats`); None counts nothing.
        where: names the image in an error (file, row, column).
    """
    bg = parse_background(background)
    mode = image.mode
    if stats is not None:
        stats.n_images += 1

    def count(what: str) -> None:
        if stats is not None:
            stats.count(what)

    if mode == "RGB" and "transparency" not in image.info:
        return image.copy()
    if mode.startswith("I;16"):  # I;16, I;16B, I;16L, I;16N, I;16S
        count(f"converted from {mode}")
        return _grey_to_rgb(_scale_16bit(np.asarray(image)))
    if mode == "I":
        values = np.asarray(image, dtype=np.int64)
        if values.size == 0 or values.max() <= 65535:
            count("converted from I (16-bit range)")
            return _grey_to_rgb(_scale_16bit(values))
        count("converted from I (32-bit range)")
        scaled = np.clip(values, 0, 2**31 - 1).astype(np.float64) * (255.0 / (2**31 - 1))
        return _grey_to_rgb(np.round(scaled).astype(np.uint8))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        unit = values.size == 0 or values.max() <= 1.0
        count("converted from F ([0, 1])" if unit else "converted from F ([0, 255])")
        scaled = values * 255.0 if unit else values
        return _grey_to_rgb(np.round(np.clip(scaled, 0.0, 255.0)).astype(np.uint8))
    if mode in _ALPHA_MODES or "transparency" in image.info:
        source = image.convert("LA") if mode == "La" else image  # PIL has no La -> RGBA conversion
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Palette images with Transparency expressed in bytes ..."
            rgba = source.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:  # fully opaque: nothing to composite
            count(f"converted from {mode} (opaque)")
            return rgba.convert("RGB")
        label = mode if mode in _ALPHA_MODES else f"{mode} (transparency)"
        count(f"{label} composited on {_background_name(bg)}")
        canvas = Image.new("RGBA", rgba.size, (*bg, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        rgb = image.convert("RGB")  # L, 1 (replicated), P (palette), CMYK, YCbCr, LAB, HSV, RGBX
    except ValueError as e:
        raise DataError(
            f"{where}: cannot convert an image of mode {mode} to RGB ({e}); re-save it as an RGB PNG or JPEG"
        ) from e
    count(f"converted from {mode}")
    return rgb


def save_image_whole(image: Image.Image, path: str | os.PathLike) -> None:
    """Save `image` to `path` (format from its suffix) through a temporary file beside it, then rename: a killed
    writer leaves no half-written image for a resumed run to mistake for a finished one."""
    final = os.fspath(path)
    stem, suffix = os.path.splitext(os.path.basename(final))
    tmp = os.path.join(os.path.dirname(final), f".{stem}.tmp{suffix}")
    image.save(tmp)
    os.replace(tmp, final)


def read_image(
    source: ImageSource,
    *,
    where: str | None = None,
    min_size: int | None = DEFAULT_MIN_SIZE,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: Colour = DEFAULT_BACKGROUND,
    stats: ImageStats | None = None,
    limit_names: tuple[str, str] = ("min_size", "max_pixels"),
) -> Image.Image:
    """Open an image file (path, encoded bytes or binary file object) as an RGB PIL image.

    The size is checked from the header before decoding: fewer than `min_size` pixels on a side or more than
    `max_pixels` pixels is refused (None turns a check off). Every mode is converted by `to_rgb`.

    Args:
        source: a path, the encoded bytes, or a binary file object.
        where: names the image in errors (default: the path, or "image bytes").
        min_size: smallest accepted width and height in pixels (default 8).
        max_pixels: largest accepted width * height (default 64_000_000).
        background: colour transparent pixels are composited on (default white).
        stats: an `ImageStats` that counts the images and what was converted.
        limit_names: how the caller's user sets min_size and max_pixels, for the fix in a message (e.g.
            ("--min-image-size", "--max-image-pixels") on a command line).

    Raises:
        DataError: the image cannot be read or decoded, or its size is outside the limits; the message names
            `where` and the fix. `err.reason` is "unreadable_image", "image_too_small" or "image_too_large".
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        where = where or "image bytes"
        fp: ImageSource = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        where = where or os.fspath(source)
        fp = source
    else:
        where = where or getattr(source, "name", None) or "image file object"
        fp = source
    if isinstance(fp, (str, os.PathLike)) and not os.path.isfile(fp):
        raise DataError(f"{where}: image file not found; fix the path", reason="unreadable_image")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; the max_pixels check below is the clear version of that warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:  # reads the header only
                width, height = im.size
                min_name, max_name = limit_names
                if max_pixels is not None and width * height > max_pixels:
                    raise DataError(
                        f"{where}: {width}x{height} = {width * height / 1e6:.3g} MP is more than {max_name}="
                        f"{max_pixels} ({max_pixels / 1e6:g} MP); refused before decoding. Downscale the image, "
                        f"or raise {max_name} if it is meant to be this large",
                        reason="image_too_large",
                    )
                if min_size is not None and min(width, height) < min_size:
                    raise DataError(
                        f"{where}: the image is {width}x{height} pixels, smaller than {min_name}={min_size} pixels "
                        f"per side (a broken or placeholder image, not one to upscale); replace or remove it, or "
                        f"lower {min_name}",
                        reason="image_too_small",
                    )
                im.load()
                return to_rgb(im, background, stats, where)
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(
            f"{where}: refused by Pillow's decompression-bomb limit ({e}); downscale the image, or raise "
            f"PIL.Image.MAX_IMAGE_PIXELS (and {limit_names[1]}) if it is meant to be this large",
            reason="image_too_large",
        ) from e
    except _DECODE_ERRORS as e:
        raise DataError(
            f"{where}: cannot decode the image {'bytes' if isinstance(source, (bytes, bytearray, memoryview)) else 'file'} "
            f"({type(e).__name__}: {e}); replace the image or remove it",
            reason="unreadable_image",
        ) from e


def loader_image_options(min_image_size: int, max_image_pixels: int, background) -> dict:
    """read_image's keyword arguments for a data loader: its limits under the loader's own option names."""
    return {"min_size": min_image_size, "max_pixels": max_image_pixels, "background": parse_background(background),
            "limit_names": ("min_image_size", "max_image_pixels")}
