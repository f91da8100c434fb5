"""Helpers of scripts/build_toy_assets.py: batch shares per prompt kind."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

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
