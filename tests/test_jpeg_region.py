"""ppl_model.jpeg_region: the partial JPEG decode is exact (bit-identical to the same library's full decode and
crop, and to today's Pillow path), oriented, padded, bounded, and falls back on what it does not handle.

Files are made here: Pillow encodes the usual samplings, progressive and restart markers; the library itself
(TurboJPEG's compressor, through ctypes) the ones Pillow cannot write (4:4:0, 4:1:1, 4:4:1, arithmetic, lossless,
12-bit)."""

from __future__ import annotations

import ctypes
import gc
import io
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ppl_model import jpeg_region
from ppl_model.imageio import UnreadableImage, decode_rgb
from ppl_model.inference.crops import crop_at, fill_colour, tile_offsets
from ppl_model.inference.preprocess import Preprocessing, prepare_image, prepare_jpeg
from ppl_model.jpeg_region import decode_jpeg_crops, decode_model_crops
from ppl_model.reasons import Reason

FILL = (123, 117, 104)
# The largest difference, in 8-bit levels, between the crops decoded here and today's path (Pillow's full decode,
# exif_transpose, crop_at). Pillow 11.2+ bundles libjpeg-turbo as well, with the same default (accurate) IDCT and
# fancy upsampling: measured 0 on every file below.
PILLOW_MAX_DIFF = 0

Offsets = Callable[[int, int], list[tuple[int, int]]]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour structure plus noise: every chroma and luma block differs, as in a photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 12 + 2, width // 12 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = base + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def with_exif(orientation: int) -> dict[str, Any]:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return {"exif": exif.tobytes()}


def pillow_jpeg(image: Image.Image, orientation: int = 1, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=params.pop("quality", 90), **with_exif(orientation), **params)
    return buffer.getvalue()


# -- TurboJPEG's own compressor, for what Pillow cannot write ----------------------------------------------------

TJ_QUALITY, TJ_SUBSAMP, TJ_ARITHMETIC, TJ_LOSSLESS = 3, 4, 14, 15
SAMP = {"4:4:0": 4, "4:1:1": 5, "4:4:1": 6, "4:2:0": 2}


def tj_jpeg(image: Image.Image, subsampling: str = "4:2:0", *, arithmetic: bool = False, lossless: bool = False,
            twelve_bit: bool = False) -> bytes:
    lib = jpeg_region._library()
    assert lib is not None
    lib.tj3Compress8.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    lib.tj3Compress12.argtypes = lib.tj3Compress8.argtypes
    lib.tj3Free.argtypes = [ctypes.c_void_p]
    handle = lib.tj3Init(0)  # TJINIT_COMPRESS
    try:
        for param, value in ((TJ_QUALITY, 90), (TJ_SUBSAMP, SAMP[subsampling]), (TJ_ARITHMETIC, int(arithmetic)),
                             (TJ_LOSSLESS, int(lossless))):
            assert lib.tj3Set(handle, param, value) == 0, lib.tj3GetErrorStr(handle)
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        if twelve_bit:
            pixels = np.ascontiguousarray(pixels.astype(np.int16) * 16)
        out, size = ctypes.c_void_p(), ctypes.c_size_t()
        compress = lib.tj3Compress12 if twelve_bit else lib.tj3Compress8
        rc = compress(handle, pixels.ctypes.data, image.width, 0, image.height, 0, ctypes.byref(out),
                      ctypes.byref(size))
        assert rc == 0, lib.tj3GetErrorStr(handle)
        data = ctypes.string_at(out, size.value)
        lib.tj3Free(out)
        return data
    finally:
        lib.tj3Destroy(handle)


def add_orientation(data: bytes, orientation: int) -> bytes:
    """An EXIF APP1 segment inserted after SOI."""
    exif = with_exif(orientation)["exif"]
    payload = exif if exif.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + exif
    return data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


# -- references ----------------------------------------------------------------------------------------------------


def crops_of(image: Image.Image, offsets: Offsets, size: int) -> np.ndarray:
    """crop_at over an oriented RGB image: today's crops as uint8."""
    return np.stack([np.asarray(crop_at(image, left, top, size, FILL), dtype=np.uint8)
                     for left, top in offsets(image.width, image.height)])


def same_decoder_full(data: bytes) -> Image.Image:
    """The whole image decoded by the same library (one region covering all of it), oriented."""
    full = decode_jpeg_crops(data, lambda w, h: [(0, 0)], 1, FILL, max_pixels=None)  # learn the size
    assert full is not None
    side = max(full.width, full.height)
    whole = decode_jpeg_crops(data, lambda w, h: [(0, 0)], side, FILL, max_pixels=None)
    assert whole is not None and whole.decoded_pixels == full.width * full.height
    return Image.fromarray(whole.crops[0][:full.height, :full.width])


def check(data: bytes, offsets: Offsets, size: int) -> int:
    """Asserts the partial crops equal the same decoder's full decode + crop; returns the max difference from
    today's Pillow path."""
    got = decode_jpeg_crops(data, offsets, size, FILL, max_pixels=None)
    assert got is not None
    reference = same_decoder_full(data)
    assert (got.width, got.height) == reference.size
    np.testing.assert_array_equal(got.crops, crops_of(reference, offsets, size))
    pillow, _ = decode_rgb(data)
    assert (got.width, got.height) == pillow.size
    return int(np.abs(got.crops.astype(np.int16) - crops_of(pillow, offsets, size)).max())


def centre(size: int) -> Offsets:
    return lambda w, h: tile_offsets(w, h, size, 1)


def tiles(size: int, count: int) -> Offsets:
    return lambda w, h: tile_offsets(w, h, size, count)


def sweep(size: int, step: int) -> Offsets:
    """Windows everywhere, including across every edge and corner (one decode covering them all)."""
    return lambda w, h: [(x, y) for y in range(-size // 2, h, step) for x in range(-size // 3, w, step)]


def single_windows(width: int, height: int, size: int) -> list[tuple[int, int]]:
    """Corners for one-crop decodes: at iMCU boundaries and off them, at the edges and beyond them."""
    xs = sorted({-7, 0, 1, 15, 16, 17, 31, 33, width // 2 - size // 2, width - size - 1, width - size, width - 5})
    ys = sorted({-9, 0, 7, 8, 16, 17, height // 2 - size // 2, height - size, height - size + 3, height - 3})
    return [(x, y) for x in xs for y in ys]


# -- exactness -------------------------------------------------------------------------------------------------

VARIANTS: dict[str, Callable[[Image.Image, int], bytes]] = {
    "baseline 4:2:0": lambda im, o: pillow_jpeg(im, o, subsampling=2),
    "baseline 4:2:2": lambda im, o: pillow_jpeg(im, o, subsampling=1),
    "baseline 4:4:4": lambda im, o: pillow_jpeg(im, o, subsampling=0),
    "progressive 4:2:0": lambda im, o: pillow_jpeg(im, o, subsampling=2, progressive=True),
    "progressive 4:4:4": lambda im, o: pillow_jpeg(im, o, subsampling=0, progressive=True),
    "grey": lambda im, o: pillow_jpeg(im.convert("L"), o),
    "grey progressive": lambda im, o: pillow_jpeg(im.convert("L"), o, progressive=True),
    "restart every 3 blocks": lambda im, o: pillow_jpeg(im, o, subsampling=2, restart_marker_blocks=3),
    "restart every row": lambda im, o: pillow_jpeg(im, o, subsampling=1, restart_marker_rows=1),
    "4:4:0 (TurboJPEG)": lambda im, o: add_orientation(tj_jpeg(im, "4:4:0"), o),
    "4:1:1 (TurboJPEG)": lambda im, o: add_orientation(tj_jpeg(im, "4:1:1"), o),
    "4:4:1 (TurboJPEG)": lambda im, o: add_orientation(tj_jpeg(im, "4:4:1"), o),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_crops_are_the_full_decode_cropped_for_every_orientation(variant: str) -> None:
    image = photo(1001, 777)
    differences = []
    for orientation in range(1, 9):
        data = VARIANTS[variant](image, orientation)
        differences.append(check(data, centre(224), 224))
        differences.append(check(data, tiles(224, 4), 224))
        differences.append(check(data, tiles(96, 9), 96))
        differences.append(check(data, sweep(64, 150), 64))
    assert max(differences) == PILLOW_MAX_DIFF


@pytest.mark.parametrize("variant", ["baseline 4:2:0", "progressive 4:2:0", "4:4:1 (TurboJPEG)", "grey"])
@pytest.mark.parametrize("orientation", [1, 6, 7])
def test_one_crop_anywhere_is_exact(variant: str, orientation: int) -> None:
    """One decode per window, at iMCU boundaries and off them, over every edge: each region decoded alone."""
    image = photo(333, 251, seed=3)
    data = VARIANTS[variant](image, orientation)
    full = same_decoder_full(data)
    for corner in single_windows(full.width, full.height, 40):
        got = decode_jpeg_crops(data, lambda w, h, c=corner: [c], 40, FILL, max_pixels=None)
        assert got is not None
        assert got.decoded_pixels < full.width * full.height
        np.testing.assert_array_equal(got.crops, crops_of(full, lambda w, h, c=corner: [c], 40))


@pytest.mark.parametrize("size", [(100, 60), (17, 9), (1, 1), (224, 224), (225, 223)])
@pytest.mark.parametrize("orientation", [1, 5, 8])
def test_images_smaller_than_the_crop_are_padded_as_crop_at_pads(size: tuple[int, int], orientation: int) -> None:
    image = photo(*size, seed=5)
    for variant in ("baseline 4:2:0", "progressive 4:4:4", "grey"):
        data = VARIANTS[variant](image, orientation)
        assert check(data, centre(224), 224) == PILLOW_MAX_DIFF
        assert check(data, tiles(224, 9), 224) == PILLOW_MAX_DIFF


def test_mpo_is_its_first_frame() -> None:
    first, second = photo(400, 300, seed=1), photo(400, 300, seed=2)
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[second], quality=90)
    data = buffer.getvalue()
    got = decode_jpeg_crops(data, centre(224), 224, FILL, max_pixels=None)
    assert got is not None and got.format == "MPO"
    assert check(data, centre(224), 224) == PILLOW_MAX_DIFF
    # The model's crops take plain JPEGs only: an MPO's frame count comes from the full decode
    assert decode_model_crops(data, 224, 1, (0.5, 0.5, 0.5), max_pixels=None) is None


def test_model_crops_are_the_centre_crop_or_tiles_padded_with_the_mean() -> None:
    data = VARIANTS["baseline 4:2:0"](photo(500, 300, seed=3), 1)
    mean = (0.48, 0.46, 0.41)
    for tile_count in (1, 4):
        got = decode_model_crops(data, 224, tile_count, mean, max_pixels=None)
        expected = decode_jpeg_crops(data, tiles(224, tile_count) if tile_count > 1 else centre(224), 224,
                                     fill_colour(mean), max_pixels=None)
        assert got is not None and expected is not None and got.format == "JPEG"
        assert np.array_equal(got.crops, expected.crops)
        assert len(got.crops) == len(tile_offsets(500, 300, 224, tile_count))


@pytest.mark.parametrize("tile_count", [1, 4, 9])
@pytest.mark.parametrize("orientation", [1, 6])
def test_prepare_jpeg_is_prepare_image_of_decode_rgb(tile_count: int, orientation: int) -> None:
    data = pillow_jpeg(photo(900, 700, seed=7), orientation, subsampling=2)
    prep = Preprocessing(224, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28), tile_count)
    new = prepare_jpeg(data, prep)
    image, image_format = decode_rgb(data)
    old = prepare_image(image, prep, image_format)
    assert new is not None
    assert (new.width, new.height, new.format) == (old.width, old.height, old.format) == (
        *((700, 900) if orientation == 6 else (900, 700)), "JPEG")
    assert torch.equal(new.crops, old.crops)


def test_regions_are_planned_by_cost() -> None:
    """One centre crop decodes a small region; tiles spread over a baseline image are decoded as one region
    when that costs less than one pass each (each pass reads the file down to its region)."""
    data = pillow_jpeg(photo(1600, 1200, seed=8), subsampling=2)
    one = decode_jpeg_crops(data, centre(224), 224, FILL, max_pixels=None)
    assert one is not None and one.decoded_pixels <= (224 + 4 * 16) ** 2
    top = decode_jpeg_crops(data, lambda w, h: [(0, 0), (w - 224, 0)], 224, FILL, max_pixels=None)
    assert top is not None and top.decoded_pixels < 1600 * 300  # a band across the top
    plan = jpeg_region._plan
    top_and_bottom = [(0, 0, 10, 10), (1500, 1100, 1510, 1110)]
    assert plan(top_and_bottom, (16, 16), 1600, 1200, False) == [(0, 0, 32, 32), (1472, 1072, 1536, 1136)]
    # progressive: every pass decodes every scan of the whole file, so one region
    assert plan(top_and_bottom, (16, 16), 1600, 1200, True) == [(0, 0, 1536, 1136)]
    assert plan([(0, 1100, 10, 1110), (1500, 1100, 1510, 1110)], (16, 16), 1600, 1200, False) == [
        (0, 1072, 1536, 1136)]


def test_threads_each_have_their_own_handle_freed_with_them() -> None:
    data = pillow_jpeg(photo(640, 480, seed=9), subsampling=2, progressive=True)
    expected = decode_jpeg_crops(data, tiles(64, 9), 64, FILL, max_pixels=None)
    assert expected is not None
    handles: list[int] = []
    owners: list[weakref.ref[jpeg_region._Handle]] = []
    results: list[np.ndarray] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(20):
            got = decode_jpeg_crops(data, tiles(64, 9), 64, FILL, max_pixels=None)
            assert got is not None
            with lock:
                results.append(got.crops)
        with lock:
            handles.append(jpeg_region._local.handle.ptr)
            owners.append(weakref.ref(jpeg_region._local.handle))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 80 and all(np.array_equal(r, expected.crops) for r in results)
    assert len(set(handles)) == 4
    gc.collect()
    assert all(owner() is None for owner in owners)  # each thread's handle was destroyed with its thread


# -- fallbacks and limits ------------------------------------------------------------------------------------------


def png() -> bytes:
    buffer = io.BytesIO()
    photo(64, 64).save(buffer, "PNG")
    return buffer.getvalue()


FALLBACKS: dict[str, Callable[[], bytes]] = {
    "PNG": png,
    "empty": lambda: b"",
    "SOI and garbage": lambda: b"\xff\xd8\xff" + b"\x00" * 100,
    "CMYK": lambda: pillow_jpeg(Image.new("CMYK", (64, 64), (10, 20, 30, 40))),
    "truncated": lambda: pillow_jpeg(photo(256, 256))[:-4000],
    "truncated progressive": lambda: pillow_jpeg(photo(256, 256), progressive=True)[:-3000],
    "arithmetic coding": lambda: tj_jpeg(photo(64, 64), arithmetic=True),
    "lossless": lambda: tj_jpeg(photo(64, 64), lossless=True),
    "12-bit": lambda: tj_jpeg(photo(64, 64), twelve_bit=True),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_what_is_not_handled_falls_back(case: str) -> None:
    data = FALLBACKS[case]()
    assert decode_jpeg_crops(data, centre(32), 32, FILL, max_pixels=None) is None
    prep = Preprocessing(32, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    assert prepare_jpeg(data, prep) is None


def test_damage_below_the_crops_is_what_pillow_decodes_too() -> None:
    """Pillow decodes damaged entropy data with warnings; crops above the damage are the same pixels, and a
    decode that reaches it (the library warns) falls back to the full decode."""
    clean = pillow_jpeg(photo(256, 256))
    damaged = clean[:-2000] + bytes(range(200)) + clean[-1800:]
    above = decode_jpeg_crops(damaged, centre(32), 32, FILL, max_pixels=None)
    assert above is not None
    np.testing.assert_array_equal(above.crops, crops_of(decode_rgb(damaged)[0], centre(32), 32))
    assert decode_jpeg_crops(damaged, tiles(32, 9), 32, FILL, max_pixels=None) is None


def test_pixel_caps_are_checked_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    data = pillow_jpeg(photo(300, 200))
    assert decode_jpeg_crops(data, centre(32), 32, FILL, max_pixels=300 * 200) is not None
    assert decode_jpeg_crops(data, centre(32), 32, FILL, max_pixels=300 * 200 - 1) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert decode_jpeg_crops(data, centre(32), 32, FILL, max_pixels=None) is None


def _scans(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(offset of EOI, [(start, end) of each scan: its SOS segment and entropy-coded data])."""
    pos, scans = 2, []
    while True:
        marker = data[pos + 1]
        if marker == 0xD9:
            return pos, scans
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        end = pos + 2 + length
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
            scans.append((pos, end))
        pos = end


def test_a_progressive_file_with_too_many_scans_is_refused() -> None:
    data = pillow_jpeg(photo(256, 256).convert("L"), progressive=True)
    eoi, scans = _scans(data)
    assert 1 < len(scans) < jpeg_region.SCAN_LIMIT  # an ordinary progressive file decodes
    assert decode_jpeg_crops(data, centre(32), 32, FILL, max_pixels=None) is not None
    start, end = scans[-1]
    hostile = data[:eoi] + data[start:end] * (2 * jpeg_region.SCAN_LIMIT) + data[eoi:]
    with pytest.raises(UnreadableImage) as info:
        decode_jpeg_crops(hostile, centre(32), 32, FILL, max_pixels=None)
    assert info.value.reason is Reason.TOO_LARGE and "scans" in info.value.detail
    assert decode_jpeg_crops(hostile, centre(32), 32, FILL, max_pixels=None, scan_limit=10_000) is None  # warned


def test_library_parameters_are_the_ones_this_build_reads() -> None:
    """The TurboJPEG 3 parameter numbers used, checked against what this library build reports."""
    assert jpeg_region.available()
    lib = jpeg_region._library()
    assert lib is not None
    handle = jpeg_region._handle(lib)
    data = pillow_jpeg(photo(120, 80), subsampling=1, progressive=True)
    assert lib.tj3DecompressHeader(handle.ptr, data, len(data)) == 0
    assert handle.get(jpeg_region._TJPARAM_JPEGWIDTH) == 120 and handle.get(jpeg_region._TJPARAM_JPEGHEIGHT) == 80
    assert handle.get(jpeg_region._TJPARAM_SUBSAMP) == 1 and handle.get(jpeg_region._TJPARAM_PROGRESSIVE) == 1
    assert handle.get(jpeg_region._TJPARAM_PRECISION) == 8 and handle.get(jpeg_region._TJPARAM_COLORSPACE) == 1
    assert handle.get(jpeg_region._TJPARAM_ARITHMETIC) == 0 and handle.get(jpeg_region._TJPARAM_LOSSLESS) == 0
