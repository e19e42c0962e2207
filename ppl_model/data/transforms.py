"""Image loading, cropping and augmentation for training and evaluation (Pillow + numpy).

Never resizes: generation traces live in the high frequencies that resampling would destroy. Images
smaller than the crop are padded with the normalisation mean, which becomes exactly zero after
normalisation.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from ppl_model.config import AugmentConfig


class UnreadableImage(Exception):
    """A file that cannot be decoded as an image.

    ``reason`` is a stable code (``missing``, ``unreadable``, ``not_an_image``, ``too_large``, ``corrupt``,
    ``unsupported_format``) for counting and querying; ``detail`` is the decoder's own message.
    """

    def __init__(self, path: Path | str, reason: str, detail: str = ""):
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))
        self.path = str(path)
        self.reason = reason
        self.detail = detail


SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
TRANSPARENT_BACKGROUND = (128, 128, 128)  # what fully transparent pixels become: deterministic, mid-range


def decode_rgb(source: Path | str | bytes, name: str = "", *, max_pixels: int | None = None,
               formats: Collection[str] | None = None) -> tuple[Image.Image, str]:
    """Decode a file (path) or encoded bytes fully, apply EXIF orientation, convert to RGB.

    Only the first frame of animated or multi-page images is decoded. ``formats`` (Pillow format names)
    refuses other formats before any pixel is decoded (``unsupported_format``); ``max_pixels`` caps
    width×height as the header states it, also before decoding (``too_large``). Pillow's own
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) applies on top, so the effective cap is the
    smaller of the two.

    Returns the image and the decoder's format name (JPEG, PNG, ...)."""
    path = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                image_format = img.format or ""
                if formats is not None and image_format not in formats:
                    raise UnreadableImage(path, "unsupported_format", f"{image_format or 'unknown'} is not accepted")
                img.seek(0)  # first frame of GIF/APNG/WebP animations and multi-page TIFF
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise UnreadableImage(path, "too_large", f"{width}x{height} pixels, over the limit of {max_pixels}")
                img.load()  # here, inside the try, so that truncated data is reported as corrupt
                img = ImageOps.exif_transpose(img)
                return to_rgb(img), image_format
    except FileNotFoundError:
        raise UnreadableImage(path, "missing") from None
    except UnidentifiedImageError as exc:
        raise UnreadableImage(path, "not_an_image", str(exc)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(path, "too_large", str(exc)) from None
    # Truncated or corrupt data. Pillow's parsers also raise TypeError on a malformed field (a TIFF strip
    # offset stored as a FLOAT fails in ImageFile.load's seek): damaged input too, not a bug to crash on.
    except (OSError, ValueError, TypeError, SyntaxError, EOFError, struct.error) as exc:
        raise UnreadableImage(path, "corrupt", str(exc)) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB, keeping the whole tonal range and making transparency deterministic.

    High bit depths are scaled, not clipped (Pillow's own conversion clips 16-bit values at 255, which
    would turn most of a 16-bit image white). Transparent pixels are composited onto mid-grey: their hidden
    colour values are arbitrary, and dropping alpha would let them reach the detector.
    """
    if img.mode in SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        values = np.asarray(img)
        grey = Image.fromarray(_scale_to_uint8(values, img.mode))
        transparency = img.info.get("transparency")
        if isinstance(transparency, int) and not isinstance(transparency, bool):
            alpha = Image.fromarray(np.where(values == transparency, 0, 255).astype(np.uint8))
            return _on_background(Image.merge("RGBA", (grey, grey, grey, alpha)))
        return grey.convert("RGB")
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        return _on_background(img.convert("RGBA"))  # P and L/RGB with tRNS: Pillow applies the transparency
    return img.convert("RGB")  # RGB, L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit data keeps its nominal range (65535 → 255); wider integer or float data is scaled by its range."""
    if mode in SIXTEEN_BIT_MODES:
        return (values.astype(np.uint16) >> 8).astype(np.uint8)
    if mode == "I" and values.size and values.min() >= 0 and values.max() <= 65535:
        return (values.astype(np.uint32) >> 8).astype(np.uint8)  # 16-bit samples in a 32-bit container
    data = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if mode == "F" and data.size and data.min() >= 0.0 and data.max() <= 1.0:
        return np.rint(data * 255.0).astype(np.uint8)  # the usual normalised float convention
    low = min(0.0, float(data.min())) if data.size else 0.0
    high = float(data.max()) if data.size else 0.0
    if high <= low:
        return np.zeros(data.shape, dtype=np.uint8)
    return np.rint((data - low) * (255.0 / (high - low))).astype(np.uint8)


def _on_background(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*TRANSPARENT_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_rgb(source: Path | str | bytes, name: str = "") -> Image.Image:
    return decode_rgb(source, name)[0]


def fill_colour(mean: tuple[float, ...]) -> tuple[int, int, int]:
    r, g, b = (round(255 * m) for m in mean)
    return (r, g, b)


def random_offset(length: int, crop: int, rng: np.random.Generator) -> int:
    """Top/left of a crop; negative when the image is smaller (the image then sits inside the padding)."""
    if length >= crop:
        return int(rng.integers(0, length - crop + 1))
    return -int(rng.integers(0, crop - length + 1))


def centre_offset(length: int, crop: int) -> int:
    return (length - crop) // 2


def crop_at(img: Image.Image, left: int, top: int, crop: int, fill: tuple[int, int, int]) -> Image.Image:
    """A crop×crop window at (left, top), padded with ``fill`` wherever it leaves the image."""
    if left >= 0 and top >= 0 and left + crop <= img.width and top + crop <= img.height:
        return img.crop((left, top, left + crop, top + crop))
    canvas = Image.new("RGB", (crop, crop), fill)
    canvas.paste(img, (-left, -top))
    return canvas


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def augment_quality(img: Image.Image, cfg: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur then JPEG re-compression, each with its probability, on either class alike."""
    if rng.random() < cfg.blur_prob:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*cfg.blur_sigma))))
    if rng.random() < cfg.jpeg_prob:
        lo, hi = cfg.jpeg_quality
        img = jpeg_roundtrip(img, int(rng.integers(lo, hi + 1)))
    return img


def to_tensor(img: Image.Image | np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(H, W, 3) uint8 → normalised float (3, H, W)."""
    array = np.asarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (tensor - mean_t) / std_t
