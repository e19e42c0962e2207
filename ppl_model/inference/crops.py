"""Where the model looks in an image: the centre crop or up to K tiles, as uint8 pixels (no torch).

Kept apart from ``ppl_model.inference.preprocess`` (which normalises into torch tensors) so that the worker's
decode processes, which only cut crops, never import torch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def fill_colour(mean: tuple[float, ...]) -> tuple[int, int, int]:
    """The padding colour: the normalisation mean, so that padding normalises to zero."""
    r, g, b = (round(255 * m) for m in mean)
    return (r, g, b)


def centre_offset(length: int, crop: int) -> int:
    return (length - crop) // 2


def crop_at(img: Image.Image, left: int, top: int, crop: int, fill: tuple[int, int, int]) -> Image.Image:
    """A crop×crop window at (left, top), padded with ``fill`` wherever it leaves the image."""
    if left >= 0 and top >= 0 and left + crop <= img.width and top + crop <= img.height:
        return img.crop((left, top, left + crop, top + crop))
    canvas = Image.new("RGB", (crop, crop), fill)
    canvas.paste(img, (-left, -top))
    return canvas


def tile_offsets(width: int, height: int, size: int, max_tiles: int) -> list[tuple[int, int]]:
    """Top-left corners of up to ``max_tiles`` non-overlapping size×size crops.

    The full grid of whole tiles is centred on the image; when it has more cells than allowed, cells are
    taken evenly across it (row-major), so the chosen crops still cover the whole image's extent.
    """
    if max_tiles == 1:
        return [(centre_offset(width, size), centre_offset(height, size))]
    cols, rows = max(1, width // size), max(1, height // size)
    left0, top0 = centre_offset(width, cols * size), centre_offset(height, rows * size)
    cells = [(left0 + c * size, top0 + r * size) for r in range(rows) for c in range(cols)]
    if len(cells) <= max_tiles:
        return cells
    picks = np.linspace(0, len(cells) - 1, max_tiles).round().astype(int)
    return [cells[i] for i in picks]


def crop_pixels(img: Image.Image, size: int, tiles: int, mean: tuple[float, ...]) -> np.ndarray:
    """The crops the model judges of an RGB image, ``(T, size, size, 3)`` uint8, in ``tile_offsets`` order."""
    fill = fill_colour(mean)
    return np.stack([np.asarray(crop_at(img, left, top, size, fill), dtype=np.uint8)
                     for left, top in tile_offsets(img.width, img.height, size, tiles)])
