"""Decoding fetched bytes into the RGB image the model sees, with the worker's safety limits.

The formats a camera, a phone or an image host produces are accepted; anything else Pillow happens to
read (ICO, PPM, EPS, PSD, DDS, ...) is refused before any of its parsers sees the bytes
(``Image.open(..., formats=ALLOWED_FORMATS)``), which keeps the seldom-exercised decoders, and their bugs,
away from untrusted input. Memory is bounded before pixels are decoded: an image whose estimated decode
peak is over ``max_decode_bytes`` is refused, and the decode threads of a process share one budget of
``decode_memory_bytes`` (a decode waits until its bytes are free; see ``ppl_model.imageio``).

Errors are raised as ``worker.sources.SourceError`` so the pipeline handles one error type; the reason
codes are those of ``ppl_model.imageio`` (its docstring maps every decoder exception to one):
``not_an_image``, ``unsupported_format`` (a refused format, or a variant of an accepted one the decoder
does not implement, such as a 12-bit JPEG), ``too_large`` (over ``max_pixels``, over ``max_decode_bytes``
or the whole ``decode_memory_bytes``), ``corrupt`` (truncated or damaged data), all permanent; and
``decode_busy``, transient: the process's decode memory stayed in use for ``DECODE_WAIT_S``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import threading
from dataclasses import dataclass

from PIL import Image

from ppl_model.imageio import Decoded, MemoryBudget, UnreadableImage, decode
from ppl_model.jpeg_region import RegionDecode, decode_model_crops
from ppl_model.reasons import Reason, Transience
from worker.settings import Settings
from worker.sources import SourceError

ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF"})
DECODE_WAIT_S = 120.0  # far longer than any one decode: only a budget held by images nobody releases waits this

MALLOC_ARENAS = 2  # glibc's M_ARENA_MAX for worker processes (see limit_malloc_arenas)

_budgets: dict[int, MemoryBudget] = {}
_budgets_lock = threading.Lock()


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX`` would), unless that variable is set.

    By default every decode thread gets an arena of its own, and the pixel memory a decode frees stays in
    that arena instead of going back to the system: resident memory then grows past the decode budget
    (measured: 1714 MiB instead of 1437-1493 MiB in the decode benchmark, docs/PERFORMANCE.md). Called when this
    module is imported, before the decode threads exist; arenas created earlier are not affected."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-8, int(arenas)))  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc (musl has no arenas to cap)
        return False


limit_malloc_arenas()


def process_budget(settings: Settings) -> MemoryBudget:
    """The decode memory budget of this process (one per ``decode_memory_bytes`` value, shared by threads)."""
    with _budgets_lock:
        budget = _budgets.get(settings.decode_memory_bytes)
        if budget is None:
            budget = _budgets[settings.decode_memory_bytes] = MemoryBudget(settings.decode_memory_bytes, DECODE_WAIT_S)
        return budget


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image and what the verdict row records about it. ``width``/``height`` are after EXIF rotation;
    ``sha256`` is of the raw bytes (the idempotency key together with the model version). The image's bytes
    stay reserved in the process's decode budget until the image is garbage."""

    image: Image.Image
    format: str
    width: int
    height: int
    sha256: str


def decode_image(data: bytes, settings: Settings) -> DecodedImage:
    """First displayed frame, EXIF-oriented, converted to RGB; ``SourceError`` when it cannot be."""
    data = bytes(data)
    decoded = decode_pixels(data, settings)
    image = decoded.image
    return DecodedImage(image=image, format=decoded.format, width=image.width, height=image.height,
                        sha256=hashlib.sha256(data).hexdigest())


def decode_pixels(data: bytes, settings: Settings) -> Decoded:
    """The RGB image, its format name and the file's frame count (``ppl_model.imageio.decode``), as
    ``decode_image`` makes it, for a caller that has hashed the bytes."""
    if not data:
        raise SourceError(Reason.NOT_AN_IMAGE, "empty data")
    try:
        return decode(data, max_pixels=settings.max_pixels, formats=ALLOWED_FORMATS,
                      max_bytes=settings.max_decode_bytes, budget=process_budget(settings))
    except UnreadableImage as exc:
        # The reason decides; one whose transience depends on the error (unreadable: only from a path, never
        # from these bytes) would count as permanent.
        transient = exc.reason.transience is Transience.ALWAYS
        raise SourceError(exc.reason, exc.detail[:500], transient=transient) from None


def decode_jpeg_region(data: bytes, settings: Settings, size: int, tiles: int, mean: tuple[float, ...]
                       ) -> RegionDecode | None:
    """The crops of a plain JPEG decoded from their regions only (``ppl_model.jpeg_region``: bit-identical to a
    full decode), under the same pixel cap and memory budget; None where that decoder does not apply, an MPO
    included (decode the whole image with ``decode_pixels``, which gives the reason if it cannot)."""
    try:
        return decode_model_crops(data, size, tiles, mean, max_pixels=settings.max_pixels,
                                  budget=process_budget(settings))
    except UnreadableImage as exc:
        transient = exc.reason.transience is Transience.ALWAYS
        raise SourceError(exc.reason, exc.detail[:500], transient=transient) from None
