"""Decoding fetched bytes into the RGB image the model sees, with the worker's safety limits.

The formats a camera, a phone or an image host produces are accepted; anything else Pillow happens to
read (ICO, PPM, EPS, PSD, ...) is refused before its pixels are decoded, which keeps the seldom-exercised
decoders, and their bugs, away from untrusted input. Errors are raised as ``worker.sources.SourceError``
(always permanent) so the pipeline handles one error type; the reason codes are those of
``ppl_model.data.transforms.UnreadableImage``: ``not_an_image``, ``unsupported_format``, ``too_large``
(over ``max_pixels``), ``corrupt`` (truncated or damaged data).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from PIL import Image

from ppl_model.data.transforms import UnreadableImage, decode_rgb
from worker.settings import Settings
from worker.sources import SourceError

ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
NOT_AN_IMAGE = "not_an_image"


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image and what the verdict row records about it. ``width``/``height`` are after EXIF rotation;
    ``sha256`` is of the raw bytes (the idempotency key together with the model version)."""

    image: Image.Image
    format: str
    width: int
    height: int
    sha256: str


def decode_image(data: bytes, settings: Settings) -> DecodedImage:
    """First frame, EXIF-oriented, converted to RGB; ``SourceError`` (permanent) when it cannot be."""
    data = bytes(data)
    if not data:
        raise SourceError(NOT_AN_IMAGE, "empty data")
    digest = hashlib.sha256(data).hexdigest()
    try:
        image, image_format = decode_rgb(data, max_pixels=settings.max_pixels, formats=ALLOWED_FORMATS)
    except UnreadableImage as exc:
        detail = exc.detail
        if exc.reason == NOT_AN_IMAGE:  # Pillow's message names a BytesIO object; the first bytes say more
            detail = f"no image decoder recognises data starting {data[:16]!r}"
        raise SourceError(exc.reason, detail[:500], transient=False) from None
    return DecodedImage(image=image, format=image_format, width=image.width, height=image.height, sha256=digest)
