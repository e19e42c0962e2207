"""ppl_model.imageio: memory bounds from the header, the first displayed frame, viewers' BMP alpha, bit depths,
and a documented reason for every decoder failure. Every file is built here with Pillow, numpy or struct."""

from __future__ import annotations

import gc
import io
import json
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ppl_model import imageio
from ppl_model.imageio import MemoryBudget, UnreadableImage, decode_rgb, decoded_bytes

REPO = Path(__file__).resolve().parent.parent
ALLOWED = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})


def encode(image: Image.Image, format: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def refused(data: bytes, **kwargs: Any) -> UnreadableImage:
    with pytest.raises(UnreadableImage) as info:
        decode_rgb(data, **kwargs)
    return info.value


def tiff(width: int, height: int, bits: int, data: bytes, *, compression: int = 1, sample_format: int = 1,
         samples: int = 1, photometric: int = 1) -> bytes:
    """A one-strip little-endian TIFF with exactly the tags given (Pillow's writer would choose its own)."""
    entries = sorted([(256, 4, width), (257, 4, height), (258, 3, bits), (259, 3, compression), (262, 3, photometric),
                      (273, 4, 0), (277, 3, samples), (278, 4, height), (279, 4, len(data)), (339, 3, sample_format)])
    data_offset = 8 + 2 + 12 * len(entries) + 4
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, 1) + packed
    return out + b"\x00\x00\x00\x00" + data


def bmp32(width: int, height: int, bgra: bytes, masks: tuple[int, int, int, int]) -> bytes:
    """A 32-bit BI_BITFIELDS BMP with a BITMAPV4 header, whose fourth mask says where alpha is."""
    header = 108
    dib = struct.pack("<IiiHHIIiiII", header, width, height, 1, 32, 3, len(bgra), 2835, 2835, 0, 0)
    dib += struct.pack("<IIII", *masks) + b"\x00" * (header - 56)
    offset = 14 + header
    return b"BM" + struct.pack("<IHHI", offset + len(bgra), 0, 0, offset) + dib + bgra


def jpeg_12_bit() -> bytes:
    """A valid 12-bit JPEG (SOF1, extended sequential): one 8×8 grey block, every coefficient zero."""
    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    one_code = bytes([1] + [0] * 15) + b"\x00"  # a Huffman table with a single 1-bit code for symbol 0
    return (b"\xff\xd8" + segment(0xDB, b"\x10" + struct.pack(">64H", *([1] * 64)))
            + segment(0xC1, struct.pack(">BHHB", 12, 8, 8, 1) + bytes([1, 0x11, 0]))
            + segment(0xC4, b"\x00" + one_code) + segment(0xC4, b"\x10" + one_code)
            + segment(0xDA, bytes([1, 1, 0x00, 0, 63, 0])) + b"\x3f" + b"\xff\xd9")


# -- memory ---------------------------------------------------------------------------------------------------


def test_float_tiff_bomb_is_refused_on_its_header_by_bytes_not_pixels() -> None:
    # 8000×8000 float32 with no pixel data at all: 64 M pixels pass a 64 M pixel cap, but not a byte budget
    header = tiff(8000, 8000, 32, b"\x00" * 64, sample_format=3)
    error = refused(header, max_pixels=64_000_000, max_bytes=512 << 20)
    assert error.reason == "too_large" and "bytes" in error.detail and "8000x8000 F" in error.detail
    # Above the budget the same bytes reach the decoder, which finds no data: the header check came first.
    assert refused(header, max_pixels=64_000_000, max_bytes=1 << 40).reason == "corrupt"


def test_estimate_counts_mode_orientation_and_decoder_buffers() -> None:
    pixels = 1000 * 1000

    def estimate(image: Image.Image, format: str, **params: Any) -> int:
        with Image.open(io.BytesIO(encode(image, format, **params))) as img:
            return decoded_bytes(img) - imageio.DECODE_OVERHEAD_BYTES

    rgb = Image.new("RGB", (1000, 1000), (1, 2, 3))
    assert estimate(rgb, "PNG") == 4 * pixels  # Pillow keeps RGB in 4 bytes, and returns that very image
    assert estimate(Image.new("RGBA", (1000, 1000)), "PNG") == 10 * pixels
    assert estimate(Image.new("F", (1000, 1000)), "TIFF") == 7 * pixels + 4 * pixels  # + libtiff's strip
    exif = Image.Exif()
    exif[0x0112] = 6
    assert estimate(rgb, "JPEG", exif=exif) == 8 * pixels  # the transposed copy beside the original
    baseline = estimate(rgb, "JPEG", subsampling=0)
    assert estimate(rgb, "JPEG", subsampling=0, progressive=True) == baseline + 6 * pixels  # DCT coefficients


@pytest.mark.parametrize("case", ["png_rgba", "tiff_float", "jpeg_rgb_rotated", "jpeg_rgb_progressive",
                                  "png_p_transparent", "tiff_12bit", "webp_rgb", "apng_default_image",
                                  "bmp_bitfields_layout"])
def test_measured_peak_stays_within_the_estimate(case: str) -> None:
    """The estimate is an upper bound of what decoding really takes: peak RSS of a fresh process, measured."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_memory.py"), "--modes", "--side", "2500",
                           "--case", case, "--json"], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["measured_per_pixel"] >= 3.5, result  # the measurement sees the decode (≥ the RGB result)
    assert result["within"], result


def test_budget_waits_for_free_bytes_refuses_what_never_fits_and_times_out() -> None:
    budget = MemoryBudget(100, wait_s=5)
    first = budget.acquire(60)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(budget.acquire(60)))
    waiter.start()
    time.sleep(0.2)
    assert not got and budget.used == 60  # 60 + 60 > 100: the second decode waits
    first.release()
    waiter.join(timeout=5)
    assert got and budget.used == 60 and budget.peak == 60
    with pytest.raises(UnreadableImage) as info:
        budget.acquire(101)
    assert info.value.reason == "too_large" and "101 bytes" in info.value.detail
    budget.wait_s = 0.1
    with pytest.raises(UnreadableImage) as info:
        budget.acquire(50)
    assert info.value.reason == "decode_busy"


def test_budget_holds_a_decoded_image_until_it_is_garbage() -> None:
    budget = MemoryBudget(1 << 30)
    image, _ = decode_rgb(encode(Image.new("RGBA", (300, 200), (1, 2, 3, 40)), "PNG"), budget=budget)
    assert budget.used == 4 * 300 * 200  # the RGB result's bytes, not the decode's peak
    assert budget.peak > budget.used
    del image
    gc.collect()
    assert budget.used == 0


def test_eight_threads_share_the_budget_and_all_complete() -> None:
    data = encode(Image.new("RGBA", (1000, 1000), (200, 40, 40, 128)), "PNG")
    budget = MemoryBudget(2 * (10 * 10**6 + imageio.DECODE_OVERHEAD_BYTES))  # two such decodes at a time
    results: list[tuple[int, ...]] = []

    def work() -> None:
        image, _ = decode_rgb(data, budget=budget)
        results.append(image.getpixel((500, 500)))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [(164, 84, 84)] * 8  # 200·128/255 + 128·127/255, and so on
    assert budget.peak <= budget.total
    gc.collect()
    assert budget.used == 0


def test_a_failed_decode_gives_its_bytes_back() -> None:
    budget = MemoryBudget(1 << 30)
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(UnreadableImage):
        decode_rgb(data[: len(data) // 2], budget=budget)
    assert budget.used == 0 and budget.peak > 0


# -- what viewers see --------------------------------------------------------------------------------------------


def test_apng_default_image_outside_the_animation_is_skipped() -> None:
    default, *animation = (Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0)))
    data = encode(default, "PNG", save_all=True, append_images=animation, default_image=True, duration=50)
    with Image.open(io.BytesIO(data)) as img:
        assert img.default_image and img.n_frames == 3 and img.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert decode_rgb(data, formats=ALLOWED)[0].getpixel((0, 0)) == (0, 0, 255)  # the first animation frame
    plain = encode(default, "PNG", save_all=True, append_images=animation, duration=50)  # default = frame 0
    assert decode_rgb(plain)[0].getpixel((0, 0)) == (255, 0, 0)


def test_bmp_alpha_that_is_zero_everywhere_is_ignored_as_viewers_do() -> None:
    masks = (0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000)
    unused_alpha = bmp32(2, 2, bytes([30, 20, 10, 0]) * 4, masks)
    with Image.open(io.BytesIO(unused_alpha)) as img:
        assert img.mode == "RGBA"  # Pillow reads the alpha mask...
    assert decode_rgb(unused_alpha)[0].getpixel((0, 0)) == (10, 20, 30)  # ...but it is not a flat grey
    used_alpha = bmp32(2, 2, bytes([30, 20, 10, 0, 30, 20, 10, 255]) * 2, masks)
    rgb = decode_rgb(used_alpha)[0]
    assert (rgb.getpixel((0, 0)), rgb.getpixel((1, 0))) == ((128, 128, 128), (10, 20, 30))
    # Only BMP's unused byte: a PNG that is transparent everywhere stays transparent
    assert decode_rgb(encode(Image.new("RGBA", (2, 2), (10, 20, 30, 0)), "PNG"))[0].getpixel((0, 0)) == (128,) * 3


def test_twelve_bit_tiff_is_scaled_by_its_declared_depth() -> None:
    packed = bytes([0x00, 0x08, 0x00, 0xFF, 0xF0, 0x00])  # 12-bit samples 0, 2048, 4095, 0
    data = tiff(4, 1, 12, packed)
    assert np.asarray(decode_rgb(data, formats=ALLOWED)[0])[0, :3, 0].tolist() == [0, 128, 255]
    sixteen = tiff(2, 1, 16, struct.pack("<HH", 4095, 65535))  # 16 bits declared: 65535 is white
    assert np.asarray(decode_rgb(sixteen)[0])[0, :, 0].tolist() == [15, 255]


def test_float_tiff_is_decoded_and_scaled() -> None:
    values = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)
    data = encode(Image.fromarray(values), "TIFF", compression="tiff_deflate")
    assert np.asarray(decode_rgb(data, formats=ALLOWED)[0])[0, :, 0].tolist() == [0, 128, 255, 0]
    wide = np.linspace(-1.0, 3.0, 4096 * 300, dtype=np.float32).reshape(300, 4096)  # many row bands
    grey = np.asarray(decode_rgb(encode(Image.fromarray(wide), "TIFF"))[0])[..., 0]
    assert grey[0, 0] == 0 and grey[-1, -1] == 255 and np.all(np.diff(grey.ravel().astype(int)) >= 0)


# -- refusals and their reasons ----------------------------------------------------------------------------------


def test_valid_variants_the_decoder_lacks_are_unsupported_with_an_accurate_detail() -> None:
    error = refused(jpeg_12_bit(), formats=ALLOWED)
    assert error.reason == "unsupported_format" and "12-bit" in error.detail
    float_rgb = tiff(1, 1, 32, b"\x00" * 12, sample_format=3, samples=3, photometric=2)
    error = refused(float_rgb, formats=ALLOWED)
    assert error.reason == "unsupported_format" and "float samples" in error.detail
    unknown_codec = tiff(2, 1, 8, b"\x01\x02", compression=12345)
    error = refused(unknown_codec, formats=ALLOWED)
    assert error.reason == "unsupported_format" and "compression 12345" in error.detail
    error = refused(bmp_header(4, 1, 64, 0, b""), formats=ALLOWED)  # a pixel depth that does not exist
    assert error.reason == "unsupported_format" and "depth (64)" in error.detail


def bmp_header(width: int, height: int, bits: int, compression: int, rest: bytes, dib: int = 40) -> bytes:
    header = struct.pack("<IiiHHIIiiII", dib, width, height, 1, bits, compression, 0, 2835, 2835, 0, 0)
    header += b"\x00" * (dib - 40)
    return b"BM" + struct.pack("<IHHI", 14 + len(header) + len(rest), 0, 0, 14 + len(header)) + header + rest


def test_bmps_pillow_refuses_but_viewers_show_are_decoded() -> None:
    palette = bytes([0, 0, 0, 0, 85, 85, 85, 0, 170, 170, 170, 0, 255, 255, 255, 0])
    two_bit = bmp_header(4, 1, 2, 0, palette + b"\x1b\x00\x00\x00")  # indices 0 1 2 3, MSB first
    two_bit = two_bit[:10] + struct.pack("<I", 14 + 40 + 16) + two_bit[14:]  # pixels after the palette
    with pytest.raises(OSError, match="depth"):
        Image.open(io.BytesIO(two_bit))
    image = decode_rgb(two_bit, formats=ALLOWED)[0]
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (85, 85, 85), (170, 170, 170), (255, 255, 255)]
    # 32-bit bitfields with R, G, B in bytes 1, 2, 3: a layout Pillow refuses, as it refuses the BMP suite's
    # rgb32bf.bmp (any contiguous masks are decoded); bottom-up rows
    layout = bmp32(2, 2, bytes([0, 10, 20, 30]) * 2 + bytes([0, 200, 100, 50]) * 2,
                   (0x0000FF00, 0x00FF0000, 0xFF000000, 0))
    with pytest.raises(OSError, match="bitfields"):
        Image.open(io.BytesIO(layout))
    image = decode_rgb(layout, formats=ALLOWED)[0]
    assert (image.getpixel((0, 0)), image.getpixel((1, 1))) == ((200, 100, 50), (10, 20, 30))
    # 16-bit ARGB 4444 (BITMAPV4 with an alpha mask): 4-bit channels scaled to 8 bits; alpha is honoured
    masks = struct.pack("<IIII", 0xF000, 0x0F00, 0x00F0, 0x000F)
    argb = bmp_header(4, 1, 16, 3, struct.pack("<4H", 0xF00F, 0x0F0F, 0x00FF, 0xFFF0), dib=108)
    argb = argb[:54] + masks + argb[70:]
    image = decode_rgb(argb, formats=ALLOWED)[0]
    assert [image.getpixel((x, 0)) for x in range(4)] == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)]
    assert refused(layout[:-5], formats=ALLOWED).reason == "corrupt"  # truncated pixel data


def test_a_tiff_codec_missing_from_libtiff_is_unsupported_not_corrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoCodecs:
        def TIFFIsCODECConfigured(self, code: int) -> int:  # libtiff's name
            return 0

    monkeypatch.setattr(imageio, "_libtiff", lambda: NoCodecs())
    # A build whose libtiff has no deflate: the strip then fails, as a WebP strip does where libtiff lacks WebP
    error = refused(tiff(8, 8, 8, b"these bytes are no deflate stream", compression=8), formats=ALLOWED)
    assert error.reason == "unsupported_format" and "tiff_adobe_deflate (8) is not built into libtiff" in error.detail


REFUSED_HEADERS = {
    "DDS": b"DDS |" + b"\x00" * 200,
    "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
    "JPEG2000": b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 100,
    "FITS": b"SIMPLE  =                    T" + b" " * 50,
    "FLI": b"\x00\x00\x00\x00\x11\xaf" + b"\x00" * 200,
    "ICO": encode(Image.new("RGB", (16, 16)), "ICO"),
    "PSD": b"8BPS\x00\x01" + b"\x00" * 100,
}


@pytest.mark.parametrize("format", sorted(REFUSED_HEADERS))
def test_refused_formats_never_reach_their_parser(format: str, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.init()
    factory, accept = Image.OPEN[format]
    called: list[str] = []

    def spy(*args: Any) -> Any:
        called.append(format)
        return factory(*args)

    monkeypatch.setitem(Image.OPEN, format, (spy, accept))
    error = refused(REFUSED_HEADERS[format], formats=ALLOWED)
    assert (error.reason, error.detail) == ("unsupported_format", f"{format} is not accepted")
    assert called == []  # named by its signature test alone


@pytest.mark.parametrize(("exception", "reason"), [
    (NotImplementedError("no such subformat"), "unsupported_format"),
    (OSError("image file is truncated"), "corrupt"),
    (OSError("Unsupported BMP compression (9)"), "unsupported_format"),
    (ValueError("bad value"), "corrupt"),
    (TypeError("unsupported operand type(s)"), "corrupt"),  # a parser tripping on a field: damage
    (KeyError(99), "corrupt"),
    (IndexError("list index out of range"), "corrupt"),
    (EOFError(), "corrupt"),
    (SyntaxError("broken"), "corrupt"),
    (struct.error("unpack requires a buffer"), "corrupt"),
    (RecursionError("maximum recursion depth exceeded"), "corrupt"),
    (MemoryError(), "too_large"),
    (Image.DecompressionBombError("too many pixels"), "too_large"),
])
def test_every_decoder_exception_class_has_a_documented_reason(exception: BaseException, reason: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_load(self: Image.Image) -> None:
        raise exception

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", failing_load)
    error = refused(encode(Image.new("RGB", (4, 4)), "PNG"), formats=ALLOWED)
    assert error.reason == reason
    assert error.reason in imageio.REASONS and f"``{reason}``" in imageio.__doc__


def test_a_genuine_bug_still_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Image.Image) -> None:
        raise AttributeError("a decoder bug")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken)
    with pytest.raises(AttributeError):  # the worker records it as decode_error: worth a bug report
        decode_rgb(encode(Image.new("RGB", (4, 4)), "PNG"))


def test_paths_missing_and_unreadable(tmp_path: Path) -> None:
    assert refused(tmp_path / "nope.png").reason == "missing"
    assert refused(tmp_path).reason == "unreadable"  # a directory


def test_pillows_pixel_limit_is_checked_without_touching_the_warnings_filters() -> None:
    import warnings
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    # 10000×9500: over Image.MAX_IMAGE_PIXELS (about 89.5 M), under twice it, where Pillow only warns
    header = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 9500, 8, 2, 0, 0, 0))
              + chunk(b"IEND", b""))
    filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what another thread may have set: the limit must hold regardless
        error = refused(header)
    assert error.reason == "too_large" and "Pillow's limit" in error.detail
    assert warnings.filters == filters
