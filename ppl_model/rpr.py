"""Random Patch Reconstruction / Replacement (RPR).

A mask M over the ViT patch grid of the crop picks a fraction r of the patches; the training sample is
``x_rpr = M⊙donor + (1−M)⊙base``, labelled fake, with a label per patch saying whether it came from the
generator. Two variants share that compositing:

* ``reconstruction``: generator patches into the real image (base = real x, donor = reconstruction x̃;
  patch labels = M);
* ``real-into-fake``: real patches into the fake image (base = fake, donor = real; patch labels = 1 − M).

Both images must already be cropped with the same box, so the grid lines up with what the model sees.
Works on ``(H, W, C)`` uint8 arrays, the form images have inside the data pipeline.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

VARIANTS = ("reconstruction", "real-into-fake")


class RPRSample(NamedTuple):
    image: np.ndarray  # (H, W, C), same dtype as the inputs
    patch_labels: np.ndarray  # (G, G) float32, 1 = generated patch
    mask: np.ndarray  # (G, G) bool, True = patch taken from the donor


def sample_patch_mask(grid: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """A (grid, grid) boolean mask with exactly round(ratio·grid²) patches set, at least one and not all."""
    n = grid * grid
    k = min(max(round(ratio * n), 1), n - 1)
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[:k]] = True
    return mask.reshape(grid, grid)


def expand_to_pixels(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """Repeat each patch-grid cell over its patch_size × patch_size pixels."""
    return np.repeat(np.repeat(mask, patch_size, axis=0), patch_size, axis=1)


def composite(base: np.ndarray, donor: np.ndarray, mask: np.ndarray, patch_size: int) -> np.ndarray:
    """``M⊙donor + (1−M)⊙base`` with M given on the patch grid."""
    if base.shape != donor.shape:
        raise ValueError(f"RPR needs aligned crops of one shape, got {base.shape} and {donor.shape}")
    grid_pixels = mask.shape[0] * patch_size
    if base.shape[0] != grid_pixels or base.shape[1] != grid_pixels:
        raise ValueError(f"crop {base.shape[:2]} does not match a {mask.shape[0]}×{patch_size} patch grid")
    return np.where(expand_to_pixels(mask, patch_size)[..., None], donor, base)


def make_rpr_sample(real: np.ndarray, fake: np.ndarray, *, variant: str, ratio: float, patch_size: int,
                    rng: np.random.Generator) -> RPRSample:
    """Composite one RPR training sample from an aligned (real, fake) crop pair."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown RPR variant {variant!r}; known: {', '.join(VARIANTS)}")
    grid = real.shape[0] // patch_size
    mask = sample_patch_mask(grid, ratio, rng)
    if variant == "reconstruction":
        image = composite(base=real, donor=fake, mask=mask, patch_size=patch_size)
        generated = mask
    else:
        image = composite(base=fake, donor=real, mask=mask, patch_size=patch_size)
        generated = ~mask
    return RPRSample(image, generated.astype(np.float32), mask)
