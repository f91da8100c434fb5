"""``imgalign score``: score a folder of images with one or several rewards.

    imgalign score --reward pickscore --reward aesthetic:0.1 --images out/ --prompts prompts.txt -o scores.csv

- ``--reward NAME[:WEIGHT]`` (repeatable); ``--reward-arg NAME.KEY=VALUE`` passes constructor kwargs (values are
  read as JSON when they parse: numbers, true/false, lists; else strings), e.g.
  ``--reward-arg clip.model=/models/toy_clip``.
- ``--prompts``: ``.txt`` with one line for all images or one line per image (images in sorted file-name order);
  ``.jsonl`` / ``.csv`` rows with a file (``file``/``image``/``file_name``/``path``, relative to ``--images``) and a
  prompt (``prompt``/``caption``/``text``): then exactly the listed images are scored, in that order.
- ``--references DIR`` gives reference images to rewards that take them (dino, clip_image, lambda_harmonic).
- Output: one row per image (``file``, ``prompt``, one column per reward, ``total`` when several) as CSV or JSONL
  (by extension or ``--format``), and a summary (count/mean/std/min/max per column, images per second) printed and
  written next to it as ``<output>.summary.json``.
- A pairwise reward (``vlm_judge``) gives each image its win rate against the other images of the same prompt.
- Images are read by :func:`imgalign.data.images.read_image`: every mode converted to RGB correctly (16-bit
  scaled, transparency composited on ``--background``), images under ``--min-image-size`` pixels a side or over
  ``--max-image-pixels`` refused; what was converted is printed and written to the summary. An image (or a
  symlink) that leads out of ``--images`` / ``--references`` is refused, as manifest paths are.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from imgalign.data.errors import not_utf8, utf8_lines
from imgalign.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIZE,
    ImageStats,
    parse_background,
    read_image,
)
from imgalign.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_FILE_KEYS = ("file", "image", "file_name", "filename", "path")
_PROMPT_KEYS = ("prompt", "caption", "text")
_REFERENCE_REWARDS_PARAM = "references"


def add_score_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``imgalign score`` options to ``parser`` (the lead wires it into ``imgalign.cli``)."""
    parser.add_argument("--reward", action="append", required=True, metavar="NAME[:WEIGHT]",
                        help="reward to compute, optionally weighted; repeat for a weighted sum")
    parser.add_argument("--reward-arg", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="constructor argument of one reward, e.g. clip.model=/path/to/clip_dir")
    parser.add_argument("--images", required=True, help="folder of images to score")
    parser.add_argument("--prompts", help="prompts file: .txt (one line, or one per image), .jsonl or .csv manifest")
    parser.add_argument("--references", help="folder of reference images (dino, clip_image, lambda_harmonic)")
    parser.add_argument("--output", "-o", help="per-image scores, .csv or .jsonl (default: <images>/scores.csv)")
    parser.add_argument("--format", choices=("csv", "jsonl"), help="output format (default: from the extension)")
    parser.add_argument("--summary", help="summary JSON (default: <output>.summary.json)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per reward call (default 16)")
    parser.add_argument("--device", default="cpu", help="torch device for the reward models")
    parser.add_argument("--dtype", default=None, help="model dtype: fp32 (default), fp16 or bf16")
    parser.add_argument("--recursive", action="store_true", help="also score images in sub-folders")
    parser.add_argument("--min-image-size", type=int, default=DEFAULT_MIN_SIZE, metavar="PX",
                        help=f"refuse images with fewer pixels on a side (default {DEFAULT_MIN_SIZE}; 0: no limit)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help=f"refuse images with more pixels, before decoding (default {DEFAULT_MAX_PIXELS}; "
                             "0: only Pillow's own limit)")
    parser.add_argument("--background", default="white",
                        help="colour transparent pixels are composited on: a name, #rrggbb or r,g,b (default white)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


class ScoreError(UserError):
    """Bad command-line input; the message names the file, row or option and the fix."""


def list_images(folder: Path, recursive: bool = False, option: str = "--images") -> list[Path]:
    """The image files of `folder`; a symlink that leads out of it is refused, as manifest paths are."""
    if not folder.is_dir():
        raise ScoreError(f"{option} {folder}: not a folder")
    root = folder.resolve()
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    images = sorted(p for p in pattern if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for path in images:
        if not path.resolve().is_relative_to(root):
            raise ScoreError(
                f"{option} {folder}: {path.relative_to(folder)} leads through a symlink to {path.resolve()}, outside "
                "the folder (refused: images must stay inside it); copy the image into the folder or remove the link"
            )
    if not images:
        raise ScoreError(f"{option} {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def _inside(root: Path, relative: str, where: str) -> Path:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ScoreError(f"{where}: '{relative}' points outside the images folder {root}")
    if not path.is_file():
        raise ScoreError(f"{where}: image '{relative}' not found in {root}")
    return path


def _pick(row: dict[str, Any], keys: Sequence[str], what: str, where: str) -> str:
    for key in keys:
        if key in row and row[key] not in (None, ""):
            return str(row[key])
    raise ScoreError(f"{where}: no {what} column (expected one of {', '.join(keys)}; got {', '.join(row)})")


def read_prompts(prompts: str | None, folder: Path, images: list[Path]) -> tuple[list[Path], list[str] | None]:
    """(images to score, one prompt each) from ``--prompts`` (see the module docstring)."""
    if prompts is None:
        return images, None
    path = Path(prompts)
    if not path.is_file():
        raise ScoreError(f"--prompts {path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".csv"):
        rows: list[tuple[str, dict[str, Any]]] = []
        if suffix == ".jsonl":
            for number, line in _text_lines(path):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ScoreError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise ScoreError(f"{path}:{number}: expected a JSON object per line")
                rows.append((f"{path}:{number}", row))
        else:
            reader = csv.DictReader(line for _, line in _text_lines(path))
            start = 2
            for row in reader:
                rows.append((f"{path}:{start}", row))
                start = reader.line_num + 1
        if not rows:
            raise ScoreError(f"--prompts {path}: no rows")
        chosen, texts = [], []
        for where, row in rows:
            chosen.append(_inside(folder, _pick(row, _FILE_KEYS, "image file", where), where))
            texts.append(_pick(row, _PROMPT_KEYS, "prompt", where))
        return chosen, texts
    lines = [line.strip() for _, line in _text_lines(path) if line.strip()]
    if not lines:
        raise ScoreError(f"--prompts {path}: empty")
    if len(lines) == 1:
        return images, lines * len(images)
    if len(lines) != len(images):
        raise ScoreError(
            f"--prompts {path}: {len(lines)} prompts for {len(images)} images; give one line per image (in sorted "
            "file-name order), a single line for all, or a .jsonl/.csv manifest with file and prompt columns"
        )
    return images, lines


def _text_lines(path: Path):
    """(line number, text) of a UTF-8 file; a line that is not UTF-8 is a ScoreError naming the file and line."""
    for number, line, bad in utf8_lines(path):
        if bad is not None:
            raise ScoreError(not_utf8(f"--prompts {path} line {number}", bad))
        yield number, line


def parse_reward_args(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    from .registry import parse_value

    kwargs: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ScoreError(f"--reward-arg {item!r}: expected NAME.KEY=VALUE, e.g. clip.model=/path/to/model")
        target, value = item.split("=", 1)
        name, key = target.rsplit(".", 1)
        kwargs.setdefault(name, {})[key] = parse_value(value)
    return kwargs


def _image_options(args: argparse.Namespace) -> dict[str, Any]:
    """read_image's limits and background from the command line (0 turns a limit off)."""
    return {"min_size": getattr(args, "min_image_size", DEFAULT_MIN_SIZE) or None,
            "max_pixels": getattr(args, "max_image_pixels", DEFAULT_MAX_PIXELS) or None,
            "background": parse_background(getattr(args, "background", "white")),
            "limit_names": ("--min-image-size", "--max-image-pixels")}


def _load_batch(paths: Sequence[Path], options: dict[str, Any] | None = None, stats: ImageStats | None = None) -> list:
    """RGB PIL images by read_image; a DataError (a UserError) names the file and the fix."""
    return [read_image(path, stats=stats, **(options or {})) for path in paths]


def _build(args: argparse.Namespace, stats: ImageStats | None = None):
    from .base import _as_dtype
    from .registry import RewardArgumentError, RewardSpec, WeightedReward, _resolve, unknown_argument_error

    reward_kwargs = parse_reward_args(args.reward_arg)
    specs = [RewardSpec.parse(text) for text in args.reward]
    unknown = set(reward_kwargs) - {s.name for s in specs}
    if unknown:
        raise ScoreError(f"--reward-arg for {sorted(unknown)}, which is not among --reward {[s.name for s in specs]}")
    references = None
    if args.references:
        references = _load_batch(list_images(Path(args.references), option="--references"), _image_options(args),
                                 stats)
    rewards = []
    for spec in specs:
        kwargs = {"device": args.device, **reward_kwargs.get(spec.name, {})}
        if args.dtype:
            kwargs["dtype"] = _as_dtype(args.dtype)
        factory = _resolve(spec.name)
        parameters = inspect.signature(factory).parameters
        if references is not None and _REFERENCE_REWARDS_PARAM in parameters:
            kwargs.setdefault("references", references)
        try:
            rewards.append(RewardSpec(spec.name, spec.weight, kwargs).build())
        except RewardArgumentError as exc:  # name the option as typed
            if exc.key not in reward_kwargs.get(spec.name, {}):
                raise
            raise unknown_argument_error(spec.name, exc.key, where=f"--reward-arg {spec.name}.{exc.key}") from None
    if len(rewards) == 1 and specs[0].weight == 1.0:
        return rewards[0], [specs[0].name]
    combined = WeightedReward(rewards, [s.weight for s in specs])
    return combined, combined.names


def _score_pointwise(reward, names, paths, prompts, batch_size, progress, options=None,
                     stats=None) -> dict[str, list[float]]:
    from .registry import WeightedReward

    columns: dict[str, list[float]] = {}
    for start in range(0, len(paths), batch_size):
        images = _load_batch(paths[start : start + batch_size], options, stats)
        chunk_prompts = prompts[start : start + batch_size] if prompts is not None else None
        if isinstance(reward, WeightedReward):
            parts = reward.score_components(images, chunk_prompts)
        else:
            parts = {names[0]: reward.score(images, chunk_prompts)}
        for key, values in parts.items():
            # float32 scores: 7 significant digits is all they hold
            columns.setdefault(key, []).extend(float(f"{float(v):.7g}") for v in values.detach().float().cpu())
        progress.update(len(images))
    return columns


def _score_groups(reward, names, paths, prompts, progress, options=None, stats=None) -> dict[str, list[float]]:
    """Pairwise rewards: each image's win rate among the images that share its prompt."""
    if prompts is None:
        raise ScoreError("a pairwise reward needs --prompts (images are compared within each prompt)")
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    values = [math.nan] * len(paths)
    for prompt, indices in groups.items():
        images = _load_batch([paths[i] for i in indices], options, stats)
        rates = reward.group_win_rates(images, prompt) if len(indices) > 1 else torch.tensor([0.5])
        for i, rate in zip(indices, rates):
            values[i] = float(rate)
        progress.update(len(indices))
    return {names[0] if len(names) == 1 else "total": values}


def _summary(columns: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {}
    for key, values in columns.items():
        finite = [v for v in values if not math.isnan(v)]
        n = len(finite)
        mean = sum(finite) / n if n else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else 0.0
        out[key] = {"count": n, "mean": mean, "std": std,
                    "min": min(finite) if n else math.nan, "max": max(finite) if n else math.nan}
    return out


def _write(path: Path, fmt: str, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        if fmt == "jsonl":
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        else:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    tmp.replace(path)


def run_score(args: argparse.Namespace) -> int:
    """Run ``imgalign score``; returns the exit code (0 ok, 2 bad input)."""
    try:
        return _run(args)
    except UserError as exc:  # ScoreError, DataError (an image, a prompts file), a bad reward argument or weight
        print(f"imgalign score: error: {exc}", file=sys.stderr)
        return 2
    except (KeyError, ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"imgalign score: error: {message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    folder = Path(args.images)
    paths, prompts = read_prompts(args.prompts, folder, list_images(folder, args.recursive))
    output = Path(args.output) if args.output else folder / "scores.csv"
    fmt = args.format or ("jsonl" if output.suffix.lower() == ".jsonl" else "csv")
    if args.batch_size < 1:
        raise ScoreError(f"--batch-size must be >= 1, got {args.batch_size}")
    options = _image_options(args)
    reference_stats, image_stats = ImageStats(), ImageStats()
    started = time.perf_counter()
    reward, names = _build(args, reference_stats)
    if reward.needs_prompts and prompts is None:
        raise ScoreError(f"reward '{reward.name}' needs prompts: pass --prompts FILE")
    load_seconds = time.perf_counter() - started

    from tqdm.auto import tqdm

    started = time.perf_counter()
    with tqdm(total=len(paths), unit="img", desc="score", disable=args.no_progress or len(paths) <= args.batch_size,
              file=sys.stderr) as progress:
        if reward.pairwise:
            columns = _score_groups(reward, names, paths, prompts, progress, options, image_stats)
        else:
            columns = _score_pointwise(reward, names, paths, prompts, args.batch_size, progress, options, image_stats)
    seconds = time.perf_counter() - started

    rows = []
    for index, path in enumerate(paths):
        row: dict[str, Any] = {"file": Path(os.path.relpath(path.resolve(), folder.resolve())).as_posix()}
        if prompts is not None:
            row["prompt"] = prompts[index]
        row.update({key: values[index] for key, values in columns.items()})
        rows.append(row)
    _write(output, fmt, rows)
    summary = {
        "rewards": [str(r) for r in args.reward],
        "images": len(paths),
        "output": str(output),
        "load_seconds": round(load_seconds, 3),
        "score_seconds": round(seconds, 3),
        "images_per_second": round(len(paths) / seconds, 3) if seconds > 0 else None,
        "columns": _summary(columns),
        "image_conversions": image_stats.conversions,
    }
    if args.references:
        summary["reference_conversions"] = reference_stats.conversions
    summary_path = Path(args.summary) if args.summary else output.with_name(output.name + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2))
    print(f"scored {len(paths)} images with {', '.join(args.reward)} in {seconds:.1f}s -> {output}")
    if image_stats.n_converted:
        print(f"  images: {image_stats.summary()}")
    if reference_stats.n_converted:
        print(f"  references: {reference_stats.summary()}")
    for key, stats in summary["columns"].items():
        print(f"  {key:>24s}: mean {stats['mean']:.4f}  std {stats['std']:.4f}  "
              f"min {stats['min']:.4f}  max {stats['max']:.4f}  (n={stats['count']})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m imgalign.rewards.cli``)."""
    parser = add_score_arguments(argparse.ArgumentParser(prog="imgalign score", description=__doc__.split("\n")[0]))
    return run_score(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
