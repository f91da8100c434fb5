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
    assert grid.shape == (2 * 32, 6 * 32, 3)  # row 1 before, row 2 after, same seeds
    assert np.abs(grid[:32] - grid[32:]).max() > 0  # the "after" row was drawn with the trained LoRA
    assert Image.open(tmp_path / "training_curves.png").width > 0
