"""Unpaired image preferences (Diffusion-KTO): the JSONL layout, its errors, pairs split in two, layout detection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgalign.data import (
    DataError,
    ImageTransform,
    collate_images,
    detect_layout,
    load_preference_pairs,
    load_unpaired_images,
    split_pairs,
    write_preference_jsonl,
    write_preference_parquet,
    write_unpaired_jsonl,
)


def square(colour, size=(24, 32)) -> Image.Image:
    arr = np.full((*size, 3), 255, np.uint8)
    arr[4:20, 4:20] = colour
    return Image.fromarray(arr)


RED, BLUE, GREEN = (220, 30, 30), (30, 30, 220), (30, 200, 30)


@pytest.fixture
def folder(tmp_path) -> Path:
    """images/ with red.png, blue.png, green.png, and a file outside the root (../secret.png)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for name, colour in (("red", RED), ("blue", BLUE), ("green", GREEN)):
        square(colour).save(root / "images" / f"{name}.png")
    square(RED).save(tmp_path / "secret.png")
    (root / "images" / "broken.png").write_bytes(b"not a png")
    return root


def write_lines(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_rows_load_with_boolean_and_0_1_labels(folder):
    path = write_lines(folder / "u.jsonl", [
        {"image": "images/red.png", "caption": "a red square", "label": True},
        "",
        {"image": "images/blue.png", "caption": "a red square", "label": False},
        {"image": "images/green.png", "caption": "a green square", "label": 1},
        {"image": "images/blue.png", "caption": "a green square", "label": 0.0},
    ])
    data = load_unpaired_images(path)
    assert len(data) == 4 and [data[i]["label"] for i in range(4)] == [1.0, 0.0, 1.0, 0.0]
    item = data[0]
    assert item["caption"] == "a red square" and item["image"].mode == "RGB" and item["image"].size == (32, 24)
    assert item["image"].getpixel((10, 10)) == RED
    assert data.where(1) == f"{path} line 3"  # blank lines keep their numbers
    assert data.stats.summary() == f"{path}: read 4 rows, kept 2 desirable + 2 undesirable images"
    assert len(load_unpaired_images(path, max_rows=2)) == 2


@pytest.mark.parametrize("label", ['"yes"', "0.5", "null", "2", "[true]"])
def test_bad_label_names_file_line_caption_and_fix(folder, label):
    path = write_lines(folder / "u.jsonl", [
        {"image": "images/red.png", "caption": "a red square", "label": True},
        '{"image": "images/blue.png", "caption": "a blue square", "label": ' + label + "}",
    ])
    with pytest.raises(DataError, match=rf"{path} line 2 \(caption 'a blue square'\): label = .* is invalid; "
                                        r"label must be true \(the image is desirable\) or false") as err:
        load_unpaired_images(path)
    assert err.value.reason == "bad_label"


def test_bad_rows_raise_or_are_skipped_and_counted(folder):
    rows = [
        {"image": "images/red.png", "caption": "a red square", "label": True},  # good
        {"image": "../secret.png", "caption": "a red square", "label": True},  # leaves the root
        {"image": "images/missing.png", "caption": "a red square", "label": False},
        {"image": "images/blue.png", "caption": "  ", "label": False},
        {"image": "images/blue.png", "label": False},
        "{not json",
        {"image": "images/blue.png", "caption": "a red square", "label": "no"},
        {"image": "images/broken.png", "caption": "a red square", "label": False},  # found, but not an image
        {"image": "images/blue.png", "caption": "a red square", "label": False},  # good
    ]
    path = write_lines(folder / "u.jsonl", rows)
    expected = {2: (r"image path '\.\./secret\.png' leads outside the image root", "path_outside_root"),
                3: (r"image file 'images/missing\.png' not found under", "missing_file"),
                4: (r"the caption is empty", "empty_caption"),
                5: (r"missing field caption; the fields are image, label", "missing_field"),
                6: (r"not valid JSON", "bad_json"),
                7: (r"label = \"no\" is invalid", "bad_label")}
    for line, (pattern, reason) in expected.items():
        one = write_lines(folder / f"one{line}.jsonl", [rows[0], rows[line - 1]])
        with pytest.raises(DataError, match=rf"one{line}\.jsonl line 2.*{pattern}") as err:
            load_unpaired_images(one)
        assert err.value.reason == reason and 'on_error="skip"' in str(err.value)
    lazy = load_unpaired_images(write_lines(folder / "lazy.jsonl", [rows[0], rows[7]]))  # images decode when read
    with pytest.raises(DataError, match=r"lazy\.jsonl line 2 .*cannot decode the image file.*on_error=\"skip\""):
        lazy[1]

    data = load_unpaired_images(path, on_error="skip")  # decodes every image up front
    assert len(data) == 2 and [data[i]["image"].getpixel((10, 10)) for i in range(2)] == [RED, BLUE]
    assert data.stats.n_skipped == 7
    assert data.stats.skipped == {"path_outside_root": 1, "missing_file": 1, "empty_caption": 1, "missing_field": 1,
                                  "bad_json": 1, "bad_label": 1, "unreadable_image": 1}
    assert "7 rows skipped" in data.stats.summary() and "kept 1 desirable + 1 undesirable" in data.stats.summary()


def test_image_root_and_empty_file_errors(folder, tmp_path):
    elsewhere = tmp_path / "labels.jsonl"
    write_lines(elsewhere, [{"image": "images/red.png", "caption": "a red square", "label": True}])
    with pytest.raises(DataError, match=r"image file 'images/red\.png' not found under .*pass image_root"):
        load_unpaired_images(elsewhere)
    assert len(load_unpaired_images(elsewhere, image_root=folder)) == 1
    empty = write_lines(tmp_path / "empty.jsonl", ["{bad"])
    with pytest.raises(DataError, match=r"no usable rows"):
        load_unpaired_images(empty, on_error="skip")
    with pytest.raises(DataError, match=r"read from JSONL"):
        load_unpaired_images(folder / "images" / "red.png")


def test_pairs_split_into_desirable_winners_and_undesirable_losers(tmp_path):
    """Pair i -> item 2i (its winner, label 1) and 2i + 1 (its loser, label 0), whichever column won; ties dropped."""
    rows = [("a red square", square(RED), square(BLUE), 1.0),  # jpg_0 wins
            ("a green square", square(BLUE), square(GREEN), 0.0),  # jpg_1 wins
            ("a tie", square(RED), square(RED), 0.5)]
    pairs = load_preference_pairs(write_preference_parquet(tmp_path / "p.parquet", rows))
    items = split_pairs(pairs)
    assert len(items) == 4
    got = [(items[i]["caption"], items[i]["image"].getpixel((10, 10)), items[i]["label"]) for i in range(4)]
    assert got == [("a red square", RED, 1.0), ("a red square", BLUE, 0.0),
                   ("a green square", GREEN, 1.0), ("a green square", BLUE, 0.0)]
    assert items.stats.summary().endswith("1 ties dropped; split into 2 desirable + 2 undesirable images (winner "
                                          "desirable, loser undesirable)")
    assert items.where(3).endswith("row 1 (loser)")
    with pytest.raises(DataError, match=r"a tie says nothing.*keep_ties=False"):
        split_pairs(load_preference_pairs(tmp_path / "p.parquet", keep_ties=True))


def test_detect_layout_by_the_first_row(tmp_path):
    unpaired = write_unpaired_jsonl(tmp_path / "u" / "u.jsonl", tmp_path / "u" / "img", [("a red square", square(RED), True)])
    assert json.loads(unpaired.read_text()) == {"image": "img/000000.png", "caption": "a red square", "label": True}
    assert detect_layout(unpaired) == "unpaired"
    write_preference_jsonl(tmp_path / "p" / "p.jsonl", tmp_path / "p" / "img", [("c", square(RED), square(BLUE), 1.0)])
    assert detect_layout(tmp_path / "p" / "p.jsonl") == "pairs"
    assert detect_layout(write_preference_parquet(tmp_path / "p.parquet", [("c", square(RED), square(BLUE), 1.0)])) == "pairs"
    assert detect_layout(write_lines(tmp_path / "x.jsonl", ["{bad", "", '{"image": "a.png"}'])) == "unpaired"
    assert detect_layout("yuvalkirstain/pickapic_v2") == "pairs"


def test_image_transform_is_seeded_by_index_and_collates():
    item = {"caption": "a red square", "image": square(RED, size=(40, 60)), "label": 1.0}
    t = ImageTransform(16, random_crop=True, hflip=True, seed=3)
    a, b = t(item, index=5, epoch=1), t(item, index=5, epoch=1)
    assert a["pixels"].shape == (3, 16, 16) and torch.equal(a["pixels"], b["pixels"])
    assert a["pixels"].min() >= -1 and a["pixels"].max() <= 1 and a["original_size"] == (40, 60)
    crops = {t(item, index=i, epoch=0)["crop_top_left"] for i in range(20)}
    assert len(crops) > 1  # the crop depends on the index
    batch = collate_images([a, t(dict(item, label=0.0), index=6)])
    assert batch["pixels"].shape == (2, 3, 16, 16) and batch["labels"].tolist() == [1.0, 0.0]
    assert batch["original_sizes"].tolist() == [[40, 60], [40, 60]] and batch["captions"] == ["a red square"] * 2
