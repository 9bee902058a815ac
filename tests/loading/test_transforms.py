"""Decoding any image mode to RGB, naming bad bytes by key, draft decoding."""

import io

import pytest
from PIL import Image

from helpers.errors import BadImageError
from helpers.loading import transforms


def _jpeg(mode="RGB", fmt="JPEG", size=(64, 48), **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, **kw).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "I;16"])
def test_any_mode_decodes_to_rgb(mode):
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    img = transforms.decode_image(_jpeg(mode, fmt), f"x/{mode}.jpg")
    assert img.mode == "RGB" and img.size == (64, 48)


def test_palette_with_transparency_and_png_named_jpg():
    p = Image.new("P", (8, 8), 0)
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=0)
    img = transforms.decode_image(buf.getvalue(), "Images/n1-a/n1_1.jpg")  # a PNG with a .jpg name
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "blob,why",
    [
        (b"", "empty object"),
        (_jpeg()[:200], "not a readable image"),
        (b"<html>not an image</html>", "not a readable image"),
    ],
)
def test_bad_bytes_name_the_key(blob, why):
    with pytest.raises(BadImageError, match=f"Images/n1-a/bad.jpg: {why}"):
        transforms.decode_image(blob, "Images/n1-a/bad.jpg")


def test_draft_decodes_smaller_but_not_below_target():
    img = transforms.decode_image(_jpeg(size=(480, 400)), "k", draft=100)
    assert 100 <= min(img.size) < 400


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_header_declaring_huge_dimensions_is_refused_before_decoding(fmt):
    import struct
    import zlib

    from helpers.loading import gpudecode

    blob = _jpeg(fmt=fmt)
    if fmt == "PNG":  # IHDR's width and height, its CRC made to match
        ihdr = b"IHDR" + struct.pack(">II", 12000, 12000) + blob[24:29]
        blob = blob[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + blob[33:]
    else:  # baseline SOF0: height, then width
        sof = blob.index(b"\xff\xc0")
        blob = blob[: sof + 5] + struct.pack(">HH", 12000, 12000) + blob[sof + 9 :]
    for read in (transforms.decode_image, gpudecode.keep_jpeg):
        with pytest.raises(BadImageError, match="k.jpg: declares 12000x12000 pixels, over the"):
            read(blob, "k.jpg")
