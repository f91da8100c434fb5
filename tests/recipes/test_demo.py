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



def test_demo_on_the_flow_toy_and_its_argument_errors(tmp_path, capsys):
    """`imgalign demo --model assets/toy/sd3`: the same protocol on the flow-matching toy (flow-target DPO); a folder
    without a pipeline, or --model with --tiny, is refused before anything loads."""
    from imgalign._paths import TOY_ASSETS
    from imgalign.cli import main

    sd3 = str(TOY_ASSETS / "sd3")
    assert main(["demo", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o1")]) == 2
    assert "nothing: no model_index.json" in capsys.readouterr().err
    assert main(["demo", "--model", sd3, "--tiny", "--out", str(tmp_path / "o2")]) == 2
    assert "exclude each other" in capsys.readouterr().err
    settings = ToyDemoSettings(pairs=12, sampler_steps=3, dpo_steps=2, batch_size=2, eval_prompts=4,
                               validation_prompts=2, pipeline=sd3)
    assert run_toy_demo(tmp_path / "flow", settings) == 0
    report = (tmp_path / "flow" / "report.txt").read_text()
    assert f"base model {sd3}" in report and "2 DPO steps" in report
    assert (tmp_path / "flow" / "dpo" / "pytorch_lora_weights.safetensors").is_file()
