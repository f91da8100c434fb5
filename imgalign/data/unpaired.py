"""Unpaired image preferences (Diffusion-KTO): each item is ONE image with its prompt, desirable or not.

Two sources give the same items, `{"caption", "image", "label"}` with label 1.0 (desirable) or 0.0 (undesirable):

    items = load_unpaired_images("labels.jsonl")                  # one JSON object per line, see below
    items = split_pairs(load_preference_pairs("pairs.parquet"))   # Pick-a-Pic pairs split in two
    print(items.stats.summary())

JSONL rows: `{"image": "imgs/001.png", "caption": "a red square", "label": true}`. `label` says whether the image
is desirable: true / false (1 / 0 are accepted too; nothing else). `image` is a path relative to the image root (by
default the JSONL's folder) and may never leave it. Bad rows get the pair loader's treatment: a DataError naming the
file, the line, the caption and the fix, or with `on_error="skip"` skipped and counted by reason (and then every
image is decoded once up front, so unreadable images are skipped the same way).

`split_pairs` turns decided pair i into items 2i (its winner, desirable) and 2i + 1 (its loser, undesirable); ties
say nothing about either image alone, so they are dropped (load the pairs with keep_ties=False).

`detect_layout(source)` tells the two layouts apart by a JSONL's first row: an `image` field (and no `jpg_0`) is
this layout; everything else is pairs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from imgalign.data.errors import DataError, not_utf8, row_failure, short, skipped_text, utf8_lines
from imgalign.data.images import (
    DEFAULT_BACKGROUND,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIZE,
    Colour,
    ImageStats,
    loader_image_options,
    read_image,
    to_rgb,
)
from imgalign.data.pair_transform import pair_generator, resize_flip_crop
from imgalign.data.preference import PreferencePairs, _inside_root

__all__ = [
    "UNPAIRED_FIELDS",
    "ImageTransform",
    "UnpairedImages",
    "UnpairedStats",
    "collate_images",
    "detect_layout",
    "load_unpaired_images",
    "split_pairs",
    "write_unpaired_jsonl",
]

UNPAIRED_FIELDS = ("image", "caption", "label")
_LABEL_HELP = "label must be true (the image is desirable) or false (undesirable); 1 and 0 are accepted too"
_SKIP_HINT = 'or pass on_error="skip" to skip such rows'


def detect_layout(source: str | os.PathLike) -> Literal["pairs", "unpaired"]:
    """'unpaired' for a JSONL file whose first JSON object has an `image` field and no `jpg_0`; else 'pairs'."""
    path = Path(os.fspath(source)).expanduser()
    if not (path.is_file() and path.suffix.lower() in (".jsonl", ".json")):
        return "pairs"
    for _, line, bad in utf8_lines(path):
        if bad is not None or not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            return "unpaired" if "image" in rec and "jpg_0" not in rec else "pairs"
    return "pairs"


@dataclass
class UnpairedStats:
    """What loading kept and dropped; `summary()` is the line a recipe logs."""

    source: str
    n_rows: int = 0  # JSONL: non-blank lines read (after max_rows); split pairs: the pairs kept
    n_desirable: int = 0
    n_undesirable: int = 0
    n_skipped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: list[str] = field(default_factory=list)  # the first few skip messages
    images: ImageStats = field(default_factory=ImageStats)
    pairs: str | None = None  # split pairs: the pair loader's summary

    def summary(self) -> str:
        kept = f"{self.n_desirable} desirable + {self.n_undesirable} undesirable images"
        if self.pairs is not None:
            return f"{self.pairs}; split into {kept} (winner desirable, loser undesirable)"
        text = f"{self.source}: read {self.n_rows} rows, kept {kept}"
        text += skipped_text(self)
        if self.images.n_converted:
            text += f"; images: {self.images.summary()}"
        return text


class UnpairedImages:
    """Map-style dataset of unpaired images from a JSONL (build it with `load_unpaired_images`)."""

    def __init__(self, paths: list[str], captions: list[str], labels: list[float], lines: list[int], source: str,
                 image_root: str, stats: UnpairedStats, image_options: dict[str, Any]):
        self._paths, self._captions, self._labels, self._lines = paths, captions, labels, lines
        self.source, self.image_root, self.stats, self.image_options = source, image_root, stats, image_options

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return f"UnpairedImages({self.stats.summary()})"

    def where(self, index: int) -> str:
        return f"{self.source} line {self._lines[index]}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = range(len(self))[index]  # IndexError out of range, negatives from the end
        return {"caption": self._captions[index], "image": self._load(index), "label": self._labels[index]}

    def _load(self, index: int, stats: ImageStats | None = None) -> Image.Image:
        rel = self._paths[index]
        where = f"{self.where(index)} (caption {short(self._captions[index])!r}, image file {rel!r})"
        full = _inside_root(self.image_root, rel)
        if full is None:  # checked when loading; a symlink may have changed since
            raise DataError(f"{where}: the image path leads outside the image root {self.image_root} (refused)",
                            reason="path_outside_root")
        try:
            return read_image(full, where=where, stats=stats, **self.image_options)
        except DataError as e:
            raise DataError(f'{e} (or load with on_error="skip", which decodes every image up front and skips '
                            "bad rows)", reason=e.reason or "unreadable_image") from e


class SplitPairs:
    """Preference pairs as unpaired images: item 2i is pair i's winner (desirable), 2i + 1 its loser."""

    def __init__(self, pairs: PreferencePairs):
        if (pairs._labels == 0.5).any():
            raise DataError(f"{pairs.stats.source}: a tie says nothing about either image alone; load the pairs "
                            "with keep_ties=False (data.keep_ties=false) to split them into unpaired images")
        self.pairs = pairs
        n = len(pairs)
        self.stats = UnpairedStats(pairs.stats.source, n_rows=n, n_desirable=n, n_undesirable=n,
                                   pairs=pairs.stats.summary())

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def __repr__(self) -> str:
        return f"SplitPairs({self.stats.summary()})"

    def where(self, index: int) -> str:
        return f"{self.pairs.where(index // 2)} ({'winner' if index % 2 == 0 else 'loser'})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = range(len(self))[index]
        pair, winner = index // 2, index % 2 == 0
        return {"caption": self.pairs.caption(pair), "image": self.pairs.image(pair, winner=winner),
                "label": 1.0 if winner else 0.0}


def split_pairs(pairs: PreferencePairs) -> SplitPairs:
    """Pick-a-Pic pairs -> unpaired images: each winner desirable, each loser undesirable (no ties allowed)."""
    return SplitPairs(pairs)


def _label(value: Any) -> float | None:
    """1.0 / 0.0 for true / false (or 1 / 0); None for anything else."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    return None


def load_unpaired_images(
    source: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    max_rows: int | None = None,
    validate_images: bool | None = None,
    min_image_size: int | None = DEFAULT_MIN_SIZE,
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: Colour = DEFAULT_BACKGROUND,
) -> UnpairedImages:
    """Read a JSONL of `{"image", "caption", "label"}` rows (see the module docstring).

    Args:
        source: the .jsonl file.
        image_root: folder the image paths are relative to (default: the JSONL's folder). No path may leave it.
        on_error: "raise" a DataError at the first bad row, or "skip" bad rows and count them by reason.
        max_rows: read at most this many (non-blank) lines.
        validate_images: decode every image once up front (default: only when on_error="skip").
        min_image_size, max_image_pixels, background: as for `load_preference_pairs`.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}')
    path = Path(os.fspath(source)).expanduser()
    if not path.is_file():
        raise DataError(f"unpaired image data not found: {source} (no such file)")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f"{path}: unpaired image data is read from JSONL (one {{image, caption, label}} object per "
                        f"line), not {path.suffix!r} files")
    if image_root is not None and not os.path.isdir(image_root):
        raise DataError(f"image_root {image_root} is not a folder")
    root = os.fspath(image_root) if image_root is not None else str(path.parent)
    name = str(path)
    stats = UnpairedStats(source=name)
    image_options = loader_image_options(min_image_size, max_image_pixels, background)

    fail = row_failure(on_error, stats)

    paths, captions, labels, lines = [], [], [], []
    for line_no, line, bad in utf8_lines(path):
        if bad is None and not line.strip():
            continue
        if max_rows is not None and stats.n_rows >= max_rows:
            break
        stats.n_rows += 1
        where = f"{name} line {line_no}"
        if bad is not None:
            fail("bad_encoding", f"{not_utf8(where, bad)}, {_SKIP_HINT}")
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            fail("bad_json", f"{where}: not valid JSON ({e}); each line must be one JSON object, {_SKIP_HINT}")
            continue
        if not isinstance(rec, dict):
            fail("bad_json", f"{where}: expected a JSON object, got {type(rec).__name__}; {_SKIP_HINT}")
            continue
        missing = [c for c in UNPAIRED_FIELDS if c not in rec]
        if missing:
            fail("missing_field", f"{where}: missing field {', '.join(missing)}; the fields are "
                                  f"{', '.join(rec) or '(none)'}; each line needs {', '.join(UNPAIRED_FIELDS)}, "
                                  f"{_SKIP_HINT}")
            continue
        caption = None if rec["caption"] is None else str(rec["caption"])
        what = f"{where} (caption {short(caption)!r})"
        label = _label(rec["label"])
        if label is None:
            fail("bad_label", f"{what}: label = {json.dumps(rec['label'])} is invalid; {_LABEL_HELP}. Fix the label, "
                              f"{_SKIP_HINT}")
            continue
        try:
            (caption or "").encode("utf-8")
        except UnicodeEncodeError as e:  # a "\ud800" escape: JSON can spell text that UTF-8 cannot hold
            fail("bad_encoding", f"{where}: the caption holds {caption[e.start:e.end]!r}, a lone surrogate escape "
                                 f"that is not text; fix the \\u escape in the file, {_SKIP_HINT}")
            continue
        if not caption or not caption.strip():
            fail("empty_caption", f"{where}: the caption is empty; give every image its prompt, {_SKIP_HINT}")
            continue
        rel = rec["image"]
        if not isinstance(rel, str) or not rel:
            fail("missing_image", f"{what}: field image must be a path relative to the image root, got "
                                  f"{short(rel)}; {_SKIP_HINT}")
            continue
        full = _inside_root(root, rel)
        if full is None:
            fail("path_outside_root", f"{what}: image path {rel!r} leads outside the image root {root}; paths must "
                                      f"stay inside it (refused), {_SKIP_HINT}")
            continue
        if not os.path.isfile(full):
            fail("missing_file", f"{what}: image file {rel!r} not found under {root}; fix the path or pass "
                                 f"image_root=..., {_SKIP_HINT}")
            continue
        paths.append(rel)
        captions.append(caption)
        labels.append(label)
        lines.append(line_no)

    data = UnpairedImages(paths, captions, labels, lines, name, root, stats, image_options)
    if validate_images is None:
        validate_images = on_error == "skip"
    if validate_images:
        good = []
        for i in range(len(data)):
            seen = ImageStats()
            try:
                data._load(i, stats=seen)
            except DataError as e:
                fail(e.reason or "unreadable_image", str(e))
                continue
            stats.images.update(seen)
            good.append(i)
        data._paths, data._captions = [paths[i] for i in good], [captions[i] for i in good]
        data._labels, data._lines = [labels[i] for i in good], [lines[i] for i in good]
    stats.n_desirable = sum(1 for v in data._labels if v == 1.0)
    stats.n_undesirable = len(data) - stats.n_desirable
    if not len(data):
        raise DataError(f"{name}: no usable rows ({stats.summary()}); each line needs image, caption and label")
    return data


def write_unpaired_jsonl(path: str | os.PathLike, image_dir: str | os.PathLike, rows, image_format: str = "png") -> Path:
    """Write (caption, image, desirable) rows as JSONL plus image files in `image_dir` (inside the JSONL's folder,
    so the JSONL loads with no image_root); images are PIL images, encoded bytes or file paths. -> the JSONL path."""
    from imgalign.data.writers import _encode

    path, image_dir = Path(path), Path(image_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    ext = {"jpeg": "jpg"}.get(image_format.lower(), image_format.lower())
    with open(path, "w", encoding="utf-8") as fh:
        for i, (caption, image, desirable) in enumerate(rows):
            file = image_dir.resolve() / f"{i:06d}.{ext}"
            file.write_bytes(_encode(image, image_format))
            rel = os.path.relpath(file, path.parent.resolve())
            fh.write(json.dumps({"image": Path(rel).as_posix(), "caption": caption, "label": bool(desirable)}) + "\n")
    return path


class ImageTransform:
    """Resize / flip / crop one image and map it to [-1, 1]: `PairTransform` for a single image.

    The shorter side goes to `resolution` (bilinear), then a flip with probability 0.5 and an R x R crop (centre or
    random), drawn in that order from `pair_generator(seed, epoch, index)`. Returns `caption`, `label`, `pixels`
    [3, R, R], `original_size` (h, w) and `crop_top_left` (y, x) for SDXL's micro-conditioning.
    """

    def __init__(self, resolution: int, random_crop: bool = False, hflip: bool = True, seed: int = 0):
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution, self.random_crop, self.hflip, self.seed = int(resolution), random_crop, hflip, int(seed)

    def __repr__(self) -> str:
        return (f"ImageTransform(resolution={self.resolution}, random_crop={self.random_crop}, hflip={self.hflip}, "
                f"seed={self.seed})")

    def __call__(self, item: dict[str, Any], index: int = 0, epoch: int = 0) -> dict[str, Any]:
        R = self.resolution
        g = pair_generator(self.seed, epoch, index)
        image = item["image"] if item["image"].mode == "RGB" else to_rgb(item["image"])
        original_size = (image.height, image.width)
        x = TF.pil_to_tensor(image).float().div_(255.0)  # [3, H, W] in [0, 1]
        x, top, left = resize_flip_crop(x, R, self.hflip, self.random_crop, g)
        return {"caption": item["caption"], "label": float(item["label"]), "pixels": x.contiguous(),
                "original_size": original_size, "crop_top_left": (top, left)}


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack transformed images: pixels [B, 3, R, R], captions, labels [B] (1 desirable, 0 undesirable),
    original_sizes [B, 2], crops_top_left [B, 2]."""
    if not items:
        raise ValueError("collate_images got an empty batch")
    if "pixels" not in items[0]:
        raise ValueError("collate_images needs transformed items: apply an ImageTransform first")
    return {
        "pixels": torch.stack([it["pixels"] for it in items]),
        "captions": [it["caption"] for it in items],
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.float32),
        "original_sizes": torch.tensor([it["original_size"] for it in items], dtype=torch.long),
        "crops_top_left": torch.tensor([it["crop_top_left"] for it in items], dtype=torch.long),
    }
