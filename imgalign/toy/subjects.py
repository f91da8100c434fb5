"""Toy subjects for subject-driven generation (DreamBooth-style), in DreamBench's folder layout.

Five distinctive patterned objects that the toy grammar cannot describe (so a model must learn them
from the references), each with `N_REFERENCES` renders at 64 px on varied backgrounds and positions:

    striped_square      a square of red and yellow horizontal stripes         (class: square)
    ringed_circle       a blue disc inside a yellow ring                      (class: circle)
    two_tone_triangle   a triangle, left half green, right half red           (class: triangle)
    checker_square      a 2 x 2 blue / yellow checkerboard square             (class: square)
    cross_circle        a red disc with a white plus sign                     (class: circle)

Layout (mirrors ``dreambench/dataset``)::

    subjects/dataset/<subject>/00.png ... 04.png
    subjects/dataset/prompts_and_classes.txt      "Classes" CSV + "Object Prompts" templates

Prompt templates use DreamBench's ``'a {0} {1} ...'.format(unique_token, class_token)`` form and toy
contexts (backgrounds, relations to grammar objects, recolouring), e.g. ``a sks square left of a red circle``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imgalign._paths import TOY_ASSETS
from imgalign.toy.grammar import BACKGROUNDS, COLOURS

SUBJECT_DIR = TOY_ASSETS / "subjects" / "dataset"
N_REFERENCES = 5
REFERENCE_SIZE = 64
SUBJECTS: dict[str, str] = {  # subject name -> class (DreamBench's class token)
    "striped_square": "square",
    "ringed_circle": "circle",
    "two_tone_triangle": "triangle",
    "checker_square": "square",
    "cross_circle": "circle",
}
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a {0} {1}",
    "a {0} {1} on a white background",
    "a {0} {1} on a black background",
    "a {0} {1} on a gray background",
    "a small {0} {1}",
    "a large {0} {1}",
    "a {0} {1} left of a red circle",
    "a {0} {1} right of a blue square",
    "a {0} {1} above a green triangle",
    "a {0} {1} below a yellow circle",
    "a {0} {1} and a blue triangle",
    "a {0} {1} and a red square on a gray background",
    "a red {0} {1}",
    "a green {0} {1}",
    "a yellow {0} {1} on a black background",
)
WHITE = (255, 255, 255)


def _masks(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of a side x side box, in units of the box side (0..1)."""
    c = (np.arange(side) + 0.5) / side
    return np.meshgrid(c, c, indexing="ij")


def draw_subject(name: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 [side, side, 3], bool mask [side, side]) of one subject filling a side x side box."""
    y, x = _masks(side)
    rgb = np.zeros((side, side, 3), np.uint8)
    r2 = (x - 0.5) ** 2 + (y - 0.5) ** 2
    if name == "striped_square":
        mask = np.ones((side, side), bool)
        stripe = (np.floor(y * 5) % 2 == 0)
        rgb[:] = COLOURS["yellow"]
        rgb[stripe] = COLOURS["red"]
    elif name == "ringed_circle":
        mask = r2 <= 0.25
        rgb[:] = COLOURS["yellow"]
        rgb[r2 <= 0.30**2] = COLOURS["blue"]
    elif name == "two_tone_triangle":
        mask = np.abs(x - 0.5) <= 0.5 * y
        rgb[:] = COLOURS["green"]
        rgb[x >= 0.5] = COLOURS["red"]
    elif name == "checker_square":
        mask = np.ones((side, side), bool)
        rgb[:] = COLOURS["blue"]
        rgb[(x < 0.5) == (y < 0.5)] = COLOURS["yellow"]
    elif name == "cross_circle":
        mask = r2 <= 0.25
        rgb[:] = COLOURS["red"]
        rgb[(np.abs(x - 0.5) < 0.1) | (np.abs(y - 0.5) < 0.1)] = WHITE
    else:
        raise ValueError(f"unknown toy subject {name!r}; expected one of {list(SUBJECTS)}")
    return rgb, mask


def render_subject(name: str, rng: np.random.Generator, size: int = REFERENCE_SIZE,
                   background: str | None = None) -> Image.Image:
    """One reference render: the subject at a random size (35-60% of the canvas) and position."""
    bg = background or list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    side = int(rng.integers(round(0.35 * size), round(0.6 * size) + 1))
    inset = max(1, round(0.03 * size))
    x0, y0 = (int(v) for v in rng.integers(inset, size - inset - side + 1, size=2))
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = BACKGROUNDS[bg]
    rgb, mask = draw_subject(name, side)
    canvas[y0:y0 + side, x0:x0 + side][mask] = rgb[mask]
    return Image.fromarray(canvas)


def prompts_and_classes_text(unique_token: str = "sks") -> str:
    """The text of ``prompts_and_classes.txt`` in DreamBench's format."""
    lines = ["Classes", "", "subject_name,class"]
    lines += [f"{name},{cls}" for name, cls in SUBJECTS.items()]
    lines += ["", "Prompts", "", "Object Prompts", "", "prompt_list = ["]
    body = [f"'{t.replace('{0}', '{0}').replace('{1}', '{1}')}'.format(unique_token, class_token)"
            for t in PROMPT_TEMPLATES]
    lines += [line + "," for line in body[:-1]] + [body[-1], "]", ""]
    return "\n".join(lines)


def subject_prompts(subject: str, unique_token: str = "sks") -> list[str]:
    """The evaluation prompts of one subject, e.g. ``a sks square on a black background``."""
    return [t.format(unique_token, SUBJECTS[subject]) for t in PROMPT_TEMPLATES]


def build_subjects(out_dir: str | Path, seed: int = 0, n_references: int = N_REFERENCES,
                   size: int = REFERENCE_SIZE) -> Path:
    """Write the subjects in DreamBench layout under ``out_dir/dataset``; returns ``out_dir``."""
    out = Path(out_dir)
    dataset = out / "dataset"
    for k, name in enumerate(SUBJECTS):
        folder = dataset / name
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, k])
        backgrounds = list(BACKGROUNDS)
        for i in range(n_references):
            # cycle the backgrounds so every subject is seen on each of them
            render_subject(name, rng, size, background=backgrounds[i % len(backgrounds)]).save(folder / f"{i:02d}.png")
    (dataset / "prompts_and_classes.txt").write_text(prompts_and_classes_text(), encoding="utf-8")
    (dataset / "references_and_licenses.txt").write_text(
        "Toy subjects - references and licenses\n\nAll images are synthetic renders made by "
        f"imgalign.toy.subjects.build_subjects (seed {seed}); same license as imgalign.\n", encoding="utf-8")
    return out
