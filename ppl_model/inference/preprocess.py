"""Inference preprocessing, shared by evaluation, ``ppl scan`` and the worker: decode, crop, normalise.

An image is judged on one centre crop at the model's input size, or, with ``tiles > 1``, on up to that
many non-overlapping crops spread over the whole image (so a large image is judged on all of its patches,
not only its centre); the per-crop probabilities are then aggregated by max or mean. Images are never
resized, as in training: smaller ones are padded with the normalisation mean.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ppl_model.imageio import decode_rgb
from ppl_model.inference.base import Prediction
from ppl_model.inference.crops import crop_pixels
from ppl_model.jpeg_region import decode_model_crops
from ppl_model.model_dir import ModelInfo

AGGREGATIONS = ("max", "mean")
Perturbation = Callable[[Image.Image], Image.Image]  # applied to a decoded image before preprocessing


@dataclass(frozen=True)
class Preprocessing:
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tiles: int = 1  # crops per image: 1 = the centre crop

    def __post_init__(self) -> None:
        if self.tiles < 1:
            raise ValueError("tiles must be at least 1")

    @classmethod
    def for_model(cls, info: ModelInfo, tiles: int = 1) -> Preprocessing:
        return cls(info.input_size, rgb_triple(info.mean, "mean"), rgb_triple(info.std, "std"), tiles)


def rgb_triple(values: Sequence[float], name: str) -> tuple[float, float, float]:
    """One normalisation value per RGB channel, as floats; ValueError for any other count."""
    if len(values) != 3:
        raise ValueError(f"the normalisation {name} needs one value per RGB channel, got {list(values)}")
    return float(values[0]), float(values[1]), float(values[2])


def to_tensor(img: Image.Image | np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(H, W, 3) uint8 → normalised float (3, H, W)."""
    return normalise(np.asarray(img, dtype=np.uint8)[None], mean, std)[0]


def normalise(crops: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
              device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, H, W, 3) uint8 crops → normalised float (N, 3, H, W) on ``device``, in one vectorised pass. The
    uint8 pixels move first, so a GPU receives a quarter of the bytes and does the arithmetic itself.

    ``(x / 255 - mean) / std`` as ``(x - 255·mean) · 1/(255·std)``, two in-place passes over the pixels instead
    of three new tensors (about half the time on the CPU), equal within float32 rounding; a pixel of the mean's
    own colour (the padding of ``crop_pixels``, where 255·mean is whole) still normalises to exactly 0."""
    # torch refuses to share a read-only array (a PIL image's) without a warning: copy that one (a crop's bytes)
    pixels = np.require(crops, dtype=np.uint8, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    tensor = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).to(torch.float32)
    offset, scale = _affine(tuple(mean), tuple(std), str(torch.device(device)))
    return tensor.sub_(offset).mul_(scale)


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel offset and scale of ``normalise``, made once per normalisation and device."""
    offset = torch.tensor([255.0 * m for m in mean], dtype=torch.float32, device=device)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=device)
    return offset[None, :, None, None], scale[None, :, None, None]


class Prepared(NamedTuple):
    crops: torch.Tensor  # (T, 3, S, S), T = number of crops of this image
    width: int
    height: int
    format: str  # the decoder's name for the file format (JPEG, PNG, ...), "" when unknown


def prepare_image(img: Image.Image, prep: Preprocessing, image_format: str = "") -> Prepared:
    crops = crop_pixels(img, prep.input_size, prep.tiles, prep.mean)
    return Prepared(normalise(crops, prep.mean, prep.std), img.width, img.height, image_format)


def prepare(source: Path | str | bytes, prep: Preprocessing, name: str = "") -> Prepared:
    """Decode and prepare one image; raises ``UnreadableImage`` with a reason for what cannot be decoded."""
    img, image_format = decode_rgb(source, name)
    return prepare_image(img, prep, image_format)


def prepare_jpeg(data: bytes, prep: Preprocessing, *, max_pixels: int | None = None) -> Prepared | None:
    """``prepare_image(decode_rgb(data))`` for a plain JPEG, decoding only the crops' regions
    (``ppl_model.jpeg_region``): the same crops bit for bit, size and format. None for what that decoder does
    not handle (not a JPEG, an MPO, CMYK, over ``max_pixels``, damaged, ...): decode the whole image as before,
    which gives the reason if it cannot. Raises ``UnreadableImage`` (``too_large``) for a hostile progressive
    file."""
    region = decode_model_crops(data, prep.input_size, prep.tiles, prep.mean, max_pixels=max_pixels)
    if region is None:
        return None
    return Prepared(normalise(region.crops, prep.mean, prep.std), region.width, region.height, region.format)


def aggregate(prediction: Prediction, counts: list[int], how: str = "max") -> list[Prediction]:
    """Split a batch prediction back into images (``counts`` crops each) and combine each image's crops:
    the image probability by ``how``; the patch grid of the crop that decided (max) or the mean grid."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}")
    out, start = [], 0
    for count in counts:
        probs = prediction.image_prob[start:start + count]
        grids = prediction.patch_prob[start:start + count]
        if how == "max":
            best = int(probs.argmax())
            out.append(Prediction(probs[best:best + 1], grids[best:best + 1]))
        else:
            out.append(Prediction(probs.mean(keepdims=True), grids.mean(axis=0, keepdims=True)))
        start += count
    return out
