"""What a person looks at: captioned image grids, validation grids, the demo's before/after grid and curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imgalign.train.setup import captioned_grid, grid_font, image_grid, wrap_text


def _images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _grey(n, size=32, seed=0):
    """Grey images (no red pixels to confuse with the red captions)."""
    return (torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1).expand(n, 3, size, size)


def _dark(region: np.ndarray) -> int:
    """Pixels clearly darker than the white background (text)."""
    return int((region.min(axis=-1) < 128).sum())


def test_image_grid_keeps_its_layout():
    grid = np.asarray(image_grid(_images(6), nrow=3))
    assert grid.shape == (2 * 32, 3 * 32, 3)


def test_captioned_grid_upscales_nearest_and_labels_rows_and_columns():
    images = _images(6)
    grid = captioned_grid(images, ["before (base)", "after (DPO LoRA)"], col_labels=["a red circle",
                          "two blue squares left of a big green triangle on a white background", "x"], tile=128,
                          label_width=150, gap=4)
    arr = np.asarray(grid).astype(int)
    assert grid.width == 150 + 3 * (128 + 4)
    assert grid.height > 2 * (128 + 4)  # plus the column labels under the grid
    # each tile is the image upscaled x4, nearest neighbour, at its place in the layout
    expected = ((images[4] + 1) / 2).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy().astype(int)
    expected = expected.repeat(4, axis=0).repeat(4, axis=1)
    x, y = 150 + 1 * 132, 1 * 132
    assert np.array_equal(arr[y:y + 128, x:x + 128], expected)
    # the label column beside each row and the caption area under the grid carry text
    assert _dark(arr[:128, :150]) > 20 and _dark(arr[132:260, :150]) > 20
    below = arr[2 * 132:]
    for c in range(3):
        assert _dark(below[:, 150 + c * 132:150 + c * 132 + 128]) > 5, c
    # a long prompt wraps onto several lines instead of running into the next column
    text_rows = np.nonzero((below[:, 150 + 132:150 + 132 + 128].min(axis=-1) < 128).any(axis=1))[0]
    assert text_rows.max() - text_rows.min() > 2 * grid_font(14).size


def test_captioned_grid_tile_captions_title_and_small_tiles():
    images = _grey(4, size=16)
    grid = captioned_grid(images, ["row a", "row b"], tile=128, label_width=100, gap=4,
                          tile_captions=[None, "watermark", None, None], title="a title")
    arr = np.asarray(grid).astype(int)
    assert grid.width == 100 + 2 * (128 + 4)  # 16 px -> x8
    red = (arr[..., 0] > 150) & (arr[..., 1] < 100) & (arr[..., 2] < 100)
    ys, xs = np.nonzero(red)
    assert len(xs) > 10 and xs.min() >= 100 + 132  # only under the second tile of the first row
    assert _dark(arr[:12, :]) > 5  # the title line
    with pytest.raises(ValueError, match="do not fill"):
        captioned_grid(_images(5), ["a", "b"])
    with pytest.raises(ValueError, match="column labels"):
        captioned_grid(_images(4), ["a", "b"], col_labels=["x"])


def test_wrap_text_wraps_breaks_and_truncates():
    font = grid_font(14)
    lines = wrap_text("two green triangles left of a small red circle", font, 100)
    assert len(lines) > 2 and all(font.getlength(line) <= 100 for line in lines)
    assert " ".join(lines) == "two green triangles left of a small red circle"
    assert all(font.getlength(line) <= 60 for line in wrap_text("x" * 40, font, 60))
    assert wrap_text("first\nsecond", font, 500) == ["first", "second"]
    short = wrap_text("one two three four five six seven", font, 40, max_lines=2)
    assert len(short) == 2 and short[-1].endswith("…")


def test_run_validation_writes_a_captioned_upscaled_grid(monkeypatch, tmp_path):
    from imgalign.recipes import common

    prompts = ["a red circle", "a red circle", "two blue squares", "two blue squares"]
    monkeypatch.setattr(common, "validation_images", lambda adapter, cfg, res: ((_images(4) + 1) / 2, prompts))
    cfg = common.ValidationConfig(prompts=["a red circle", "two blue squares"], images_per_prompt=2)
    assert common.run_validation(None, cfg, 32, tmp_path, 3) == {}
    arr = np.asarray(Image.open(tmp_path / "validation" / "step-000003.png")).astype(int)
    assert arr.shape[0] >= 2 * 128 and arr.shape[1] >= 2 * 128 + 100
    left = arr[:, :128]
    assert _dark(left) > 40  # the prompts beside the rows


def test_demo_before_after_grid_labels_rows_prompts_and_watermarks(tmp_path):
    from imgalign.demo import _before_after
    from imgalign.eval.toy_bench import ToyBenchResult

    prompts = ["a red circle", "two blue squares", "a big green triangle"]
    before = ToyBenchResult(prompts, [{"watermark": w} for w in (0.9, 0.0, 0.7)], (_grey(3, seed=1) + 1) / 2)
    after = ToyBenchResult(prompts, [{"watermark": w} for w in (0.0, 0.0, 0.1)], (_grey(3, seed=2) + 1) / 2)
    _before_after(before, after, 3, tmp_path / "ba.png")
    arr = np.asarray(Image.open(tmp_path / "ba.png")).astype(int)
    assert arr.shape[1] >= 3 * 128 and arr.shape[0] >= 2 * 128
    red = (arr[..., 0] > 150) & (arr[..., 1] < 100) & (arr[..., 2] < 100)
    assert red.sum() > 20  # "watermark" under two "before" tiles ...
    # ... and none in the "after" half of the tiles (the caption strip of row 2 sits below its tiles)
    ys = np.nonzero(red.any(axis=1))[0]
    assert ys.max() < arr.shape[0] / 2 + 64


def test_training_curves_have_axis_labels_legend_smoothing_and_one_last_validation(monkeypatch, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from imgalign import demo

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    history = [{"step": s, "train/loss": 0.69 - 0.01 * s + 0.02 * (-1) ** s, "train/rewards/accuracies": 0.5 + 0.01 * s}
               for s in range(1, 21)]
    validation = [{"step": 0, "val/toy_preference": 0.4}, {"step": 10, "val/toy_preference": 0.5},
                  {"step": 20, "val/toy_preference": 0.55}, {"step": 20, "val/toy_preference": 0.55}]
    demo._plot_toy(history, validation, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").is_file()
    (fig,) = figures
    loss, acc, val = fig.axes[:3]
    assert all(ax.get_ylabel() for ax in (loss, acc, val))
    labels = [t.get_text() for t in loss.get_legend().get_texts()]
    assert "log 2: no preference learned" in labels
    assert any("EMA" in label for label in labels)
    raw, smooth = loss.get_lines()[:2]
    assert np.ptp(smooth.get_ydata()[5:]) < np.ptp(raw.get_ydata()[5:])
    (points,) = val.get_lines()
    assert list(points.get_xdata()) == [0, 10, 20]  # the last validation point once
    near_end = [{"step": s, "val/toy_preference": 0.5} for s in (0, 62, 124, 186, 248, 250)]
    assert demo._validation_points(near_end, "val/toy_preference")[0] == [0, 62, 124, 186, 250]
    assert demo._ema([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected: no pull towards 0
