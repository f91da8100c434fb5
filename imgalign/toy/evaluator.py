"""Check a toy image against its prompt, GenEval style but exact.

GenEval runs an object detector on a generated image and checks that the prompt's objects are present
with the right count, colour and position. In the toy world we can do the same without a learned
detector, because the domain is flat-colour shapes from a known palette:

1. segment: each pixel takes the nearest object colour of the palette if it is within
   ``colour_tolerance`` (RGB Euclidean distance) of it, else it is "not an object". Blur, noise and JPEG
   artefacts move pixels a little; a palette colour is >= 221 away from every other palette colour, so a
   tolerance near 100 absorbs the artefacts without ever confusing two colours;
2. find 4-connected components of equal colour (run-length union-find, no scipy needed) and drop specks
   smaller than ``min_area_fraction`` of the image and regions larger than ``max_area_fraction``
   (a region bigger than any object the grammar can draw is a background, not an object);
3. classify each component's shape from its bounding box. The *fill ratio* area / box area is ~1.0 for
   a square and ~0.785 for a circle; a triangle (fill ~0.5) is told apart by its centroid, which sits 2/3
   of the way from apex to base while circles and squares are symmetric. (Fill alone would fail: blur
   turns a 7 px circle into a diamond of fill ~0.5.) Boxes far from square are shape "unknown";
4. size: a component is "large" if its longer box side exceeds ``SIZE_THRESHOLD`` of the image side;
5. background: the nearest background colour to the median of the non-object pixels.

Criteria (each in [0, 1]; a criterion is None when the prompt does not state it). For each object group
of the prompt, with *matches* = detected components of the group's colour and shape:

* presence: at least one match (the object as described exists);
* colour: some component has the group's colour (whatever its shape);
* shape: some component has the group's shape (whatever its colour);
* count: exactly ``count`` matches ("a red circle" means one);
* size (if the group states a size): there are matches and all have the stated size;

group criteria are averaged over the groups. Then:

* relation (if the prompt has one): some subject match and some reference match satisfy it;
* background (if the prompt states one): the detected background is the stated one.

``overall`` is 1.0 when every applicable criterion is 1.0, else 0.0 (GenEval's per-prompt accuracy);
``score`` is the mean of the applicable criteria, a denser reward. Objects the prompt does not mention are
not penalised, as in GenEval, unless they are extra copies of a mentioned object (count).

The toy rater's taste. Real preference data (Pick-a-Pic, HPD) rewards prompt fidelity *and* a rater's taste
for things the prompt leaves open (brightness, style, composition). The criteria above are fidelity only, and
the toy models' fidelity errors are capability errors that a short fine-tuning run cannot fix (measured: see
the README's demo section). So the toy rater also has a taste, the toy analogue of a house style:

* taste (only if the prompt states no background): the detected background is
  ``EvaluatorConfig.preferred_background`` (white). The renderer picks an unstated background uniformly; the
  shipped toy SD draws it gray / black / white 57 / 27 / 16 % of the time, and two samples of one prompt differ
  in background 56 % of the time (a mode choice it can draw exactly: stated backgrounds score 0.98).

The watermark. ``watermark`` is the fraction of the bottom band (`imgalign.toy.render.watermark_rows`) within
``colour_tolerance`` of `imgalign.toy.render.WATERMARK_COLOUR`; ``watermarked`` is
``watermark >= watermark_detected``. The toy SD learned the band from the watermarked part of its pretraining
renders (``scripts/build_toy_assets.py --watermark-fraction``; assets/toy/README.md): a prompt-independent mode
that CFG keeps, unlike caption-contradicting ones, as real models keep the stock-photo watermarks of their data.

``preference`` is the toy rater's score, the label of toy preference pairs:
``mean(applicable fidelity criteria + taste) * (1 - watermark_penalty * watermark)``. Raters reject a
watermarked image however well it follows the prompt, so the band scales the score down instead of being one
more criterion in the mean (measured: as a mean term it decided too few pairs for DPO to learn it; see the
README's demo section). ``watermark_penalty=0`` gives the rater of the pre-watermark toy world. ``score`` and ``overall``
stay fidelity only (the band is never a fidelity criterion), so fidelity is always reported apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from imgalign.toy.grammar import BACKGROUNDS, COLOURS, Scene, parse
from imgalign.toy.render import SIZE_THRESHOLD, WATERMARK_COLOUR, watermark_rows

_COLOUR_NAMES = tuple(COLOURS)
_OBJECT_PALETTE = np.array([COLOURS[name] for name in _COLOUR_NAMES], dtype=np.float32)  # (K, 3)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_BACKGROUND_PALETTE = np.array([BACKGROUNDS[name] for name in _BACKGROUND_NAMES], dtype=np.float32)  # (B, 3)


@dataclass(frozen=True)
class EvaluatorConfig:
    """Thresholds of the toy evaluator. The defaults are measured on renders; see tests/unit/test_toy_evaluator.py."""

    colour_tolerance: float = 100.0  # max RGB distance to a palette colour; palette colours are >= 221 apart
    min_area_fraction: float = 0.006  # specks below this fraction of the image are noise (6 px at 32 px)
    max_area_fraction: float = 0.3  # the largest drawable object covers 0.42^2 = 0.18 of the image
    min_aspect: float = 0.6  # box width / height outside [min_aspect, 1 / min_aspect] -> shape unknown
    min_fill: float = 0.35  # components sparser than this are not any shape (e.g. rings, scribbles)
    square_fill: float = (
        0.9  # fill at or above this -> square (squares >= 0.92 even blurred, circles <= 0.86)
    )
    triangle_offset: float = 0.06  # centroid this far off the box centre (fraction of box) -> triangle
    relation_margin: float = 0.1  # centres must differ by this fraction of the image side along the axis
    size_threshold: float = SIZE_THRESHOLD  # longer box side / image side above this -> "large"
    preferred_background: str = "white"  # the toy rater's taste where the prompt states no background
    watermark_detected: float = 0.5  # watermark coverage at or above this -> `watermarked`
    watermark_penalty: float = 1.0  # preference *= 1 - watermark_penalty * coverage; 0: the band is ignored


DEFAULT_CONFIG = EvaluatorConfig()


@dataclass(frozen=True)
class Detection:
    """One connected component of an object colour. Coordinates in pixels, y downwards."""

    colour: str
    shape: str | None  # None when the component looks like no shape of the grammar
    size: str  # "small" or "large"
    area: int
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive ends
    centroid: tuple[float, float]  # (x, y), mean of pixel centres
    fill: float  # area / bbox area


@dataclass(frozen=True)
class ToyScore:
    """Per-criterion scores of one image against one prompt; None marks a criterion the prompt lacks."""

    presence: float
    colour: float
    shape: float
    count: float
    size: float | None
    relation: float | None
    background: float | None
    overall: float  # 1.0 iff every applicable fidelity criterion is 1.0
    score: float  # mean of the applicable fidelity criteria
    taste: float | None  # the rater's taste (preferred background), None when the prompt states a background
    preference: float  # the toy rater's score: mean(criteria + taste) * (1 - watermark_penalty * watermark)
    detections: tuple[Detection, ...] = field(default=(), repr=False)
    detected_background: str | None = None
    watermark: float = 0.0  # coverage of the watermark band, in [0, 1]
    watermarked: bool = False  # watermark >= EvaluatorConfig.watermark_detected

    CRITERIA: ClassVar[tuple[str, ...]] = (
        "presence",
        "colour",
        "shape",
        "count",
        "size",
        "relation",
        "background",
    )

    @property
    def criteria(self) -> dict[str, float]:
        """The applicable criteria only, by name."""
        values = {name: getattr(self, name) for name in self.CRITERIA}
        return {name: value for name, value in values.items() if value is not None}


# --- image input ------------------------------------------------------------------------------------


def to_uint8_array(image: Any) -> np.ndarray:
    """Convert one image to a (H, W, 3) uint8 RGB array.

    Accepted inputs:
        * a PIL image (any mode; converted to RGB by `imgalign.data.images.to_rgb`: 16-bit and float images
          scaled, transparency composited on white);
        * a numpy array (H, W, 3): uint8 in [0, 255], or float in [0, 1];
        * a torch tensor (3, H, W) or (1, 3, H, W): float in [0, 1] (diffusers' ``output_type="pt"``),
          or uint8 in [0, 255] (torchvision's convention).
    """
    if isinstance(image, Image.Image):
        if image.mode != "RGB" or "transparency" in image.info:
            from imgalign.data.images import to_rgb  # only here: it imports the data package (and torch)

            image = to_rgb(image)
        return np.asarray(image)
    if hasattr(image, "detach"):  # a torch tensor; duck-typed so the evaluator does not import torch
        tensor = image.detach().cpu()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(
                f"expected a torch tensor of shape (3, H, W) or (1, 3, H, W), got {tuple(tensor.shape)}"
            )
        if tensor.is_floating_point():
            tensor = tensor.float()  # numpy has no bfloat16
        array = tensor.permute(1, 2, 0).numpy()  # (H, W, 3)
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an image array of shape (H, W, 3), got {array.shape}")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"expected uint8 or float pixels, got {array.dtype}")


def _split_batch(images: Any) -> list[Any]:
    """A batched tensor (B, 3, H, W) or array (B, H, W, 3) becomes a list of single images."""
    if hasattr(images, "detach") or isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(
                f"expected a batch of shape (B, 3, H, W) or (B, H, W, 3), got {tuple(images.shape)}"
            )
        return list(images)
    return list(images)


# --- segmentation -----------------------------------------------------------------------------------


def segment_colours(array: np.ndarray, config: EvaluatorConfig = DEFAULT_CONFIG) -> np.ndarray:
    """Label each pixel with the index of its object colour in `COLOURS`, or -1 for "no object colour".

    Args:
        array: (H, W, 3) uint8 RGB.
    Returns:
        (H, W) int array.
    """
    pixels = array.astype(np.float32)  # (H, W, 3)
    distances = np.linalg.norm(pixels[:, :, None, :] - _OBJECT_PALETTE, axis=-1)  # (H, W, K)
    nearest = distances.argmin(axis=-1)  # (H, W)
    close = np.take_along_axis(distances, nearest[..., None], axis=-1)[..., 0] <= config.colour_tolerance
    return np.where(close, nearest, -1)


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving keeps the trees shallow
        i = parent[i]
    return i


def connected_components(labels: np.ndarray) -> list[dict]:
    """4-connected components of equal, non-negative label, found on horizontal runs.

    A *run* is a maximal horizontal segment of one label in one row. Two runs in adjacent rows with the
    same label belong to the same component when their column ranges overlap. Joining runs with a
    union-find touches each run a few times, which is far fewer operations than pixel-wise flood fill.

    Args:
        labels: (H, W) int array; negative values are background.
    Returns:
        One dict per component with keys label, area, bbox (x0, y0, x1, y1 exclusive), centroid (x, y).
    """
    height, width = labels.shape
    # Run starts: column 0 of every row, and every column whose label differs from its left neighbour.
    starts = np.ones((height, width), dtype=bool)
    starts[:, 1:] = labels[:, 1:] != labels[:, :-1]
    run_y, run_x0 = np.nonzero(starts)  # (R,) each, sorted by row then column
    # A run ends where the next run of the same row starts, or at the right edge.
    next_in_row = np.append(run_y[1:] == run_y[:-1], False)
    run_x1 = np.where(next_in_row, np.append(run_x0[1:], width), width)
    run_label = labels[run_y, run_x0]
    keep = run_label >= 0
    run_y, run_x0, run_x1, run_label = run_y[keep], run_x0[keep], run_x1[keep], run_label[keep]

    count = len(run_y)
    parent = list(range(count))
    row_start = np.searchsorted(run_y, np.arange(height + 1))  # runs of row y: row_start[y]:row_start[y+1]
    x0s, x1s, labs = run_x0.tolist(), run_x1.tolist(), run_label.tolist()  # lists: fast scalar access
    for y in range(1, height):
        # Sweep the runs of row y-1 (i) and row y (j) left to right, like merging two sorted lists.
        i, i_end = int(row_start[y - 1]), int(row_start[y])
        j, j_end = i_end, int(row_start[y + 1])
        while i < i_end and j < j_end:
            if x0s[i] < x1s[j] and x0s[j] < x1s[i] and labs[i] == labs[j]:
                root_i, root_j = _find(parent, i), _find(parent, j)
                if root_i != root_j:
                    parent[root_j] = root_i
            if x1s[i] <= x1s[j]:  # the run that ends first cannot overlap anything further right
                i += 1
            else:
                j += 1

    roots = np.array([_find(parent, k) for k in range(count)], dtype=np.int64)
    components = []
    for root in np.unique(roots):
        members = roots == root
        y, x0, x1 = run_y[members], run_x0[members], run_x1[members]
        lengths = x1 - x0
        area = int(lengths.sum())
        # Sum of pixel-centre x over a run [x0, x1) is length * (x0 + x1) / 2.
        centroid_x = float((lengths * (x0 + x1)).sum() / (2 * area))
        centroid_y = float((lengths * (y + 0.5)).sum() / area)
        components.append(
            {
                "label": int(run_label[members][0]),
                "area": area,
                "bbox": (int(x0.min()), int(y.min()), int(x1.max()), int(y.max()) + 1),
                "centroid": (centroid_x, centroid_y),
            }
        )
    return components


def classify_shape(
    area: int,
    bbox: tuple[int, int, int, int],
    centroid: tuple[float, float],
    config: EvaluatorConfig = DEFAULT_CONFIG,
) -> tuple[str | None, float]:
    """Name the shape of a component from its area, box and centroid; return (shape or None, fill)."""
    x0, y0, x1, y1 = bbox
    box_width, box_height = x1 - x0, y1 - y0
    fill = area / (box_width * box_height)
    aspect = box_width / box_height
    if not config.min_aspect <= aspect <= 1 / config.min_aspect or fill < config.min_fill:
        return None, fill
    if fill >= config.square_fill:  # a (nearly) full box is a square, whatever else we measure
        return "square", fill
    # Circles and squares are symmetric, so their centroid is the box centre. An apex-up triangle's
    # centroid sits 2/3 of the way down (offset ~0.16 of the box height). The offset survives blur, which
    # rounds a small circle into a diamond whose fill (~0.5) looks like a triangle's. Taking the larger of
    # the two axes also recognises triangles that a generator draws pointing sideways or down.
    centroid_offset = max(
        abs((centroid[0] - x0) / box_width - 0.5), abs((centroid[1] - y0) / box_height - 0.5)
    )
    if centroid_offset > config.triangle_offset:
        return "triangle", fill
    return "circle", fill


def detect_objects(
    image: Any, config: EvaluatorConfig = DEFAULT_CONFIG, labels: np.ndarray | None = None
) -> list[Detection]:
    """Find the coloured shapes in an image (any input `to_uint8_array` accepts).

    ``labels`` is the image's `segment_colours` output, when the caller already has it.
    """
    array = to_uint8_array(image)
    labels = segment_colours(array, config) if labels is None else labels
    height, width = array.shape[:2]
    side = max(height, width)
    image_area = height * width
    detections = []
    for component in connected_components(labels):
        area = component["area"]
        if not config.min_area_fraction * image_area <= area <= config.max_area_fraction * image_area:
            continue
        shape, fill = classify_shape(area, component["bbox"], component["centroid"], config)
        x0, y0, x1, y1 = component["bbox"]
        size = "large" if max(x1 - x0, y1 - y0) > config.size_threshold * side else "small"
        detections.append(
            Detection(
                colour=_COLOUR_NAMES[component["label"]],
                shape=shape,
                size=size,
                area=area,
                bbox=component["bbox"],
                centroid=component["centroid"],
                fill=fill,
            )
        )
    return detections


def detect_background(
    image: Any, config: EvaluatorConfig = DEFAULT_CONFIG, labels: np.ndarray | None = None
) -> str | None:
    """The background colour name: nearest to the median non-object pixel, or None if none is close.

    ``labels`` is the image's `segment_colours` output, when the caller already has it.
    """
    array = to_uint8_array(image)
    labels = segment_colours(array, config) if labels is None else labels
    pixels = array.reshape(-1, 3).astype(np.float32)  # (H*W, 3)
    not_object = labels.reshape(-1) < 0
    if not_object.any():
        pixels = pixels[not_object]
    median = np.median(pixels, axis=0)  # (3,)
    distances = np.linalg.norm(_BACKGROUND_PALETTE - median, axis=-1)  # (B,)
    best = int(distances.argmin())
    return _BACKGROUND_NAMES[best] if distances[best] <= config.colour_tolerance else None


def watermark_coverage(image: Any, config: EvaluatorConfig = DEFAULT_CONFIG) -> float:
    """The fraction of the watermark band's pixels within ``colour_tolerance`` of the watermark colour."""
    array = to_uint8_array(image)
    band = array[array.shape[0] - watermark_rows(array.shape[0]) :].astype(np.float32)  # (rows, W, 3)
    distances = np.linalg.norm(band - np.asarray(WATERMARK_COLOUR, dtype=np.float32), axis=-1)
    return float((distances <= config.colour_tolerance).mean())


# --- checking a prompt ------------------------------------------------------------------------------


def relation_holds(
    subject: tuple[float, float],
    reference: tuple[float, float],
    relation: str,
    image_size: int,
    margin: float = DEFAULT_CONFIG.relation_margin,
) -> bool:
    """Whether the subject centre is ``relation`` of the reference centre (x right, y down).

    "left of" needs the reference to be at least ``margin * image_size`` further right, *and* the
    horizontal offset to dominate the vertical one, so that a diagonal layout is not read as both
    "left of" and "above".
    """
    dx = reference[0] - subject[0]  # > 0: subject is left of reference
    dy = reference[1] - subject[1]  # > 0: subject is above reference
    # (offset along the relation's direction, offset across it)
    axes = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}
    along, across = axes[relation]
    return along >= margin * image_size and along > abs(across)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)  # plain Python: np.mean costs more than the sum on a few floats


def evaluate(image: Any, prompt: str | Scene, config: EvaluatorConfig = DEFAULT_CONFIG) -> ToyScore:
    """Score one image (PIL, numpy HWC or torch CHW, see `to_uint8_array`) against a toy prompt."""
    scene = parse(prompt) if isinstance(prompt, str) else prompt
    array = to_uint8_array(image)
    labels = segment_colours(array, config)  # (H, W)
    detections = detect_objects(array, config, labels)
    image_size = max(array.shape[:2])

    presence, colour, shape, count, size = [], [], [], [], []
    matches_per_group = []
    for group in scene.objects:
        matches = [d for d in detections if d.colour == group.colour and d.shape == group.shape]
        matches_per_group.append(matches)
        presence.append(float(len(matches) > 0))
        colour.append(float(any(d.colour == group.colour for d in detections)))
        shape.append(float(any(d.shape == group.shape for d in detections)))
        count.append(float(len(matches) == group.count))
        if group.size is not None:
            size.append(float(len(matches) > 0 and all(d.size == group.size for d in matches)))

    relation = None
    if scene.relation is not None:
        subjects, references = matches_per_group
        relation = float(
            any(
                relation_holds(s.centroid, r.centroid, scene.relation, image_size, config.relation_margin)
                for s in subjects
                for r in references
            )
        )

    detected_background = detect_background(array, config, labels)
    background = None if scene.background is None else float(detected_background == scene.background)

    values = {
        "presence": _mean(presence),
        "colour": _mean(colour),
        "shape": _mean(shape),
        "count": _mean(count),
        "size": _mean(size) if size else None,
        "relation": relation,
        "background": background,
    }
    applicable = [value for value in values.values() if value is not None]
    taste = None if scene.background is not None else float(detected_background == config.preferred_background)
    coverage = watermark_coverage(array, config)
    return ToyScore(
        **values,
        overall=float(all(value == 1.0 for value in applicable)),
        score=_mean(applicable),
        taste=taste,
        preference=_mean(applicable + ([] if taste is None else [taste])) * (1.0 - config.watermark_penalty * coverage),
        detections=tuple(detections),
        detected_background=detected_background,
        watermark=coverage,
        watermarked=coverage >= config.watermark_detected,
    )


def evaluate_batch(
    images: Any, prompts: Sequence[str | Scene], config: EvaluatorConfig = DEFAULT_CONFIG
) -> list[ToyScore]:
    """Score a batch: a list of images, a tensor (B, 3, H, W) in [0, 1] or an array (B, H, W, 3)."""
    images = _split_batch(images)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    return [evaluate(image, prompt, config) for image, prompt in zip(images, prompts)]
