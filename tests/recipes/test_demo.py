"""`imgalign demo` on the shipped toy SD, shrunk to seconds: every output is written and the report is complete.

The demo's effect itself is toy evidence (README, measured with the full settings), not a timed test.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from imgalign.demo import ToyDemoSettings, run_toy_demo


def test_toy_demo_writes_its_report_grid_curves_and_lora(tmp_path):
    settings = ToyDemoSettings(pairs=16, sampler_steps=4, dpo_steps=4, batch_size=4, eval_prompts=6,
                               validation_prompts=2)
    assert run_toy_demo(tmp_path, settings) == 0
    report = (tmp_path / "report.txt").read_text()
    assert "held-out test prompts: 6 x 1 images" in report
    assert "4 DPO steps" in report and "whole demo" in report
    for name in ("preference", "score", "taste", "watermark"):  # one before/after row per criterion ...
        assert any(line.startswith(name) for line in report.splitlines()), name
    assert report.count("(paired bootstrap)") == 4  # ... and the four paired changes
    assert (tmp_path / "dpo" / "pytorch_lora_weights.safetensors").is_file()
    grid = np.asarray(Image.open(tmp_path / "before_after.png")).astype(int)
    # labelled grid: 2 rows (before, after) x 6 prompts, 32 px samples shown as 128 px tiles right of a label column
    assert grid.shape[0] >= 2 * 128 and grid.shape[1] >= 6 * 128
    # each tile has a grey frame: the left frame of column 0 (one px left of the 1.5-tile label column) gives the
    # tile tops of the two rows; the "after" row was drawn with the trained LoRA, so its pixels differ
    frame = np.flatnonzero((grid[:, 192 - 1] == 170).all(axis=1))
    starts = [int(y) + 1 for k, y in enumerate(frame) if k == 0 or y != frame[k - 1] + 1]
    assert len(starts) == 2, starts
    before, after = (grid[y:y + 128, 192:192 + 6 * 128] for y in starts)
    assert np.abs(before - after).max() > 0
    assert Image.open(tmp_path / "training_curves.png").width > 0
