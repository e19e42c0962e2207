"""Image loading, cropping and augmentation for training and evaluation (Pillow + numpy).

Never resizes: generation traces live in the high frequencies that resampling would destroy. Images
smaller than the crop are padded with the normalisation mean, which becomes exactly zero after
normalisation.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageFilter

from ppl_model.config import AugmentConfig

# Decoding lives in ppl_model.imageio (one implementation for training, scans and the worker); these names
# stay importable from here for the code that always has.
from ppl_model.imageio import (  # noqa: F401
    ALPHA_MODES,
    SIXTEEN_BIT_MODES,
    TRANSPARENT_BACKGROUND,
    UnreadableImage,
    decode_rgb,
    load_rgb,
    to_rgb,
)


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
