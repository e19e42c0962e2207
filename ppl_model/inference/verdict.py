"""From probabilities to a verdict: the score, the label at the model's threshold, and a patch summary.

The same summary is what ``ppl scan`` prints and what the worker stores, so analysts see one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ppl_model.categories import Label


@dataclass(frozen=True)
class Verdict:
    score: float  # probability the image is generated
    label: Label  # FAKE when score >= threshold
    threshold: float
    patch_mean: float
    patch_max: float
    patch_p90: float
    patch_frac_above: float  # share of patches whose probability is at or above the threshold
    top_patch_row: int
    top_patch_col: int


def make_verdict(score: float, patch_grid: np.ndarray, threshold: float) -> Verdict:
    grid = np.asarray(patch_grid, dtype=np.float32)
    row, col = np.unravel_index(int(grid.argmax()), grid.shape)
    label = Label.FAKE if score >= threshold else Label.REAL
    return Verdict(score=float(score), label=label, threshold=float(threshold),
                   patch_mean=float(grid.mean()), patch_max=float(grid.max()),
                   patch_p90=float(np.percentile(grid, 90)), patch_frac_above=float((grid >= threshold).mean()),
                   top_patch_row=int(row), top_patch_col=int(col))
