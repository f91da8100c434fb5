"""Write preference pairs in the Pick-a-Pic layout, as parquet or as JSONL plus image files.

Used by the tests, the toy-data generator and users converting their own data; the result loads with
`load_preference_pairs`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

__all__ = ["write_preference_jsonl", "write_preference_parquet"]


ImageLike = Image.Image | bytes | str | os.PathLike


def _encode(image: ImageLike, image_format: str) -> bytes:
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format=image_format)
        return buf.getvalue()
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    return Path(image).read_bytes()


def _rows(rows: Iterable[Any]) -> Iterable[tuple[str, ImageLike, ImageLike, float]]:
    """Accept (caption, jpg_0, jpg_1, label_0), (caption, (jpg_0, jpg_1), label_0) or dicts."""
    for r in rows:
        if isinstance(r, dict):
            yield r["caption"], r["jpg_0"], r["jpg_1"], float(r["label_0"])
        elif len(r) == 3:
            caption, (im0, im1), label = r
            yield caption, im0, im1, float(label)
        else:
            caption, im0, im1, label = r
            yield caption, im0, im1, float(label)


def write_preference_parquet(
    path: str | os.PathLike, rows: Iterable[Any], image_format: str = "png", rows_per_group: int = 256
) -> Path:
    """Write pairs as a Pick-a-Pic-layout parquet file (`caption`, `jpg_0`/`jpg_1` bytes, `label_0`,
    `label_1`). Rows are (caption, jpg_0, jpg_1, label_0) or (caption, (jpg_0, jpg_1), label_0) or
    dicts; images are PIL images (encoded as `image_format`), encoded bytes, or file paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("caption", pa.string()),
            ("jpg_0", pa.binary()),
            ("jpg_1", pa.binary()),
            ("label_0", pa.float64()),
            ("label_1", pa.float64()),
        ]
    )
    batch: dict[str, list] = {name: [] for name in schema.names}

    def flush(writer: pq.ParquetWriter) -> None:
        writer.write_table(pa.table(batch, schema=schema))
        for v in batch.values():
            v.clear()

    with pq.ParquetWriter(path, schema) as writer:
        for caption, im0, im1, label in _rows(rows):
            batch["caption"].append(caption)
            batch["jpg_0"].append(_encode(im0, image_format))
            batch["jpg_1"].append(_encode(im1, image_format))
            batch["label_0"].append(label)
            batch["label_1"].append(1.0 - label)
            if len(batch["caption"]) >= rows_per_group:
                flush(writer)
        if batch["caption"]:
            flush(writer)
    return path


def write_preference_jsonl(
    path: str | os.PathLike, image_dir: str | os.PathLike, rows: Iterable[Any], image_format: str = "png"
) -> Path:
    """Write pairs as JSONL plus image files in `image_dir`; returns the image root to load it with.

    Paths in the JSONL are relative to the JSONL's folder when `image_dir` is inside it (then
    `load_preference_pairs(path)` needs no image_root), else relative to `image_dir`.
    """
    path, image_dir = Path(path), Path(image_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    jsonl_dir = path.parent.resolve()
    root = jsonl_dir if image_dir.resolve().is_relative_to(jsonl_dir) else image_dir.resolve()
    ext = {"jpeg": "jpg"}.get(image_format.lower(), image_format.lower())
    with open(path, "w", encoding="utf-8") as fh:
        for i, (caption, im0, im1, label) in enumerate(_rows(rows)):
            rels = []
            for side, im in ((0, im0), (1, im1)):
                file = image_dir.resolve() / f"{i:06d}_{side}.{ext}"
                file.write_bytes(_encode(im, image_format))
                rels.append(file.relative_to(root).as_posix())
            rec = {"caption": caption, "jpg_0": rels[0], "jpg_1": rels[1], "label_0": label}
            fh.write(json.dumps(rec) + "\n")
    return root
