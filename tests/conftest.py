"""Shared fixtures: tiny pipelines of every family saved to disk, and a tiny preference dataset."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_FAMILIES = ("sd15", "sd2-v", "sdxl", "sd3", "flux")


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """family -> folder of a tiny random pipeline saved with save_pretrained (built once per session)."""
    from imgalign.models.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_pipelines")
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = str(save_tiny_pipeline(family, root / family))
        return cache[family]

    return get


def _blob(colour, size=40, seed=0):
    """A flat-colour square on white with a little noise; different sizes exercise resize + crop."""
    rng = np.random.default_rng(seed)
    arr = np.full((size, size + 8, 3), 255, np.uint8)
    arr[8:32, 10:34] = colour
    arr = np.clip(arr.astype(int) + rng.integers(-10, 10, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory):
    """A JSONL preference set: 8 pairs, 'a red square' prefers red over blue; one tie (dropped by default)."""
    from imgalign.data import write_preference_jsonl

    root = tmp_path_factory.mktemp("pairs")
    rows = []
    for i in range(8):
        red, blue = _blob((220, 30, 30), seed=i), _blob((30, 30, 220), seed=100 + i)
        label = 1.0 if i % 2 == 0 else 0.0  # odd rows: jpg_1 is the preferred (red) one
        rows.append(("a red square", red if label == 1 else blue, blue if label == 1 else red, label))
    rows.append(("a red square", _blob((220, 30, 30), seed=50), _blob((220, 30, 30), seed=51), 0.5))
    path = root / "pairs.jsonl"
    write_preference_jsonl(path, root / "images", rows)
    return str(path)
