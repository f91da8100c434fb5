"""imgalign.data.preference: every source round-trips, ties, winner-first, bad input named or skipped."""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgalign.data import (
    DataError,
    PairTransform,
    collate_pairs,
    load_preference_pairs,
    write_preference_jsonl,
    write_preference_parquet,
)

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def solid(color, size=(10, 8)) -> Image.Image:  # read_image refuses images under 8 px a side
    return Image.new("RGB", size, color)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def rows(labels=(1.0, 0.0, 0.5, 1.0)):
    """Row i: caption 'p{i}', jpg_0 red, jpg_1 blue, the given label_0."""
    return [(f"p{i}", solid(RED), solid(BLUE), lab) for i, lab in enumerate(labels)]


def color(img: Image.Image):
    return img.getpixel((0, 0))


def check_default_rows(pairs):
    """Rows of rows(): the tie is dropped, label 0 swaps winner and loser."""
    assert len(pairs) == 3
    assert pairs.stats.n_rows == 4 and pairs.stats.n_ties_dropped == 1 and pairs.stats.n_skipped == 0
    first, swapped, last = pairs[0], pairs[1], pairs[2]
    assert first["caption"] == "p0" and first["label"] == 1.0
    assert color(first["winner"]) == RED and color(first["loser"]) == BLUE
    assert swapped["caption"] == "p1" and swapped["label"] == 1.0  # label_0 == 0: jpg_1 won
    assert color(swapped["winner"]) == BLUE and color(swapped["loser"]) == RED
    assert swapped["winner_is_jpg_0"] is False
    assert last["caption"] == "p3"
    assert first["winner"].mode == "RGB" and first["winner"].size == (10, 8)


# ----------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------


def test_parquet_file_round_trip(tmp_path):
    path = write_preference_parquet(tmp_path / "pairs.parquet", rows())
    assert pq.read_schema(path).names == ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    check_default_rows(load_preference_pairs(path))


def test_ties_kept_with_flag(tmp_path):
    path = write_preference_parquet(tmp_path / "pairs.parquet", rows())
    pairs = load_preference_pairs(str(path), keep_ties=True)
    assert len(pairs) == 4 and pairs.stats.n_ties == 1 and pairs.stats.n_ties_dropped == 0
    tie = pairs[2]
    assert tie["label"] == 0.5 and color(tie["winner"]) == RED  # jpg_0 stays first for a tie
    assert "1 ties kept" in pairs.stats.summary()


def test_parquet_folder_picks_split_files(tmp_path):
    data = tmp_path / "data"
    write_preference_parquet(data / "train-00000-of-00002.parquet", rows((1.0, 0.0)))
    write_preference_parquet(data / "train-00001-of-00002.parquet", rows((1.0,)))
    write_preference_parquet(data / "validation-00000-of-00001.parquet", rows((0.0,)))
    assert len(load_preference_pairs(tmp_path, split="train")) == 3
    val = load_preference_pairs(tmp_path, split="validation")
    assert len(val) == 1 and color(val[0]["winner"]) == BLUE
    assert "validation-00000" in val.where(0) and "row 0" in val.where(0)


def test_parquet_folder_without_split_names_reads_all(tmp_path):
    write_preference_parquet(tmp_path / "a.parquet", rows((1.0,)))
    write_preference_parquet(tmp_path / "b.parquet", rows((0.0, 1.0)))
    pairs = load_preference_pairs(tmp_path)
    assert len(pairs) == 3 and pairs.stats.n_rows == 3


def test_max_rows(tmp_path):
    write_preference_parquet(tmp_path / "a.parquet", rows((1.0, 1.0)))
    write_preference_parquet(tmp_path / "b.parquet", rows((1.0, 1.0)))
    pairs = load_preference_pairs(tmp_path, max_rows=3)
    assert len(pairs) == 3 and pairs.stats.n_rows == 3


def hf_struct_table(entries):
    """Pick-a-Pic columns with jpg_* as datasets' Image storage: struct<bytes, path>."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table(
        {
            "caption": pa.array([e[0] for e in entries], pa.string()),
            "jpg_0": pa.array([e[1] for e in entries], image),
            "jpg_1": pa.array([e[2] for e in entries], image),
            "label_0": pa.array([e[3] for e in entries], pa.float64()),
        }
    )


def test_parquet_with_image_structs_and_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    solid(BLUE).save(tmp_path / "imgs" / "b.png")
    table = hf_struct_table(
        [
            (
                "bytes",
                {"bytes": png(solid(RED)), "path": "ignored.png"},
                {"bytes": png(solid(BLUE)), "path": None},
                1.0,
            ),
            ("path", {"bytes": None, "path": "imgs/b.png"}, {"bytes": png(solid(RED)), "path": None}, 1.0),
        ]
    )
    pq.write_table(table, tmp_path / "hf.parquet")
    pairs = load_preference_pairs(tmp_path / "hf.parquet")
    assert [color(pairs[i]["winner"]) for i in range(2)] == [RED, BLUE]

    # plain path strings, resolved against image_root
    table = pa.table({"caption": ["c"], "jpg_0": ["b.png"], "jpg_1": ["b.png"], "label_0": [0.0]})
    pq.write_table(table, tmp_path / "paths.parquet")
    pairs = load_preference_pairs(tmp_path / "paths.parquet", image_root=tmp_path / "imgs")
    assert color(pairs[0]["winner"]) == BLUE


def test_column_renaming(tmp_path):
    table = pa.table(
        {"prompt": ["c"], "jpg_0": [png(solid(RED))], "jpg_1": [png(solid(BLUE))], "label_0": [0.0]}
    )
    pq.write_table(table, tmp_path / "x.parquet")
    pairs = load_preference_pairs(tmp_path / "x.parquet", columns={"caption": "prompt"})
    assert pairs[0]["caption"] == "c" and color(pairs[0]["winner"]) == BLUE


def test_jsonl_round_trip(tmp_path):
    root = write_preference_jsonl(tmp_path / "pairs.jsonl", tmp_path / "images", rows())
    assert root == tmp_path.resolve()
    first = json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[0])
    assert first["jpg_0"] == "images/000000_0.png" and first["label_0"] == 1.0
    pairs = load_preference_pairs(tmp_path / "pairs.jsonl")
    check_default_rows(pairs)
    assert pairs.where(1) == f"{tmp_path / 'pairs.jsonl'} line 2"


def test_jsonl_with_images_elsewhere_needs_image_root(tmp_path):
    root = write_preference_jsonl(tmp_path / "meta" / "pairs.jsonl", tmp_path / "imgs", rows((1.0,)))
    assert root == (tmp_path / "imgs").resolve()
    with pytest.raises(DataError, match="not found"):
        load_preference_pairs(tmp_path / "meta" / "pairs.jsonl")
    assert len(load_preference_pairs(tmp_path / "meta" / "pairs.jsonl", image_root=root)) == 1


def test_datasets_save_to_disk_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "caption": datasets.Value("string"),
            "jpg_0": datasets.Image(),
            "jpg_1": datasets.Image(),
            "label_0": datasets.Value("float64"),
        }
    )
    data = {
        "caption": [r[0] for r in rows()],
        "jpg_0": [r[1] for r in rows()],
        "jpg_1": [r[2] for r in rows()],
        "label_0": [r[3] for r in rows()],
    }
    ds = datasets.Dataset.from_dict(data, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    check_default_rows(load_preference_pairs(tmp_path / "ds"))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "dd"))
    check_default_rows(load_preference_pairs(tmp_path / "dd", split="validation"))
    with pytest.raises(DataError, match="no split 'train'.*validation"):
        load_preference_pairs(tmp_path / "dd")


def test_hub_id_without_datasets_gives_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"imgalign\[datasets\]"):
        load_preference_pairs("someone/some_pairs")


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_preference_pairs(str(tmp_path / "nope.parquet"))


def test_dataloader_with_transform_and_collate(tmp_path):
    from torch.utils.data import DataLoader

    path = write_preference_parquet(tmp_path / "pairs.parquet", rows())
    pairs = load_preference_pairs(path, transform=PairTransform(4, hflip=False))
    batch = next(iter(DataLoader(pairs, batch_size=3, collate_fn=collate_pairs)))
    assert batch["pixels_w"].shape == (3, 3, 4, 4) and batch["pixels_l"].shape == (3, 3, 4, 4)
    assert batch["captions"] == ["p0", "p1", "p3"]
    assert batch["labels"].tolist() == [1.0, 1.0, 1.0]
    assert batch["original_sizes"].tolist() == [[8, 10]] * 3
    # winner of p1 is blue: channel 2 at +1, channel 0 at -1
    assert batch["pixels_w"][1, 2].min() == 1.0 and batch["pixels_w"][1, 0].max() == -1.0


# ----------------------------------------------------------------------------------------------------
# bad input: raise naming file + row (+ caption), or skip and count
# ----------------------------------------------------------------------------------------------------


def bad_parquet(tmp_path, bad_row):
    """Rows 0..2 fine; row 1 replaced by `bad_row` = (caption, jpg_0 bytes, jpg_1 bytes, label)."""
    good = ("good", png(solid(RED)), png(solid(BLUE)), 1.0)
    entries = [good, bad_row, good]
    table = pa.table(
        {
            "caption": pa.array([e[0] for e in entries], pa.string()),
            "jpg_0": pa.array([e[1] for e in entries], pa.binary()),
            "jpg_1": pa.array([e[2] for e in entries], pa.binary()),
            "label_0": pa.array([e[3] for e in entries], pa.float64()),
        }
    )
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    return str(path)


@pytest.mark.parametrize(
    "bad_row, reason, needle",
    [
        (("a cat", png(solid(RED)), png(solid(BLUE)), 0.7), "bad_label", "label_0 = 0.7"),
        (("a cat", png(solid(RED)), png(solid(BLUE)), None), "bad_label", "label_0 = None"),
        (("   ", png(solid(RED)), png(solid(BLUE)), 1.0), "empty_caption", "caption is empty"),
        (("a cat", png(solid(RED)), None, 1.0), "missing_image", "no image"),
        (("a cat", b"not an image at all", png(solid(BLUE)), 1.0), "unreadable_image", "cannot decode"),
    ],
)
def test_bad_row_raises_or_is_skipped(tmp_path, bad_row, reason, needle):
    path = bad_parquet(tmp_path, bad_row)
    with pytest.raises(DataError) as e:
        load_preference_pairs(path, validate_images=True)
    msg = str(e.value)
    assert path in msg and "row 1" in msg and needle in msg
    if bad_row[0].strip():
        assert "a cat" in msg  # the caption helps find the row
    assert isinstance(e.value, ValueError)

    pairs = load_preference_pairs(path, on_error="skip")
    assert len(pairs) == 2 and pairs.stats.n_skipped == 1 and pairs.stats.skipped == {reason: 1}
    assert all(pairs[i]["caption"] == "good" for i in range(len(pairs)))
    assert reason in pairs.stats.summary()


def test_unreadable_image_surfaces_at_getitem_without_validation(tmp_path):
    path = bad_parquet(tmp_path, ("a cat", b"\x89PNG garbage", png(solid(BLUE)), 1.0))
    pairs = load_preference_pairs(path)  # cheap checks pass: bytes are present
    assert len(pairs) == 3
    pairs[0]
    with pytest.raises(DataError, match=r"row 1 \(caption 'a cat'\), column jpg_0: cannot decode"):
        pairs[1]


def test_missing_column_names_existing_columns(tmp_path):
    pq.write_table(pa.table({"caption": ["c"], "jpg_0": [b"x"], "label_0": [1.0]}), tmp_path / "m.parquet")
    with pytest.raises(DataError) as e:
        load_preference_pairs(tmp_path / "m.parquet", on_error="skip")  # not skippable: the file is wrong
    msg = str(e.value)
    assert "m.parquet" in msg and "missing column jpg_1" in msg and "caption, jpg_0, label_0" in msg


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_jsonl_path_traversal_refused(tmp_path):
    secret = tmp_path / "secret.png"
    solid(GREEN).save(secret)  # a readable image outside the root: must still be refused
    root = tmp_path / "data"
    root.mkdir()
    solid(RED).save(root / "ok.png")
    os.symlink(secret, root / "link.png")
    good = {"caption": "good", "jpg_0": "ok.png", "jpg_1": "ok.png", "label_0": 1}
    for bad_path in ("../secret.png", "../../etc/passwd", str(secret), "link.png"):
        bad = {"caption": "evil", "jpg_0": "ok.png", "jpg_1": bad_path, "label_0": 0}
        path = write_jsonl(root / "pairs.jsonl", [good, bad])
        with pytest.raises(DataError) as e:
            load_preference_pairs(path)
        msg = str(e.value)
        assert "line 2" in msg and "outside the image root" in msg and "pairs.jsonl" in msg, msg
        pairs = load_preference_pairs(path, on_error="skip")
        assert len(pairs) == 1 and pairs.stats.skipped == {"path_outside_root": 1}


def test_jsonl_missing_file_bad_json_and_missing_field(tmp_path):
    solid(RED).save(tmp_path / "ok.png")
    good = {"caption": "good", "jpg_0": "ok.png", "jpg_1": "ok.png", "label_0": 1}
    records = [
        good,
        {"caption": "gone", "jpg_0": "ok.png", "jpg_1": "missing.png", "label_0": 1},
        "{not json",
        {"caption": "no label", "jpg_0": "ok.png", "jpg_1": "ok.png"},
        "",
        good,
    ]
    path = write_jsonl(tmp_path / "p.jsonl", records[:2])
    with pytest.raises(DataError, match=r"p\.jsonl line 2 \(caption 'gone'\).*'missing\.png' not found"):
        load_preference_pairs(path)
    path = write_jsonl(tmp_path / "p.jsonl", records[2:3])
    with pytest.raises(DataError, match=r"p\.jsonl line 1: not valid JSON"):
        load_preference_pairs(path)
    path = write_jsonl(tmp_path / "p.jsonl", records)
    pairs = load_preference_pairs(path, on_error="skip")
    assert len(pairs) == 2
    assert pairs.stats.skipped == {"missing_file": 1, "bad_json": 1, "missing_field": 1}
    assert pairs.stats.n_rows == 5 and pairs.where(1).endswith("line 6")
    assert any(
        "line 4" in m and "label_0" in m and "fields are caption, jpg_0, jpg_1" in m
        for m in pairs.stats.examples
    )


# ----------------------------------------------------------------------------------------------------
# duplicates, boolean labels, text that is not UTF-8, image conversion and limits
# ----------------------------------------------------------------------------------------------------


def test_duplicate_pairs_counted_and_reported(tmp_path):
    for name, colour in (("a.png", RED), ("b.png", BLUE), ("c.png", GREEN)):
        solid(colour).save(tmp_path / name)
    records = [
        {"caption": "x", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1},
        {"caption": "x", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1},  # duplicate
        {"caption": "x", "jpg_0": "./b.png", "jpg_1": "a.png", "label_0": 0},  # same pair swapped, same winner a
        {"caption": "x", "jpg_0": "b.png", "jpg_1": "a.png", "label_0": 1},  # same pair, the other winner
        {"caption": "y", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1},  # another caption: not a duplicate
        {"caption": "x", "jpg_0": "a.png", "jpg_1": "c.png", "label_0": 1},  # another image: not a duplicate
    ]
    pairs = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", records))
    assert len(pairs) == 6  # kept: repeated judgements are data, but the summary says so
    assert pairs.stats.n_duplicates == 3 and pairs.stats.n_conflicting == 1
    assert "3 duplicate pairs (same caption and images; 1 with another winner)" in pairs.stats.summary()
    assert load_preference_pairs(tmp_path / "p.jsonl", count_duplicates=False).stats.n_duplicates == 0


def test_duplicate_image_bytes_counted_in_parquet(tmp_path):
    path = write_preference_parquet(tmp_path / "p.parquet", rows((1.0, 1.0, 0.0)) + [("p0", solid(RED), solid(BLUE), 1.0)])
    pairs = load_preference_pairs(path)
    assert pairs.stats.n_duplicates == 1 and pairs.stats.n_conflicting == 0  # row 3 repeats row 0
    assert "1 duplicate pairs (same caption and images)" in pairs.stats.summary()


def test_boolean_label_refused_naming_file_row_and_fix(tmp_path):
    solid(RED).save(tmp_path / "a.png")
    good = {"caption": "good", "jpg_0": "a.png", "jpg_1": "a.png", "label_0": 1.0}
    path = write_jsonl(tmp_path / "p.jsonl", [good, {**good, "caption": "bool", "label_0": True}])
    with pytest.raises(DataError, match=r"p\.jsonl line 2 \(caption 'bool'\): label_0 is true; a boolean does not "
                                        r"say which image won: write 1\.0 .* 0\.0") as e:
        load_preference_pairs(path)
    assert e.value.reason == "bool_label"
    pairs = load_preference_pairs(path, on_error="skip")
    assert len(pairs) == 1 and pairs.stats.skipped == {"bool_label": 1} and pairs.stats.n_rows == 2

    table = pa.table({"caption": ["a", "b"], "jpg_0": [png(solid(RED))] * 2, "jpg_1": [png(solid(BLUE))] * 2,
                      "label_0": pa.array([True, False], pa.bool_())})
    pq.write_table(table, tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet row 0 \(caption 'a'\): label_0 is the boolean true.*"
                                        r"write 1\.0 if jpg_0 is preferred, 0\.0 if jpg_1.*Cast the column"):
        load_preference_pairs(tmp_path / "b.parquet")


def test_non_utf8_caption_named_and_skippable(tmp_path):
    solid(RED).save(tmp_path / "a.png")
    good = json.dumps({"caption": "good", "jpg_0": "a.png", "jpg_1": "a.png", "label_0": 1}).encode()
    bad = good.replace(b"good", b"caf\xe9")
    (tmp_path / "p.jsonl").write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    with pytest.raises(DataError, match=r"p\.jsonl line 2: not UTF-8 \(byte 0xe9 at position \d+\); re-save"):
        load_preference_pairs(tmp_path / "p.jsonl")
    pairs = load_preference_pairs(tmp_path / "p.jsonl", on_error="skip")
    assert len(pairs) == 2 and pairs.stats.skipped == {"bad_encoding": 1} and pairs.stats.n_rows == 3

    captions = pa.array([b"good", b"caf\xe9", b"good"], pa.binary()).view(pa.string())  # parquet does not check
    table = pa.table({"caption": captions, "jpg_0": [png(solid(RED))] * 3, "jpg_1": [png(solid(BLUE))] * 3,
                      "label_0": [1.0, 1.0, 0.0]})
    pq.write_table(table, tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet row 1, column caption: not UTF-8 \(byte 0xe9"):
        load_preference_pairs(tmp_path / "c.parquet")
    pairs = load_preference_pairs(tmp_path / "c.parquet", on_error="skip")
    assert len(pairs) == 2 and pairs.stats.skipped == {"bad_encoding": 1}
    assert [pairs[i]["caption"] for i in range(2)] == ["good", "good"]


def test_images_converted_by_mode_and_counted(tmp_path):
    import numpy as np

    sixteen = Image.fromarray(np.full((8, 10), 32768, np.uint16))  # mid grey in 16 bits
    clear = Image.new("RGBA", (10, 8), (0, 0, 0, 0))
    path = write_preference_parquet(tmp_path / "p.parquet", [("a", sixteen, clear, 1.0), ("b", sixteen, solid(RED), 0.0)])
    pairs = load_preference_pairs(path, on_error="skip")
    assert color(pairs[0]["winner"]) == (128, 128, 128)  # not 255: convert("RGB") clips 16-bit values
    assert color(pairs[0]["loser"]) == (255, 255, 255)  # transparent on white, not the black it holds
    assert pairs.stats.images.summary() == "2 images converted from I;16, 1 RGBA composited on white"
    assert "images: 2 images converted from I;16, 1 RGBA composited on white" in pairs.stats.summary()
    black = load_preference_pairs(path, background="black")
    assert color(black[0]["loser"]) == (0, 0, 0)


def test_too_small_and_too_large_images_refused_or_skipped(tmp_path):
    path = write_preference_parquet(
        tmp_path / "p.parquet",
        [("ok", solid(RED), solid(BLUE), 1.0), ("dot", solid(RED, (1, 1)), solid(BLUE), 1.0),
         ("big", solid(RED, (200, 100)), solid(BLUE), 1.0)],
    )
    with pytest.raises(DataError, match=r"row 1 \(caption 'dot'\), column jpg_0: the image is 1x1 pixels.*"
                                        r"lower min_image_size") as e:
        load_preference_pairs(path, validate_images=True, max_image_pixels=10_000)
    assert e.value.reason == "image_too_small"
    pairs = load_preference_pairs(path, on_error="skip", max_image_pixels=10_000)
    assert len(pairs) == 1 and pairs.stats.skipped == {"image_too_small": 1, "image_too_large": 1}
    assert any("200x100" in m and "max_image_pixels=10000" in m for m in pairs.stats.examples)
    assert len(load_preference_pairs(path, on_error="skip", min_image_size=1, max_image_pixels=None)) == 3


def test_lone_surrogate_escape_in_jsonl_caption_named(tmp_path):
    solid(RED).save(tmp_path / "a.png")
    good = '{"caption": "good", "jpg_0": "a.png", "jpg_1": "a.png", "label_0": 1}'
    (tmp_path / "p.jsonl").write_text(good + "\n" + good.replace("good", "bad \\ud800") + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl line 2: the caption holds '\\ud800', a lone surrogate"):
        load_preference_pairs(tmp_path / "p.jsonl")
    pairs = load_preference_pairs(tmp_path / "p.jsonl", on_error="skip")
    assert len(pairs) == 1 and pairs.stats.skipped == {"bad_encoding": 1}
