"""Helpers of scripts/build_toy_assets.py: batch shares per prompt kind."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "build_toy_assets", Path(__file__).resolve().parents[2] / "scripts" / "build_toy_assets.py")
build = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(build)

PROMPTS = ["a red circle", "two blue squares", "a red circle and a blue square",
           "a green triangle left of a red circle on a white background"]


def test_kind_row_weights_give_each_kind_its_share():
    index = np.array([0, 0, 0, 1, 2, 2, 3])  # image -> prompt: 3 single, 1 count, 2 pair, 1 relation
    w = build.kind_row_weights(PROMPTS, index, "single=0.4,count=0.2,pair=0.2,relation=0.2").numpy()
    np.testing.assert_allclose(w, [0.4 / 3] * 3 + [0.2] + [0.1] * 2 + [0.2])
    assert build.kind_row_weights(PROMPTS, index, "uniform") is None
    with pytest.raises(ValueError, match="kinds"):
        build.kind_row_weights(PROMPTS, index, "single=0.5,triangles=0.5")


def test_evaluate_pipeline_reports_the_rater_beside_fidelity():
    """The build's eval table: fidelity criteria, the toy rater's taste (prompts without a background only)
    and preference, each the mean over the images the shipped toy SD draws."""
    from imgalign.models.adapters import load_adapter
    from imgalign.toy.evaluator import evaluate

    sd = Path(__file__).resolve().parents[2] / "assets" / "toy" / "sd"
    if not (sd / "model_index.json").is_file():
        pytest.skip("toy SD not built")
    summary = build.evaluate_pipeline(sd, PROMPTS, steps=4, cfg=5.0, seed=0)
    pipe = load_adapter(str(sd)).pipe  # the same call as the build's eval: one batch, generator seeded with seed
    images = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                  output_type="np", height=32, width=32).images
    scores = [evaluate(im, p) for im, p in zip(images, PROMPTS)]
    assert summary["preference"] == pytest.approx(np.mean([s.preference for s in scores]))
    assert summary["taste"] == pytest.approx(np.mean([s.taste for s in scores[:3]]))  # the 4th states a background
    assert summary["score"] == pytest.approx(np.mean([s.score for s in scores]))
    assert summary["watermark"] == pytest.approx(np.mean([s.watermark for s in scores]))
    assert summary["watermarked"] == pytest.approx(np.mean([s.watermarked for s in scores]))
