"""``ppl eval``: per-subset (generator) accuracy on real and fake, AP and AUROC, optionally under
degradations, with threshold calibration to a target false-positive rate.

Images are judged through an inference backend with the serving preprocessing (centre crop), so the
figures describe what would be deployed. Subsets:

* genimage: each ``<generator>/val`` with its own real (nature) and fake (ai) images;
* folders and paired: each folder beside ``real/`` (``fake/``, or one per reconstruction generator), every
  one judged against all of ``real/``; each file is scored once however many subsets it is in.
"""

from __future__ import annotations

from pathlib import Path
from typing import NotRequired, TypedDict

import numpy as np

from ppl_model.categories import Backend
from ppl_model.data.datasets import Sample, evaluation_subsets
from ppl_model.evaluation.metrics import detection_metrics, mean_over_subsets, threshold_for_fpr
from ppl_model.evaluation.perturbations import ROBUSTNESS
from ppl_model.inference.backends import load_backend
from ppl_model.inference.base import InferenceBackend
from ppl_model.inference.preprocess import Perturbation, Preprocessing
from ppl_model.inference.scan import scan
from ppl_model.model_dir import write_threshold
from ppl_model.reasons import Reason

Subsets = dict[str, list[Sample]]
Metrics = dict[str, float]  # detection_metrics: acc_real, acc_fake, acc, ap, auroc (+ real, fake counts)


class Calibration(TypedDict):
    target_fpr: float
    previous_threshold: float


class Degraded(TypedDict):
    subsets: dict[str, Metrics]
    mean: Metrics


class EvaluationResult(TypedDict):
    """What ``evaluate_model`` returns: ``ppl eval`` prints it as JSON and ``format_table`` tables it."""

    model: str
    backend: Backend
    layout: str
    threshold: float
    subsets: dict[str, Metrics]
    mean: Metrics
    skipped: dict[str, Reason]  # file → why it could not be judged
    calibrated: NotRequired[Calibration]  # with target_fpr: the threshold was recalibrated on this data
    roc_png: NotRequired[str]
    robustness: NotRequired[dict[str, Degraded]]  # perturbation name → metrics under it


def score_files(files: list[Path], backend: InferenceBackend, prep: Preprocessing, *,
                perturb: Perturbation | None = None, batch_size: int = 64, workers: int = 4,
                progress: bool = True) -> tuple[dict[Path, float], dict[str, Reason]]:
    """Fake probability per readable file, and the unreadable ones with their reasons."""
    scores: dict[Path, float] = {}
    skipped: dict[str, Reason] = {}
    for record in scan(files, backend, prep, threshold=0.5, batch_size=batch_size, workers=workers,
                       progress=progress, perturb=perturb):
        if record.error:
            skipped[record.path] = record.error
        elif record.score is not None:  # set on every judged record
            scores[Path(record.path)] = record.score
    return scores, skipped


def judged(items: list[Sample], scores: dict[Path, float]) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels of a subset's readable files."""
    pairs = [(scores[s.path], s.label) for s in items if s.path in scores]
    return np.array([score for score, _ in pairs]), np.array([label for _, label in pairs], dtype=np.int64)


def subset_metrics(subsets: Subsets, scores: dict[Path, float], threshold: float) -> dict[str, dict[str, float]]:
    return {name: detection_metrics(*judged(items, scores), threshold) for name, items in subsets.items()}


def evaluate_model(model_dir: str | Path, data: str | Path, *, layout: str = "auto",
                   backend: Backend | str = Backend.AUTO,
                   robustness: bool = False, target_fpr: float | None = None, roc_png: str | Path | None = None,
                   batch_size: int = 64, workers: int = 4, progress: bool = True) -> EvaluationResult:
    """Everything ``ppl eval`` reports; with ``target_fpr`` the threshold is calibrated on this data and
    written into ``model.json`` before the metrics are computed."""
    engine = load_backend(backend, model_dir, max_batch=batch_size)
    info = engine.info
    prep = Preprocessing.for_model(info)
    layout, subsets = evaluation_subsets(data, layout)
    files = sorted({sample.path for items in subsets.values() for sample in items})
    scores, skipped = score_files(files, engine, prep, batch_size=batch_size, workers=workers, progress=progress)
    threshold = info.threshold
    calibrated = None
    if target_fpr is not None:
        reals = [scores[s.path] for items in subsets.values() for s in items if s.label == 0 and s.path in scores]
        threshold = threshold_for_fpr(np.unique(reals), target_fpr)
        write_threshold(model_dir, threshold)
        calibrated = Calibration(target_fpr=target_fpr, previous_threshold=info.threshold)
    per_subset = subset_metrics(subsets, scores, threshold)
    result = EvaluationResult(model=info.version_id, backend=engine.name, layout=layout, threshold=threshold,
                              subsets=per_subset, mean=mean_over_subsets(per_subset), skipped=skipped)
    if calibrated is not None:
        result["calibrated"] = calibrated
    if roc_png:
        plot_roc(subsets, scores, Path(roc_png), title=f"model {info.version_id}")
        result["roc_png"] = str(roc_png)
    if robustness:
        result["robustness"] = {}
        for name, perturb in ROBUSTNESS.items():
            degraded, _ = score_files(files, engine, prep, perturb=perturb, batch_size=batch_size, workers=workers,
                                      progress=progress)
            under = subset_metrics(subsets, degraded, threshold)
            result["robustness"][name] = Degraded(subsets=under, mean=mean_over_subsets(under))
    return result


def plot_roc(subsets: Subsets, scores: dict[Path, float], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, items in subsets.items():
        values, labels = judged(items, scores)
        if len(set(labels.tolist())) == 2:
            fpr, tpr, _ = roc_curve(labels, values)
            ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(xlabel="false-positive rate (real called fake)", ylabel="true-positive rate", title=title)
    ax.legend(loc="lower right", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def format_table(result: EvaluationResult) -> str:
    lines = [f"{'subset':24s} {'real':>6s} {'fake':>6s} {'acc_real':>8s} {'acc_fake':>8s} {'acc':>6s} {'AP':>6s} "
             f"{'AUROC':>6s}"]
    rows = [*result["subsets"].items(), ("mean", result["mean"])]
    for name, m in rows:
        counts = f"{m['real']:6d} {m['fake']:6d}" if "real" in m else f"{'':6s} {'':6s}"
        lines.append(f"{name:24s} {counts} {m['acc_real']:8.3f} {m['acc_fake']:8.3f} {m['acc']:6.3f} "
                     f"{m['ap']:6.3f} {m['auroc']:6.3f}")
    for name, block in result.get("robustness", {}).items():
        m = block["mean"]
        lines.append(f"{'mean under ' + name:24s} {'':6s} {'':6s} {m['acc_real']:8.3f} {m['acc_fake']:8.3f} "
                     f"{m['acc']:6.3f} {m['ap']:6.3f} {m['auroc']:6.3f}")
    return "\n".join(lines)
