"""Preference pairs in the Pick-a-Pic layout: `caption`, `jpg_0`, `jpg_1`, `label_0`.

`label_0 = 1` means jpg_0 is preferred, `0` means jpg_1 is preferred, `0.5` is a tie (Pick-a-Pic,
Diffusion-DPO). One entry point reads every source:

    pairs = load_preference_pairs("data/pickapic/", split="train")   # folder of parquet files
    pairs = load_preference_pairs("pairs.parquet")                    # one parquet file
    pairs = load_preference_pairs("pairs.jsonl")                      # image paths relative to its folder
    pairs = load_preference_pairs("saved_dataset/")                   # datasets.save_to_disk folder
    pairs = load_preference_pairs("yuvalkirstain/pickapic_v2")        # hub id (needs `datasets`)
    print(pairs.stats.summary())

`jpg_*` may hold image bytes, a `{"bytes": ..., "path": ...}` struct (how `datasets` stores an Image
feature) or a path relative to the image root; a path may never leave that root. Captions, labels and
paths are checked up front; images are decoded in `__getitem__` by `imgalign.data.images.read_image`
(every PIL mode converted to RGB correctly, transparency composited on `background`, images smaller than
`min_image_size` or larger than `max_image_pixels` refused). With `on_error="skip"` every image is also
decoded once up front, so bad rows are skipped consistently and counted by reason, and the conversions
are counted in `stats.images`.

A label must be a number: a boolean `label_0` (true/false) is refused, since it does not say which image
won; write 1.0 or 0.0. Rows with the same caption and the same two images are kept and counted in
`stats.n_duplicates` (`stats.n_conflicting` of them name the other winner).

Items are winner first: `{"caption", "winner", "loser", "label", "winner_is_jpg_0"}` with label 1.0 for
a decided pair and 0.5 for a kept tie (then the winner is jpg_0).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
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
)
from imgalign.data.pair_transform import PairTransform, collate_pairs
from imgalign.data.writers import write_preference_jsonl, write_preference_parquet

__all__ = [
    "REQUIRED_COLUMNS",
    "DataError",
    "PairStats",
    "PairTransform",
    "PreferencePairs",
    "collate_pairs",
    "load_preference_pairs",
    "write_preference_jsonl",
    "write_preference_parquet",
]

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
_LABEL_HELP = "label_0 must be 1 (jpg_0 preferred), 0 (jpg_1 preferred) or 0.5 (tie)"
_BOOL_LABEL_HELP = (
    "a boolean does not say which image won: write 1.0 if jpg_0 is preferred, 0.0 if jpg_1 is preferred "
    "(0.5 for a tie)"
)
_SKIP_HINT = 'or pass on_error="skip" to skip such rows'
OnError = Literal["raise", "skip"]


@dataclass
class PairStats:
    """What loading kept and dropped; `summary()` is the line a recipe logs."""

    source: str
    n_rows: int = 0  # rows read from the source (after max_rows)
    n_pairs: int = 0  # rows kept
    n_ties: int = 0  # rows with label_0 == 0.5
    n_ties_dropped: int = 0
    n_skipped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: list[str] = field(default_factory=list)  # the first few skip messages
    n_duplicates: int = 0  # kept rows whose caption and image pair (either order) an earlier kept row has
    n_conflicting: int = 0  # of those, rows that name the other winner (or a tie against a decided pair)
    images: ImageStats = field(default_factory=ImageStats)  # conversions of the images decoded up front

    def summary(self) -> str:
        text = f"{self.source}: read {self.n_rows} rows, kept {self.n_pairs} pairs"
        if self.n_ties:
            kept = self.n_ties - self.n_ties_dropped
            text += f", {self.n_ties_dropped} ties dropped" if self.n_ties_dropped else f", {kept} ties kept"
        if self.n_duplicates:
            text += f", {self.n_duplicates} duplicate pairs (same caption and images"
            text += f"; {self.n_conflicting} with another winner)" if self.n_conflicting else ")"
        text += skipped_text(self)
        if self.images.n_converted:
            text += f"; images: {self.images.summary()}"
        return text


@dataclass
class _Chunk:
    """One file (or dataset) of rows: an Arrow table with the four columns and where images live."""

    name: str  # shown in messages: file path, or "hub_id [split]"
    table: pa.Table
    image_root: str | None
    line_numbers: list[int] | None = None  # JSONL: source line of each row
    n_dropped: int = 0  # JSONL: lines dropped while reading (bad JSON, missing field, not UTF-8, boolean label)

    def where(self, row: int) -> str:
        if self.line_numbers is not None:
            return f"{self.name} line {self.line_numbers[row]}"
        return f"{self.name} row {row}"

    def caption(self, row: int) -> Any:
        return self.table.column("caption")[row].as_py()


def _split_ref(value: Any) -> tuple[bytes | None, str | None]:
    """An image cell as (bytes, path); at most one is used, bytes first."""
    if value is None:
        return None, None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (bytes(value) or None), None
    if isinstance(value, str):
        return None, (value or None)
    if isinstance(value, dict):
        b, p = value.get("bytes"), value.get("path")
        return (bytes(b) if b else None), (p if isinstance(p, str) and p else None)
    return None, None


def _inside_root(root: str, rel: str) -> str | None:
    """`root/rel` with symlinks resolved, or None when it leaves `root` (`../../etc/passwd`)."""
    root_real = os.path.realpath(root)
    cand = os.path.realpath(os.path.join(root_real, rel))
    if os.path.commonpath([root_real, cand]) != root_real:
        return None
    return cand


class PreferencePairs:
    """A map-style dataset of winner-first preference pairs (use with torch DataLoader).

    Build it with `load_preference_pairs`. Set `transform` (e.g. a `PairTransform`) to get tensors, and
    call `set_epoch(epoch)` before each epoch so random augmentations depend on (seed, epoch, index).
    """

    def __init__(
        self,
        chunks: list[_Chunk],
        chunk_ids: np.ndarray,
        rows: np.ndarray,
        labels: np.ndarray,
        stats: PairStats,
        transform: Callable[..., dict] | None = None,
        image_options: dict[str, Any] | None = None,
    ):
        self._chunks = chunks
        self._chunk_ids = chunk_ids  # [N] which chunk each kept pair is in
        self._rows = rows  # [N] row inside that chunk
        self._labels = labels  # [N] label_0 of each kept pair
        self.stats = stats
        self.transform = transform
        self.image_options = dict(image_options or {})  # min_size, max_pixels, background for read_image
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"PreferencePairs({self.stats.summary()}, transform={self.transform!r})"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def where(self, index: int) -> str:
        """The source file and row of pair `index`, for messages."""
        return self._chunks[self._chunk_ids[index]].where(int(self._rows[index]))

    def raw_item(self, index: int) -> dict[str, Any]:
        """Pair `index` without the transform."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"pair index {index} out of range for {n} pairs")
        index %= n
        chunk = self._chunks[self._chunk_ids[index]]
        row = int(self._rows[index])
        img0 = _load_image(chunk, row, "jpg_0", **self.image_options)
        img1 = _load_image(chunk, row, "jpg_1", **self.image_options)
        label_0 = float(self._labels[index])
        if label_0 == 0.0:  # jpg_1 preferred: winner first
            return {
                "caption": chunk.caption(row),
                "winner": img1,
                "loser": img0,
                "label": 1.0,
                "winner_is_jpg_0": False,
            }
        return {
            "caption": chunk.caption(row),
            "winner": img0,
            "loser": img1,
            "label": label_0,
            "winner_is_jpg_0": True,
        }

    def caption(self, index: int) -> str:
        """The caption of pair `index`."""
        return self._chunks[self._chunk_ids[index]].caption(int(self._rows[index]))

    def image(self, index: int, winner: bool = True) -> Image.Image:
        """The winner's (or the loser's) image of pair `index` alone, decoded once (a tie's winner is jpg_0)."""
        chunk = self._chunks[self._chunk_ids[index]]
        jpg_0_wins = float(self._labels[index]) != 0.0
        column = "jpg_0" if jpg_0_wins == winner else "jpg_1"
        return _load_image(chunk, int(self._rows[index]), column, **self.image_options)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.raw_item(index)
        if self.transform is not None:
            item = self.transform(item, index=index % len(self), epoch=self.epoch)
        return item


def _load_image(chunk: _Chunk, row: int, column: str, stats: ImageStats | None = None, **options: Any) -> Image.Image:
    """The image of one cell as RGB, by `read_image` (`options`: min_size, max_pixels, background)."""
    data, path = _split_ref(chunk.table.column(column)[row].as_py())
    what = f"{chunk.where(row)} (caption {short(chunk.caption(row))!r}), column {column}"
    if data is None:
        if path is None or chunk.image_root is None:
            raise DataError(f"{what}: no image bytes or path", reason="missing_image")
        full = _inside_root(chunk.image_root, path)
        if full is None:
            raise DataError(f"{what}: image path {path!r} is outside the image root {chunk.image_root}",
                            reason="path_outside_root")
    where = what if data is not None else f"{what} (image file {path!r})"
    try:
        return read_image(data if data is not None else full, where=where, stats=stats, **options)
    except DataError as e:
        raise DataError(
            f'{e} (or load with on_error="skip", which decodes every image up front and skips bad rows)',
            reason=e.reason or "unreadable_image",
        ) from e


# ----------------------------------------------------------------------------------------------------
# reading sources into chunks
# ----------------------------------------------------------------------------------------------------


def _check_columns(names: Iterable[str], where: str) -> None:
    names = list(names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise DataError(
            f"{where}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
            f"the columns are {', '.join(names) or '(none)'}. Preference data needs the Pick-a-Pic "
            f"columns {', '.join(REQUIRED_COLUMNS)}: rename yours (or pass columns={{ours: yours}})"
        )


def _rename(table: pa.Table, columns: dict[str, str] | None) -> pa.Table:
    if not columns:
        return table
    inverse = {v: k for k, v in columns.items()}
    return table.rename_columns([inverse.get(n, n) for n in table.column_names])


def _parquet_files(folder: Path, split: str) -> list[Path]:
    files = sorted(p for p in folder.rglob("*.parquet") if p.is_file())
    if not files:
        return []
    # hub layouts name files by split (data/train-00000-of-00010.parquet, train/0.parquet)
    pat = re.compile(rf"^{re.escape(split)}([-_.]|$)")
    in_split = [p for p in files if pat.match(p.name) or split in p.relative_to(folder).parts[:-1]]
    return in_split or files


def _read_parquet(
    files: list[Path], columns: dict[str, str] | None, image_root: str | None, max_rows: int | None
) -> list[_Chunk]:
    ours = {v: k for k, v in (columns or {}).items()}  # their name -> our name
    chunks, total = [], 0
    for f in files:
        if max_rows is not None and total >= max_rows:
            break
        try:
            schema = pq.read_schema(f)
        except Exception as e:
            raise DataError(f"{f}: cannot read as parquet ({e})") from e
        _check_columns([ours.get(n, n) for n in schema.names], str(f))
        src_cols = [(columns or {}).get(c, c) for c in REQUIRED_COLUMNS]
        table = _rename(pq.read_table(f, columns=src_cols), columns)
        if max_rows is not None:
            table = table.slice(0, max_rows - total)
        total += table.num_rows
        chunks.append(_Chunk(str(f), table, image_root or str(f.parent)))
    return chunks


def _read_jsonl(path: Path, image_root: str | None, max_rows: int | None, fail) -> list[_Chunk]:
    captions, jpg0, jpg1, labels, lines = [], [], [], [], []
    n_lines = 0  # non-blank lines read
    name = str(path)
    for line_no, line, bad in utf8_lines(path):
        if bad is None and not line.strip():
            continue
        if max_rows is not None and len(lines) >= max_rows:
            break
        n_lines += 1
        where = f"{name} line {line_no}"
        if bad is not None:
            fail("bad_encoding", f"{not_utf8(where, bad)}, {_SKIP_HINT}")
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            fail(
                "bad_json",
                f"{where}: not valid JSON ({e}); each line must be one JSON object, {_SKIP_HINT}",
            )
            continue
        if not isinstance(rec, dict):
            fail("bad_json", f"{where}: expected a JSON object, got {type(rec).__name__}; {_SKIP_HINT}")
            continue
        missing = [c for c in REQUIRED_COLUMNS if c not in rec]
        if missing:
            fail(
                "missing_field",
                f"{where}: missing field {', '.join(missing)}; the fields are "
                f"{', '.join(rec) or '(none)'}; each line needs {', '.join(REQUIRED_COLUMNS)}, {_SKIP_HINT}",
            )
            continue
        label = rec["label_0"]
        if isinstance(label, bool):
            fail("bool_label", f"{where} (caption {short(rec['caption'])!r}): label_0 is {json.dumps(label)}; "
                               f"{_BOOL_LABEL_HELP}, {_SKIP_HINT}")
            continue
        caption = rec["caption"] if rec["caption"] is None else str(rec["caption"])
        try:
            (caption or "").encode("utf-8")
        except UnicodeEncodeError as e:  # a "\ud800" escape: JSON can spell text that UTF-8 cannot hold
            fail("bad_encoding", f"{where}: the caption holds {caption[e.start:e.end]!r}, a lone surrogate escape "
                                 f"that is not text; fix the \\u escape in the file, {_SKIP_HINT}")
            continue
        captions.append(caption)
        jpg0.append(rec["jpg_0"] if isinstance(rec["jpg_0"], str) else None)
        jpg1.append(rec["jpg_1"] if isinstance(rec["jpg_1"], str) else None)
        labels.append(float(label) if isinstance(label, (int, float)) else float("nan"))
        lines.append(line_no)
    table = pa.table(
        {
            "caption": pa.array(captions, pa.string()),
            "jpg_0": pa.array(jpg0, pa.string()),
            "jpg_1": pa.array(jpg1, pa.string()),
            "label_0": pa.array(labels, pa.float64()),
        }
    )
    n_dropped = n_lines - len(lines)
    return [_Chunk(name, table, image_root or str(path.parent), line_numbers=lines, n_dropped=n_dropped)]


def _read_hf_dataset(
    source: str,
    split: str,
    local: bool,
    columns: dict[str, str] | None,
    image_root: str | None,
    max_rows: int | None,
) -> list[_Chunk]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"loading {source!r} needs the optional 'datasets' package: pip install 'imgalign[datasets]' "
            f"(or convert the data to parquet / JSONL, which need nothing extra)"
        ) from None
    name = source if local else f"{source} [{split}]"
    try:
        ds = datasets.load_from_disk(source) if local else datasets.load_dataset(source, split=split)
    except Exception as e:
        raise DataError(f"cannot load dataset {name}: {type(e).__name__}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: no split {split!r}; the splits are {', '.join(ds)}; pass split=...")
        ds = ds[split]
        name = f"{source} [{split}]"
    names = [({v: k for k, v in (columns or {}).items()}).get(n, n) for n in ds.column_names]
    _check_columns(names, name)
    ds = ds.select_columns([(columns or {}).get(c, c) for c in REQUIRED_COLUMNS])
    n = len(ds) if max_rows is None else min(max_rows, len(ds))
    # Arrow storage of the rows: Image features stay {"bytes", "path"} structs, nothing is decoded
    table = _rename(ds.with_format("arrow")[:n], columns)
    return [_Chunk(name, table, image_root or (source if local else None))]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _read_source(source: str, split: str, columns, image_root, max_rows, fail) -> list[_Chunk]:
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return _read_parquet([path], columns, image_root, max_rows)
        if suffix in (".jsonl", ".json"):
            if columns:
                raise DataError(
                    f"{path}: columns= renaming is for parquet and datasets sources; "
                    "write the JSONL with the Pick-a-Pic field names"
                )
            return _read_jsonl(path, image_root, max_rows, fail)
        raise DataError(
            f"{path}: unsupported file type {suffix!r}; use .parquet or .jsonl "
            "(or a folder of parquet files, or a datasets folder)"
        )
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _read_hf_dataset(str(path), split, True, columns, image_root, max_rows)
        files = _parquet_files(path, split)
        if not files:
            raise DataError(
                f"{path}: no .parquet files in this folder, and it is not a folder written by "
                "datasets' save_to_disk; point at a .parquet/.jsonl file or such a folder"
            )
        return _read_parquet(files, columns, image_root, max_rows)
    looks_like_path = (
        source.startswith((".", "/", "~"))
        or path.suffix.lower() in (".parquet", ".jsonl", ".json")
        or not _HUB_ID.match(source)
    )
    if looks_like_path:
        raise DataError(f"preference data not found: {source} (no such file or folder)")
    return _read_hf_dataset(source, split, False, columns, image_root, max_rows)


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------


def _image_refs(chunk: _Chunk, column: str) -> tuple[np.ndarray, list[str | None]]:
    """(has_bytes [N] bool, paths [N]) of an image column, without copying image bytes to Python."""
    col = chunk.table.column(column)
    n = chunk.table.num_rows
    t = col.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        has = pc.fill_null(pc.greater(pc.binary_length(col), 0), False)
        return np.asarray(has.to_numpy(zero_copy_only=False), dtype=bool), [None] * n
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return np.zeros(n, dtype=bool), col.to_pylist()
    if pa.types.is_struct(t):
        fields = {t.field(i).name for i in range(t.num_fields)}
        has = np.zeros(n, dtype=bool)
        paths: list[str | None] = [None] * n
        if "bytes" in fields:
            b = pc.struct_field(col, "bytes")
            has = np.asarray(
                pc.fill_null(pc.greater(pc.binary_length(b), 0), False).to_numpy(zero_copy_only=False),
                dtype=bool,
            )
        if "path" in fields:
            paths = pc.struct_field(col, "path").to_pylist()
        if "bytes" in fields or "path" in fields:
            return has, paths
    raise DataError(
        f"{chunk.name}: column {column} has type {t}; it must hold image bytes, a path string, or a "
        f'{{"bytes", "path"}} struct (a datasets Image feature)'
    )


def _repair_captions(chunk: _Chunk) -> dict[int, UnicodeDecodeError]:
    """Rows whose caption is not UTF-8 (parquet does not check); their captions are replaced in the table by
    the text decoded with U+FFFD, so messages about the chunk can show them. {row: the decode error}."""
    cap = chunk.table.column("caption")
    try:
        cap.validate(full=True)
        return {}
    except pa.ArrowInvalid:
        pass
    raw = cap.cast(pa.large_binary() if pa.types.is_large_string(cap.type) else pa.binary()).to_pylist()
    bad, fixed = {}, []
    for row, value in enumerate(raw):
        if value is None:
            fixed.append(None)
            continue
        try:
            fixed.append(value.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad[row] = e
            fixed.append(value.decode("utf-8", errors="replace"))
    index = chunk.table.column_names.index("caption")
    chunk.table = chunk.table.set_column(index, "caption", pa.array(fixed, cap.type))
    return bad


def _image_key(chunk: _Chunk, column: str) -> Callable[[int], bytes]:
    """row -> a key of the cell's image: a digest of its bytes, or its normalised path."""
    col = chunk.table.column(column)
    data = paths = None
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        data = col
    elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        paths = col
    elif pa.types.is_struct(col.type):
        names = {col.type.field(i).name for i in range(col.type.num_fields)}
        data = pc.struct_field(col, "bytes") if "bytes" in names else None
        paths = pc.struct_field(col, "path") if "path" in names else None

    def key(row: int) -> bytes:
        if data is not None:
            cell = data[row]
            if cell.is_valid and len(cell.as_buffer()) > 0:
                return b"b" + hashlib.blake2b(cell.as_buffer(), digest_size=16).digest()
        path = paths[row].as_py() if paths is not None else None
        return b"p" + os.path.normpath(path or "").encode("utf-8", "surrogateescape")

    return key


def _count_duplicates(chunks: list[_Chunk], chunk_ids: list[int], rows: list[int], labels: list[float],
                      stats: PairStats) -> None:
    """Count kept rows whose caption and image pair (in either order) an earlier kept row already has."""
    seen: dict[bytes, bytes] = {}  # digest of (caption, the two images) -> what the first such row said won
    keys: dict[int, tuple[Callable[[int], bytes], Callable[[int], bytes]]] = {}
    for ci, row, label in zip(chunk_ids, rows, labels):
        if ci not in keys:
            keys = {ci: (_image_key(chunks[ci], "jpg_0"), _image_key(chunks[ci], "jpg_1"))}
        a, b = keys[ci][0](row), keys[ci][1](row)
        caption = (chunks[ci].caption(row) or "").encode("utf-8", "surrogateescape")
        pair = hashlib.blake2b(b"\0".join([caption, *sorted((a, b))]), digest_size=16).digest()
        winner = b"tie" if label == 0.5 else (a if label == 1.0 else b)
        if pair in seen:
            stats.n_duplicates += 1
            stats.n_conflicting += seen[pair] != winner
        else:
            seen[pair] = winner


def _validate(chunk: _Chunk, keep_ties: bool, fail, stats: PairStats) -> tuple[list[int], list[float]]:
    """Cheap checks of every row; returns the kept rows and their labels."""
    n = chunk.table.num_rows
    try:
        labels = chunk.table.column("label_0").cast(pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{chunk.name}: column label_0 is not numeric ({e}); {_LABEL_HELP}") from e
    labels = np.nan_to_num(np.asarray(labels, dtype=np.float64), nan=-1.0)  # null -> invalid
    bool_labels = pa.types.is_boolean(chunk.table.column("label_0").type)
    cap = chunk.table.column("caption")
    if not (pa.types.is_string(cap.type) or pa.types.is_large_string(cap.type)):
        raise DataError(f"{chunk.name}: column caption has type {cap.type}; it must hold strings")
    bad_text = _repair_captions(chunk)
    cap = chunk.table.column("caption")
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(cap), ""), True).to_numpy(zero_copy_only=False)
    refs = {c: _image_refs(chunk, c) for c in IMAGE_COLUMNS}

    kept_rows, kept_labels = [], []
    for row in range(n):
        label = float(labels[row])
        if row in bad_text:
            fail("bad_encoding", f"{not_utf8(f'{chunk.where(row)}, column caption', bad_text[row])}, {_SKIP_HINT}")
            continue
        if bool_labels and chunk.table.column("label_0")[row].is_valid:
            shown = json.dumps(chunk.table.column("label_0")[row].as_py())
            fail(
                "bool_label",
                f"{chunk.where(row)} (caption {short(chunk.caption(row))!r}): label_0 is the boolean {shown} "
                f"(the column is boolean); {_BOOL_LABEL_HELP}. Cast the column to float, {_SKIP_HINT}",
            )
            continue
        if label not in (0.0, 0.5, 1.0):
            shown = chunk.table.column("label_0")[row].as_py()
            fail(
                "bad_label",
                f"{chunk.where(row)} (caption {short(chunk.caption(row))!r}): label_0 = {shown!r} "
                f"is invalid; {_LABEL_HELP}. Fix the label, {_SKIP_HINT}",
            )
            continue
        if label == 0.5:
            stats.n_ties += 1
            if not keep_ties:
                stats.n_ties_dropped += 1
                continue
        if empty[row]:
            fail(
                "empty_caption",
                f"{chunk.where(row)}: the caption is empty; give every pair its prompt, {_SKIP_HINT}",
            )
            continue
        ok = True
        for column in IMAGE_COLUMNS:
            has_bytes, paths = refs[column]
            if has_bytes[row]:
                continue
            where = f"{chunk.where(row)} (caption {short(chunk.caption(row))!r}), column {column}"
            p = paths[row]
            if not p:
                fail("missing_image", f"{where}: no image (neither bytes nor a path); {_SKIP_HINT}")
            elif chunk.image_root is None:
                fail(
                    "missing_file",
                    f"{where}: image path {p!r} but no image root is known; "
                    "pass image_root=<folder holding the images>",
                )
            elif (full := _inside_root(chunk.image_root, p)) is None:
                fail(
                    "path_outside_root",
                    f"{where}: image path {p!r} leads outside the image root "
                    f"{chunk.image_root}; paths must stay inside it (refused), "
                    f"{_SKIP_HINT}",
                )
            elif not os.path.isfile(full):
                fail(
                    "missing_file",
                    f"{where}: image file {p!r} not found under {chunk.image_root}; "
                    f"fix the path or pass image_root=..., {_SKIP_HINT}",
                )
            else:
                continue
            ok = False
            break
        if ok:
            kept_rows.append(row)
            kept_labels.append(label)
    return kept_rows, kept_labels


def load_preference_pairs(
    source: str | os.PathLike,
    split: str = "train",
    image_root: str | os.PathLike | None = None,
    keep_ties: bool = False,
    on_error: OnError = "raise",
    max_rows: int | None = None,
    validate_images: bool | None = None,
    columns: dict[str, str] | None = None,
    transform: Callable[..., dict] | None = None,
    min_image_size: int | None = DEFAULT_MIN_SIZE,
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: Colour = DEFAULT_BACKGROUND,
    count_duplicates: bool = True,
) -> PreferencePairs:
    """Read preference pairs from a parquet file or folder, a JSONL file, or a `datasets` dataset.

    Args:
        source: .parquet file; folder of parquet files (files named `<split>-*` or under `<split>/`
            are used if any, else all); .jsonl file; folder written by `datasets.save_to_disk`; or a
            hub dataset id (needs the `datasets` extra).
        split: split of a hub dataset, DatasetDict or split-named parquet folder.
        image_root: folder that image paths are relative to (default: the JSONL's / parquet's folder).
            No path may leave it.
        keep_ties: keep `label_0 == 0.5` rows (label 0.5, jpg_0 as winner); dropped and counted otherwise.
        on_error: "raise" a DataError at the first bad row, or "skip" bad rows and count them by reason.
        max_rows: read at most this many rows of the source (before filtering).
        validate_images: decode every image once up front (default: only when on_error="skip").
        columns: map of our column names to yours, e.g. {"caption": "prompt"} (parquet/datasets).
        transform: callable(item, index=, epoch=) applied in __getitem__, e.g. PairTransform(512).
        min_image_size: refuse images with fewer pixels on a side (default 8; None: no limit).
        max_image_pixels: refuse images with more pixels, checked before decoding (default 64 MP; None: no
            limit beyond Pillow's own PIL.Image.MAX_IMAGE_PIXELS).
        background: colour transparent pixels are composited on (default white; a name, #rrggbb or (r, g, b)).
        count_duplicates: count rows repeating an earlier row's caption and image pair (hashes image bytes).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}')
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    source = os.fspath(source)
    if image_root is not None:
        image_root = os.fspath(image_root)
        if not os.path.isdir(image_root):
            raise DataError(f"image_root {image_root} is not a folder")
    stats = PairStats(source=source)
    image_options = loader_image_options(min_image_size, max_image_pixels, background)

    fail = row_failure(on_error, stats)

    chunks = _read_source(source, split, columns, image_root, max_rows, fail)
    chunk_ids, rows, labels = [], [], []
    for i, chunk in enumerate(chunks):
        stats.n_rows += chunk.table.num_rows + chunk.n_dropped
        kept, kept_labels = _validate(chunk, keep_ties, fail, stats)
        chunk_ids += [i] * len(kept)
        rows += kept
        labels += kept_labels

    if validate_images is None:
        validate_images = on_error == "skip"
    if validate_images:
        good = []
        for j, (ci, row) in enumerate(zip(chunk_ids, rows)):
            row_images = ImageStats()  # counted only when both images of the row are kept
            try:
                for column in IMAGE_COLUMNS:
                    _load_image(chunks[ci], row, column, stats=row_images, **image_options)
            except DataError as e:
                fail(e.reason or "unreadable_image", str(e))
                continue
            stats.images.update(row_images)
            good.append(j)
        chunk_ids = [chunk_ids[j] for j in good]
        rows = [rows[j] for j in good]
        labels = [labels[j] for j in good]

    if count_duplicates:
        _count_duplicates(chunks, chunk_ids, rows, labels, stats)
    stats.n_pairs = len(rows)
    return PreferencePairs(
        chunks,
        np.asarray(chunk_ids, dtype=np.int32),
        np.asarray(rows, dtype=np.int64),
        np.asarray(labels, dtype=np.float32),
        stats,
        transform,
        image_options,
    )
