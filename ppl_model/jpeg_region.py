"""Decoding only the part of a JPEG the model sees: the centre crop or the K tiles, exactly.

A 12 MP photo is judged on one 224×224 crop (or a few tiles), yet today's path decodes and orients all of it.
libjpeg-turbo's TurboJPEG 3 API decodes a cropping region (``tj3SetCroppingRegion``: IDCT, upsampling and
colour conversion only inside it; a baseline file is read only down to the region's bottom). Measured by
``benchmarks/jpeg_decode.py`` (decode + prepare, same run): a 12 MP q90 baseline photo's centre crop 4× faster,
6× when it is stored rotated (EXIF 6, as phones store portrait photos); K tiles spread over the image need
about the whole image, 1.1-2.3×; progressive files, whose every scan must be entropy-decoded whatever the
region, 1.1-1.5×.
The library comes from the ``turbojpeg`` wheel (its ``turbojpeg.libs/libturbojpeg-*.so.0.3.0``, libjpeg-turbo
2.1.92 = 3.0 beta), reached through ``ctypes``; the wheel's own binding is not used.

**Exact, not approximate.** The crops returned are bit-identical to a full decode by the same library
followed by the same crop (``tests/test_jpeg_region.py`` checks it for every sampling, progressive, restart
markers, odd sizes and all EXIF orientations; and measures the difference from Pillow's decode, which is 0
there: Pillow bundles libjpeg-turbo too). What makes it exact: the region is widened to iMCU boundaries
(TurboJPEG requires its left edge there) and by one more iMCU on every side where the image continues, so
that fancy chroma upsampling sees the same neighbours as in a full decode, then trimmed.

**Orientation.** The model sees EXIF-oriented pixels, so each crop box (in oriented coordinates) is mapped to
the stored image (a rotated photo's centre-right crop is stored at the bottom centre), that stored region is
decoded and the orientation applied to it. Crops that leave the image are padded with ``fill`` exactly as
``ppl_model.inference.crops.crop_at`` pads.

**Bounded.** The pixel cap (``max_pixels`` and Pillow's ``Image.MAX_IMAGE_PIXELS``) is checked on the header
TurboJPEG itself reads, before anything is decoded (this library build predates ``TJPARAM_MAXPIXELS``); a
progressive file with more than ``SCAN_LIMIT`` scans is refused as ``too_large`` (``TJPARAM_SCANLIMIT``: a
hostile progressive JPEG with thousands of scans costs a pass over the whole image per scan). Memory: the
regions' pixels (3 bytes each), plus for a progressive file the whole image's coefficients (2 bytes per
sample), as in a full decode.

**Fallback.** ``None`` means "not handled here, decode the whole image as before" (``ppl_model.imageio``
then gives the proper reason if it cannot): not a JPEG, CMYK/YCCK, 12-bit or lossless, arithmetic coding, an
unusual sampling, no end-of-image marker (a truncated file), over the pixel cap, any error or warning from
the library, or the library not installed (a platform without the wheel). An MPO is its first frame, the main
JPEG, as in the full decode.

One TurboJPEG handle per thread (``threading.local``), destroyed with its thread. ``ctypes`` releases the GIL
during the decode, so threads decode in parallel.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import io
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ppl_model.imageio import MemoryBudget, UnreadableImage
from ppl_model.inference.crops import fill_colour, tile_offsets
from ppl_model.reasons import Reason

SCAN_LIMIT = 100  # libjpeg writes 10 scans for a colour progressive JPEG, 6 for grey; mozjpeg a few more

# TurboJPEG 3 constants (turbojpeg.h; the values of this library build are checked by the tests)
_TJINIT_DECOMPRESS = 1
_TJPARAM_STOPONWARNING = 0
_TJPARAM_SUBSAMP = 4
_TJPARAM_JPEGWIDTH = 5
_TJPARAM_JPEGHEIGHT = 6
_TJPARAM_PRECISION = 7
_TJPARAM_COLORSPACE = 8
_TJPARAM_FASTUPSAMPLE = 9
_TJPARAM_FASTDCT = 10
_TJPARAM_PROGRESSIVE = 12
_TJPARAM_SCANLIMIT = 13
_TJPARAM_ARITHMETIC = 14
_TJPARAM_LOSSLESS = 15
_TJPF_RGB = 0
_TJCS_RGB, _TJCS_YCBCR, _TJCS_GRAY = 0, 1, 2
# iMCU width × height by TJSAMP_*: 4:4:4, 4:2:2, 4:2:0, grey, 4:4:0, 4:1:1, 4:4:1 (unknown samplings fall back)
_IMCU = {0: (8, 8), 1: (16, 8), 2: (16, 16), 3: (8, 8), 4: (8, 16), 5: (32, 8), 6: (8, 32)}

_ORIENTATIONS = (2, 3, 4, 5, 6, 7, 8)  # EXIF orientations that ImageOps.exif_transpose applies


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


@dataclass(frozen=True)
class RegionDecode:
    """What ``decode_jpeg_crops`` decoded: the oriented image size, its crops and the file format."""

    width: int  # after EXIF orientation, as decode_rgb's image would be
    height: int
    crops: np.ndarray  # (T, size, size, 3) uint8, in the order of the offsets
    format: str  # Pillow's name: "JPEG", or "MPO" for a multi-picture file
    decoded_pixels: int  # pixels the library decoded (the regions' area), for the benchmarks and budgets


@functools.cache
def _library() -> ctypes.CDLL | None:
    """libturbojpeg from the ``turbojpeg`` wheel, with the TurboJPEG 3 signatures; None where it is absent."""
    try:
        files = importlib.metadata.distribution("turbojpeg").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith("libturbojpeg") and ".so" in file.name:
            try:
                lib = ctypes.CDLL(str(file.locate()))
                _declare(lib)
            except (OSError, AttributeError):  # not loadable here, or not TurboJPEG 3
                continue
            return lib
    return None


def _declare(lib: ctypes.CDLL) -> None:
    handle, c_int, size_t = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    lib.tj3Init.argtypes, lib.tj3Init.restype = [c_int], handle
    lib.tj3Destroy.argtypes, lib.tj3Destroy.restype = [handle], None
    lib.tj3Set.argtypes, lib.tj3Set.restype = [handle, c_int, c_int], c_int
    lib.tj3Get.argtypes, lib.tj3Get.restype = [handle, c_int], c_int
    lib.tj3GetErrorStr.argtypes, lib.tj3GetErrorStr.restype = [handle], ctypes.c_char_p
    lib.tj3DecompressHeader.argtypes, lib.tj3DecompressHeader.restype = [handle, ctypes.c_char_p, size_t], c_int
    lib.tj3SetCroppingRegion.argtypes, lib.tj3SetCroppingRegion.restype = [handle, _Region], c_int
    lib.tj3Decompress8.argtypes = [handle, ctypes.c_char_p, size_t, ctypes.c_void_p, c_int, c_int]
    lib.tj3Decompress8.restype = c_int


def available() -> bool:
    """Whether the partial decoder is installed here (else ``decode_jpeg_crops`` always returns None)."""
    return _library() is not None


class _Handle:
    """A TurboJPEG decompressor, destroyed when its owner (the thread's local storage) lets it go."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.ptr = lib.tj3Init(_TJINIT_DECOMPRESS)
        if not self.ptr:
            raise MemoryError("tj3Init failed")

    def __del__(self) -> None:
        if getattr(self, "ptr", None):
            self.lib.tj3Destroy(self.ptr)
            self.ptr = None

    def get(self, param: int) -> int:
        return int(self.lib.tj3Get(self.ptr, param))

    def set(self, param: int, value: int) -> None:
        if self.lib.tj3Set(self.ptr, param, value) != 0:
            raise _TurboError(self.error())

    def error(self) -> str:
        message = self.lib.tj3GetErrorStr(self.ptr)
        return message.decode("utf-8", "replace") if message else "unknown TurboJPEG error"


class _TurboError(Exception):
    pass


_local = threading.local()


def _handle(lib: ctypes.CDLL) -> _Handle:
    handle = getattr(_local, "handle", None)
    if handle is None:
        handle = _local.handle = _Handle(lib)
    return handle


# -- geometry ----------------------------------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # left, top, right, bottom (exclusive)


def _stored_point(orientation: int, x: int, y: int, sw: int, sh: int) -> tuple[int, int]:
    """The stored pixel shown at oriented pixel (x, y) (ImageOps.exif_transpose's transposes)."""
    if orientation == 2:
        return sw - 1 - x, y
    if orientation == 3:
        return sw - 1 - x, sh - 1 - y
    if orientation == 4:
        return x, sh - 1 - y
    if orientation == 5:
        return y, x
    if orientation == 6:
        return y, sh - 1 - x
    if orientation == 7:
        return sw - 1 - y, sh - 1 - x
    if orientation == 8:
        return sw - 1 - y, x
    return x, y


def _stored_box(orientation: int, box: Box, sw: int, sh: int) -> Box:
    """The stored rectangle whose oriented image is ``box`` (a non-empty box inside the oriented image)."""
    left, top, right, bottom = box
    a = _stored_point(orientation, left, top, sw, sh)
    b = _stored_point(orientation, right - 1, bottom - 1, sw, sh)
    return min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]) + 1, max(a[1], b[1]) + 1


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Stored (H, W, 3) pixels as shown under ``orientation`` (a view)."""
    if orientation == 2:
        return pixels[:, ::-1]
    if orientation == 3:
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:
        return pixels.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(pixels, -1)
    if orientation == 7:
        return pixels[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(pixels, 1)
    return pixels


def _widen(box: Box, imcu: tuple[int, int], sw: int, sh: int) -> Box:
    """``box`` widened to iMCU boundaries plus one iMCU where the image continues, within the image."""
    mw, mh = imcu
    left, top, right, bottom = box
    return (max(0, (left // mw - 1) * mw), max(0, (top // mh - 1) * mh),
            min(sw, (-(-right // mw) + 1) * mw), min(sh, (-(-bottom // mh) + 1) * mh))


def _union(boxes: list[Box]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _cost(region: Box, sw: int, sh: int, progressive: bool) -> int:
    """Relative cost of decoding ``region``: entropy decoding of every row down to its bottom (of every row
    for a progressive file) plus IDCT, upsampling and colour conversion of its area (measured about equal per
    pixel on 12 MP 4:2:0 photos)."""
    rows = sh if progressive else region[3]
    return rows * sw + (region[2] - region[0]) * (region[3] - region[1])


def _plan(boxes: list[Box], imcu: tuple[int, int], sw: int, sh: int, progressive: bool) -> list[Box]:
    """The regions to decode: one per crop, or one around all of them, whichever costs less."""
    separate = [_widen(b, imcu, sw, sh) for b in boxes]
    if len(separate) <= 1:
        return separate
    together = _widen(_union(boxes), imcu, sw, sh)
    if _cost(together, sw, sh, progressive) <= sum(_cost(r, sw, sh, progressive) for r in separate):
        return [together]
    return separate


# -- decoding ----------------------------------------------------------------------------------------------------


def _header_info(data: bytes) -> tuple[str, int] | None:
    """Pillow's format name and the EXIF orientation it would apply, from the header; None to fall back."""
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
            if img.mode not in ("RGB", "L"):  # CMYK, YCCK and whatever Pillow reads differently
                return None
            orientation: Any = img.getexif().get(0x0112, 1)
            image_format = img.format or ""
    except Exception:  # anything Pillow's parser says: the full path reports it with its reason
        return None
    try:
        applied = orientation if orientation in _ORIENTATIONS else 1
    except TypeError:  # an unhashable value: exif_transpose ignores it too
        applied = 1
    return image_format, int(applied)


def decode_jpeg_crops(data: bytes, offsets: Callable[[int, int], list[tuple[int, int]]], size: int,
                      fill: tuple[int, int, int], *, max_pixels: int | None,
                      scan_limit: int = SCAN_LIMIT, budget: MemoryBudget | None = None,
                      formats: Collection[str] | None = None) -> RegionDecode | None:
    """The ``size``×``size`` crops at ``offsets(width, height)`` (top-left corners in the EXIF-oriented image of
    that size) of a JPEG, padded with ``fill`` where they leave the image, decoding only what they cover.

    None: not handled here (see the module docstring), decode the whole image instead. Raises
    ``UnreadableImage`` (``too_large``) for a progressive file with more than ``scan_limit`` scans. With a
    ``budget``, the decode's memory is reserved from it first (as ``imageio.decode_rgb`` reserves a full
    decode's), which may wait or raise ``decode_busy``/``too_large`` as it does. ``formats``: the Pillow format
    names to decode (``JPEG``, ``MPO``); None for any, the others return None before anything is decoded."""
    lib = _library()
    if lib is None or not isinstance(data, bytes) or data[:3] != b"\xff\xd8\xff":
        return None
    # A truncated file (no end-of-image marker after the last scan) is the full decoder's to refuse: a region
    # above the damage would decode cleanly. FF D9 cannot occur inside entropy-coded data (FF is stuffed).
    if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        return None
    header = _header_info(data)
    if header is None:
        return None
    image_format, orientation = header
    if formats is not None and image_format not in formats:
        return None
    handle = _handle(lib)
    try:
        if lib.tj3DecompressHeader(handle.ptr, data, len(data)) != 0:
            return None
        sw, sh = handle.get(_TJPARAM_JPEGWIDTH), handle.get(_TJPARAM_JPEGHEIGHT)
        imcu = _IMCU.get(handle.get(_TJPARAM_SUBSAMP))
        if (imcu is None or sw <= 0 or sh <= 0 or handle.get(_TJPARAM_PRECISION) != 8
                or handle.get(_TJPARAM_LOSSLESS) or handle.get(_TJPARAM_ARITHMETIC)
                or handle.get(_TJPARAM_COLORSPACE) not in (_TJCS_RGB, _TJCS_YCBCR, _TJCS_GRAY)):
            return None
        cap = min(c for c in (max_pixels, Image.MAX_IMAGE_PIXELS, 2**31 - 1) if c)
        if sw * sh > cap:
            return None  # the full path refuses it from the header, with the limit in its message
        progressive = bool(handle.get(_TJPARAM_PROGRESSIVE))
        handle.set(_TJPARAM_STOPONWARNING, 0)  # so that a hostile file's bogus scans reach the scan limit
        handle.set(_TJPARAM_FASTUPSAMPLE, 0)
        handle.set(_TJPARAM_FASTDCT, 0)
        handle.set(_TJPARAM_SCANLIMIT, scan_limit)

        width, height = (sh, sw) if orientation in (5, 6, 7, 8) else (sw, sh)
        corners = offsets(width, height)
        crops = np.empty((len(corners), size, size, 3), dtype=np.uint8)
        crops[...] = np.asarray(fill, dtype=np.uint8)
        wanted: list[tuple[int, Box, Box]] = []  # (crop index, oriented box, stored box)
        for index, (left, top) in enumerate(corners):
            box = (max(0, left), max(0, top), min(width, left + size), min(height, top + size))
            if box[0] < box[2] and box[1] < box[3]:
                wanted.append((index, box, _stored_box(orientation, box, sw, sh)))
        regions = _plan([stored for _, _, stored in wanted], imcu, sw, sh, progressive)
        reservation = budget.acquire(_memory(regions, sw, sh, progressive), "<bytes>") if budget else None
        try:
            return _decode_regions(handle, data, regions, wanted, corners, crops, orientation, sw, sh,
                                   width, height, image_format)
        finally:
            if reservation is not None:
                reservation.release()
    except _TurboError as exc:
        message = str(exc)
        if "more than" in message and "scans" in message:
            raise UnreadableImage("<bytes>", Reason.TOO_LARGE, f"{message} (the limit is {scan_limit})") from None
        return None


def _memory(regions: list[Box], sw: int, sh: int, progressive: bool) -> int:
    """Bytes a decode of ``regions`` holds at most: the RGB rows of each region, and for a progressive file the
    whole image's coefficients (2 bytes a sample, up to three full-size components) on top."""
    rows = max((r[2] - r[0]) * (r[3] - r[1]) * 3 for r in regions) if regions else 0
    return rows + (sw * sh * 6 if progressive else 0)


def _decode_regions(handle: _Handle, data: bytes, regions: list[Box], wanted: list[tuple[int, Box, Box]],
                    corners: list[tuple[int, int]], crops: np.ndarray, orientation: int, sw: int, sh: int,
                    width: int, height: int, image_format: str) -> RegionDecode:
    """Decode each region once and cut the crops it contains into ``crops`` (oriented, in place)."""
    decoded = 0
    for region in regions:
        pixels = _decode_region(handle, data, region, sw, sh)
        decoded += pixels.shape[0] * pixels.shape[1]
        for index, box, stored in wanted:
            if not _inside(stored, region):
                continue
            part = pixels[stored[1] - region[1]:stored[3] - region[1], stored[0] - region[0]:stored[2] - region[0]]
            left, top = corners[index]
            crops[index, box[1] - top:box[3] - top, box[0] - left:box[2] - left] = _orient(part, orientation)
    return RegionDecode(width, height, crops, image_format, decoded)


def decode_model_crops(data: bytes, size: int, tiles: int, mean: tuple[float, ...], *, max_pixels: int | None,
                       budget: MemoryBudget | None = None) -> RegionDecode | None:
    """The crops the model judges of a plain JPEG (``crops.tile_offsets``: the centre crop or up to ``tiles``
    tiles of ``size``, padded with the normalisation ``mean``'s colour), decoded from their regions alone: what
    ``crops.crop_pixels`` cuts from a full decode, bit for bit. None for an MPO (its frame count comes from the
    full decode) and for whatever ``decode_jpeg_crops`` does not handle."""
    return decode_jpeg_crops(data, lambda width, height: tile_offsets(width, height, size, tiles), size,
                             fill_colour(mean), max_pixels=max_pixels, budget=budget, formats=("JPEG",))


def _inside(box: Box, region: Box) -> bool:
    return region[0] <= box[0] and region[1] <= box[1] and box[2] <= region[2] and box[3] <= region[3]


def _decode_region(handle: _Handle, data: bytes, region: Box, sw: int, sh: int) -> np.ndarray:
    """The stored pixels of ``region`` (iMCU-aligned on the left), as (h, w, 3) uint8 RGB."""
    left, top, right, bottom = region
    whole = region == (0, 0, sw, sh)
    crop = _Region(0, 0, 0, 0) if whole else _Region(left, top, right - left, bottom - top)
    if handle.lib.tj3SetCroppingRegion(handle.ptr, crop) != 0:
        raise _TurboError(handle.error())
    out = np.empty((bottom - top, right - left, 3), dtype=np.uint8)
    if handle.lib.tj3Decompress8(handle.ptr, data, len(data), out.ctypes.data, 0, _TJPF_RGB) != 0:
        raise _TurboError(handle.error())
    return out
