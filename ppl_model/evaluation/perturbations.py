"""The degradations ``ppl eval --robustness`` applies to each decoded image before preprocessing.

Each is what content goes through on its way to a moderation queue: re-compression, blurring, and
downscaling by a platform.
"""

from __future__ import annotations

from PIL import Image, ImageFilter

from ppl_model.data.transforms import jpeg_roundtrip
from ppl_model.inference.preprocess import Perturbation


def jpeg(quality: int) -> Perturbation:
    return lambda img: jpeg_roundtrip(img, quality)


def blur(sigma: float) -> Perturbation:
    return lambda img: img.filter(ImageFilter.GaussianBlur(radius=sigma))


def downscale(factor: float) -> Perturbation:
    def apply(img: Image.Image) -> Image.Image:
        size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
        return img.resize(size, Image.Resampling.BICUBIC)

    return apply


ROBUSTNESS: dict[str, Perturbation] = {
    "jpeg95": jpeg(95), "jpeg75": jpeg(75), "jpeg60": jpeg(60), "jpeg30": jpeg(30),
    "blur1": blur(1.0), "blur2": blur(2.0),
    "down0.5": downscale(0.5), "down0.75": downscale(0.75),
}
