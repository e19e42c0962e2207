"""``ppl bench synth``: the project's controlled stand-in for GenImage, built from real photos alone.

Protocol (as GenImage's): train a detector on ONE generator family, test it on every family, and report
per-family accuracy, AP and AUROC plus the mean over the families it never saw, for the plain baseline and
for PPL with identical config, budget and seeds; then the Few-Patch-Bias analysis (``analyze``) of both on
a fixed test subset and, in the full run, robustness under the ``ppl eval --robustness`` degradations.

Stages (each printed with its wall time):

1. ``split_photos``: the real photos are split **by source photo** into train/val/test before any crop
   is taken (photos ranked by a hash of their file name, then cut by the configured fractions), so no
   photo feeds two splits.
2. ``build_crops``: non-resized random crops of each split's photos.
3. ``build_generators``: one conv autoencoder per family in ``generators.FAMILIES``, trained here on
   train-split crops only. Their reconstructions of real crops are the paired fakes (the RPR donors);
   the ``*_sampled`` families decode interpolated or Gaussian-sampled latents (``sample_images``), fakes
   that reconstruct no real photo and have no real partner.
4. ``write_datasets``: the detector's data in the paired layout (``train/{real,<family>}`` and
   ``val/{real,<family>}``, a reconstruction has its real crop's file name), the test set
   (``test/{real,<every family>}``, each family judged against all of ``real/``) and
   ``analysis_images/{real,fake}`` (real test crops and fakes of the unseen families).
5. ``run_detectors``: per seed, ``run_training`` baseline and PPL, ``evaluate_model`` on the test set,
   ``analyze`` on the analysis images.
6. ``summarise`` and ``write_report``: ``OUT/results.json`` and ``OUT/report.md``.

Stages 2-4 are cached under ``OUT/cache``, each keyed by a hash of everything that made it (photo
contents, split, sizes, steps, seeds, the keys of the stages before), so a rerun with the same settings
only retrains the detectors and any changed setting rebuilds what depends on it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppl_model.config import ExperimentConfig
from ppl_model.synthbench.config import Log, SynthBenchConfig
from ppl_model.synthbench.report import machine_info, summarise, write_report
from ppl_model.synthbench.stages import (
    build_crops,
    build_generators,
    build_pretrained,
    jsonable,
    run_detectors,
    write_datasets,
)

# ---------------------------------------------------------------------------------------------- driver


@dataclass
class _Clock:
    log: Log
    stages: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.log(f"stage {name} ...")
        start = time.perf_counter()
        value = fn()
        self.stages[name] = time.perf_counter() - start
        self.log(f"stage {name} done in {self.stages[name]:.1f} s")
        return value


def _detector_summary(exp: ExperimentConfig) -> str:
    m, t, loss = exp.model, exp.train, exp.loss
    model = f"pretrained {m.arch} ({m.pretrained})" if m.pretrained else f"{m.arch} {m.size} from random weights"
    return (f"{model}, {m.finetune} fine-tuning, input {m.input_size or 'default'} px, patch "
            f"{m.patch_size or 'default'}, {t.epochs} epoch(s) of batch {t.batch_size}; RPR r = {exp.rpr.ratio}, "
            f"p = {exp.rpr.prob}; PCL λ = {loss.pcl_weight} (warm-up {loss.pcl_warmup_fraction}), α = {loss.margin}, "
            f"form {loss.pcl_form}, projection "
            f"{loss.pcl_projection if loss.pcl_projection and loss.pcl_form != 'paper' else 'none'}; "
            f"patch-head weight {loss.patch_weight}")
def run_benchmark(photos: str | Path, out: str | Path, cfg: SynthBenchConfig, exp: ExperimentConfig, *,
                  config_path: str | Path | None = None, progress: bool = False, log: Log = print,
                  cache: str | Path | None = None) -> dict[str, Any]:
    """All stages; writes ``OUT/results.json`` (also after each detector) and ``OUT/report.md``. ``cache``
    (default ``OUT/cache``) may be shared by runs, e.g. one process per regime on a machine with two cores."""
    cfg.validate()
    out = Path(out)
    cache = Path(cache) if cache is not None else out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    clock = _Clock(log)
    started = time.time()
    total = time.perf_counter()

    crops = clock.run("crops", lambda: build_crops(photos, cfg, cache, log=log))
    log(f"photo split (by source photo): {crops.split_sizes}; crops {({k: len(v) for k, v in crops.names.items()})}"
        f"{' (cached)' if not crops.built else ''}")
    generators = clock.run("generators", lambda: build_generators(crops, cfg, cache, progress=progress, log=log))
    datasets = clock.run("datasets", lambda: write_datasets(crops, generators, cfg, cache, log=log))
    if not datasets.built:
        log(f"datasets: cached ({datasets.root})")
    pretrained = None
    if "pretrained-lora" in cfg.regimes:
        pretrained = clock.run("pretrain", lambda: build_pretrained(crops, cfg, exp, cache, log=log))
        if not pretrained.built:
            log(f"pretrained stand-in: cached ({pretrained.path})")

    families: dict[str, dict[str, Any]] = {}
    for name in cfg.families:
        g = generators[name]
        families[name] = {"kind": "reconstruction", "made_by": f"{g.spec.upsampler} ÷{g.spec.downsample} autoencoder",
                          "val_l1": g.val_l1, "train_seconds": g.train_seconds, "cached": not g.trained,
                          "generator": str(g.path)}
    for s in cfg.sampled:
        families[s.name] = {"kind": f"sampled ({s.mode})", "made_by": f"{s.source} decoder", "source": s.source,
                            "mode": s.mode}
    for e in cfg.edits:
        families[e.name] = {"kind": f"local edit ({e.area:.0%} of the image)",
                            "made_by": f"{e.source} reconstruction blended into a real crop", "source": e.source,
                            "area": e.area}

    results: dict[str, Any] = {
        "status": "running",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "benchmark": cfg.to_dict(),
        "photos": str(photos),
        "splits": {"photos": crops.split_sizes, "crops": {k: len(v) for k, v in crops.names.items()},
                   "photo_names": crops.photos, "skipped": crops.skipped},
        "families": families,
        "train_family": cfg.train_family,
        "unseen": cfg.unseen,
        "analysis_images": datasets.counts["analysis"],
        "cache": {"crops": crops.key, "generators": {n: g.key for n, g in generators.items()},
                  "datasets": datasets.key, "generators_trained": [n for n, g in generators.items() if g.trained]},
        "data": {"detector": str(datasets.detector_data), "test": str(datasets.test_data),
                 "analysis_images": str(datasets.analysis_images)},
        "detector": {"config_file": str(config_path) if config_path else None, "config": exp.to_dict(),
                     "summary": _detector_summary(exp)},
        "seeds": [exp.train.seed + k for k in range(cfg.seeds)],
        "pretrained": None if pretrained is None else {
            "path": str(pretrained.path), "key": pretrained.key, "cached": not pretrained.built,
            "train_seconds": pretrained.train_seconds, "first_loss": pretrained.first_loss,
            "final_loss": pretrained.final_loss},
        "machine": machine_info(),
        "wall_seconds": clock.stages,
        "runs": {},
        "aggregate": {},
    }

    def save(runs: dict[str, dict[str, Any]]) -> None:
        results["runs"] = runs
        results["aggregate"] = summarise(runs, cfg)
        (out / "results.json").write_text(json.dumps(jsonable(results), indent=2) + "\n")

    save({})
    runs = clock.run("detectors", lambda: run_detectors(datasets, cfg, exp, out, pretrained=pretrained,
                                                        progress=progress, log=log, on_run=save))
    clock.stages["total"] = time.perf_counter() - total
    results["status"] = "done"
    save(runs)
    write_report(jsonable(results), out / "report.md")
    log(f"done in {clock.stages['total'] / 60:.1f} min: {out / 'results.json'}, {out / 'report.md'}")
    return results

