"""worker.decoding: what the worker accepts as an image, what it refuses and with which reason code, and
the RGB pixels it hands to the model. Every image is generated in memory with Pillow."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import sys
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image, features

from worker import decoding
from worker.decoding import ALLOWED_FORMATS, DecodedImage, decode_image
from worker.settings import Settings
from worker.sources import SourceError

SETTINGS = Settings()


def encode(image: Image.Image, format: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width: int, height: int) -> bytes:
    """A valid PNG (8-bit RGB) claiming any size, with the first row's worth of pixel data at most."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" * min(3 * width + 1, 4096))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", row) + png_chunk(b"IEND", b"")


def decode_error(data: bytes, settings: Settings = SETTINGS) -> SourceError:
    with pytest.raises(SourceError) as info:
        decode_image(data, settings)
    assert info.value.transient is False  # a decoding failure never gets better by retrying
    return info.value


def pixel(decoded: DecodedImage, x: int = 0, y: int = 0) -> tuple[int, ...]:
    return tuple(np.asarray(decoded.image)[y, x])


# -- accepted -----------------------------------------------------------------------------------------------------


def test_jpeg_is_decoded_with_its_format_size_and_content_hash() -> None:
    data = encode(noise(40, 30), "JPEG", quality=90)
    decoded = decode_image(data, SETTINGS)
    assert (decoded.format, decoded.width, decoded.height) == ("JPEG", 40, 30)
    assert decoded.image.mode == "RGB" and decoded.image.size == (40, 30)
    assert decoded.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("format", ["PNG", "BMP", "TIFF", "GIF"] + (["WEBP"] if features.check("webp") else []))
def test_other_allowed_formats(format: str) -> None:
    colour = (10, 200, 30)
    decoded = decode_image(encode(Image.new("RGB", (5, 3), colour), format, **({"lossless": True}
                                                                                if format == "WEBP" else {})), SETTINGS)
    assert (decoded.format, decoded.width, decoded.height) == (format, 5, 3)
    assert pixel(decoded, 4, 2) == colour


def test_one_pixel_and_a_long_thin_strip() -> None:
    one = decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), SETTINGS)
    assert (one.width, one.height, pixel(one)) == (1, 1, (1, 2, 3))
    strip = encode(Image.new("L", (100_000, 1), 77), "PNG")
    decoded = decode_image(strip, SETTINGS)  # 100 000 pixels: far under max_pixels, whatever the aspect ratio
    assert (decoded.width, decoded.height, pixel(decoded, 99_999)) == (100_000, 1, (77, 77, 77))
    assert decode_error(strip, Settings(max_pixels=99_999)).reason == "too_large"


def test_exif_orientation_6_swaps_width_and_height() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    decoded = decode_image(encode(image, "JPEG", exif=exif, quality=95), SETTINGS)
    assert (decoded.width, decoded.height) == (20, 40)
    rows = np.asarray(decoded.image).mean(axis=(1, 2))
    assert rows[:10].mean() > 200 and rows[-20:].mean() < 50  # the left band is now at the top


def test_cmyk_jpeg_becomes_rgb() -> None:
    decoded = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95), SETTINGS)
    r, g, b = pixel(decoded, 8, 8)
    assert decoded.format == "JPEG" and r > 230 and g < 30 and b < 30  # cyan 0, magenta + yellow full: red


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(values), "PNG"), SETTINGS)
    assert np.asarray(decoded.image)[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(decoded.image).shape == (1, 4, 3)


def test_sixteen_bit_tiff_is_scaled_not_clipped() -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(values), "TIFF"), SETTINGS)
    assert np.asarray(decoded.image)[0, :, 1].tolist() == [0, 128, 255]


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    decoded = decode_image(data, SETTINGS)
    assert (decoded.format, pixel(decoded, 3, 3)) == ("GIF", (255, 0, 0))


def test_apng_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((0, 0, 255), (255, 255, 0))]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    decoded = decode_image(data, SETTINGS)
    assert (decoded.format, pixel(decoded)) == ("PNG", (0, 0, 255))


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_animated_webp_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((0, 200, 0), (200, 0, 200))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    decoded = decode_image(data, SETTINGS)
    assert (decoded.format, pixel(decoded, 4, 4)) == ("WEBP", (0, 200, 0))


def test_multi_page_tiff_gives_its_first_page() -> None:
    pages = [Image.new("RGB", (4, 3), (9, 99, 199)), Image.new("RGB", (50, 50), (250, 0, 0))]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    decoded = decode_image(data, SETTINGS)
    assert (decoded.width, decoded.height, pixel(decoded)) == (4, 3, (9, 99, 199))


def test_transparent_palette_png_is_composited_onto_mid_grey() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 255, 0, 200, 10, 10] + [0] * 762)  # index 0: green (transparent), 1: red
    image.putpixel((1, 0), 1)
    decoded = decode_image(encode(image, "PNG", transparency=0), SETTINGS)
    assert pixel(decoded, 0) == (128, 128, 128)  # not the hidden green
    assert pixel(decoded, 1) == (200, 10, 10)


def test_la_png_is_composited_onto_mid_grey() -> None:
    image = Image.new("LA", (3, 1))
    for x, alpha in enumerate((0, 255, 128)):
        image.putpixel((x, 0), (200, alpha))
    decoded = decode_image(encode(image, "PNG"), SETTINGS)
    assert pixel(decoded, 0) == (128, 128, 128)
    assert pixel(decoded, 1) == (200, 200, 200)
    assert abs(pixel(decoded, 2)[0] - 164) <= 1  # 200·128/255 + 128·127/255


# -- refused ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"",
    b"<!DOCTYPE html><html><body>not found</body></html>",
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>',
    gzip.compress(b"\x89PNG\r\n\x1a\n" * 100),
    b"\x00" * 1000,
])
def test_not_an_image(data: bytes) -> None:
    error = decode_error(data)
    assert error.reason == "not_an_image"


@pytest.mark.parametrize("format", ["JPEG", "PNG"])
def test_truncated_files_are_corrupt(format: str) -> None:
    data = encode(noise(64, 64), format)
    error = decode_error(data[: len(data) // 2])
    assert error.reason == "corrupt"


def test_decompression_bomb_header_is_too_large() -> None:
    error = decode_error(png_header(100_000, 100_000))
    assert error.reason == "too_large"


def test_pixel_cap_is_checked_from_the_header_before_decoding() -> None:
    header = png_header(5000, 5000)  # 25 M pixels, under Pillow's own limit; no pixel data at all
    assert decode_error(header, Settings(max_pixels=1_000_000)).reason == "too_large"
    # Under the cap the same bytes reach the pixel decoder, which finds no data: the header check came first.
    assert decode_error(header, Settings(max_pixels=30_000_000)).reason == "corrupt"


@pytest.mark.parametrize(("format", "params"), [("ICO", {}), ("PPM", {}), ("TGA", {}), ("PCX", {})])
def test_formats_pillow_reads_but_the_worker_refuses(format: str, params: dict[str, Any]) -> None:
    assert format not in ALLOWED_FORMATS
    data = encode(Image.new("RGB", (16, 16), (1, 2, 3)), format, **params)
    assert Image.open(io.BytesIO(data)).format == format  # Pillow would happily decode it
    error = decode_error(data)
    assert error.reason == "unsupported_format" and format in error.detail


def test_decode_errors_are_source_errors_with_a_useful_detail() -> None:
    error = decode_error(b"<html>hello</html>")
    assert error.reason == "not_an_image" and "<html>" in error.detail
    assert "BytesIO" not in error.detail


# -- memory and the reasons of issue 18 ----------------------------------------------------------------------------


def jpeg_header(width: int, height: int) -> bytes:
    """A baseline JPEG header (SOF0, 3 components) claiming any size, without any pixel data."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + bytes([1, 0x22, 0, 2, 0x11, 0, 3, 0x11, 0])
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def test_a_64_megapixel_jpeg_is_bounded_by_bytes_from_its_header() -> None:
    header = jpeg_header(8000, 8000)  # 64 M pixels: exactly at max_pixels
    error = decode_error(header, Settings(max_decode_bytes=200 << 20))
    assert error.reason == "too_large" and "bytes" in error.detail
    error = decode_error(header, Settings(decode_memory_bytes=200 << 20))  # more than the whole process budget
    assert error.reason == "too_large" and "budget" in error.detail
    assert decode_error(header).reason == "corrupt"  # under both defaults: decoded, and there is no data


def test_a_full_budget_is_transient_decode_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decoding, "DECODE_WAIT_S", 0.2)
    settings = Settings(decode_memory_bytes=(64 << 20) + 12345)  # a budget of its own for this test
    held = decoding.process_budget(settings).acquire(64 << 20)  # e.g. images another thread has not let go of
    try:
        with pytest.raises(SourceError) as info:
            decode_image(encode(Image.new("RGB", (8, 8)), "PNG"), settings)
        error = info.value
    finally:
        held.release()
    assert error.reason == "decode_busy" and error.transient is True  # retried later, not recorded as failed
    assert decode_image(encode(Image.new("RGB", (8, 8)), "PNG"), settings).width == 8


def test_threads_of_a_process_share_one_budget() -> None:
    settings = Settings(decode_memory_bytes=(3 << 29) + 777)
    assert decoding.process_budget(settings) is decoding.process_budget(Settings.from_env(
        {"PPL_DECODE_MEMORY_BYTES": str((3 << 29) + 777)}))
    decoded = decode_image(encode(Image.new("RGBA", (50, 40), (9, 9, 9, 9)), "PNG"), settings)
    assert decoding.process_budget(settings).used == 4 * 50 * 40  # held while the image is
    del decoded
    assert decoding.process_budget(settings).used == 0


@pytest.mark.parametrize(("name", "data"), [
    ("DDS", b"DDS |" + b"\x00" * 200),
    ("EPS", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"),
    ("JPEG2000", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 100),
    ("FITS", b"SIMPLE  =                    T" + b" " * 50),
    ("FLI", b"\x00" * 4 + b"\x11\xaf" + b"\x00" * 200),
    ("ICO", b"\x00\x00\x01\x00\x01\x00" + b"\x00\x00" + b"\x00" * 200),
])
def test_refused_formats_get_unsupported_format_whatever_their_header_says(name: str, data: bytes) -> None:
    """Opened by every plugin, these bytes came out as decode_error (DDS: NotImplementedError), not_an_image
    (JPEG2000, FLI) or corrupt (FITS, ICO); now no refused plugin parses them."""
    error = decode_error(data)
    assert (error.reason, error.detail) == ("unsupported_format", f"{name} is not accepted")


def test_twelve_bit_jpeg_is_refused_as_unsupported_not_as_not_an_image() -> None:
    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    one_code = bytes([1] + [0] * 15) + b"\x00"
    data = (b"\xff\xd8" + segment(0xDB, b"\x10" + struct.pack(">64H", *([1] * 64)))
            + segment(0xC1, struct.pack(">BHHB", 12, 8, 8, 1) + bytes([1, 0x11, 0]))
            + segment(0xC4, b"\x00" + one_code) + segment(0xC4, b"\x10" + one_code)
            + segment(0xDA, bytes([1, 1, 0x00, 0, 63, 0])) + b"\x3f" + b"\xff\xd9")
    error = decode_error(data)
    assert error.reason == "unsupported_format" and "12-bit" in error.detail


def test_malloc_arenas_are_capped_unless_the_operator_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert decoding.limit_malloc_arenas() is False  # the environment variable wins
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert decoding.limit_malloc_arenas() is sys.platform.startswith("linux")
