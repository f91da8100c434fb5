"""Check toy images of a subject exactly: subject fidelity (DreamBench's DINO) and prompt fidelity (CLIP-T).

DreamBench scores a subject-driven generator twice: DINO / CLIP-I similarity to the subject's reference
photos (is *this* subject drawn?) and CLIP-T similarity to the prompt (is the rest of the prompt met?). The
toy subjects (`imgalign.toy.subjects`) are flat-colour patterns, so both questions have exact answers, at the
toy models' 32 px as at the references' 64 px.

**Subject fidelity** (`subject_fidelity`). Every pixel is compared with the palette: the four object colours,
the three backgrounds (the cross circle's white is the white background) and the watermark colour.

1. *Foreground* is every pixel that is neither the detected background (`detect_background`) nor nearest the
   watermark colour. Blends of two colours count as foreground, so a blurred striped square stays one piece.
2. Foreground pieces of one colour are merged, smallest merged box first, while their gap is at most
   ``merge_gap`` of the merged box's side: on a white background the cross's white plus cuts it into four
   red quadrants. Every piece and every merge is a candidate region.
3. The template is the subject's own drawing (`subjects.draw_subject`): its *parts* (the pixels of each of
   its two colours: red rows and yellow rows, ring and disc, ...) and, for circles and triangles, its
   *outside*, which must be background. Each region is judged on its *core*, the pixels whose four
   neighbours lie in the same region and inside the box: blur and VAE decoding mix the boundary pixels with
   the neighbouring region (a region too thin to have a core, a 7 px square's stripes, is judged whole).
   The template is laid over each candidate at the candidate's box side +-2 px and centre +-1 px. For each
   placement and region we measure the share of the region's core within ``match_tolerance`` of each
   palette colour: a pixel halfway between two palette colours counts for both, a pure wrong colour never
   does (palette colours are >= 221 apart).
4. From those shares:

   * ``pattern``, the colour-agnostic layout: the parts' dominant colours differ, and it is the least of each
     part's dominant share and the outside's background share; 0 when two parts share their dominant colour
     (a plain object) or a part is only background (missing);
   * ``colours``, the references' colours: the mean over the parts of the share of the part's own colour;
   * ``score = pattern * colours``, and ``detected = score >= SubjectCheckConfig.detected``.

   Within a candidate the placement with the best (pattern, colours) wins: the layout registers the template,
   then the colours are read there (so a striped square with its colours swapped reads as swapped, not as the
   subject shifted by a stripe). Across candidates the best score wins.

Measured on renders (tests/unit/test_toy_subject_check.py): the subject is detected on every render at 32
and 64 px, clean or blurred and noisy; a plain object of its class scores 0.0 (pattern 0), an empty image
0.0, the other subjects at most 0.24 on average and 0.38 on single images (never detected); the subject
with one of its two colours repainted in a new colour 0.5 (layout kept, half the colours). Through the toy
SD's VAE (encode, decode) the ringed circle, two-tone triangle and checker square stay detected (0.9, 0.9
and 1.0 of 32 px references), the striped square and cross circle mostly do not (0.1, 0.33): that VAE,
trained on plain shapes, decodes the stripes as orange and the white plus as background.

**Prompt fidelity** (`prompt_fidelity`). A subject prompt is a toy-grammar prompt (`imgalign.toy.grammar`)
in which one group reads ``a [small|large] [COLOUR] <token> <class>`` (`parse_subject_prompt`). The subject
is the region where the subject's layout is found (``pattern >= detected``: the subject, possibly
recoloured). Otherwise a *stand-in* takes its place, as CLIP-T would accept any object of the class ("a sks
square" is a square): the largest object of the class, among the evaluator's detections (`detect_objects`)
and the single foreground pieces whose shape (`classify_shape`) is the class, preferring one that is not
itself a copy of another group of the prompt.
Then, with the evaluator's machinery:

* ``subject``: the subject or a stand-in is present;
* ``size`` (if stated, for the subject or another group): the evaluator's small / large cut on the box;
* ``colour`` (a recolouring, if stated): see below;
* ``background`` (if stated): `detect_background` is the stated one;
* ``presence`` / ``count`` (if the prompt has another group): as in `evaluate`, over the `detect_objects`
  detections outside the subject's box (a checker square's blue quadrant is not "a blue square");
* ``relation`` (if stated): `relation_holds` between the subject's centroid and some match of the other group.

``score`` is the mean of the applicable criteria, ``passed`` whether all of them are 1.

**Recolouring** ("a red sks square"). A patterned subject has no single colour, and its pixel shares cannot
decide one: a striped square is 43 to 75 % red at 7 to 9 px, depending on where its stripes fall on the
pixel grid. So recolouring is defined on the subject's design. Its *main* parts are those with the largest
area in the continuous design (`main_part_colours`): the striped square's red stripes (3 of 5), the ringed
circle's yellow ring (64 %), the cross circle's red disc (55 %), both halves of the two-tone triangle and
both colours of the checker square (50 % each). "a C sks class" is met when a main part is drawn in C (for
a stand-in: when its dominant colour is C). So "a red sks square" is already met by the striped square,
"a yellow sks square" asks for its red stripes in yellow (and its yellow ones in red, to keep two
colours), and "a red sks circle" asks the ringed circle for a red ring.

This is the trade-off subject-driven methods face, made exact. The unchanged subject keeps fidelity 1 but
fails a recolouring it does not already meet. The subject with its main part repainted (`recolour_subject`,
what `render_subject_scene` draws) meets it and keeps the layout (``pattern`` 1) at fidelity 0.5 when C is
new to the subject, 0 when C is its other colour (the two colours swap). A plain object of colour C meets
it at fidelity 0 (``pattern`` 0). Only the unchanged subject is ``detected``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from imgalign.toy.evaluator import (
    DEFAULT_CONFIG,
    Detection,
    EvaluatorConfig,
    _split_batch,
    classify_shape,
    connected_components,
    detect_background,
    detect_objects,
    relation_holds,
    to_uint8_array,
)
from imgalign.toy.grammar import BACKGROUNDS, COLOURS, SHAPES, SIZES, ObjectSpec, Scene, parse
from imgalign.toy.render import WATERMARK_COLOUR, render
from imgalign.toy.subjects import SUBJECTS, draw_subject

#: The palette the subject check compares pixels with: object colours first (so their indices are the
#: evaluator's colour labels), then backgrounds (the cross circle's white is the white background), then
#: the watermark.
PALETTE_NAMES: tuple[str, ...] = (*COLOURS, *BACKGROUNDS, "watermark")
_PALETTE = np.array([*COLOURS.values(), *BACKGROUNDS.values(), WATERMARK_COLOUR], dtype=np.float32)  # (K, 3)
_N_OBJECT_COLOURS = len(COLOURS)
_WATERMARK = PALETTE_NAMES.index("watermark")
_COUNT_WORDS = ("a", "an", "one")
_PAD = 4


@dataclass(frozen=True)
class SubjectCheckConfig:
    """Thresholds of the subject check; the evaluator's own thresholds sit in ``evaluator``."""

    evaluator: EvaluatorConfig = DEFAULT_CONFIG
    match_tolerance: float = 130.0  # soft match radius: blends of two palette colours count for both
    min_piece_fraction: float = 0.002  # foreground pieces below this fraction of the image are specks
    max_piece_fraction: float = 0.6  # pieces above it are background the colour test missed
    min_side: int = 5  # candidate boxes shorter than this (px) cannot show a pattern
    merge_gap: float = 0.3  # merge pieces whose box gap <= this fraction of the merged box side
    detected: float = 0.7  # fidelity score at or above this -> the subject is detected
    max_pieces: int = 12  # keep the largest pieces only, so a noisy image stays fast


DEFAULT_SUBJECT_CONFIG = SubjectCheckConfig()


# --- templates --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
    """The subject drawn in a side x side box, split into regions: its colour parts, then its outside."""

    regions: np.ndarray  # (R, side, side) float32 0/1 masks; the last one is the outside when has_outside
    sizes: np.ndarray  # (R,) pixels per region
    part_colours: tuple[int, ...]  # palette index of each part
    has_outside: bool


def _palette_index(rgb: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour of each RGB triple: (..., 3) -> (...)."""
    return np.linalg.norm(rgb.astype(np.float32)[..., None, :] - _PALETTE, axis=-1).argmin(axis=-1)


@cache
def _subject_parts(subject: str) -> tuple[int, ...]:
    """Palette indices of the subject's colours, in a fixed order (the template's part order)."""
    rgb, mask = draw_subject(subject, 64)
    return tuple(sorted(int(k) for k in np.unique(_palette_index(rgb[mask]))))


def _core(region: np.ndarray, keep: float = 0.25) -> np.ndarray:
    """The region without its boundary pixels (4-neighbours outside the region or outside the box), which
    blur and VAE decoding mix with the neighbouring part; the whole region if its core would hold fewer
    than ``keep`` of its pixels (thin stripes at small sizes)."""
    padded = np.pad(region, 1, constant_values=False)
    core = region & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return core if core.sum() >= keep * region.sum() else region


@cache
def _template(subject: str, side: int) -> _Template | None:
    """The subject's template at ``side`` px, or None if a part vanishes at this size."""
    rgb, mask = draw_subject(subject, side)
    index = _palette_index(rgb)  # (side, side)
    parts = _subject_parts(subject)
    regions = [(index == k) & mask for k in parts]
    has_outside = not mask.all()
    if has_outside:
        regions.append(~mask)
    regions = [_core(region) for region in regions]
    stacked = np.stack(regions).astype(np.float32)  # (R, side, side)
    sizes = stacked.sum(axis=(1, 2))
    if (sizes == 0).any():
        return None
    return _Template(stacked, sizes, parts, has_outside)


@cache
def main_part_colours(subject: str) -> tuple[str, ...]:
    """The colours of the subject's main parts: those with the largest area in the continuous design.

    Measured on a 400 px drawing; parts within 2 % of the largest count as main (the two-tone triangle's and
    the checker square's halves are equal). A recolouring prompt "a C sks class" asks for C here.
    """
    rgb, mask = draw_subject(subject, 400)
    shares = {
        k: float((rgb[mask] == _PALETTE[k].astype(np.uint8)).all(axis=-1).mean())
        for k in _subject_parts(subject)
    }
    largest = max(shares.values())
    return tuple(PALETTE_NAMES[k] for k, share in shares.items() if share >= largest - 0.02)


def recolour_subject(subject: str, colour: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The subject with its main part repainted ``colour``: (RGB uint8 [side, side, 3], bool mask).

    This is what "a ``colour`` sks class" asks for (see the module docstring). If ``colour`` is already a
    main colour the subject is returned unchanged; if it is the colour of another part, the two parts swap
    colours, so the pattern keeps two distinct colours.
    """
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {sorted(COLOURS)}")
    rgb, mask = draw_subject(subject, side)
    main = main_part_colours(subject)
    if colour in main:
        return rgb, mask
    old = _PALETTE[PALETTE_NAMES.index(main[0])].astype(np.uint8)
    new = np.array(COLOURS[colour], dtype=np.uint8)
    was_old, was_new = (rgb == old).all(axis=-1) & mask, (rgb == new).all(axis=-1) & mask
    rgb = rgb.copy()
    rgb[was_old], rgb[was_new] = new, old
    return rgb, mask


# --- image analysis ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """A candidate region: one foreground component, or a merge of several."""

    area: int
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive ends
    centroid: tuple[float, float]  # (x, y)
    single: bool  # one connected component (not a merge)
    colour: int = -1  # palette index of the most common labelled colour in the box (-1: none)


@dataclass(frozen=True)
class _Analysis:
    """What every check needs from one image, computed once."""

    array: np.ndarray  # (H, W, 3) uint8
    # (H + 2 * _PAD, W + 2 * _PAD, K) float32: 1 where the pixel is within match_tolerance of palette
    # colour k; the _PAD border is background, so a template may overhang the image's edge.
    within: np.ndarray
    object_labels: np.ndarray  # (H, W) evaluator labels: object colour index or -1
    background: str | None  # the evaluator's detected background (None if no background colour is close)
    background_index: int  # palette index of the detected, or else the nearest, background
    pieces: tuple[_Piece, ...]


def _merge_boxes(a: _Piece, b: _Piece) -> _Piece:
    area = a.area + b.area
    centroid = tuple((a.area * ca + b.area * cb) / area for ca, cb in zip(a.centroid, b.centroid))
    bbox = (
        min(a.bbox[0], b.bbox[0]),
        min(a.bbox[1], b.bbox[1]),
        max(a.bbox[2], b.bbox[2]),
        max(a.bbox[3], b.bbox[3]),
    )
    return _Piece(area, bbox, centroid, single=False, colour=a.colour)


def _gap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Chebyshev gap in pixels between two boxes (0 when they touch or overlap)."""
    return max(0, b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _candidate_pieces(pieces: list[_Piece], merge_gap: float) -> list[_Piece]:
    """The pieces plus every merge of an agglomerative clustering of same-coloured pieces: the pair with
    the smallest merged box first, while the two boxes' gap is at most ``merge_gap`` of its side.

    Only pieces of one colour merge, smallest union first, so the cross's red quadrants find each other
    even when another object sits closer to one of them than the width of the plus.
    """
    candidates = list(pieces)
    for colour in {p.colour for p in pieces}:
        clusters = [p for p in pieces if p.colour == colour]
        while len(clusters) > 1:
            best = None
            for i in range(len(clusters)):
                for j in range(i + 1, len(clusters)):
                    merged = _merge_boxes(clusters[i], clusters[j])
                    x0, y0, x1, y1 = merged.bbox
                    key = (max(x1 - x0, y1 - y0), _gap(clusters[i].bbox, clusters[j].bbox))
                    if key[1] <= merge_gap * key[0] and (best is None or key < best[0]):
                        best = (key, i, j, merged)
            if best is None:
                break
            _, i, j, merged = best
            clusters = [c for k, c in enumerate(clusters) if k not in (i, j)] + [merged]
            candidates.append(merged)
    return candidates


def _analyse(image: Any, config: SubjectCheckConfig) -> _Analysis:
    array = to_uint8_array(image)
    height, width = array.shape[:2]
    distances = np.linalg.norm(array.astype(np.float32)[:, :, None, :] - _PALETTE, axis=-1)  # (H, W, K)
    nearest = distances.argmin(axis=-1)  # (H, W)
    close = (
        np.take_along_axis(distances, nearest[..., None], axis=-1)[..., 0]
        <= config.evaluator.colour_tolerance
    )
    labels = np.where(close, nearest, -1)  # (H, W) palette index or -1
    # Palette colours are >= 221 apart, so a pixel within the tolerance (100) of an object colour is nearest
    # to it among all palette colours: these are exactly `segment_colours`' labels.
    object_labels = np.where(labels < _N_OBJECT_COLOURS, labels, -1)
    background = detect_background(array, config.evaluator, object_labels)
    if background is None:  # no background is close: take the nearest to the median non-object pixel
        pixels = array[object_labels < 0] if (object_labels < 0).any() else array.reshape(-1, 3)
        median = np.median(pixels.astype(np.float32), axis=0)
        names = tuple(BACKGROUNDS)
        distance = [np.linalg.norm(median - np.asarray(BACKGROUNDS[n], np.float32)) for n in names]
        background_index = PALETTE_NAMES.index(names[int(np.argmin(distance))])
    else:
        background_index = PALETTE_NAMES.index(background)

    # Blends (-1) are foreground, so that a blurred pattern stays one piece; anything nearest the watermark
    # colour is not (a faint, partly drawn band is far from every palette colour but still the band).
    foreground = (labels != background_index) & (nearest != _WATERMARK)
    components = connected_components(np.where(foreground, 0, -1))
    image_area = height * width
    low, high = max(2.0, config.min_piece_fraction * image_area), config.max_piece_fraction * image_area
    components = [c for c in components if low <= c["area"] <= high]
    components = sorted(components, key=lambda c: -c["area"])[: config.max_pieces]
    pieces = []
    for c in components:
        x0, y0, x1, y1 = c["bbox"]
        box = labels[y0:y1, x0:x1]
        box = box[(box >= 0) & (box != background_index)]
        colour = int(np.bincount(box).argmax()) if box.size else -1
        pieces.append(_Piece(c["area"], c["bbox"], c["centroid"], single=True, colour=colour))
    within = np.zeros((height + 2 * _PAD, width + 2 * _PAD, len(_PALETTE)), dtype=np.float32)
    within[..., background_index] = 1.0
    within[_PAD:-_PAD, _PAD:-_PAD] = distances <= config.match_tolerance
    return _Analysis(
        array=array,
        within=within,
        object_labels=object_labels,
        background=background,
        background_index=background_index,
        pieces=tuple(_candidate_pieces(pieces, config.merge_gap)),
    )


# --- subject fidelity -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectFidelity:
    """How well the subject's pattern is drawn, at the best-matching region of the image."""

    score: float  # pattern * colours, in [0, 1]
    detected: bool  # score >= SubjectCheckConfig.detected
    pattern: float  # colour-agnostic layout: distinct, uniform parts and a background outside
    colours: float  # mean over the parts of the share drawn in the references' colour
    part_colours: tuple[str, ...] = ()  # the drawn colour of each part (palette names), template part order
    bbox: tuple[int, int, int, int] | None = None  # the region's box (x0, y0, x1, y1), None without a region
    centroid: tuple[float, float] | None = None  # the region's foreground centroid (x, y)


@dataclass(frozen=True)
class _Match:
    score: float
    pattern: float
    colours: float
    part_colours: tuple[int, ...]


#: The 3 x 3 placements around the centred one, centred first so that it wins ties.
_SHIFTS = [(1, 1)] + [(a, b) for a in range(3) for b in range(3) if (a, b) != (1, 1)]


def _pattern_and_colours(
    shares: np.ndarray, template: _Template, background: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per placement: (pattern, colours, dominant palette index of each part).

    Args:
        shares: (..., R, K) share of each template region's pixels within tolerance of palette colour k.
    Returns:
        pattern (...), colours (...), dominant (..., P).
    """
    n_parts = len(template.part_colours)
    part_shares = shares[..., :n_parts, :].copy()  # (..., P, K)
    # A part "drawn" in the background colour is missing, unless the background is its own colour
    # (the cross's white plus on a white background).
    part_shares[..., [k != background for k in template.part_colours], background] = 0.0
    dominant = part_shares.argmax(axis=-1)  # (..., P)
    distinct = (np.diff(np.sort(dominant, axis=-1), axis=-1) != 0).all(axis=-1)  # (...)
    uniform = part_shares.max(axis=-1).min(axis=-1)  # (...) the least uniform part
    if template.has_outside:
        uniform = np.minimum(uniform, shares[..., -1, background])
    pattern = uniform * distinct
    colours = part_shares[..., np.arange(n_parts), list(template.part_colours)].mean(axis=-1)
    return pattern, colours, dominant


def _match_piece(
    analysis: _Analysis, piece: _Piece, subject: str, config: SubjectCheckConfig
) -> _Match | None:
    """The best template placement over one candidate region, by (pattern, colours): the layout registers
    the template, the colours are read there. None if the region cannot hold the pattern."""
    x0, y0, x1, y1 = piece.bbox
    width, height = x1 - x0, y1 - y0
    longest = max(width, height)
    if (
        longest < config.min_side
        or not config.evaluator.min_aspect <= width / height <= 1 / config.evaluator.min_aspect
    ):
        return None
    within = analysis.within  # padded by _PAD on every side
    cx, cy = (x0 + x1) / 2 + _PAD, (y0 + y1) / 2 + _PAD  # box centre in padded coordinates
    best: tuple[tuple[float, float], _Match] | None = None
    for side in (longest, longest - 1, longest + 1, longest - 2, longest + 2):  # nominal first: it wins ties
        template = _template(subject, side) if side >= config.min_side else None
        # The template's top-left corner goes to round(centre - side / 2) + {-1, 0, 1} on each axis.
        left, top = int(round(cx - side / 2)) - 1, int(round(cy - side / 2)) - 1
        fits = (
            0 <= left
            and 0 <= top
            and left + side + 2 <= within.shape[1]
            and top + side + 2 <= within.shape[0]
        )
        if template is None or not fits:
            continue
        crop = within[top : top + side + 2, left : left + side + 2]  # (side + 2, side + 2, K)
        windows = np.lib.stride_tricks.sliding_window_view(crop, (side, side), axis=(0, 1))  # (3, 3, K, s, s)
        shares = (
            np.einsum("abkyx,ryx->abrk", windows, template.regions) / template.sizes[:, None]
        )  # (3, 3, R, K)
        pattern, colours, dominant = _pattern_and_colours(shares, template, analysis.background_index)
        for a, b in _SHIFTS:
            key = (float(pattern[a, b]), float(colours[a, b]))
            if best is None or key > best[0]:
                part_colours = tuple(int(k) for k in dominant[a, b])
                best = (key, _Match(key[0] * key[1], key[0], key[1], part_colours))
    return None if best is None else best[1]


def _fidelity(
    analysis: _Analysis, subject: str, config: SubjectCheckConfig
) -> tuple[SubjectFidelity, _Piece | None]:
    """Subject fidelity at the best candidate (by score, pattern, colours, area), and that candidate."""
    best: tuple[tuple[float, float, float, int], _Piece, _Match] | None = None
    for piece in analysis.pieces:
        match = _match_piece(analysis, piece, subject, config)
        if match is not None:
            key = (match.score, match.pattern, match.colours, piece.area)
            if best is None or key > best[0]:
                best = (key, piece, match)
    if best is None:
        return SubjectFidelity(score=0.0, detected=False, pattern=0.0, colours=0.0), None
    _, piece, match = best
    fidelity = SubjectFidelity(
        score=match.score,
        detected=match.score >= config.detected,
        pattern=match.pattern,
        colours=match.colours,
        part_colours=tuple(PALETTE_NAMES[k] for k in match.part_colours),
        bbox=piece.bbox,
        centroid=piece.centroid,
    )
    return fidelity, piece


def _check_subject(subject: str) -> None:
    if subject not in SUBJECTS:
        raise ValueError(f"unknown toy subject {subject!r}; expected one of {list(SUBJECTS)}")


def subject_fidelity(
    image: Any, subject: str, config: SubjectCheckConfig = DEFAULT_SUBJECT_CONFIG
) -> SubjectFidelity:
    """Is the subject's pattern drawn? Any input `to_uint8_array` accepts, any size from 32 px up."""
    _check_subject(subject)
    return _fidelity(_analyse(image, config), subject, config)[0]


# --- subject prompts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectPrompt:
    """A parsed subject prompt. ``scene`` is the grammar scene with the subject group replaced by a
    stand-in group of the subject's class (``scene.objects[subject_index]``, in some colour that keeps the
    groups distinct); ``others`` are the remaining groups."""

    text: str
    subject_class: str
    size: str | None  # stated subject size
    colour: str | None  # stated recolouring
    scene: Scene
    subject_index: int  # 0: "a sks square left of ...", 1: "... left of a sks square"

    @property
    def others(self) -> tuple[ObjectSpec, ...]:
        return tuple(g for i, g in enumerate(self.scene.objects) if i != self.subject_index)

    @property
    def relation(self) -> str | None:
        return self.scene.relation

    @property
    def background(self) -> str | None:
        return self.scene.background


def parse_subject_prompt(prompt: str, token: str = "sks") -> SubjectPrompt:
    """Parse a toy prompt in which one group is ``a [SIZE] [COLOUR] <token> <class>``.

    The rest must follow the toy grammar (`imgalign.toy.grammar`): "a sks square left of a red circle on a
    gray background". Raises ValueError naming the prompt and what is wrong.
    """
    words = prompt.strip().rstrip(".").lower().split()
    token = token.lower()
    if words.count(token) != 1:
        raise ValueError(f"subject prompt {prompt!r} must contain the identifier {token!r} exactly once")
    at = words.index(token)
    subject_class = words[at + 1] if at + 1 < len(words) else None
    if subject_class not in SHAPES:
        raise ValueError(
            f"in subject prompt {prompt!r} the identifier {token!r} must be followed by a class "
            f"({list(SHAPES)}), got {subject_class!r}"
        )
    # Walk back from the token over the optional colour and size to the count word that starts the group.
    start, colour, size = at, None, None
    if start > 0 and words[start - 1] in COLOURS:
        start, colour = start - 1, words[start - 1]
    if start > 0 and words[start - 1] in SIZES:
        start, size = start - 1, words[start - 1]
    if start == 0 or words[start - 1] not in _COUNT_WORDS:
        raise ValueError(
            f"in subject prompt {prompt!r} the subject's group must read 'a [small|large] [colour] {token} "
            f"{subject_class}'"
        )
    prefix, suffix = words[: start - 1], words[at + 2 :]
    # The stand-in's colour: the stated one where the grammar allows it, else any that keeps groups distinct.
    colours = ([colour] if colour else []) + [c for c in COLOURS if c != colour]
    error: ValueError | None = None
    for stand_in in colours:
        group = ["a"] + ([size] if size else []) + [stand_in, subject_class]
        try:
            scene = parse(" ".join(prefix + group + suffix))
        except ValueError as err:
            error = error or err
            continue
        return SubjectPrompt(
            text=prompt,
            subject_class=subject_class,
            size=size,
            colour=colour,
            scene=scene,
            subject_index=0 if not prefix else 1,
        )
    raise ValueError(f"cannot parse subject prompt {prompt!r}: {error}") from None


# --- prompt fidelity --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFidelity:
    """Per-criterion checks of the prompt apart from the subject's identity; None: not stated."""

    subject: float  # the subject, or a stand-in of its class, is present
    size: float | None
    colour: float | None  # the recolouring
    background: float | None
    presence: float | None  # the other group is present (outside the subject)
    count: float | None  # the other group has exactly its count
    relation: float | None
    score: float  # mean of the applicable criteria
    passed: bool  # every applicable criterion is 1
    subject_bbox: tuple[int, int, int, int] | None = None
    subject_stand_in: bool = False  # the subject's layout was not found; a plain object of its class stood in
    detected_background: str | None = None
    detections: tuple[Detection, ...] = field(default=(), repr=False)

    CRITERIA: ClassVar[tuple[str, ...]] = (
        "subject",
        "size",
        "colour",
        "background",
        "presence",
        "count",
        "relation",
    )

    @property
    def criteria(self) -> dict[str, float]:
        """The applicable criteria only, by name."""
        values = {name: getattr(self, name) for name in self.CRITERIA}
        return {name: value for name, value in values.items() if value is not None}


def _dominant_colour(analysis: _Analysis, bbox: tuple[int, int, int, int]) -> str | None:
    """The most common object colour inside a box, or None if it holds none."""
    x0, y0, x1, y1 = bbox
    labels = analysis.object_labels[y0:y1, x0:x1]
    counts = np.bincount(labels[labels >= 0], minlength=_N_OBJECT_COLOURS)
    return PALETTE_NAMES[int(counts.argmax())] if counts.any() else None


def _stand_in(
    analysis: _Analysis, parsed: SubjectPrompt, detections: Sequence[Detection], config: SubjectCheckConfig
) -> tuple[_Piece, str | None] | None:
    """The subject's stand-in and its colour: the largest object of the subject's class, preferring one that
    is not itself a copy of another group of the prompt. Candidates are the evaluator's detections (one
    colour each) and the single foreground pieces (several colours, e.g. a subject drawn wrong), both of
    at least an evaluator object's area."""
    height, width = analysis.array.shape[:2]
    candidates = [
        (_Piece(d.area, d.bbox, d.centroid, single=True), d.colour)
        for d in detections
        if d.shape == parsed.subject_class
    ]
    for piece in analysis.pieces:
        shape, _ = classify_shape(piece.area, piece.bbox, piece.centroid, config.evaluator)
        big_enough = piece.area >= config.evaluator.min_area_fraction * height * width
        if piece.single and big_enough and shape == parsed.subject_class:
            candidates.append((piece, _dominant_colour(analysis, piece.bbox)))
    others = {(group.colour, group.shape) for group in parsed.others}
    return max(
        candidates,
        key=lambda c: ((c[1], parsed.subject_class) not in others, c[0].area),
        default=None,
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _prompt_fidelity(
    analysis: _Analysis,
    parsed: SubjectPrompt,
    subject: str,
    fidelity: SubjectFidelity,
    fidelity_piece: _Piece | None,
    config: SubjectCheckConfig,
) -> PromptFidelity:
    image_size = max(analysis.array.shape[:2])
    detections = detect_objects(analysis.array, config.evaluator, analysis.object_labels)
    if fidelity_piece is not None and fidelity.pattern >= config.detected:
        # The subject's layout is drawn (in its own colours or recoloured): that region is the subject, and
        # its colours are those of its main parts.
        piece, stand_in = fidelity_piece, False
        main = main_part_colours(subject)
        parts = [PALETTE_NAMES[k] for k in _subject_parts(subject)]  # the template's part order
        drawn = {fidelity.part_colours[i] for i, name in enumerate(parts) if name in main}
    else:
        found = _stand_in(analysis, parsed, detections, config)
        piece, stand_in = (None, False) if found is None else (found[0], True)
        drawn = set() if found is None else {found[1]}

    # Other groups: detections outside the subject's box (its own stripes and quadrants are not objects).
    if piece is not None:
        x0, y0, x1, y1 = piece.bbox
        detections = [
            d
            for d in detections
            if not (x0 - 1 <= d.centroid[0] <= x1 + 1 and y0 - 1 <= d.centroid[1] <= y1 + 1)
        ]

    sizes: list[float] = []
    if parsed.size is not None:
        large = piece is not None and max(piece.bbox[2] - piece.bbox[0], piece.bbox[3] - piece.bbox[1]) > (
            config.evaluator.size_threshold * image_size
        )
        sizes.append(float(piece is not None and large == (parsed.size == "large")))
    presence, count, matches_per_group = [], [], []
    for group in parsed.others:
        matches = [d for d in detections if d.colour == group.colour and d.shape == group.shape]
        matches_per_group.append(matches)
        presence.append(float(len(matches) > 0))
        count.append(float(len(matches) == group.count))
        if group.size is not None:
            sizes.append(float(len(matches) > 0 and all(d.size == group.size for d in matches)))

    relation = None
    if parsed.relation is not None:
        pairs = [] if piece is None else [(piece.centroid, other.centroid) for other in matches_per_group[0]]
        if parsed.subject_index == 1:  # "a red circle left of a sks square": the subject is the reference
            pairs = [(second, first) for first, second in pairs]
        relation = float(
            any(
                relation_holds(a, b, parsed.relation, image_size, config.evaluator.relation_margin)
                for a, b in pairs
            )
        )

    values = {
        "subject": float(piece is not None),
        "size": _mean(sizes) if sizes else None,
        "colour": None if parsed.colour is None else float(parsed.colour in drawn),
        "background": None if parsed.background is None else float(analysis.background == parsed.background),
        "presence": _mean(presence) if presence else None,
        "count": _mean(count) if count else None,
        "relation": relation,
    }
    applicable = [v for v in values.values() if v is not None]
    return PromptFidelity(
        **values,
        score=_mean(applicable),
        passed=all(v == 1.0 for v in applicable),
        subject_bbox=None if piece is None else piece.bbox,
        subject_stand_in=stand_in,
        detected_background=analysis.background,
        detections=tuple(detections),
    )


def prompt_fidelity(
    image: Any,
    prompt: str | SubjectPrompt,
    subject: str,
    token: str = "sks",
    config: SubjectCheckConfig = DEFAULT_SUBJECT_CONFIG,
) -> PromptFidelity:
    """Does the image meet the prompt apart from the subject's identity? See the module docstring."""
    return evaluate_subject(image, prompt, subject, token, config).prompt


# --- both, and batches ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectCheck:
    """Both DreamBench-style scores of one image."""

    fidelity: SubjectFidelity
    prompt: PromptFidelity


def _parse_for(prompt: str | SubjectPrompt, subject: str, token: str) -> SubjectPrompt:
    """Parse a prompt (if it is text) and check that it names the subject's class."""
    _check_subject(subject)
    parsed = parse_subject_prompt(prompt, token) if isinstance(prompt, str) else prompt
    if parsed.subject_class != SUBJECTS[subject]:
        raise ValueError(
            f"prompt {parsed.text!r} names class {parsed.subject_class!r} but subject {subject!r} is a "
            f"{SUBJECTS[subject]}"
        )
    return parsed


def evaluate_subject(
    image: Any,
    prompt: str | SubjectPrompt,
    subject: str,
    token: str = "sks",
    config: SubjectCheckConfig = DEFAULT_SUBJECT_CONFIG,
) -> SubjectCheck:
    """Subject fidelity and prompt fidelity of one image, sharing one segmentation."""
    parsed = _parse_for(prompt, subject, token)
    analysis = _analyse(image, config)
    fidelity, piece = _fidelity(analysis, subject, config)
    return SubjectCheck(fidelity, _prompt_fidelity(analysis, parsed, subject, fidelity, piece, config))


@dataclass
class SubjectBatchResult:
    """Per-image checks and their summary: name -> (mean, number of images where the value applies)."""

    per_image: list[SubjectCheck]
    summary: dict[str, tuple[float, int]]

    def table(self) -> str:
        lines = [f"{'metric':<20}{'mean':>8}{'n':>6}"]
        lines += [f"{name:<20}{mean:>8.3f}{n:>6}" for name, (mean, n) in self.summary.items()]
        return "\n".join(lines)


def summarise(checks: Sequence[SubjectCheck]) -> dict[str, tuple[float, int]]:
    """Means over images: fidelity (score, detected rate, pattern, colours), prompt fidelity (score, passed
    rate, each criterion over the images whose prompt states it) and ``both`` (detected and passed)."""
    columns: dict[str, list[float]] = {
        "fidelity": [c.fidelity.score for c in checks],
        "detected": [float(c.fidelity.detected) for c in checks],
        "pattern": [c.fidelity.pattern for c in checks],
        "colours": [c.fidelity.colours for c in checks],
        "prompt_fidelity": [c.prompt.score for c in checks],
        "prompt_passed": [float(c.prompt.passed) for c in checks],
        "both": [float(c.fidelity.detected and c.prompt.passed) for c in checks],
    }
    for name in PromptFidelity.CRITERIA:
        columns[f"prompt/{name}"] = [c.prompt.criteria[name] for c in checks if name in c.prompt.criteria]
    return {name: (float(np.mean(v)), len(v)) for name, v in columns.items() if v}


def evaluate_subject_batch(
    images: Any,
    prompts: Sequence[str | SubjectPrompt],
    subject: str,
    token: str = "sks",
    config: SubjectCheckConfig = DEFAULT_SUBJECT_CONFIG,
) -> SubjectBatchResult:
    """Check a batch: a list of images, a tensor (B, 3, H, W) in [0, 1] or an array (B, H, W, 3).

    Prompts are parsed once per distinct text.
    """
    images = _split_batch(images)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    parsed: dict[str, SubjectPrompt] = {}
    checks = []
    for image, prompt in zip(images, prompts):
        if isinstance(prompt, str):
            if prompt not in parsed:
                parsed[prompt] = parse_subject_prompt(prompt, token)
            prompt = parsed[prompt]
        checks.append(evaluate_subject(image, prompt, subject, token, config))
    return SubjectBatchResult(checks, summarise(checks))


# --- rendering subject scenes -----------------------------------------------------------------------


def render_subject_scene(
    prompt: str | SubjectPrompt, subject: str, rng: np.random.Generator, size: int = 32, token: str = "sks"
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Draw a scene that satisfies a subject prompt; returns (image, the subject's box (x0, y0, x1, y1)).

    The grammar's renderer lays out the scene with a plain stand-in of the subject's class (so sizes,
    relations and spacing follow `imgalign.toy.render`); the stand-in is then replaced by the subject, drawn
    by `subjects.draw_subject` in the same box, or by `recolour_subject` when the prompt recolours it.
    """
    parsed = _parse_for(prompt, subject, token)
    image, truth = render(parsed.scene, rng, size)
    canvas = np.array(image)
    (stand_in,) = [o for o in truth.objects if o.group == parsed.subject_index]
    side = stand_in.side
    # Every grammar shape spans its box's full width and reaches its bottom row, so the box's top-left is:
    x, y = stand_in.bbox[0], stand_in.bbox[3] - side
    box = canvas[y : y + side, x : x + side]
    box[np.all(box == COLOURS[stand_in.colour], axis=-1)] = BACKGROUNDS[truth.background]
    if parsed.colour is None:
        rgb, mask = draw_subject(subject, side)
    else:
        rgb, mask = recolour_subject(subject, parsed.colour, side)
    box[mask] = rgb[mask]
    return Image.fromarray(canvas), (x, y, x + side, y + side)


__all__ = [
    "DEFAULT_SUBJECT_CONFIG",
    "PALETTE_NAMES",
    "PromptFidelity",
    "SubjectBatchResult",
    "SubjectCheck",
    "SubjectCheckConfig",
    "SubjectFidelity",
    "SubjectPrompt",
    "evaluate_subject",
    "evaluate_subject_batch",
    "main_part_colours",
    "parse_subject_prompt",
    "prompt_fidelity",
    "recolour_subject",
    "render_subject_scene",
    "subject_fidelity",
    "summarise",
]
