"""Few-Patch-Bias analysis: counterfactual direct effects (CDE) of single patches (DESIGN.md §2).

δ(I) is the detector's image logit; CDE_ij = δ(I) − δ(I with patch (i, j) replaced by a neutral baseline
fill). A detector that decides from a few conspicuous patches concentrates the positive CDE on them (low
entropy, high top-1 mass, high Gini) and flips fake → real when its single most influential patch is
masked; one that uses every patch spreads it out. The masked logit is exactly δ(I) − CDE_ij, so the flip
test and the one-random-patch accuracy need no forward pass beyond the CDE map's.

Everything runs in float32 (no autocast): CDE values are differences of nearby logits, which reduced
precision would drown in rounding noise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ppl_model.data.datasets import list_images
from ppl_model.data.transforms import UnreadableImage
from ppl_model.inference.preprocess import Preprocessing, prepare
from ppl_model.model_dir import load_model_dir

BASELINES = ("zero", "mean", "black")
FILL_DESCRIPTIONS = {
    "zero": "normalised zero (the model's mean colour), as in the paper",
    "mean": "the mean RGB colour of the analysed centre crops",
    "black": "black (RGB 0, 0, 0)",
}
UNIFORMITY_KEYS = ("normalized_entropy", "top1_mass", "top5pct_mass", "gini")
# Uniformity is summarised per label: a detector that calls real images fake has "evidence" on them too,
# and pooling it with the fakes' would compare different things between detectors.
GROUPS = ("fake", "real", "all")
SUMMARY_KEYS = (*(f"{key}_{group}" for group in GROUPS for key in UNIFORMITY_KEYS), "flip_rate",
                "random_patch_accuracy_drop")


def patch_masked_copies(pixels: torch.Tensor, patch_size: int, fill: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """The G² copies of one normalised crop ``(3, S, S)``; copy k = i·G + j has patch (i, j) set to ``fill``
    (a colour ``(3,)`` in normalised space). Returns ``(G², 3, S, S)``."""
    channels, height, width = pixels.shape
    if height != width or height % patch_size:
        raise ValueError(f"crop {height}×{width} is not a square grid of {patch_size}-pixel patches")
    grid = height // patch_size
    fill_t = torch.as_tensor(fill, dtype=pixels.dtype, device=pixels.device).reshape(channels, 1, 1)
    # mask[k] is the pixel mask of patch k: the one-hot grid of k blown up to patch_size×patch_size blocks.
    onehot = torch.eye(grid * grid, dtype=torch.bool, device=pixels.device).reshape(-1, grid, grid)
    mask = onehot.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2)
    return torch.where(mask[:, None], fill_t, pixels)


def _device(module: nn.Module, fallback: torch.device) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else fallback


def _logits_in_batches(detector: nn.Module, pieces: Iterable[torch.Tensor], batch_size: int,
                       device: torch.device) -> torch.Tensor:
    """Image logits of a stream of crop stacks, re-cut into forward passes of exactly ``batch_size`` crops
    (the last one shorter), so copies of several images share a pass and no pass is wasted on a remainder."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    outputs: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    count = 0

    def run(batch: torch.Tensor) -> None:
        outputs.append(detector(batch.to(device)).image_logit.reshape(-1).float().cpu())

    for piece in pieces:
        pending.append(piece)
        count += len(piece)
        while count >= batch_size:
            joined = torch.cat(pending)
            run(joined[:batch_size])
            pending, count = [joined[batch_size:]], count - batch_size
    if count:
        run(torch.cat(pending))
    return torch.cat(outputs) if outputs else torch.empty(0)


@torch.inference_mode()
def counterfactual_effects_many(detector: nn.Module, crops: torch.Tensor, patch_size: int,
                                fill: torch.Tensor | Sequence[float],
                                batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Base logits ``(B,)`` and CDE maps ``(B, G, G)`` of a stack of normalised crops ``(B, 3, S, S)``.

    Each image contributes its original plus its G² masked copies, streamed through the detector in
    ``ceil(B·(G²+1) / batch_size)`` forward passes. The detector should be in eval mode (no dropout noise).
    """
    device = _device(detector, crops.device)
    crops = crops.to(device, torch.float32)  # masked copies are then made where the model runs
    grid = crops.shape[-1] // patch_size

    def pieces() -> Iterator[torch.Tensor]:
        for crop in crops:
            yield crop[None]
            yield patch_masked_copies(crop, patch_size, fill)

    logits = _logits_in_batches(detector, pieces(), batch_size, device).double().reshape(len(crops), -1)
    base = logits[:, 0]
    cde = (base[:, None] - logits[:, 1:]).reshape(len(crops), grid, grid)
    return base.numpy(), cde.numpy()


def counterfactual_effects(detector: nn.Module, pixels: torch.Tensor, patch_size: int,
                           fill: torch.Tensor | Sequence[float], batch_size: int = 256) -> tuple[float, np.ndarray]:
    """δ(I) and CDE_ij = δ(I) − δ(I with patch (i, j) set to ``fill``) for one normalised crop ``(3, S, S)``;
    the CDE map is ``(G, G)``."""
    base, cde = counterfactual_effects_many(detector, pixels[None], patch_size, fill, batch_size)
    return float(base[0]), cde[0]


def uniformity(cde: np.ndarray) -> dict[str, float]:
    """How evenly the evidence for "fake" is spread, over p = CDE⁺ / ΣCDE⁺ on the N = G² patches.

    ``normalized_entropy`` H(p)/log N (1 = every patch equal, 0 = one patch), ``top1_mass`` max p,
    ``top5pct_mass`` the mass of the ceil(0.05·N) largest p, ``gini`` the Gini coefficient of p (0 = equal;
    one patch holding everything gives (N−1)/N). When no patch pushes towards fake (ΣCDE⁺ = 0) p does not
    exist: the image's evidence is not "uniform" or "concentrated", it is absent, so every value is NaN
    rather than a number that would bias averages; callers use nan-aware means and count these images.
    """
    values = np.asarray(cde, dtype=np.float64).ravel()
    n = values.size
    if n < 2:
        raise ValueError("uniformity needs at least two patches")
    positive = np.clip(values, 0.0, None)
    total = positive.sum()
    if not total > 0:
        return dict.fromkeys(UNIFORMITY_KEYS, math.nan)
    p = positive / total
    nonzero = p[p > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum() / math.log(n))
    ranked = np.sort(p)  # ascending
    top_k = math.ceil(0.05 * n)
    gini = float(2.0 * (np.arange(1, n + 1) * ranked).sum() / n - (n + 1) / n)  # Σp = 1
    return {"normalized_entropy": min(max(entropy, 0.0), 1.0), "top1_mass": float(ranked[-1]),
            "top5pct_mass": float(ranked[-top_k:].sum()), "gini": max(gini, 0.0)}


def logit_threshold(threshold: float) -> float:
    """The image-logit threshold equivalent to a threshold on the fake probability (fake when ≥)."""
    if threshold <= 0:
        return -math.inf
    if threshold >= 1:
        return math.inf
    return math.log(threshold / (1 - threshold))


def _labelled_files(images_dir: Path) -> list[tuple[Path, int | None]]:
    """``real/`` and ``fake/`` give labels 0 and 1 (other entries are then ignored); otherwise every image
    under the folder, unlabelled."""
    if (images_dir / "real").is_dir() and (images_dir / "fake").is_dir():
        return [(path, label) for label, name in ((0, "real"), (1, "fake")) for path in list_images(images_dir / name)]
    return [(path, None) for path in list_images(images_dir)]


def _mean_colour(files: list[Path], prep: Preprocessing, skipped: dict[str, dict[str, str]],
                 progress: bool) -> np.ndarray:
    """Mean RGB in [0, 1] over all readable centre crops (their padding included: it is what the model sees)."""
    mean, std = np.array(prep.mean), np.array(prep.std)
    total, count = np.zeros(3), 0
    for path in tqdm(files, desc="mean colour", unit="img", disable=not progress, leave=False):
        try:
            crops = prepare(path, prep).crops.double()
        except UnreadableImage as exc:
            skipped[str(path)] = {"path": str(path), "reason": exc.reason, "detail": exc.detail}
            continue
        total += crops.mean(dim=(0, 2, 3)).numpy() * std + mean
        count += 1
    return total / count if count else mean  # nothing readable: the fill is irrelevant; use the model mean


def _save_heatmap(crop: torch.Tensor, cde: np.ndarray, prep: Preprocessing, prob: float, label: int | None,
                  path: Path) -> None:
    """The crop with CDE⁺ over it, one cell per patch. A bare Agg figure: no pyplot state, nothing to leak."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    std, mean = torch.tensor(prep.std)[:, None, None], torch.tensor(prep.mean)[:, None, None]
    image = (crop.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    size = image.shape[0]
    fig = Figure(figsize=(4.2, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(image, extent=(0, size, size, 0), interpolation="nearest")
    overlay = ax.imshow(np.clip(cde, 0, None), extent=(0, size, size, 0), cmap="inferno", alpha=0.55,
                        interpolation="nearest", vmin=0)
    fig.colorbar(overlay, ax=ax, label="CDE⁺ (logit drop when masked)")
    known = "" if label is None else (", labelled fake" if label else ", labelled real")
    ax.set_title(f"p(fake) = {prob:.3f}{known}", fontsize=9)
    ax.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def _stats(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean, sample std (ddof 1; null below two values) and count over the defined (finite) values."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(finite)
    return {"mean": float(finite.mean()) if n else None, "std": float(finite.std(ddof=1)) if n > 1 else None,
            "n": n}


def _json_value(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def analyze(model_dir: str | Path, images_dir: str | Path, out_dir: str | Path, *, baseline: str = "zero",
            batch_size: int = 256, seed: int = 0, progress: bool = True,
            device: str | torch.device | None = None) -> dict[str, Any]:
    """CDE maps, heatmaps and Few-Patch-Bias summaries for every image under ``images_dir``.

    Writes ``out_dir/images.jsonl`` (one record per readable image), ``out_dir/heatmaps/*.png`` and
    ``out_dir/summary.json``, and returns the summary. Each summary entry is ``{"mean", "std", "n"}`` over
    the images where it is defined, with the sample std (null when n < 2):

    * uniformity ``<key>_fake``, ``<key>_real`` and ``<key>_all`` (e.g. ``normalized_entropy_fake``): over
      fake-labelled, real-labelled and all images with ΣCDE⁺ > 0 (an unlabelled folder has only ``_all``);
    * ``flip_rate``: over fake-labelled images predicted fake (only those can flip to real); in an
      unlabelled folder, over images predicted fake;
    * ``random_patch_accuracy_drop``: over labelled images; its ``std`` is the std of the per-image
      difference correct − correct-after-one-random-patch (values in {−1, 0, 1}), so ``std / sqrt(n)`` is
      its standard error; no bootstrap.

    Fills (``baseline``): ``zero`` normalised zero, i.e. the model's normalisation mean (the paper's zeroed
    patch; the default), ``mean`` the mean RGB colour of all analysed centre crops, ``black``. The fill is
    recorded in the summary. Unreadable files are skipped and listed with reasons.
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}")
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    detector, info = load_model_dir(model_dir, device=device)
    prep = Preprocessing.for_model(info)
    grid, patch_size = info.grid[0], info.patch_size
    threshold = logit_threshold(info.threshold)
    files = _labelled_files(images_dir)

    skipped: dict[str, dict[str, str]] = {}
    if baseline == "mean":
        fill_rgb = _mean_colour([path for path, _ in files], prep, skipped, progress)
    else:
        fill_rgb = np.array(prep.mean) if baseline == "zero" else np.zeros(3)
    fill = torch.tensor((fill_rgb - np.array(prep.mean)) / np.array(prep.std), dtype=torch.float32)

    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    # Images per group: enough masked copies for ~8 full passes, so at most one short pass per group.
    group_size = max(1, math.ceil(8 * batch_size / (grid * grid + 1)))
    todo = [(index, path, label) for index, (path, label) in enumerate(files) if str(path) not in skipped]
    bar = tqdm(total=len(todo), desc="CDE", unit="img", disable=not progress, dynamic_ncols=True)
    with (out_dir / "images.jsonl").open("w") as jsonl:
        for start in range(0, len(todo), group_size):
            loaded = []
            for index, path, label in todo[start:start + group_size]:
                try:
                    loaded.append((index, path, label, prepare(path, prep).crops[0]))
                except UnreadableImage as exc:
                    skipped[str(path)] = {"path": str(path), "reason": exc.reason, "detail": exc.detail}
                    bar.update()
            if not loaded:
                continue
            bases, cdes = counterfactual_effects_many(detector, torch.stack([item[3] for item in loaded]),
                                                      patch_size, fill, batch_size)
            for (index, path, label, crop), base, cde in zip(loaded, bases, cdes, strict=True):
                record = _image_record(index, path, images_dir, label, float(base), cde, threshold, seed)
                _save_heatmap(crop, cde, prep, record["probability"], label, out_dir / record["heatmap"])
                jsonl.write(json.dumps(record) + "\n")
                records.append(record)
                bar.update()
    bar.close()

    drops = [int(r["correct"]) - int(r["random_patch_correct"]) for r in records if r["label"] is not None]
    groups = {"fake": [r for r in records if r["label"] == 1], "real": [r for r in records if r["label"] == 0],
              "all": records}
    summary: dict[str, Any] = {f"{key}_{group}": _stats(r[key] for r in members)
                               for group, members in groups.items() for key in UNIFORMITY_KEYS}
    summary["flip_rate"] = _stats(float(r["flipped"]) for r in records if r["flipped"] is not None)
    summary["random_patch_accuracy_drop"] = _stats(drops)
    summary |= {
        "images": len(records),
        "skipped": sorted(skipped.values(), key=lambda s: s["path"]),
        "undefined_uniformity": sum(r["normalized_entropy"] is None for r in records),
        "baseline": baseline,
        "fill_description": FILL_DESCRIPTIONS[baseline],
        "fill_rgb": [float(v) for v in fill_rgb],  # in [0, 1], pixel space
        "fill": fill.tolist(),  # normalised, as fed to the model
        "version_id": info.version_id,
        "grid": list(info.grid),
        "threshold": info.threshold,
        "seed": seed,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _image_record(index: int, path: Path, images_dir: Path, label: int | None, base: float, cde: np.ndarray,
                  threshold: float, seed: int) -> dict[str, Any]:
    """One image's line of images.jsonl. Masked logits are base − CDE, exactly what the masked forward gave."""
    grid = cde.shape[0]
    predicted = int(base >= threshold)
    top = int(np.argmax(cde))
    # Seeded by (seed, image index): the same patch whatever else is in the folder or unreadable.
    random_patch = int(np.random.default_rng([seed, index]).integers(grid * grid))
    masked_prediction = int(base - cde.flat[random_patch] >= threshold)
    relative = path.relative_to(images_dir).as_posix()
    return {
        "path": str(path),
        "label": label,
        "base_logit": base,
        "probability": float(np.exp(-np.logaddexp(0.0, -base))),  # sigmoid, no overflow
        "predicted": predicted,
        "correct": None if label is None else predicted == label,
        **{key: _json_value(value) for key, value in uniformity(cde).items()},
        "top_patch": [top // grid, top % grid],
        "max_cde": float(cde.flat[top]),
        # Only a fake predicted fake can flip to real; a real image called fake is a false positive, not a flip.
        "flipped": bool(base - cde.flat[top] < threshold) if predicted and label in (1, None) else None,
        "random_patch": [random_patch // grid, random_patch % grid],
        "random_patch_correct": None if label is None else masked_prediction == label,
        "heatmap": f"heatmaps/{relative.replace('/', '__')}.png",
    }
