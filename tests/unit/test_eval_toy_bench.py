"""Paired changes of the toy benchmark: per-image differences on the same prompts, with a bootstrap interval."""

from __future__ import annotations

import pytest
import torch

from imgalign.eval.toy_bench import ToyBenchResult, changes_table, paired_changes


def _result(values: list[float], taste: list[float | None]) -> ToyBenchResult:
    rows = [{"preference": v, "score": v, "taste": t, "watermark": 0.0} for v, t in zip(values, taste)]
    return ToyBenchResult(["p"] * len(rows), rows, torch.zeros(len(rows), 3, 2, 2))


def test_paired_changes_use_per_image_differences():
    """base 0.2, 0.4, 0.6, 0.8; after each +0.1: change exactly +0.1 with a zero-width interval (every pair differs
    by 0.1), the mean after 0.6; taste only where stated (None skipped on both sides)."""
    base = _result([0.2, 0.4, 0.6, 0.8], [0.0, None, 1.0, None])
    after = _result([0.3, 0.5, 0.7, 0.9], [0.5, None, 1.0, None])
    out = paired_changes(base, after)
    assert out["preference"]["change"] == pytest.approx(0.1) and out["preference"]["after"] == pytest.approx(0.6)
    assert out["preference"]["ci95"] == pytest.approx([0.1, 0.1])
    assert out["taste"]["change"] == pytest.approx(0.25) and out["watermark"]["change"] == 0.0
    table = changes_table(base, {"run": out})
    assert "0.600 +0.100 [+0.100, +0.100]" in table and table.splitlines()[1].startswith("base")
