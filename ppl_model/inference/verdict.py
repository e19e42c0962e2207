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
    return make_verdicts(np.asarray([score]), np.asarray(patch_grid)[None], threshold)[0]


def make_verdicts(scores: np.ndarray, patch_grids: np.ndarray, threshold: float) -> list[Verdict]:
    """``make_verdict`` for a batch: (N,) scores and (N, rows, cols) grids, summarised in one vectorised pass
    (the same figures, to the bit, as one image at a time)."""
    grids = np.asarray(patch_grids, dtype=np.float32)
    flat = grids.reshape(len(grids), -1)
    top = flat.argmax(axis=1)
    rows, cols = np.unravel_index(top, grids.shape[1:])
    means, maxima = flat.mean(axis=1), flat.max(axis=1)
    p90 = np.percentile(flat, 90, axis=1)
    above = (flat >= threshold).mean(axis=1)
    return [Verdict(score=float(score), label=Label.FAKE if score >= threshold else Label.REAL,
                    threshold=float(threshold), patch_mean=float(means[i]), patch_max=float(maxima[i]),
                    patch_p90=float(p90[i]), patch_frac_above=float(above[i]), top_patch_row=int(rows[i]),
                    top_patch_col=int(cols[i]))
            for i, score in enumerate(np.asarray(scores, dtype=np.float64).tolist())]
