"""The toy world: a tiny text-to-image domain whose truth is checkable exactly.

    >>> import numpy as np
    >>> from imgalign.toy import render, evaluate
    >>> image, truth = render("two red circles on a white background", np.random.default_rng(0))
    >>> evaluate(image, "two red circles on a white background").overall
    1.0

* `grammar`: prompts as text and as `Scene` data (`parse`, `Scene.to_text`, `sample_prompt`).
* `render`: a scene to a 32 px (or larger) RGB image plus its exact `GroundTruth`.
* `evaluator`: GenEval-style per-criterion checks of an image against its prompt (`evaluate`).
* `prompts`: the fixed train/validation/test prompt sets in ``assets/toy/prompts``.
"""

from imgalign.toy.evaluator import (
    DEFAULT_CONFIG,
    Detection,
    EvaluatorConfig,
    ToyScore,
    detect_background,
    detect_objects,
    evaluate,
    evaluate_batch,
    relation_holds,
    to_uint8_array,
)
from imgalign.toy.grammar import (
    BACKGROUNDS,
    COLOURS,
    PROMPT_KINDS,
    RELATIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    parse,
    perturb_scene,
    sample_prompt,
    sample_scene,
)
from imgalign.toy.prompts import PROMPT_DIR, build_prompt_sets, load_prompt_set, load_prompts
from imgalign.toy.render import GroundTruth, RenderedObject, render

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DEFAULT_CONFIG",
    "PROMPT_DIR",
    "PROMPT_KINDS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Detection",
    "EvaluatorConfig",
    "GroundTruth",
    "ObjectSpec",
    "RenderedObject",
    "Scene",
    "ToyScore",
    "build_prompt_sets",
    "detect_background",
    "detect_objects",
    "evaluate",
    "evaluate_batch",
    "load_prompt_set",
    "load_prompts",
    "parse",
    "perturb_scene",
    "relation_holds",
    "render",
    "sample_prompt",
    "sample_scene",
    "to_uint8_array",
]
