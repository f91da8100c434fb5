"""Render toy scenes: flat-colour shapes on a flat background, with a random layout and exact ground truth.

Every shape is rasterised analytically by testing pixel centres against the shape (no anti-aliasing),
so a render uses only palette colours and its ground truth (pixel area, bounding box, centroid) is exact.

Layout rules, which the evaluator relies on:

* every object lies inside the canvas, at least ``inset`` pixels from its border;
* bounding boxes of different objects are at least ``2 * inset`` pixels apart, so objects never touch
  and connected components are objects;
* a relation is drawn "purely": for "A left of B", A's box ends before B's box starts on the x axis, and
  the vertical offset of the centres is at most half the horizontal one, so the scene is not also
  "A above B";
* sizes are a fraction of the canvas side, so a scene looks the same at 32 and 64 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from imgalign.toy.grammar import BACKGROUNDS, COLOURS, SIZES, Scene, parse

#: Object side (bounding-box width = height) as a fraction of the canvas side, per size word. At 32 px a
#: small object is 7-9 px and a large one 12-13 px; at 64 px, 13-18 and 23-27 px.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.21, 0.28), "large": (0.36, 0.42)}
#: The evaluator's small/large cut on the longer box side, inside the gap between the two ranges. It sits
#: nearer the small range because blur only ever shrinks a segmented object (faint edge pixels fall outside
#: the colour tolerance); it never grows one.
SIZE_THRESHOLD = 0.30

#: The toy world's watermark: a band of this colour along the bottom edge, drawn over the scene. Magenta is
#: 255 or more from every object and background colour, so the evaluator never confuses it with either.
#: No prompt asks for it; the toy SD learns it from the part of its pretraining renders that carry it, the
#: toy analogue of the watermarks and captions in web-scraped training images.
WATERMARK_COLOUR = (255, 0, 255)


def watermark_rows(size: int) -> int:
    """Height in pixels of the watermark band of a ``size`` px image (2 at 32 px, 4 at 64 px)."""
    return max(1, round(0.06 * size))


def add_watermark(images: np.ndarray) -> np.ndarray:
    """A copy of uint8 RGB image(s), (H, W, 3) or (N, H, W, 3), with the watermark band drawn over the bottom rows."""
    marked = images.copy()
    height = images.shape[-3]
    marked[..., height - watermark_rows(height) :, :, :] = WATERMARK_COLOUR
    return marked


@dataclass(frozen=True)
class RenderedObject:
    """Ground truth for one drawn object. Coordinates are pixels, x to the right and y downwards.

    ``bbox`` is (x0, y0, x1, y1) with exclusive ends, measured on the drawn pixels; ``centroid`` is the
    mean of the drawn pixel centres (pixel (i, j) has its centre at (i + 0.5, j + 0.5)).
    """

    group: int  # index into Scene.objects
    colour: str
    shape: str
    size: str
    side: int  # requested side length in pixels
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int


@dataclass(frozen=True)
class GroundTruth:
    """Everything the renderer decided: the resolved background and every object it drew."""

    scene: Scene
    image_size: int
    background: str  # resolved, also when the prompt leaves it open
    objects: tuple[RenderedObject, ...]


# --- rasterisation ----------------------------------------------------------------------------------


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a shape filling a side x side box, sampled at pixel centres.

    Circles fill about pi/4 of their box, squares all of it and triangles (apex up, base at the bottom)
    about half: the fill ratios the evaluator's shape classifier separates.
    """
    centres = np.arange(side) + 0.5  # (side,) pixel-centre coordinates inside the box
    y, x = np.meshgrid(centres, centres, indexing="ij")  # (side, side) each
    half = side / 2
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return (x - half) ** 2 + (y - half) ** 2 <= half**2
    if shape == "triangle":
        # The half-width grows linearly from 0 at the apex (y = 0) to `half` at the base (y = side).
        return np.abs(x - half) <= half * y / side
    raise ValueError(f"unknown shape {shape!r}")


# --- layout -----------------------------------------------------------------------------------------


def _inset(size: int) -> int:
    """Margin between objects and the canvas border (and half the gap between two objects)."""
    return max(1, round(0.03 * size))


def _side(size_word: str, image_size: int, rng: np.random.Generator) -> int:
    low, high = SIZE_RANGES[size_word]
    return int(rng.integers(round(low * image_size), round(high * image_size) + 1))


def _spread(rng: np.random.Generator, free: int) -> tuple[int, int]:
    """Split ``free`` slack pixels into (before, between); the rest goes after the second box.

    Two sorted uniform points on [0, free] spread the slack (nearly) uniformly over all placements
    before + between + after = free, so no position along the axis is favoured.
    """
    first, second = sorted(int(v) for v in rng.integers(0, free + 1, size=2))
    return first, second - first


def _layout_relation(
    sides: list[int], relation: str, size: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Top-left corners (x, y) of the subject and the reference for a relation, drawn purely.

    We place the two boxes along a "main" axis (x for left/right, y for above/below) in order, then pick
    the cross-axis positions so that the cross offset of the centres is at most half the main offset.
    """
    inset = _inset(size)
    gap = 2 * inset
    # Order along the main axis: the object that comes first (left-most or top-most).
    first, second = (0, 1) if relation in ("left of", "above") else (1, 0)
    free = size - 2 * inset - sides[0] - sides[1] - gap
    if free < 0:
        raise ValueError(f"objects of sides {sides} do not fit side by side in a {size} px canvas")
    before, between = _spread(rng, free)
    main = [0, 0]
    main[first] = inset + before
    main[second] = main[first] + sides[first] + gap + between
    main_offset = abs((main[1] + sides[1] / 2) - (main[0] + sides[0] / 2))

    # Cross axis: choose the subject freely, then the reference among positions within the allowed offset.
    # If the subject sits at an edge and the reference is much larger, that set can be empty: redraw.
    for _ in range(100):
        cross0 = int(rng.integers(inset, size - inset - sides[0] + 1))
        centre0 = cross0 + sides[0] / 2
        low = max(inset, int(np.ceil(centre0 - main_offset / 2 - sides[1] / 2)))
        high = min(size - inset - sides[1], int(np.floor(centre0 + main_offset / 2 - sides[1] / 2)))
        if low <= high:
            cross1 = int(rng.integers(low, high + 1))
            break
    else:  # unreachable for the size ranges above; kept so a bad SIZE_RANGES edit fails loudly
        raise RuntimeError(f"could not align objects of sides {sides} for relation {relation!r}")
    cross = [cross0, cross1]
    if relation in ("left of", "right of"):
        return [(main[0], cross[0]), (main[1], cross[1])]
    return [(cross[0], main[0]), (cross[1], main[1])]


def _layout_grid(sides: list[int], size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left corners for up to four objects, one per cell of a randomly split 2 x 2 grid.

    A single object may go anywhere. Otherwise the canvas is cut once vertically and once horizontally at
    random points that leave room for the largest object on both sides, each object takes a distinct
    random cell and a uniform position inside it. Objects in different cells are >= 2 * inset apart.
    """
    inset = _inset(size)
    if len(sides) == 1:
        return [tuple(int(v) for v in rng.integers(inset, size - inset - sides[0] + 1, size=2))]
    largest = max(sides)
    low, high = largest + 2 * inset, size - largest - 2 * inset
    if low > high:
        raise ValueError(f"{len(sides)} objects of sides {sides} do not fit in a {size} px canvas")
    cut_x, cut_y = (int(v) for v in rng.integers(low, high + 1, size=2))
    cells = rng.permutation(4)[: len(sides)]
    corners = []
    for cell, side in zip(cells, sides):
        x_range = (0, cut_x) if cell % 2 == 0 else (cut_x, size)
        y_range = (0, cut_y) if cell // 2 == 0 else (cut_y, size)
        x = int(rng.integers(x_range[0] + inset, x_range[1] - inset - side + 1))
        y = int(rng.integers(y_range[0] + inset, y_range[1] - inset - side + 1))
        corners.append((x, y))
    return corners


# --- rendering --------------------------------------------------------------------------------------


def render(spec: Scene | str, rng: np.random.Generator, size: int = 32) -> tuple[Image.Image, GroundTruth]:
    """Draw a scene with a random layout that satisfies it.

    Args:
        spec: a `Scene` or a prompt text (parsed with `parse`).
        rng: the only source of randomness: the same generator state gives the same image.
        size: canvas side in pixels (32 by default; anything from 32 up works).

    Returns:
        (image, ground_truth): an RGB PIL image of ``size x size`` using only palette colours, and the
        resolved background and per-object colour, shape, size, bounding box and centroid.
    """
    scene = parse(spec) if isinstance(spec, str) else spec
    if size < 32:
        raise ValueError(
            f"toy images must be at least 32 px so that small shapes stay recognisable, got {size}"
        )
    background = scene.background or list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]

    # Expand groups into instances and resolve each instance's size word and pixel side.
    instances = []  # (group index, spec, size word, side)
    for index, group in enumerate(scene.objects):
        for _ in range(group.count):
            word = group.size or SIZES[int(rng.integers(len(SIZES)))]
            instances.append((index, group, word, _side(word, size, rng)))
    sides = [side for *_, side in instances]
    if scene.relation is not None:
        corners = _layout_relation(sides, scene.relation, size, rng)
    else:
        corners = _layout_grid(sides, size, rng)

    canvas = np.empty((size, size, 3), dtype=np.uint8)  # (H, W, RGB)
    canvas[:] = BACKGROUNDS[background]
    objects = []
    for (index, group, word, side), (x, y) in zip(instances, corners):
        mask = _shape_mask(group.shape, side)  # (side, side)
        canvas[y : y + side, x : x + side][mask] = COLOURS[group.colour]
        rows, cols = np.nonzero(mask)
        objects.append(
            RenderedObject(
                group=index,
                colour=group.colour,
                shape=group.shape,
                size=word,
                side=side,
                bbox=(
                    x + int(cols.min()),
                    y + int(rows.min()),
                    x + int(cols.max()) + 1,
                    y + int(rows.max()) + 1,
                ),
                centroid=(x + float(cols.mean()) + 0.5, y + float(rows.mean()) + 0.5),
                area=int(mask.sum()),
            )
        )
    truth = GroundTruth(scene=scene, image_size=size, background=background, objects=tuple(objects))
    return Image.fromarray(canvas), truth
