"""Detection metrics at a threshold, and threshold calibration to a false-positive rate."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

METRICS = ("acc_real", "acc_fake", "acc", "ap", "auroc")


def detection_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy on real and on fake at ``threshold`` (fake when score >= threshold) and their mean, with
    AP and AUROC (threshold-free; NaN when only one class is present)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    fake = scores >= threshold
    acc_real = float((~fake[labels == 0]).mean()) if (labels == 0).any() else float("nan")
    acc_fake = float(fake[labels == 1].mean()) if (labels == 1).any() else float("nan")
    both = (labels == 0).any() and (labels == 1).any()
    return {"acc_real": acc_real, "acc_fake": acc_fake, "acc": (acc_real + acc_fake) / 2,
            "ap": float(average_precision_score(labels, scores)) if both else float("nan"),
            "auroc": float(roc_auc_score(labels, scores)) if both else float("nan"),
            "real": int((labels == 0).sum()), "fake": int((labels == 1).sum())}


def mean_over_subsets(subsets: dict[str, dict[str, float]]) -> dict[str, float]:
    return {key: float(np.nanmean([m[key] for m in subsets.values()])) for key in METRICS} if subsets else {}


def threshold_for_fpr(real_scores: np.ndarray, target_fpr: float) -> float:
    """The smallest threshold at which at most ``target_fpr`` of the real images are called fake."""
    if not 0 < target_fpr < 1:
        raise ValueError("target FPR must be between 0 and 1")
    real = np.sort(np.asarray(real_scores, dtype=np.float64))
    if real.size == 0:
        raise ValueError("calibration needs real images")
    allowed = int(np.floor(target_fpr * real.size))  # real images that may score at or above the threshold
    cut = real[real.size - allowed - 1]  # the highest real score that must stay below the threshold
    return float(np.nextafter(cut, np.inf))
