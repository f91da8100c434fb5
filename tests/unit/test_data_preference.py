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


def solid(color, size=(8, 6)) -> Image.Image:
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
    assert first["winner"].mode == "RGB" and first["winner"].size == (8, 6)


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
    assert batch["original_sizes"].tolist() == [[6, 8]] * 3
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
