"""imgalign.data.images: every PIL mode to the right RGB pixels, size limits checked before decoding, counts."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from imgalign.data import DataError, ImageStats, read_image, to_rgb
from imgalign.errors import UserError


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def grey(image: Image.Image) -> list[int]:
    """The grey values of an RGB image whose channels are equal, row-major."""
    array = pixels(image)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    return array[..., 0].ravel().tolist()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds (almost) no pixel data: decoding it would fail."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------------
# modes
# ----------------------------------------------------------------------------------------------------


def test_16bit_scaled_by_257_not_clipped():
    """I;16 value v -> round(v / 257): 65535 -> 255, 32768 -> 127.5 -> 128, 257 -> 1, 0 -> 0.
    convert("RGB") would give 255 for every value >= 255 (the 99.6 % white bug)."""
    values = np.array([[65535, 32768], [257, 0]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    assert grey(to_rgb(image)) == [255, 128, 1, 0]
    # through a real 16-bit PNG file, as the loaders see it
    stats = ImageStats()
    assert grey(read_image(encode(image), min_size=1, stats=stats)) == [255, 128, 1, 0]
    assert stats.conversions == {"converted from I;16": 1}
    big_endian = Image.frombytes("I;16B", (2, 2), values.astype(">u2").tobytes())
    assert grey(to_rgb(big_endian)) == [255, 128, 1, 0]


def test_32bit_int_uses_16bit_range_when_it_fits_else_the_full_range():
    fits = Image.fromarray(np.array([[65535, 32768, -7]], dtype=np.int32))
    assert fits.mode == "I"
    assert grey(to_rgb(fits)) == [255, 128, 0]  # negatives clip to 0
    full = Image.fromarray(np.array([[2**31 - 1, 2**30, 0]], dtype=np.int32))
    # 2**30 * 255 / (2**31 - 1) = 127.50000006 -> 128
    stats = ImageStats()
    assert grey(to_rgb(full, stats=stats)) == [255, 128, 0]
    assert stats.conversions == {"converted from I (32-bit range)": 1}


def test_float_unit_range_or_0_255_clipped():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, -0.2]], dtype=np.float32))
    assert unit.mode == "F"
    assert grey(to_rgb(unit)) == [0, 128, 255, 0]  # 0.5 * 255 = 127.5 -> 128
    wide = Image.fromarray(np.array([[0.0, 100.4, 300.0, np.nan]], dtype=np.float32))
    stats = ImageStats()
    assert grey(to_rgb(wide, stats=stats)) == [0, 100, 255, 0]  # max > 1: taken as 0-255; clipped; NaN -> 0
    assert stats.conversions == {"converted from F ([0, 255])": 1}


def test_grey_and_bilevel_replicated():
    assert grey(to_rgb(Image.new("L", (2, 1), 77))) == [77, 77]
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    assert grey(to_rgb(bilevel)) == [0, 255]


def test_alpha_composited_on_the_background_not_dropped():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(200, 10, 10, 0), (200, 10, 10, 255), (200, 10, 10, 128)])
    out = pixels(to_rgb(rgba))
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent -> white (the default background)
    assert out[0, 1].tolist() == [200, 10, 10]  # opaque -> itself
    # half alpha: a * c + (1 - a) * 255 with a = 128/255 -> (227.5, 132.5, 132.5), within 1 of it
    assert np.abs(out[0, 2] - [227.5, 132.5, 132.5]).max() <= 1.0
    assert pixels(to_rgb(rgba, background=(0, 0, 0)))[0, 0].tolist() == [0, 0, 0]
    assert pixels(to_rgb(rgba, background="#102030"))[0, 0].tolist() == [16, 32, 48]
    assert pixels(to_rgb(rgba, background="1,2,3"))[0, 0].tolist() == [1, 2, 3]
    # the file keeps its alpha too
    assert pixels(read_image(encode(rgba), min_size=1))[0, 0].tolist() == [255, 255, 255]


def test_grey_alpha_and_palette_alpha():
    la = Image.new("LA", (2, 1))
    la.putdata([(40, 0), (40, 255)])
    assert grey(to_rgb(la)) == [255, 40]
    assert grey(to_rgb(la, background="black")) == [0, 40]
    pa = Image.new("PA", (2, 1))
    pa.putpalette([9, 99, 199] + [0] * 765)
    pa.putdata([(0, 0), (0, 255)])
    assert pixels(to_rgb(pa))[0].tolist() == [[255, 255, 255], [9, 99, 199]]


def test_palette_transparency_index_composited():
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.putdata([0, 1, 2])
    palette.info["transparency"] = 1  # index 1 (green) is transparent
    stats = ImageStats()
    assert pixels(to_rgb(palette, stats=stats))[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 255]]
    assert stats.conversions == {"P (transparency) composited on white": 1}
    # as a real PNG with a tRNS chunk
    reread = read_image(encode(palette), min_size=1)
    assert pixels(reread)[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 255]]
    del palette.info["transparency"]
    assert pixels(to_rgb(palette))[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def test_cmyk_pure_cyan():
    cyan = Image.new("CMYK", (2, 2), (255, 0, 0, 0))
    assert pixels(to_rgb(cyan))[0, 0].tolist() == [0, 255, 255]
    assert pixels(read_image(encode(cyan, "JPEG"), min_size=1))[0, 0].tolist() == pytest.approx([0, 255, 255], abs=3)


def test_rgb_unchanged_and_not_counted():
    image = Image.new("RGB", (2, 1), (1, 2, 3))
    stats = ImageStats()
    out = to_rgb(image, stats=stats)
    assert out is not image and pixels(out)[0, 0].tolist() == [1, 2, 3]
    assert stats.n_images == 1 and stats.conversions == {} and stats.summary() == ""


def test_stats_summary_counts_what_was_converted():
    stats = ImageStats()
    sixteen = Image.fromarray(np.full((2, 2), 1000, np.uint16))
    clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    for image in (sixteen, sixteen, sixteen, clear, clear, Image.new("RGB", (2, 2))):
        to_rgb(image, stats=stats)
    assert stats.n_images == 6 and stats.n_converted == 5
    assert stats.summary() == "3 images converted from I;16, 2 RGBA composited on white"
    opaque = ImageStats()
    to_rgb(Image.new("RGBA", (2, 2), (5, 5, 5, 255)), stats=opaque)
    assert opaque.summary() == "1 image converted from RGBA (opaque)"


def test_rewards_and_toy_evaluator_use_the_same_conversion():
    from imgalign.rewards.images import pil_to_tensor
    from imgalign.toy.evaluator import to_uint8_array

    sixteen = Image.fromarray(np.array([[65535, 32768]], dtype=np.uint16))
    assert (pil_to_tensor(sixteen)[:, 0, 1] * 255).round().tolist() == [128.0] * 3
    clear = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    assert to_uint8_array(clear)[0, 0].tolist() == [255, 255, 255]


# ----------------------------------------------------------------------------------------------------
# limits and errors
# ----------------------------------------------------------------------------------------------------


def test_tiny_image_refused_naming_the_file_and_fix(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(path)
    with pytest.raises(DataError, match=r"dot\.png: the image is 1x1 pixels, smaller than min_size=8.*lower min_size") as e:
        read_image(path)
    assert e.value.reason == "image_too_small" and isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    assert read_image(path, min_size=1).size == (1, 1)
    assert read_image(path, min_size=None).size == (1, 1)
    with pytest.raises(DataError, match="7x20 pixels"):
        read_image(encode(Image.new("RGB", (7, 20))))  # one short side is enough


def test_pixel_limit_refused_before_decoding(monkeypatch):
    image = encode(Image.new("RGB", (100, 60)))

    def no_decoding(self):
        raise AssertionError("the image was decoded")

    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", no_decoding)
        with pytest.raises(DataError, match=r"100x60 = 0\.006 MP is more than max_pixels=5000.*before decoding") as e:
            read_image(image, max_pixels=5000)
    assert e.value.reason == "image_too_large"
    assert read_image(image, max_pixels=6000).size == (100, 60)
    # a 90 MP header (the default limit is 64 MP): refused from the header; decoding it would fail instead
    with pytest.raises(DataError, match=r"9500x9500 = 90\.2 MP is more than max_pixels=64000000"):
        read_image(png_header_only(9500, 9500), where="big.png")


def test_pillow_decompression_bomb_error_is_a_clear_error():
    # 900 MP: over twice PIL.Image.MAX_IMAGE_PIXELS, so Image.open itself raises DecompressionBombError
    with pytest.raises(DataError, match=r"big\.png: refused by Pillow's decompression-bomb limit.*MAX_IMAGE_PIXELS") as e:
        read_image(png_header_only(30000, 30000), where="big.png", max_pixels=None)
    assert e.value.reason == "image_too_large"


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"bad\.png: cannot decode the image file \(UnidentifiedImageError"):
        read_image(bad)
    truncated = encode(Image.new("RGB", (64, 64), (1, 2, 3)))[:-40]
    with pytest.raises(DataError, match="cannot decode the image bytes"):
        read_image(truncated, max_pixels=None)
    with pytest.raises(DataError, match=r"gone\.png: image file not found"):
        read_image(tmp_path / "gone.png")
    with pytest.raises(DataError, match="not a colour"):
        to_rgb(Image.new("RGBA", (1, 1)), background="not-a-colour")


def test_save_image_whole_leaves_no_half_image(tmp_path, monkeypatch):
    """The image goes through a temporary file beside the target (format from the target's suffix); a writer killed
    mid-save leaves no file under the final name, so a resumed generation redoes it."""
    from PIL import Image

    from imgalign.data.images import save_image_whole

    image = Image.new("RGB", (8, 8), (200, 10, 10))
    save_image_whole(image, tmp_path / "a.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]
    assert Image.open(tmp_path / "a.jpg").format == "JPEG"

    def killed(self, fp, *a, **k):
        open(fp, "wb").write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_image_whole(image, tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists()
