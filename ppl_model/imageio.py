"""Decoding encoded image bytes into the 8-bit RGB image the model judges, bounded by memory.

One module for every caller (training, ``ppl scan``, the worker), so that they all see the same pixels.

* **What viewers see.** The first *displayed* frame: an APNG's default image that is not part of its
  animation is skipped, as animation-capable viewers skip it; a HEIF file's primary image, which is what
  viewers show of a collection. ``decode`` also counts the frames (``Decoded.frames``). EXIF orientation is
  applied (HEIF's ``irot``/``imir`` by libheif, which then resets the EXIF tag; AVIF's through its EXIF tag).
  A BMP whose alpha channel is zero everywhere is opaque (browsers treat it so: such files come from encoders that
  write 0 into the unused fourth byte). High bit depths are scaled by the range their header declares
  (a 12-bit TIFF by 4095, not 65535). Transparent pixels are composited onto mid-grey. BMPs that Pillow's
  plugin refuses but browsers show (2-bit palettes, bitfields in any layout) are decoded here.
* **Formats beyond Pillow's own**: HEIC/HEIF through pillow-heif, whose opener is registered once, on the first
  decode (``register_heif_opener``); AVIF through Pillow's own plugin (libavif). Both decode 10-bit files to 8 bits.
* **Untrusted bytes reach only the allowed plugins.** With ``formats``, Pillow runs only those plugins'
  header parsers (``Image.open(..., formats=...)``). A refused format is named by Pillow's signature
  check (each plugin's ``accept`` prefix test: a few byte comparisons), never by its parser.
* **Memory before pixels.** ``decoded_bytes`` estimates, from the header alone, what decoding and the
  conversion to RGB will peak at (mode, bit depth, orientation, the decoder's own buffers); ``max_bytes``
  refuses an image over it and a ``MemoryBudget`` shared by threads makes a decode wait until its bytes
  are free. The factors were measured (``benchmarks/decode_memory.py --modes``, docs/PERFORMANCE.md).

Every failure is ``UnreadableImage`` with one of these ``reason`` codes (``ppl_model.reasons.Reason``):

======================  ==================================================================================
reason                  raised for
======================  ==================================================================================
``missing``             a path that does not exist
``unreadable``          a path that exists but cannot be read (permission, a directory)
``not_an_image``        no decoder recognises the bytes, or the header of an allowed format is unreadable
``unsupported_format``  a format outside ``formats``, or a variant of an allowed one that the decoder does
                        not implement (12-bit JPEG, float RGB TIFF, WebP-compressed TIFF, 64-bit BMP, ...);
                        ``NotImplementedError`` from any plugin
``too_large``           over ``max_pixels`` (width × height), over ``max_bytes`` or the whole budget
                        (estimated decoded bytes), Pillow's decompression-bomb limit, ``MemoryError``
``corrupt``             the pixel data is truncated or damaged (``OSError``, ``ValueError``, ``EOFError``,
                        ``SyntaxError``, ``TypeError``, ``IndexError``, ``KeyError``, ``struct.error``,
                        ``zlib.error``, ``RecursionError`` while decoding)
``decode_busy``         (transient) the shared ``MemoryBudget`` stayed full for its whole wait
======================  ==================================================================================

Any other exception is a bug in a decoder and propagates (the worker records it as ``decode_error``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import io
import os
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, TiffImagePlugin, UnidentifiedImageError

from ppl_model.errors import PPLError
from ppl_model.reasons import DECODER_REASONS, Reason

REASONS = DECODER_REASONS  # the codes raised here (the table above)

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
TRANSPARENT_BACKGROUND = (128, 128, 128)  # what fully transparent pixels become: deterministic, mid-range
# Allowed plugins are tried in this order (JPEG before MPO: the JPEG factory itself returns MPO files).
FORMAT_ORDER = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "HEIF", "AVIF")
BAND_PIXELS = 1 << 20  # numeric conversions work on row bands of about this many pixels
# Messages with which Pillow's plugins refuse a valid file they do not implement (as opposed to damage).
_UNSUPPORTED_MESSAGES = ("cannot handle", "unknown pixel mode", "unsupported", "not supported", "not configured",
                         "unknown compression", "not available")


class UnreadableImage(PPLError):
    """A file that cannot be decoded as an image.

    ``reason`` is a stable code (see the module docstring) for counting and querying; ``detail`` is the
    decoder's own message or what the header said.
    """

    def __init__(self, path: Path | str, reason: Reason, detail: str = ""):
        reason = Reason(reason)  # an unknown code is a bug here, not a new category in scans and failure rows
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))
        self.path = str(path)
        self.reason = reason
        self.detail = detail


# -- memory ------------------------------------------------------------------------------------------------------

# Bytes per pixel that the decode-and-convert path below peaks at, by the mode Pillow decodes into. Pillow keeps
# 1 byte per pixel for 1/L/P, 2 for I;16 and 4 for everything else (RGB included); the rest is the RGB result
# and the temporaries of each conversion. Checked against measured peak RSS by tests/test_imageio.py.
_PEAK_PER_PIXEL = {"1": 5, "L": 5, "P": 5, "RGB": 4, "RGBA": 10, "I;16": 6, "I": 7, "F": 7}
_PEAK_WITH_ALPHA_CONVERSION = 10  # LA, PA, La, RGBa and tRNS transparency: first converted to RGBA
_PEAK_OTHER = 8  # CMYK, YCbCr, LAB, HSV, RGBX: decoded + RGB
_STORED_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2}  # else 4
# libheif's and libavif's decoded YCbCr planes (2 bytes a sample for 10-bit) and the interleaved RGB(A) buffer the
# plugin copies into Pillow's image
_HEIF_AVIF_BUFFERS_PER_PIXEL = 10
DECODE_OVERHEAD_BYTES = 48 << 20  # decoder state, band temporaries, allocator slack: per image, whatever its size


def _mode_key(mode: str) -> str:
    return "I;16" if mode in SIXTEEN_BIT_MODES else mode


def decoded_bytes(img: Image.Image) -> int:
    """Estimated peak bytes that decoding ``img`` (opened and sought to its frame, not loaded) and converting
    it to RGB will take.

    Reads only what ``Image.open`` parsed from the header: size, mode, EXIF orientation, and per format the
    decoder's own whole-image buffers (progressive JPEG coefficients, WebP's RGBA canvases, a TIFF strip)."""
    width, height = img.size
    pixels = width * height
    key = _mode_key(img.mode)
    if key in ("LA", "PA", "La", "RGBa") or ("transparency" in img.info and key not in ("I;16", "I", "F")):
        per_pixel = _PEAK_WITH_ALPHA_CONVERSION
    else:
        per_pixel = _PEAK_PER_PIXEL.get(key, _PEAK_OTHER)
    if _orientation(img) not in (0, 1):
        per_pixel += _STORED_PER_PIXEL.get(key, 4)  # the transposed copy exists beside the original
    total = pixels * per_pixel
    if img.format == "PNG" and img.tell() > 0:
        total += pixels * _STORED_PER_PIXEL.get(key, 4)  # an APNG frame past the first: Pillow keeps the previous
    if img.format in ("JPEG", "MPO") and img.info.get("progressive"):
        # libjpeg keeps every DCT coefficient of a progressive file: 2 bytes per sample, per component
        layers = getattr(img, "layer", None) or [("", 1, 1, 0)] * len(img.getbands())
        h_max = max(layer[1] for layer in layers) or 1
        v_max = max(layer[2] for layer in layers) or 1
        total += sum(2 * pixels * layer[1] * layer[2] // (h_max * v_max) for layer in layers)
    elif img.format == "WEBP":
        total += 13 * pixels  # libwebp's decoded RGBA frame, its animation canvas and the copy Pillow reads
    elif img.format == "TIFF":
        total += _tiff_buffer_bytes(img)
    elif img.format in ("HEIF", "AVIF"):
        total += _HEIF_AVIF_BUFFERS_PER_PIXEL * pixels
    total += pixels * getattr(img, "EXTRA_PER_PIXEL", 0)
    return total + DECODE_OVERHEAD_BYTES


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # an unreadable EXIF block: exif_transpose will ignore it as well
        return 1


def _tiff_buffer_bytes(img: Image.Image) -> int:
    """libtiff reads one whole strip or tile into a buffer of its own before Pillow unpacks it."""
    tags = getattr(img, "tag_v2", {})
    width, height = img.size
    bits = tags.get(258, (8,))
    bits_per_pixel = sum(bits) if isinstance(bits, tuple) else int(bits) * int(tags.get(277, 1))
    if 322 in tags and 323 in tags:
        area = int(tags[322]) * int(tags[323])
    else:
        area = width * min(height, int(tags.get(278, height)) or height)
    return area * bits_per_pixel // 8


class MemoryBudget:
    """Bytes that concurrent decodes may hold together (one per process, shared by its decode threads).

    ``acquire`` waits until the bytes are free; more than ``total`` at once is refused as ``too_large``, and
    a wait longer than ``wait_s`` as ``decode_busy``."""

    def __init__(self, total: int, wait_s: float = 120.0):
        self.total = int(total)
        self.wait_s = wait_s
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, path: str = "") -> Reservation:
        nbytes = int(nbytes)
        if nbytes > self.total:
            raise UnreadableImage(path, Reason.TOO_LARGE, f"decoding needs about {nbytes} bytes, more than the whole "
                                                   f"decode memory budget of {self.total} bytes")
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self.used + nbytes > self.total:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UnreadableImage(path, Reason.DECODE_BUSY, f"{nbytes} bytes of decode memory not free within "
                                                             f"{self.wait_s:.0f} s ({self.used} of {self.total} used)")
                self._cond.wait(left)
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        return Reservation(self, nbytes)

    def _give_back(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()


class Reservation:
    """Bytes held in a ``MemoryBudget``: shrunk to what a decoded image keeps, released when it is gone."""

    def __init__(self, budget: MemoryBudget, nbytes: int):
        self._budget = budget
        self._lock = threading.Lock()
        self.nbytes = nbytes

    def shrink(self, nbytes: int) -> None:
        with self._lock:
            freed, self.nbytes = max(0, self.nbytes - nbytes), min(self.nbytes, nbytes)
        if freed:
            self._budget._give_back(freed)

    def release(self) -> None:
        self.shrink(0)


# -- decoding ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    data: bytes
    path: str


def _read(source: Path | str | bytes, name: str) -> _Source:
    path = name or ("<bytes>" if isinstance(source, bytes | bytearray | memoryview) else str(source))
    if isinstance(source, bytes | bytearray | memoryview):
        return _Source(bytes(source), path)
    try:
        return _Source(Path(source).read_bytes(), path)
    except FileNotFoundError:
        raise UnreadableImage(path, Reason.MISSING) from None
    except OSError as exc:  # a directory, permission denied, an I/O error
        raise UnreadableImage(path, Reason.UNREADABLE, str(exc)) from None


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif",
                            ".hif", ".avif"})


@functools.cache
def register_heif_opener() -> None:
    """pillow-heif's HEIF plugin in Pillow's registry, once per process, on first use (importing it costs about
    50 ms, which modules that never decode should not pay). Thumbnails, depth and auxiliary images stay unread:
    only the primary image is ever judged, and less parsing of untrusted bytes is less to go wrong."""
    from pillow_heif import register_heif_opener as register

    register(thumbnails=False, depth_images=False, aux_images=False)


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, by suffix (hidden files left out), sorted."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))


@dataclass(frozen=True)
class Decoded:
    """What ``decode`` returns: the judged frame as 8-bit RGB, the decoder's format name (JPEG, PNG, HEIF, AVIF,
    ...), and how many frames the file holds (animation frames of a GIF, APNG, WebP or AVIF sequence; pages of
    a TIFF; top-level images of a HEIF file; 1 for a still image), of which the first displayed is judged."""

    image: Image.Image
    format: str
    frames: int


def decode_rgb(source: Path | str | bytes, name: str = "", *, max_pixels: int | None = None,
               formats: Collection[str] | None = None, max_bytes: int | None = None,
               budget: MemoryBudget | None = None) -> tuple[Image.Image, str]:
    """``decode``'s image and format name."""
    decoded = decode(source, name, max_pixels=max_pixels, formats=formats, max_bytes=max_bytes, budget=budget)
    return decoded.image, decoded.format


def decode(source: Path | str | bytes, name: str = "", *, max_pixels: int | None = None,
           formats: Collection[str] | None = None, max_bytes: int | None = None,
           budget: MemoryBudget | None = None) -> Decoded:
    """Decode a file (path) or encoded bytes: the first displayed frame, EXIF-oriented, as 8-bit RGB.

    Before any pixel is decoded: ``formats`` (Pillow format names) keeps every other plugin away from the
    bytes (``unsupported_format``); ``max_pixels`` caps width×height and ``max_bytes`` the estimated
    decoded bytes (``too_large``); ``budget`` reserves those bytes, waiting while other threads hold them,
    and keeps the returned image's own bytes reserved until the image is garbage. Pillow's
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) applies on top.

    Returns the image, the decoder's format name and the file's frame count."""
    src = _read(source, name)
    path = src.path
    try:
        img = _open(src, formats)
        image_format = img.format or ""
        frames = frame_count(img)
        _seek_first_displayed(img)
        width, height = img.size
        # Pillow's own limit, checked here rather than by turning its warning into an error: the warnings
        # filters are process-wide, and catch_warnings in concurrent decode threads would corrupt them.
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            raise UnreadableImage(path, Reason.TOO_LARGE, f"{width}x{height} pixels, over Pillow's limit of "
                                                   f"{Image.MAX_IMAGE_PIXELS}")
        if max_pixels is not None and width * height > max_pixels:
            raise UnreadableImage(path, Reason.TOO_LARGE, f"{width}x{height} pixels, over the limit of {max_pixels}")
        estimate = decoded_bytes(img)
        if max_bytes is not None and estimate > max_bytes:
            raise UnreadableImage(path, Reason.TOO_LARGE, f"{width}x{height} {img.mode} needs about {estimate} bytes "
                                                   f"to decode, over the limit of {max_bytes} bytes")
        reservation = budget.acquire(estimate, path) if budget is not None else None
        try:
            img.load()  # inside the try: truncated data is reported as corrupt
            rgb = _to_rgb_owned(img, _significant_bits(img), bmp=image_format == "BMP")
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise
        if reservation is not None:  # the RGB image keeps 4 bytes per pixel until it is garbage
            reservation.shrink(4 * rgb.width * rgb.height)
            weakref.finalize(rgb, reservation.release)
        return Decoded(rgb, image_format, frames)
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, MemoryError) as exc:
        raise UnreadableImage(path, Reason.TOO_LARGE, f"{type(exc).__name__}: {exc}") from None
    except NotImplementedError as exc:
        raise UnreadableImage(path, Reason.UNSUPPORTED_FORMAT, f"{exc}" or "not implemented by the decoder") from None
    # Truncated or damaged data. Pillow's parsers also raise TypeError, KeyError or IndexError on a malformed
    # field (a TIFF strip offset stored as a FLOAT): damaged input too, not a bug to crash on.
    except (OSError, ValueError, TypeError, SyntaxError, EOFError, IndexError, KeyError, struct.error, zlib.error,
            RecursionError) as exc:
        message = str(exc)
        refusal = _tiff_codec_refusal(src.data)
        if refusal:
            raise UnreadableImage(path, Reason.UNSUPPORTED_FORMAT, _variant_detail(src.data, refusal)) from None
        # Pillow's plugins refuse what they do not implement with an OSError or SyntaxError that says so
        if isinstance(exc, OSError | SyntaxError) and any(m in message.lower() for m in _UNSUPPORTED_MESSAGES):
            raise UnreadableImage(path, Reason.UNSUPPORTED_FORMAT, _variant_detail(src.data, message)) from None
        raise UnreadableImage(path, Reason.CORRUPT, message or type(exc).__name__) from None


def _open(src: _Source, formats: Collection[str] | None) -> ImageFile.ImageFile:
    register_heif_opener()
    order = None
    if formats is not None:
        allowed = {f.upper() for f in formats}
        Image.init()
        # Only names that have a plugin of their own (MPO files come out of the JPEG plugin)
        order = [f for f in FORMAT_ORDER if f in allowed] + sorted(allowed - set(FORMAT_ORDER))
        order = [f for f in order if f in Image.OPEN]
        if not order:
            raise UnreadableImage(src.path, Reason.UNSUPPORTED_FORMAT, "no format is accepted")
    try:
        return Image.open(io.BytesIO(src.data), formats=order)
    except UnidentifiedImageError:
        pass
    except OSError:
        # Pillow's BMP plugin refuses some valid files that browsers show (2-bit palettes, bitfields in an
        # unusual layout): those are decoded here; anything else is reported as Pillow's plugin said.
        if (order is None or "BMP" in order) and _LayoutBmp.handles(src.data):
            return _LayoutBmp(io.BytesIO(src.data))
        raise
    known = sniff_format(src.data)
    if known is None:
        raise UnreadableImage(src.path, Reason.NOT_AN_IMAGE,
                              f"no image decoder recognises data starting {src.data[:16]!r}")
    if formats is not None and known not in {f.upper() for f in formats}:
        raise UnreadableImage(src.path, Reason.UNSUPPORTED_FORMAT, f"{known} is not accepted")
    # An allowed format's signature, but its parser gave up: ask it why, to tell an unimplemented variant
    # (a 12-bit JPEG, a float RGB TIFF) from a damaged header.
    refusal = _tiff_codec_refusal(src.data) if known == "TIFF" else None
    if refusal:
        raise UnreadableImage(src.path, Reason.UNSUPPORTED_FORMAT, _variant_detail(src.data, refusal))
    message = _parser_message(known, src.data)
    if any(m in message.lower() for m in _UNSUPPORTED_MESSAGES):
        raise UnreadableImage(src.path, Reason.UNSUPPORTED_FORMAT, _variant_detail(src.data, f"{known}: {message}"))
    raise UnreadableImage(src.path, Reason.NOT_AN_IMAGE, f"{known} signature, but its header is unreadable: {message}")



class _LayoutBmp(ImageFile.ImageFile):
    """BMPs with a BITMAPINFOHEADER or later that Pillow's plugin refuses but viewers show: 2-bit palette
    images, and 16/32-bit ``BI_BITFIELDS``/``BI_ALPHABITFIELDS`` in any layout of contiguous masks (the BMP
    suite's rgb32bf.bmp and friends). Decoded with numpy in row bands; damaged data raises ``OSError``."""

    format = "BMP"
    format_description = "Windows Bitmap (ppl_model.imageio's decoder)"
    EXTRA_PER_PIXEL = 4  # the numpy array the rows are assembled in, beside the image Pillow copies it into

    @staticmethod
    def _header(data: bytes) -> dict[str, Any] | None:
        if len(data) < 54 or data[:2] != b"BM":
            return None
        offset, dib_size = struct.unpack_from("<II", data, 10)
        if dib_size < 40:
            return None
        width, height, _, bits, compression = struct.unpack_from("<iiHHI", data, 18)
        colours = struct.unpack_from("<I", data, 46)[0]
        header = {"offset": offset, "width": width, "height": height, "bits": bits, "dib": dib_size,
                  "compression": compression, "colours": colours}
        if bits == 2 and compression == 0:
            return header
        if bits in (16, 32) and compression in (3, 6):  # BI_BITFIELDS, BI_ALPHABITFIELDS
            count = 4 if dib_size >= 56 or compression == 6 else 3
            if len(data) < 54 + 4 * count:
                return None
            masks = list(struct.unpack_from(f"<{count}I", data, 54)) + [0] * (4 - count)
            if not any(masks[:3]) or not all(_contiguous(m) for m in masks):
                return None
            header["masks"] = masks
            return header
        return None

    @classmethod
    def handles(cls, data: bytes) -> bool:
        header = cls._header(data)
        return header is not None and header["width"] > 0 and header["height"] != 0

    def _open(self) -> None:
        if self.fp is None:  # Image.open always gives one; the attribute is optional for closed images
            raise SyntaxError("no file to read")
        self._data = self.fp.read()
        header = self._header(self._data)
        if header is None:
            raise SyntaxError("not a BMP this decoder handles")
        self._bmp = header
        self._size = (header["width"], abs(header["height"]))
        alpha = header["bits"] != 2 and header["masks"][3] != 0
        self._mode = "RGBA" if alpha else "RGB"
        self.tile = []

    def load(self) -> Any:
        if self._im is None:
            pixels = self._decode()
            self.im = Image.fromarray(pixels, self._mode).im
            del pixels
            self._data = b""
        return Image.Image.load(self)

    def _decode(self) -> np.ndarray:
        h = self._bmp
        width, height, bits = h["width"], abs(h["height"]), h["bits"]
        stride = (bits * width + 31) // 32 * 4
        if h["offset"] + stride * height > len(self._data):
            raise OSError(f"BMP pixel data truncated: {len(self._data) - h['offset']} of {stride * height} bytes")
        rows = np.frombuffer(self._data, dtype=np.uint8, count=stride * height, offset=h["offset"])
        rows = rows.reshape(height, stride)
        if h["height"] > 0:  # bottom-up, as most BMPs are
            rows = rows[::-1]
        out = np.empty((height, width, len(self._mode)), dtype=np.uint8)
        band = max(1, BAND_PIXELS // width)
        if bits == 2:
            entries = h["colours"] or 4
            start = 14 + h["dib"]
            palette = np.frombuffer(self._data, dtype=np.uint8, count=4 * entries, offset=start).reshape(entries, 4)
            lut = np.zeros((4, 3), dtype=np.uint8)
            lut[:min(4, entries)] = palette[:4, 2::-1]  # BGRx → RGB
            for top in range(0, height, band):
                packed = rows[top:top + band, : (width + 3) // 4]
                indices = np.stack([(packed >> shift) & 3 for shift in (6, 4, 2, 0)], axis=-1)
                out[top:top + band] = lut[indices.reshape(packed.shape[0], -1)[:, :width]]
            return out
        dtype = np.dtype("<u2") if bits == 16 else np.dtype("<u4")
        for top in range(0, height, band):
            values = rows[top:top + band].copy().view(dtype)[:, :width].astype(np.uint64)
            for channel, mask in enumerate(h["masks"][: len(self._mode)]):
                out[top:top + band, :, channel] = _mask_channel(values, mask)
        return out


def _contiguous(mask: int) -> bool:
    if mask == 0:
        return True
    shifted = mask >> ((mask & -mask).bit_length() - 1)
    return shifted & (shifted + 1) == 0


def _mask_channel(values: np.ndarray, mask: int) -> np.ndarray:
    """One channel of bitfield pixels, scaled from its own bit width to 8 bits (5-bit 31 → 255)."""
    if mask == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    shift = (mask & -mask).bit_length() - 1
    top = mask >> shift
    channel = (values & mask) >> shift
    return ((channel * 255 + top // 2) // top).astype(np.uint8)


def sniff_format(data: bytes) -> str | None:
    """The format whose signature ``data`` starts with, by Pillow's own prefix tests, without parsing it."""
    if data[-18:].startswith(b"TRUEVISION-XFILE."):  # TGA's footer: its header has no signature, and it
        return "TGA"  # can start like a CUR file's
    prefix = data[:16]
    register_heif_opener()
    Image.init()
    for name, (_, accept) in list(Image.OPEN.items()):
        if accept is None:
            continue
        try:
            result = accept(prefix)
        except Exception:  # a prefix test on too few bytes
            continue
        if result and not isinstance(result, str):
            return name
    return None


def _parser_message(format_name: str, data: bytes) -> str:
    factory = Image.OPEN[format_name][0]
    try:
        factory(io.BytesIO(data), "")
    except Exception as exc:  # what Image.open swallowed: the plugin's reason
        return str(exc) or type(exc).__name__
    return "unknown"


def _tiff_directory(data: bytes) -> TiffImagePlugin.ImageFileDirectory_v2 | None:
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    try:
        ifd = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
        fp = io.BytesIO(data)
        fp.seek(ifd.next)
        ifd.load(fp)
        return ifd
    except Exception:  # a damaged directory: no more detail to give
        return None


@functools.cache
def _libtiff() -> ctypes.CDLL | None:
    """The libtiff Pillow decodes with (its wheel's copy, else the system's), to ask which codecs it has."""
    import PIL

    candidates = sorted(glob.glob(os.path.join(os.path.dirname(PIL.__file__), os.pardir, "pillow.libs", "libtiff*")))
    candidates.append(ctypes.util.find_library("tiff") or "")
    for candidate in filter(None, candidates):
        try:
            lib = ctypes.CDLL(candidate)
            lib.TIFFIsCODECConfigured.argtypes = [ctypes.c_uint16]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _tiff_codec_refusal(data: bytes) -> str | None:
    """Why a TIFF cannot be decoded whatever its data: a compression Pillow does not know, or one this
    build's libtiff was compiled without (WebP, ZSTD, ... are optional; libtiff says so only on stderr)."""
    ifd = _tiff_directory(data)
    if ifd is None:
        return None
    code = ifd.get(259, 1)
    if not isinstance(code, int):
        return None
    if code not in TiffImagePlugin.COMPRESSION_INFO:
        return f"TIFF compression {code} is not known to the decoder"
    lib = _libtiff()
    if code != 1 and lib is not None and not lib.TIFFIsCODECConfigured(code):
        return f"TIFF compression {TiffImagePlugin.COMPRESSION_INFO[code]} ({code}) is not built into libtiff here"
    return None


def _variant_detail(data: bytes, message: str) -> str:
    """The decoder's message, plus for a TIFF what the header declares (sample format, bits, compression)."""
    ifd = _tiff_directory(data)
    if ifd is None:
        return message
    try:
        sample_format = {1: "unsigned integer", 2: "signed integer", 3: "float"}.get(
            (ifd.get(339) or (1,))[0], "unknown")
        compression = TiffImagePlugin.COMPRESSION_INFO.get(ifd.get(259, 1), str(ifd.get(259)))
        return (f"{message} (TIFF: {sample_format} samples, BitsPerSample {ifd.get(258)}, "
                f"SamplesPerPixel {ifd.get(277, 1)}, compression {compression})")
    except Exception:
        return message


def _seek_first_displayed(img: Image.Image) -> None:
    """Frame 0, except an APNG's default image that is not part of the animation (``default_image``):
    viewers that play the animation never show it; and a HEIF file's primary image, where the opener already
    is (it need not be the first of the file's images)."""
    if img.format == "HEIF":
        return
    if img.format == "PNG" and getattr(img, "default_image", False) and getattr(img, "n_frames", 1) > 1:
        img.seek(1)
    elif getattr(img, "n_frames", 1) > 1:
        img.seek(0)


def frame_count(img: Image.Image) -> int:
    """Frames an opened file holds, from its headers (no pixel decoded): animation frames (an APNG's default
    image outside the animation not counted), TIFF pages, HEIF top-level images; 1 for a still image."""
    frames = int(getattr(img, "n_frames", 1) or 1)
    if img.format == "PNG" and getattr(img, "default_image", False) and frames > 1:
        frames -= 1
    return frames


def _significant_bits(img: Image.Image) -> int | None:
    """Bits per sample the header declares for 16-bit data stored in fewer bits (a 12-bit TIFF)."""
    if img.mode not in SIXTEEN_BIT_MODES or img.format != "TIFF":
        return None
    bits = getattr(img, "tag_v2", {}).get(258)
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    return int(bits) if isinstance(bits, int) and 0 < bits < 16 else None


# -- conversion to RGB -------------------------------------------------------------------------------------------


def to_rgb(img: Image.Image, *, significant_bits: int | None = None) -> Image.Image:
    """Any Pillow mode → 8-bit RGB, keeping the whole tonal range and making transparency deterministic.

    High bit depths are scaled, not clipped (Pillow's own conversion clips 16-bit values at 255, which
    would turn most of a 16-bit image white); ``significant_bits`` (e.g. 12) is the range 16-bit samples
    really use. Transparent pixels are composited onto mid-grey: their hidden colour values are arbitrary,
    and dropping alpha would let them reach the detector. ``img`` is left as it was.
    """
    return _to_rgb(img, significant_bits, owned=False, bmp=False)


def _to_rgb_owned(img: Image.Image, significant_bits: int | None, *, bmp: bool) -> Image.Image:
    """``to_rgb`` for an image nobody else holds: frees each intermediate as soon as it is no longer needed."""
    if img.getexif().get(0x0112, 1) not in (0, 1):
        ImageOps.exif_transpose(img, in_place=True)
    return _to_rgb(img, significant_bits, owned=True, bmp=bmp)


def _release(img: Image.Image, owned: bool) -> None:
    if owned:
        img.close()  # drops the pixel memory now, not when the caller's frame ends


def _to_rgb(img: Image.Image, significant_bits: int | None, *, owned: bool, bmp: bool) -> Image.Image:
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _numeric_to_rgb(img, significant_bits, owned)
    if mode == "RGB" and "transparency" not in img.info:
        if owned:  # the decoded image itself, detached from its file object
            rgb = img._new(img.im)
            _release(img, owned)
            return rgb
        return img.copy()
    if mode == "RGBA":
        return _composite(img, owned, bmp=bmp)
    if mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")  # P and L/RGB with tRNS: Pillow applies the transparency
        _release(img, owned)
        return _composite(rgba, True, bmp=False)
    rgb = img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX
    _release(img, owned)
    return rgb


def _composite(rgba: Image.Image, owned: bool, *, bmp: bool) -> Image.Image:
    """RGBA over mid-grey, in place on the RGB copy: out = rgb·a + grey·(1 − a)."""
    alpha = rgba.getchannel("A")
    low, high = alpha.getextrema()
    if low == 255 or (bmp and high == 0):  # opaque; or a BMP's unused fourth byte, which viewers ignore
        del alpha
        rgb = rgba.convert("RGB")
        _release(rgba, owned)
        return rgb
    inverse = alpha.point(lambda value: 255 - value)
    del alpha
    rgb = rgba.convert("RGB")
    _release(rgba, owned)
    rgb.paste(TRANSPARENT_BACKGROUND, (0, 0, *rgb.size), inverse)
    return rgb


def _bands(img: Image.Image) -> Iterator[np.ndarray]:
    """The pixels as numpy arrays, a band of rows at a time (a whole-image array would copy it twice)."""
    width, height = img.size
    rows = max(1, BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        yield np.asarray(img.crop((0, top, width, min(height, top + rows))))


def _numeric_to_rgb(img: Image.Image, significant_bits: int | None, owned: bool) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale → 8 bits, band by band.

    16-bit data keeps its nominal range (65535 → 255, or 2^bits − 1 → 255 with ``significant_bits``);
    32-bit integers within 0..65535 are 16-bit samples in a wider container; other integer or float data
    is scaled by its range (0..1 floats by 255). NaN and infinities count as 0."""
    mode = img.mode
    scale = None  # (low, high) for range scaling
    if mode in SIXTEEN_BIT_MODES:
        kind = "bits"
    else:
        low = high = None
        for band in _bands(img):
            data = np.nan_to_num(band.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            if data.size:
                low = float(data.min()) if low is None else min(low, float(data.min()))
                high = float(data.max()) if high is None else max(high, float(data.max()))
        low, high = (low or 0.0), (high or 0.0)
        if mode == "I" and low >= 0 and high <= 65535:
            kind = "shift"
        elif mode == "F" and low >= 0.0 and high <= 1.0:
            kind = "unit"
        else:
            kind, scale = "range", (min(0.0, low), high)
    out = np.empty((img.height, img.width), dtype=np.uint8)
    transparency = img.info.get("transparency")
    transparent_value = transparency if isinstance(transparency, int) and not isinstance(transparency, bool) else None
    alpha = np.empty((img.height, img.width), dtype=np.uint8) if transparent_value is not None else None
    top = 0
    for band in _bands(img):
        rows = band.shape[0]
        out[top:top + rows] = _scale_band(band, kind, significant_bits, scale)
        if alpha is not None:
            alpha[top:top + rows] = np.where(band == transparent_value, 0, 255)
        top += rows
    _release(img, owned)
    grey = Image.fromarray(out)
    del out
    if alpha is None:
        return grey.convert("RGB")
    rgb = grey.convert("RGB")
    rgb.paste(TRANSPARENT_BACKGROUND, (0, 0, *rgb.size), Image.fromarray(255 - alpha))
    return rgb


def _scale_band(band: np.ndarray, kind: str, significant_bits: int | None,
                scale: tuple[float, float] | None) -> np.ndarray:
    if kind == "bits":
        if significant_bits:
            top = (1 << significant_bits) - 1
            values = np.minimum(band.astype(np.uint32), top)
            return ((values * 255 + top // 2) // top).astype(np.uint8)
        return (band.astype(np.uint16) >> 8).astype(np.uint8)
    if kind == "shift":
        return (band.astype(np.uint32) >> 8).astype(np.uint8)
    data = np.nan_to_num(band.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if kind == "unit":
        return np.rint(data * 255.0).astype(np.uint8)
    low, high = scale or (0.0, 0.0)
    if high <= low:
        return np.zeros(data.shape, dtype=np.uint8)
    return np.rint((data - low) * (255.0 / (high - low))).astype(np.uint8)


def load_rgb(source: Path | str | bytes, name: str = "") -> Image.Image:
    return decode_rgb(source, name)[0]
