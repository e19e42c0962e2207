"""Image loading, cropping and augmentation for training and evaluation (Pillow + numpy).

Never resizes: generation traces live in the high frequencies that resampling would destroy. Images
smaller than the crop are padded with the normalisation mean, which becomes exactly zero after
normalisation.
"""

from __future__ import annotations

import io

import numpy as np
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

# Cropping and normalisation are shared with inference and live there (inference must not import the
# training-data package); these names stay importable from here.
from ppl_model.inference.crops import centre_offset, crop_at, fill_colour  # noqa: F401
from ppl_model.inference.preprocess import to_tensor  # noqa: F401


def random_offset(length: int, crop: int, rng: np.random.Generator) -> int:
    """Top/left of a crop; negative when the image is smaller (the image then sits inside the padding)."""
    if length >= crop:
        return int(rng.integers(0, length - crop + 1))
    return -int(rng.integers(0, crop - length + 1))


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def augment_quality(img: Image.Image, cfg: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur then JPEG re-compression, each with its probability, on either class alike."""
    if rng.random() < cfg.blur_prob:
        low, high = cfg.blur_sigma  # [lo, hi], checked by the config
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(low, high))))
    if rng.random() < cfg.jpeg_prob:
        lo, hi = cfg.jpeg_quality
        img = jpeg_roundtrip(img, int(rng.integers(lo, hi + 1)))
    return img
