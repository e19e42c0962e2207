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

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import time
import tomllib
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ppl_model.config import ConfigError, ExperimentConfig, ModelConfig, apply_overrides, from_dict, load_config
from ppl_model.data.datasets import DataLayoutError, list_images
from ppl_model.data.transforms import UnreadableImage, load_rgb
from ppl_model.evaluation.metrics import METRICS, mean_over_subsets
from ppl_model.synthbench.generators import (
    FAMILIES,
    SAMPLE_MODES,
    ConvAutoencoder,
    GeneratorSpec,
    crops_from_images,
    load_generator,
    local_edits,
    reconstruct,
    sample_images,
    save_generator,
    to_uint8_images,
    train_autoencoder,
)

# The ablation's arms: config overrides applied on top of the detector config, so every arm shares the
# budget, data, seeds and everything else. PCL, where on, keeps the config's form (loss.pcl_form).
ARMS: dict[str, tuple[str, ...]] = {
    "baseline": ("rpr.enabled=false", "loss.pcl_weight=0.0", "loss.patch_weight=0.0"),
    # The control a reviewer of the paper raised: hide 15 % of the patches, no patch labels, no PCL.
    "patch-dropout": ("rpr.enabled=false", "loss.pcl_weight=0.0", "loss.patch_weight=0.0",
                      "augment.patch_dropout=0.15"),
    "rpr": ("rpr.enabled=true", "loss.pcl_weight=0.0", "loss.patch_weight=0.0"),
    "pcl": ("rpr.enabled=false", "loss.patch_weight=0.0"),
    "rpr+pcl": ("rpr.enabled=true", "loss.patch_weight=0.0"),  # the paper's recipe
    "rpr+pcl+patch-head": ("rpr.enabled=true",),  # this project's: plus the patch-head BCE on RPR's labels
    # The paper's recipe with the paper's exact PCL (mean over batch pairs, no projection head).
    "rpr+pcl-paper-form": ("rpr.enabled=true", "loss.patch_weight=0.0", "loss.pcl_form=\"paper\""),
}
DEFAULT_ARMS = ("baseline", "patch-dropout", "rpr", "pcl", "rpr+pcl", "rpr+pcl+patch-head")
# scratch: the detector config as given (tiny.toml: a random-initialised ViT, fully fine-tuned);
# pretrained-lora: the backbone pretrained here (``build_pretrained``), frozen, adapted with LoRA.
REGIMES = ("scratch", "pretrained-lora")
METHODS = DEFAULT_ARMS  # kept for callers of the two-method version
PRESETS = ("quick", "full", "gpu")
REAL = "real"
Log = Callable[[str], None]


class SynthBenchError(ConfigError):
    """A benchmark setting or input that cannot be used."""


@dataclass(frozen=True)
class SampledFamily:
    """Fakes with no real partner: ``source``'s decoder applied to latents that encode no real crop."""

    name: str
    source: str  # a reconstruction family (its trained generator is reused)
    mode: str  # "interpolate" (convex mixes of two crops' latents) or "gaussian" (per-channel Gaussian)


DEFAULT_SAMPLED = (SampledFamily("ae_shuffle_x4_sampled", "ae_shuffle_x4", "interpolate"),
                   SampledFamily("ae_transposed_x8_sampled", "ae_transposed_x8", "gaussian"))


@dataclass(frozen=True)
class LocalEditFamily:
    """Real crops with one region (about ``area`` of the image) regenerated by ``source``'s autoencoder and
    blended in with a feathered edge, as inpainting does: traces uneven across the image by construction."""

    name: str
    source: str  # a reconstruction family
    area: float = 0.25


# One edit by the training family's generator (a local trace the detector knows) and one by an unseen one.
DEFAULT_EDITS = (LocalEditFamily("edit_nearest_x4", "ae_nearest_x4"),
                 LocalEditFamily("edit_shuffle_x4", "ae_shuffle_x4"))


@dataclass(frozen=True)
class SynthBenchConfig:
    """Sizes, budgets and families of one benchmark run; ``quick()``, ``full()`` and ``gpu()`` are presets."""

    preset: str = "full"  # name only, for the report
    crop_size: int = 64  # the detector's images (never resized); a multiple of 8 for the ×8 generators
    train_crops_per_photo: int = 48
    val_crops_per_photo: int = 8
    test_crops_per_photo: int = 24
    val_fraction: float = 0.125  # of the photos
    test_fraction: float = 0.25
    families: tuple[str, ...] = tuple(FAMILIES)  # reconstruction families (paired fakes)
    sampled: tuple[SampledFamily, ...] = DEFAULT_SAMPLED
    edits: tuple[LocalEditFamily, ...] = DEFAULT_EDITS
    train_family: str = "ae_nearest_x4"  # the stand-in for the SD VAE: the one family the detector sees
    generator_crop_size: int = 64  # generators are fully convolutional: trained on these, applied to crop_size
    generator_steps: int = 2000
    generator_batch_size: int = 32
    generator_lr: float = 2e-3
    data_seed: int = 0  # crops, generator initialisation, sampled latents, analysis subset
    seeds: int = 3  # detector seeds: train.seed, train.seed + 1, ...
    arms: tuple[str, ...] = DEFAULT_ARMS
    regimes: tuple[str, ...] = REGIMES
    # Each arm's threshold: the one that calls this fraction of the validation reals fake.
    target_fpr: float = 0.05
    robustness: bool = True
    robustness_regimes: tuple[str, ...] = ("scratch",)  # the regimes evaluated under degradations
    robustness_seeds: int = 3  # ... for their first this many seeds (the evaluation costs ~10× a clean one)
    analysis_real: int = 32
    analysis_fake: int = 32
    cde_fill: str = "zero"  # the masked patch's fill in the CDE analysis (the paper zeroes it)
    # The pretrained stand-in: masked-patch reconstruction on train-split real crops, then frozen + LoRA.
    pretrain_steps: int = 2000
    pretrain_batch_size: int = 64
    pretrain_lr: float = 1e-3
    pretrain_mask_ratio: float = 0.5
    # "masked": reconstruct the masked patches only (SimMIM); "all": every patch, so the visible tokens must
    # also keep their own patch's fine detail (a detector reads such detail).
    pretrain_target: str = "masked"
    # --set overrides of the detector config for the pretrained-lora regime (after the preset's and user's).
    lora_overrides: tuple[str, ...] = ("model.finetune=lora",)
    # --set overrides of the detector config that the preset needs (applied before the user's own).
    detector_overrides: tuple[str, ...] = ()
    backend: str = "torch"  # inference backend for evaluation
    eval_batch_size: int = 64
    workers: int = 2  # decoding threads in evaluation

    @classmethod
    def quick(cls) -> SynthBenchConfig:
        """A smoke run (well under a minute of work on 2 CPU cores): tiny crops, few steps, one seed."""
        return cls(preset="quick", crop_size=32, train_crops_per_photo=4, val_crops_per_photo=2,
                   test_crops_per_photo=2, generator_crop_size=32, generator_steps=30, generator_batch_size=16,
                   seeds=1, robustness=False, analysis_real=16, analysis_fake=16, pretrain_steps=20,
                   pretrain_batch_size=16,
                   detector_overrides=("model.input_size=32", "train.epochs=2", "train.batch_size=16",
                                       "data.workers=0"))

    @classmethod
    def full(cls) -> SynthBenchConfig:
        """The CPU benchmark (configs/tiny.toml: 64-px crops, patch 8): six arms × two regimes × three seeds.

        Sized for under 90 minutes on 2 shared cores (docs/RESULTS.md has the measured stage times):
        generators 1000 steps, 16 test crops per photo, the stand-in pretrained for 1000 steps, every
        detector 8 epochs, robustness for the first seed of the scratch regime only. Two processes with one
        thread each (``--regimes scratch`` and ``--regimes pretrained-lora`` sharing ``--cache``) use both
        cores without the thread contention that slows one two-threaded process on a shared machine."""
        return cls(test_crops_per_photo=16, generator_steps=1000, pretrain_steps=1000, pretrain_target="all",
                   robustness_seeds=1, detector_overrides=("train.epochs=8", "data.workers=1"))

    @classmethod
    def gpu(cls) -> SynthBenchConfig:
        """The paper's geometry: 224-px crops, 14-px patches (a 16×16 grid), more crops and generator steps.

        Generators still train on 64-px crops (``train_autoencoder`` runs on the CPU) and are applied to the
        224-px crops; the detector trains on the GPU. Pair with a bigger model and more epochs through the
        detector config, e.g. ``--config configs/clip-vit-l14.toml --set model.pretrained=DIR``.
        """
        return cls(preset="gpu", crop_size=224, train_crops_per_photo=32, val_crops_per_photo=8,
                   test_crops_per_photo=16, generator_steps=3000, analysis_real=64, analysis_fake=64,
                   eval_batch_size=128, workers=8,
                   detector_overrides=("model.input_size=224", "model.patch_size=14", "data.workers=8"))

    @classmethod
    def preset_named(cls, name: str) -> SynthBenchConfig:
        if name not in PRESETS:
            raise SynthBenchError(f"unknown benchmark scale {name!r}; choose from {', '.join(PRESETS)}")
        return getattr(cls, name)()

    def with_overrides(self, items: Sequence[str]) -> SynthBenchConfig:
        """``field=value`` overrides (TOML literals: 2000, 0.2, false, ["a", "b"]); ``sampled`` is not settable."""
        hints = typing.get_type_hints(type(self))
        changes: dict[str, Any] = {}
        for item in items:
            name, sep, text = item.partition("=")
            name = name.strip()
            if not sep or name not in hints or name in ("sampled", "edits"):
                settable = ", ".join(f.name for f in dataclasses.fields(self) if f.name not in ("sampled", "edits"))
                raise SynthBenchError(f"benchmark override {item!r} must be FIELD=VALUE with FIELD one of {settable}")
            try:
                value = tomllib.loads(f"v = {text.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                value = text.strip()
            tp = hints[name]
            if typing.get_origin(tp) is tuple:
                value = tuple(value) if isinstance(value, list) else tuple(str(value).split(","))
            elif tp is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
                raise SynthBenchError(f"benchmark override {name} must be {tp.__name__}, not {value!r}")
            changes[name] = value
        return dataclasses.replace(self, **changes)

    @property
    def all_families(self) -> list[str]:
        return [*self.families, *(s.name for s in self.sampled), *(e.name for e in self.edits)]

    @property
    def edit_families(self) -> list[str]:
        return [e.name for e in self.edits]

    @property
    def methods(self) -> list[str]:
        """Every trained detector kind, ``<regime>/<arm>``, in report order."""
        return [f"{regime}/{arm}" for regime in self.regimes for arm in self.arms]

    @property
    def unseen(self) -> list[str]:
        return [name for name in self.all_families if name != self.train_family]

    @property
    def generator_families(self) -> list[str]:
        """Families that need a trained generator: every reconstruction family (sampled ones reuse them)."""
        return list(self.families)

    def validate(self) -> None:
        names = self.all_families
        checks = [
            (self.crop_size >= 8 and self.crop_size % 8 == 0, "crop_size must be a positive multiple of 8"),
            (self.generator_crop_size >= 8 and self.generator_crop_size % 8 == 0,
             "generator_crop_size must be a positive multiple of 8"),
            (self.generator_crop_size <= self.crop_size, "generator_crop_size must not exceed crop_size"),
            (min(self.train_crops_per_photo, self.val_crops_per_photo, self.test_crops_per_photo) >= 1,
             "crops per photo must be at least 1"),
            (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1
             and self.val_fraction + self.test_fraction < 1, "val_fraction and test_fraction must leave a train split"),
            (bool(self.families) and set(self.families) <= set(FAMILIES),
             f"families must be among {', '.join(FAMILIES)}"),
            (len(set(names)) == len(names) and REAL not in names, "family names must be unique and not 'real'"),
            (all(s.source in self.families and s.mode in SAMPLE_MODES for s in self.sampled),
             f"a sampled family needs a source among the families and a mode among {', '.join(SAMPLE_MODES)}"),
            (self.train_family in self.families,
             "train_family must be a reconstruction family (RPR needs pixel-aligned real/fake pairs)"),
            (bool(self.unseen), "at least one family besides train_family is needed"),
            (self.generator_steps >= 1 and self.generator_batch_size >= 1, "generator steps and batch must be >= 1"),
            (self.seeds >= 1, "seeds must be at least 1"),
            (bool(self.arms) and set(self.arms) <= set(ARMS), f"arms must be among {', '.join(ARMS)}"),
            (bool(self.regimes) and set(self.regimes) <= set(REGIMES), f"regimes must be among {', '.join(REGIMES)}"),
            (set(self.robustness_regimes) <= set(REGIMES), "robustness_regimes must be among the regimes"),
            (0 < self.target_fpr < 1, "target_fpr must be in (0, 1)"),
            (all(e.source in self.families and 0 < e.area < 1 for e in self.edits),
             "a local-edit family needs a source among the families and an area in (0, 1)"),
            (self.cde_fill in ("zero", "mean", "black"), "cde_fill must be zero, mean or black"),
            (self.pretrain_steps >= 1 and self.pretrain_batch_size >= 1 and 0 < self.pretrain_mask_ratio < 1,
             "pretrain steps and batch must be >= 1 and pretrain_mask_ratio in (0, 1)"),
            (self.pretrain_target in ("masked", "all"), "pretrain_target must be masked or all"),
            (self.analysis_real >= 1 and self.analysis_fake >= 1, "analysis counts must be at least 1"),
        ]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise SynthBenchError("; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- helpers


def settings_key(settings: Any) -> str:
    """A short stable hash of JSON-able settings: the cache key of what they make."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _name_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _photo_key(path: Path, root: Path) -> str:
    """A photo's id in crop file names: its relative path without extension, ``/`` as ``__``."""
    return path.relative_to(root).with_suffix("").as_posix().replace("/", "__")


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished cache entry into place (a half-written one never has the final name)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _to_uint8(crops: torch.Tensor) -> torch.Tensor:
    return (crops.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()


def _to_float(crops: torch.Tensor) -> torch.Tensor:
    return crops.float().div(255)


def _save_pngs(images: torch.Tensor, folder: Path, names: Sequence[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(to_uint8_images(images), names, strict=True):
        image.save(folder / f"{name}.png")


def _jsonable(value: Any) -> Any:
    """NaN and infinities become null (JSON has none); tuples become lists; paths strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def _quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------------------------------ 1. photo split


@dataclass(frozen=True)
class PhotoSplit:
    root: Path
    train: tuple[Path, ...]
    val: tuple[Path, ...]
    test: tuple[Path, ...]

    def splits(self) -> dict[str, tuple[Path, ...]]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def sizes(self) -> dict[str, int]:
        return {name: len(paths) for name, paths in self.splits().items()}

    def names(self) -> dict[str, list[str]]:
        return {name: [_photo_key(p, self.root) for p in paths] for name, paths in self.splits().items()}


def split_photos(photos: str | Path, *, val_fraction: float = 0.125, test_fraction: float = 0.25) -> PhotoSplit:
    """Split the photo files (not their crops) into train/val/test.

    Photos are ranked by a hash of their relative file name and cut into test, val and train by the
    fractions (each split at least one photo): deterministic, independent of listing order, and every
    crop of a photo lands in that photo's split.
    """
    root = Path(photos)
    if not root.is_dir():
        raise DataLayoutError(f"photo folder not found: {root}")
    files = list_images(root)
    if len(files) < 3:
        raise DataLayoutError(f"{root}: {len(files)} photo(s); the train/val/test split needs at least 3")
    ranked = sorted(files, key=lambda p: (_name_hash(_photo_key(p, root)), _photo_key(p, root)))
    n_test = max(1, round(len(files) * test_fraction))
    n_val = max(1, round(len(files) * val_fraction))
    if len(files) - n_test - n_val < 1:
        raise DataLayoutError(f"{root}: {len(files)} photos leave none for training at these fractions")
    test, val, train = ranked[:n_test], ranked[n_test:n_test + n_val], ranked[n_test + n_val:]
    return PhotoSplit(root, tuple(sorted(train)), tuple(sorted(val)), tuple(sorted(test)))


# ------------------------------------------------------------------------------------------------ 2. crops


@dataclass
class Crops:
    """Real crops per split (uint8 NCHW) with their names ``<photo>_<k>``; cached under ``cache/crops/KEY``."""

    key: str
    path: Path
    split_sizes: dict[str, int]  # photos per split
    photos: dict[str, list[str]]  # photo ids per split
    names: dict[str, list[str]]  # crop names per split
    tensors: dict[str, torch.Tensor]
    skipped: list[dict[str, str]]  # photos with no crop (unreadable, or smaller than the crop)
    built: bool  # False when loaded from the cache

    def floats(self, split: str) -> torch.Tensor:
        return _to_float(self.tensors[split])


def build_crops(photos: str | Path, cfg: SynthBenchConfig, cache: str | Path, *, log: Log = _quiet) -> Crops:
    """Split the photos, then take ``*_crops_per_photo`` random crops of each (cached)."""
    split = split_photos(photos, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    per_photo = {"train": cfg.train_crops_per_photo, "val": cfg.val_crops_per_photo, "test": cfg.test_crops_per_photo}
    settings = {
        "photos": {name: [(_photo_key(p, split.root), _file_digest(p)) for p in paths]
                   for name, paths in split.splits().items()},
        "crop_size": cfg.crop_size, "per_photo": per_photo, "seed": cfg.data_seed,
    }
    key = settings_key(settings)
    folder = Path(cache) / "crops" / key
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        tensors = load_file(str(folder / "crops.safetensors"))
        return Crops(key, folder, manifest["split_sizes"], manifest["photos"], manifest["names"], tensors,
                     manifest["skipped"], False)

    names: dict[str, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[dict[str, str]] = []
    for split_name, paths in split.splits().items():
        stacks, names[split_name] = [], []
        for path in paths:
            photo = _photo_key(path, split.root)
            try:
                image = load_rgb(path)
            except UnreadableImage as exc:
                skipped.append({"photo": photo, "reason": exc.reason})
                continue
            seed = _name_hash(f"{cfg.data_seed}:{photo}") % 2**32
            crops = crops_from_images([image], cfg.crop_size, per_photo[split_name], seed)
            if not len(crops):
                skipped.append({"photo": photo, "reason": f"smaller than {cfg.crop_size} px"})
                continue
            stacks.append(_to_uint8(crops))
            names[split_name] += [f"{photo}_{k:02d}" for k in range(len(crops))]
        if not stacks:
            raise DataLayoutError(f"no usable photo in the {split_name} split (crop size {cfg.crop_size})")
        tensors[split_name] = torch.cat(stacks)
    tmp = _fresh_dir(folder.with_name(f".{key}.tmp"))
    save_file(tensors, str(tmp / "crops.safetensors"))
    manifest = {"settings": settings, "split_sizes": split.sizes(), "photos": split.names(), "names": names,
                "skipped": skipped,
                "crops": {name: len(v) for name, v in names.items()}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    _publish(tmp, folder)
    log(f"crops: {split.sizes()} photos -> {manifest['crops']} crops of {cfg.crop_size} px"
        + (f", {len(skipped)} photo(s) skipped" if skipped else ""))
    return Crops(key, folder, split.sizes(), split.names(), names, tensors, skipped, True)


# ------------------------------------------------------------------------------------------- 3. generators


@dataclass
class GeneratorRecord:
    name: str
    spec: GeneratorSpec
    key: str
    path: Path
    model: ConvAutoencoder
    trained: bool  # False when loaded from the cache
    train_seconds: float  # of the run that made it (cached ones keep theirs)
    val_l1: float  # mean |reconstruction − crop| on the val split's crops, in [0, 1] units


def generator_training_crops(crops: Crops, cfg: SynthBenchConfig) -> torch.Tensor:
    """Train-split crops at ``generator_crop_size``: the crops themselves, or one random window of each."""
    train = crops.floats("train")
    size = cfg.generator_crop_size
    if size == train.shape[-1]:
        return train
    rng = torch.Generator().manual_seed(cfg.data_seed)
    span = train.shape[-1] - size + 1
    tops = torch.randint(0, span, (len(train),), generator=rng).tolist()
    lefts = torch.randint(0, span, (len(train),), generator=rng).tolist()
    return torch.stack([crop[:, t:t + size, s:s + size] for crop, t, s in zip(train, tops, lefts, strict=True)])


def build_generators(crops: Crops, cfg: SynthBenchConfig, cache: str | Path, *, progress: bool = False,
                     log: Log = _quiet) -> dict[str, GeneratorRecord]:
    """Train (or load from the cache) one generator per reconstruction family, on train-split crops only."""
    folder = Path(cache) / "generators"
    records: dict[str, GeneratorRecord] = {}
    training_crops: torch.Tensor | None = None
    val = crops.floats("val")
    for name in cfg.generator_families:
        spec = FAMILIES[name]
        settings = {"crops": crops.key, "spec": dataclasses.asdict(spec), "steps": cfg.generator_steps,
                    "batch_size": cfg.generator_batch_size, "lr": cfg.generator_lr,
                    "crop_size": cfg.generator_crop_size, "seed": cfg.data_seed}
        key = settings_key(settings)
        path = folder / f"{name}-{key}.safetensors"
        info_path = path.with_suffix(".train.json")
        if path.is_file() and info_path.is_file():
            model, _ = load_generator(path)
            info = json.loads(info_path.read_text())
            records[name] = GeneratorRecord(name, spec, key, path, model, False, info["train_seconds"], info["val_l1"])
            log(f"generator {name}: cached ({path.name})")
            continue
        if training_crops is None:
            training_crops = generator_training_crops(crops, cfg)
        start = time.perf_counter()
        model = train_autoencoder(spec, training_crops, steps=cfg.generator_steps,
                                  batch_size=cfg.generator_batch_size, lr=cfg.generator_lr, seed=cfg.data_seed,
                                  progress=progress)
        seconds = time.perf_counter() - start
        val_l1 = (reconstruct(model, val) - val).abs().mean().item()
        save_generator(model, spec, path)
        info_path.write_text(json.dumps({"settings": settings, "train_seconds": seconds, "val_l1": val_l1},
                                        indent=2) + "\n")
        records[name] = GeneratorRecord(name, spec, key, path, model, True, seconds, val_l1)
        log(f"generator {name}: trained {cfg.generator_steps} steps in {seconds:.0f} s "
            f"({1000 * seconds / cfg.generator_steps:.0f} ms/step), val L1 {val_l1:.4f}")
    return records


# --------------------------------------------------------------------------------------------- 4. datasets


@dataclass
class Datasets:
    key: str
    root: Path
    detector_data: Path  # paired layout: train/{real,<train family>}, val/{real,<train family>}
    test_data: Path  # test/{real,<every family>}
    analysis_images: Path  # analysis_images/{real,fake}
    counts: dict[str, Any]
    built: bool


def _sample_seed(cfg: SynthBenchConfig, name: str) -> int:
    return _name_hash(f"{cfg.data_seed}:sample:{name}") % 2**31


def write_datasets(crops: Crops, generators: dict[str, GeneratorRecord], cfg: SynthBenchConfig,
                   cache: str | Path, *, log: Log = _quiet) -> Datasets:
    """Write the PNG folders the detectors train, are tested and are analysed on (cached)."""
    settings = {"crops": crops.key, "generators": {n: g.key for n, g in sorted(generators.items())},
                "train_family": cfg.train_family, "families": list(cfg.families),
                "sampled": [dataclasses.asdict(s) for s in cfg.sampled],
                "edits": [dataclasses.asdict(e) for e in cfg.edits], "analysis": [cfg.analysis_real, cfg.analysis_fake],
                "seed": cfg.data_seed}
    key = settings_key(settings)
    folder = Path(cache) / "data" / key
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        counts = json.loads(manifest_path.read_text())["counts"]
        return Datasets(key, folder, folder / "detector", folder / "test", folder / "analysis_images", counts, False)

    tmp = _fresh_dir(folder.with_name(f".{key}.tmp"))
    detector, test = tmp / "detector", tmp / "test"
    counts: dict[str, Any] = {"detector": {}, "test": {}}
    train_gen = generators[cfg.train_family].model
    for split in ("train", "val"):
        real = crops.floats(split)
        _save_pngs(real, detector / split / REAL, crops.names[split])
        _save_pngs(reconstruct(train_gen, real), detector / split / cfg.train_family, crops.names[split])
        counts["detector"][split] = {REAL: len(real), cfg.train_family: len(real)}

    real = crops.floats("test")
    names = crops.names["test"]
    _save_pngs(real, test / REAL, names)
    counts["test"][REAL] = len(real)
    for name in cfg.families:
        _save_pngs(reconstruct(generators[name].model, real), test / name, names)
        counts["test"][name] = len(real)
    for sampled in cfg.sampled:
        images = sample_images(generators[sampled.source].model, real, len(real), seed=_sample_seed(cfg, sampled.name),
                               mode=sampled.mode)
        _save_pngs(images, test / sampled.name, [f"sample_{k:04d}" for k in range(len(images))])
        counts["test"][sampled.name] = len(images)
    for edit in cfg.edits:
        images = local_edits(generators[edit.source].model, real, area=edit.area, seed=_sample_seed(cfg, edit.name))
        _save_pngs(images, test / edit.name, names)
        counts["test"][edit.name] = len(images)

    # The fixed analysis subset: real test crops, and fakes drawn in turn from each unseen family.
    rng = np.random.default_rng(cfg.data_seed)
    analysis = tmp / "analysis_images"
    (analysis / REAL).mkdir(parents=True)
    (analysis / "fake").mkdir(parents=True)
    real_files = list_images(test / REAL)
    for index in sorted(rng.choice(len(real_files), min(cfg.analysis_real, len(real_files)), replace=False)):
        shutil.copyfile(real_files[index], analysis / REAL / real_files[index].name)
    pools = {}
    for name in cfg.unseen:
        files = list_images(test / name)
        pools[name] = [files[i] for i in rng.permutation(len(files))]
    taken = 0
    while taken < cfg.analysis_fake and any(pools.values()):
        for name in cfg.unseen:
            if pools[name] and taken < cfg.analysis_fake:
                source = pools[name].pop()
                shutil.copyfile(source, analysis / "fake" / f"{name}__{source.name}")
                taken += 1
    counts["analysis"] = {REAL: len(list_images(analysis / REAL)), "fake": taken}
    (tmp / "manifest.json").write_text(json.dumps({"settings": settings, "counts": counts}, indent=1) + "\n")
    _publish(tmp, folder)
    log(f"datasets: detector {counts['detector']}, test {counts['test']}, analysis {counts['analysis']}")
    return Datasets(key, folder, folder / "detector", folder / "test", folder / "analysis_images", counts, True)


# ---------------------------------------------------------------------------- 5. the pretrained stand-in


@dataclass
class Pretrained:
    """A tiny ViT pretrained here by masked-patch reconstruction, saved as a Hugging Face-format folder."""

    key: str
    path: Path  # config.json + model.safetensors + preprocessor_config.json: what model.pretrained loads
    built: bool
    train_seconds: float
    final_loss: float  # mean reconstruction MSE (normalised pixels, pretrain_target's patches), last 10 % of steps
    first_loss: float  # the same over the first 10 %


def _patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, S, S) → (B, G², 3·p²) in the ViT's row-major patch order."""
    batch, channels, size, _ = pixels.shape
    grid = size // patch_size
    patches = pixels.reshape(batch, channels, grid, patch_size, grid, patch_size)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, grid * grid, channels * patch_size * patch_size)


def build_pretrained(crops: Crops, cfg: SynthBenchConfig, exp: ExperimentConfig, cache: str | Path, *,
                     log: Log = _quiet) -> Pretrained:
    """Pretrain the detector config's backbone shape, self-supervised, on train-split **real** crops only
    (no fake is ever seen): a fraction of the patches is set to normalised zero and a linear decoder on the
    output tokens reconstructs their pixels (SimMIM-style; with ``pretrain_target = "all"`` every patch's).
    Cached like the other stages."""
    from ppl_model.backbones import build_backbone

    input_size = exp.model.input_size or cfg.crop_size
    model_cfg = ModelConfig(arch=exp.model.arch, size=exp.model.size, input_size=input_size,
                            patch_size=exp.model.patch_size, finetune="full")
    settings = {"crops": crops.key, "model": dataclasses.asdict(model_cfg), "steps": cfg.pretrain_steps,
                "batch_size": cfg.pretrain_batch_size, "lr": cfg.pretrain_lr, "mask": cfg.pretrain_mask_ratio,
                "seed": cfg.data_seed}
    if cfg.pretrain_target != "masked":  # keeps the cache key of masked-only stand-ins
        settings["target"] = cfg.pretrain_target
    key = settings_key(settings)
    folder = Path(cache) / "pretrained" / key
    info_path = folder / "pretrain.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        return Pretrained(key, folder, False, info["train_seconds"], info["final_loss"], info["first_loss"])

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.data_seed)
        backbone = build_backbone(model_cfg)
        patch = backbone.patch_size
        decoder = torch.nn.Linear(backbone.hidden_size, 3 * patch * patch)
    generator = torch.Generator().manual_seed(cfg.data_seed)
    mean = torch.tensor(backbone.mean)[None, :, None, None]
    std = torch.tensor(backbone.std)[None, :, None, None]
    train = crops.floats("train")
    if train.shape[-1] != input_size:
        train = train[..., :input_size, :input_size]
    params = [*backbone.parameters(), *decoder.parameters()]
    optimiser = torch.optim.AdamW(params, lr=cfg.pretrain_lr, weight_decay=0.05)
    warmup = max(1, cfg.pretrain_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, step / cfg.pretrain_steps)))))
    grid2 = backbone.grid_size ** 2
    n_masked = max(1, round(cfg.pretrain_mask_ratio * grid2))
    losses: list[float] = []
    backbone.train()
    for _ in range(cfg.pretrain_steps):
        index = torch.randint(0, len(train), (cfg.pretrain_batch_size,), generator=generator)
        batch = train[index]
        flip = torch.rand(len(batch), generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        normed = (batch - mean) / std
        masked = torch.rand(len(batch), grid2, generator=generator).argsort(1)[:, :n_masked]
        mask = torch.zeros(len(batch), grid2).scatter_(1, masked, 1.0)
        grid = backbone.grid_size
        pixel_mask = mask.reshape(-1, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
        _, tokens = backbone(normed * (1 - pixel_mask))
        error = (decoder(tokens) - _patchify(normed, patch)).pow(2).mean(-1)
        loss = (error * mask).sum() / mask.sum() if cfg.pretrain_target == "masked" else error.mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    tenth = max(1, len(losses) // 10)
    first, final = float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:]))

    tmp = _fresh_dir(folder.with_name(f".{key}.tmp"))
    backbone.base_model.save_pretrained(str(tmp))
    (tmp / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(backbone.mean),
                                                              "image_std": list(backbone.std)}, indent=2) + "\n")
    (tmp / "pretrain.json").write_text(json.dumps({"settings": settings, "train_seconds": seconds,
                                                   "first_loss": first, "final_loss": final}, indent=2) + "\n")
    _publish(tmp, folder)
    log(f"pretrained stand-in: {cfg.pretrain_steps} steps of masked-patch reconstruction in {seconds:.0f} s, "
        f"MSE on the {cfg.pretrain_target} patches {first:.3f} -> {final:.3f} ({folder})")
    return Pretrained(key, folder, True, seconds, final, first)


# -------------------------------------------------------------------------------------------- 6. detectors


def _resolved_input_size(exp: ExperimentConfig) -> int | None:
    from ppl_model.backbones import NAMED_SHAPES

    if exp.model.input_size:
        return exp.model.input_size
    if exp.model.pretrained:
        return 224
    shape = NAMED_SHAPES.get(exp.model.size)
    return shape.image_size if shape else None


def detector_config(config: str | Path | None, cfg: SynthBenchConfig,
                    overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The detector config: the file, then the preset's overrides, the user's, and the paired layout."""
    exp = load_config(config, [*cfg.detector_overrides, *overrides, "data.layout=paired"])
    size = _resolved_input_size(exp)
    if size is not None and size > cfg.crop_size:
        raise SynthBenchError(f"the detector's input ({size} px) is larger than the benchmark's crops "
                              f"({cfg.crop_size} px): images would be padded; set model.input_size or crop_size")
    return exp


def _overridden(exp: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    return from_dict(apply_overrides(exp.to_dict(), list(overrides)))


def with_seed(exp: ExperimentConfig, seed: int) -> ExperimentConfig:
    return _overridden(exp, [f"train.seed={seed}"])


def arm_config(exp: ExperimentConfig, arm: str) -> ExperimentConfig:
    """The detector config of one ablation arm."""
    if arm not in ARMS:
        raise SynthBenchError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    cfg = _overridden(exp, ARMS[arm])
    if "pcl" in arm and cfg.loss.pcl_weight == 0:
        raise SynthBenchError(f"arm {arm} needs PCL, but the detector config has loss.pcl_weight = 0")
    return cfg


def regime_config(exp: ExperimentConfig, cfg: SynthBenchConfig, regime: str,
                  pretrained: Pretrained | None) -> ExperimentConfig:
    """The detector config of a regime: as given (scratch), or the pretrained stand-in frozen with LoRA."""
    if regime == "scratch":
        return exp
    if pretrained is None:
        raise SynthBenchError("the pretrained-lora regime needs the pretrained stand-in")
    return _overridden(exp, [f'model.pretrained="{pretrained.path.resolve().as_posix()}"', *cfg.lora_overrides])


def _unseen_mean(subsets: dict[str, dict[str, float]], unseen: Sequence[str]) -> dict[str, float]:
    return mean_over_subsets({name: subsets[name] for name in unseen if name in subsets})


def training_telemetry(metrics_path: Path) -> dict[str, Any]:
    """Collapse indicators from a run's metrics.jsonl: patch cosine and CLS std at the start and the end
    (means over the first and last 10 % of logged steps), the maximum cosine, and any collapse warning."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "train"]
    tenth = max(1, len(steps) // 10)

    def mean(key: str, part: list[dict[str, Any]]) -> float | None:
        values = [r[key] for r in part if r.get(key) is not None and math.isfinite(r[key])]
        return float(np.mean(values)) if values else None

    return {"patch_cosine_start": mean("patch_cosine", steps[:tenth]),
            "patch_cosine_end": mean("patch_cosine", steps[-tenth:]),
            "patch_cosine_max": max((r["patch_cosine"] for r in steps), default=None),
            "cls_std_start": mean("cls_std", steps[:tenth]), "cls_std_end": mean("cls_std", steps[-tenth:]),
            "bce_end": mean("bce", steps[-tenth:]), "pcl_end": mean("pcl", steps[-tenth:]),
            "patch_end": mean("patch", steps[-tenth:]),
            "collapse_warnings": sum(r["event"] == "warning" and r.get("kind") == "collapse" for r in rows)}


def run_detector(datasets: Datasets, cfg: SynthBenchConfig, exp: ExperimentConfig, arm: str, out_dir: Path, *,
                 regime: str = "scratch", robustness: bool = False, progress: bool = False) -> dict[str, Any]:
    """Train one arm, calibrate its threshold on the validation reals (``target_fpr``), evaluate it on the test
    set (robustness where configured) and analyse it. ``exp`` is the regime's config."""
    from ppl_model.analysis.cde import SUMMARY_KEYS, analyze
    from ppl_model.evaluation.evaluate import evaluate_model
    from ppl_model.training.runner import METRICS as METRICS_FILE
    from ppl_model.training.runner import run_training

    arm_exp = arm_config(exp, arm)
    out_dir = _fresh_dir(out_dir)
    model_dir = out_dir / "model"
    times: dict[str, float] = {}
    start = time.perf_counter()
    info = run_training(arm_exp, datasets.detector_data, model_dir, show_progress=progress)
    assert info is not None  # one process: always the main rank
    times["train"] = time.perf_counter() - start

    start = time.perf_counter()
    options = {"backend": cfg.backend, "batch_size": cfg.eval_batch_size, "workers": cfg.workers, "progress": progress}
    # Calibration on the detector's own validation split (real crops of photos it never trained on).
    calibration = evaluate_model(model_dir, datasets.detector_data, layout="paired", target_fpr=cfg.target_fpr,
                                 **options)
    result = evaluate_model(model_dir, datasets.test_data, layout="paired", robustness=robustness, **options)
    (out_dir / "eval.json").write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    times["eval"] = time.perf_counter() - start

    start = time.perf_counter()
    summary = analyze(model_dir, datasets.analysis_images, out_dir / "analysis", baseline=cfg.cde_fill,
                      seed=exp.train.seed, progress=progress)
    times["analyze"] = time.perf_counter() - start

    robustness = None
    if "robustness" in result:
        robustness = {name: {"subsets": block["subsets"], "mean_unseen": _unseen_mean(block["subsets"], cfg.unseen)}
                      for name, block in result["robustness"].items()}
    edits = [name for name in cfg.edit_families if name in result["subsets"]]
    return {
        "seed": exp.train.seed, "regime": regime, "arm": arm, "model_dir": str(model_dir),
        "version_id": info.version_id,
        "train": {"steps": info.training["steps"], "epochs": info.training["epochs"],
                  "validation": info.training.get("validation") or {},
                  "size_mismatched_pairs": info.training.get("size_mismatched_pairs", 0)},
        "telemetry": training_telemetry(model_dir / METRICS_FILE),
        "threshold": result["threshold"],
        "calibration": {"target_fpr": cfg.target_fpr, "threshold": result["threshold"],
                        "val_acc_real": calibration["subsets"][cfg.train_family]["acc_real"],
                        "val_auroc": calibration["subsets"][cfg.train_family]["auroc"]},
        "subsets": result["subsets"],
        "mean_all": result["mean"],
        "mean_unseen": _unseen_mean(result["subsets"], cfg.unseen),
        "mean_edits": _unseen_mean(result["subsets"], edits) if edits else {},
        "robustness": robustness,
        "cde": {key: summary[key] for key in SUMMARY_KEYS} | {"images": summary["images"],
                                                               "undefined_uniformity": summary["undefined_uniformity"],
                                                               "fill": summary["fill_description"]},
        "wall_seconds": times,
    }


def run_detectors(datasets: Datasets, cfg: SynthBenchConfig, exp: ExperimentConfig, out: str | Path, *,
                  pretrained: Pretrained | None = None, progress: bool = False, log: Log = _quiet,
                  on_run: Callable[[dict[str, dict[str, Any]]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Every regime × seed × arm with the same config and budget; ``{"seed<N>": {"<regime>/<arm>": record}}``.

    ``on_run`` is called with the records so far after each detector (to save partial results)."""
    runs: dict[str, dict[str, Any]] = {}
    for regime in cfg.regimes:
        regime_exp = regime_config(exp, cfg, regime, pretrained)
        for offset in range(cfg.seeds):
            seed = exp.train.seed + offset
            seeded = with_seed(regime_exp, seed)
            for arm in cfg.arms:
                method = f"{regime}/{arm}"
                folder = Path(out) / "runs" / regime / f"seed{seed}" / arm.replace("+", "_")
                robust = cfg.robustness and regime in cfg.robustness_regimes and offset < cfg.robustness_seeds
                record = run_detector(datasets, cfg, seeded, arm, folder, regime=regime, robustness=robust,
                                      progress=progress)
                runs.setdefault(f"seed{seed}", {})[method] = record
                t, unseen, cde = record["wall_seconds"], record["mean_unseen"], record["cde"]
                log(f"seed {seed} {method}: train {t['train']:.0f} s ({record['train']['steps']} steps), "
                    f"eval {t['eval']:.0f} s, analyze {t['analyze']:.0f} s; "
                    f"{cfg.train_family} AUROC {record['subsets'][cfg.train_family]['auroc']:.3f}, "
                    f"unseen AUROC {unseen['auroc']:.3f} AP {unseen['ap']:.3f} acc@cal {unseen['acc']:.3f}, "
                    f"CDE entropy (fakes) {_fmt(cde['normalized_entropy_fake']['mean'])}, "
                    f"patch cos end {_fmt(record['telemetry']['patch_cosine_end'])}")
                if on_run is not None:
                    on_run(runs)
    return runs


# ------------------------------------------------------------------------------------------ 7. aggregation


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; null below two values) over the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    return {"mean": float(np.mean(finite)) if n else None,
            "std": float(np.std(finite, ddof=1)) if n > 1 else None, "n": n}


TELEMETRY_KEYS = ("patch_cosine_start", "patch_cosine_end", "patch_cosine_max", "cls_std_start", "cls_std_end",
                  "bce_end", "pcl_end", "patch_end", "collapse_warnings")


def summarise(runs: dict[str, dict[str, Any]], cfg: SynthBenchConfig) -> dict[str, Any]:
    """Mean ± std over seeds, per ``<regime>/<arm>``: per family, mean over unseen, local edits, robustness,
    CDE summaries, training telemetry."""
    from ppl_model.analysis.cde import SUMMARY_KEYS

    out: dict[str, Any] = {}
    for method in cfg.methods:
        records = [seed_runs[method] for seed_runs in runs.values() if method in seed_runs]
        if not records:
            continue
        block: dict[str, Any] = {"seeds": len(records)}
        block["per_family"] = {name: {metric: _stats([r["subsets"][name][metric] for r in records])
                                      for metric in METRICS}
                               for name in cfg.all_families if all(name in r["subsets"] for r in records)}
        block["mean_unseen"] = {metric: _stats([r["mean_unseen"][metric] for r in records]) for metric in METRICS}
        block["mean_edits"] = {metric: _stats([r["mean_edits"].get(metric) for r in records]) for metric in METRICS}
        robust = [r["robustness"] for r in records if r["robustness"]]
        block["robustness_seeds"] = len(robust)
        # The clean reference over the same seeds as the perturbed rows.
        block["robustness_clean"] = {metric: _stats([r["mean_unseen"][metric] for r in records if r["robustness"]])
                                     for metric in METRICS}
        if robust:
            block["robustness"] = {name: {metric: _stats([r[name]["mean_unseen"][metric] for r in robust])
                                          for metric in METRICS} for name in robust[0]}
        block["cde"] = {key: _stats([r["cde"][key]["mean"] for r in records]) for key in SUMMARY_KEYS}
        block["telemetry"] = {key: _stats([r["telemetry"][key] for r in records]) for key in TELEMETRY_KEYS}
        block["threshold"] = _stats([r["threshold"] for r in records])
        block["wall_seconds"] = {stage: _stats([r["wall_seconds"][stage] for r in records])
                                 for stage in ("train", "eval", "analyze")}
        out[method] = block
    return out


def machine_info() -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")


def _slash(counts: dict[str, int]) -> str:
    return " / ".join(str(counts[split]) for split in ("train", "val", "test"))


def _pm(stats: dict[str, Any] | None, digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    text = _fmt(stats["mean"], digits)
    return text if stats.get("std") is None else f"{text} ± {_fmt(stats['std'], digits)}"


CDE_READING = {
    "normalized_entropy_fake": "higher = evidence spread over more patches",
    "top1_mass_fake": "lower = less reliance on one patch",
    "top5pct_mass_fake": "lower = less reliance on the top 5 % of patches",
    "gini_fake": "lower = more even",
    "flip_rate": "lower = fewer fakes (predicted fake) flip to real when their most influential patch is masked",
    "random_patch_accuracy_drop": "accuracy lost when one random patch is masked (real and fake)",
    "normalized_entropy_real": "the same entropy on real images (evidence for 'fake' on reals, for reference)",
}


def _regime_tables(results: dict[str, Any], regime: str) -> list[str]:
    bench, agg = results["benchmark"], results["aggregate"]
    arms = [arm for arm in bench["arms"] if f"{regime}/{arm}" in agg]
    if not arms:
        return []
    blocks = {arm: agg[f"{regime}/{arm}"] for arm in arms}
    train_family = bench["train_family"]
    families = results["families"]
    edits = [name for name, fam in families.items() if fam["kind"].startswith("local edit")]
    lines = [f"## Regime `{regime}`", "",
             f"### Headline: mean over the {len(results['unseen'])} unseen families", "",
             "| arm | AUROC | AP | acc @ calibrated threshold | real acc | fake acc | local edits AUROC | "
             f"{train_family} AUROC |", "|---|---|---|---|---|---|---|---|"]
    for arm, block in blocks.items():
        unseen = block["mean_unseen"]
        lines.append(f"| {arm} | **{_pm(unseen['auroc'])}** | {_pm(unseen['ap'])} | {_pm(unseen['acc'])} | "
                     f"{_pm(unseen['acc_real'])} | {_pm(unseen['acc_fake'])} | "
                     f"{_pm(block['mean_edits'].get('auroc'))} | "
                     f"{_pm(block['per_family'].get(train_family, {}).get('auroc'))} |")
    lines += ["", "### AUROC per family", "", f"| family | kind | {' | '.join(arms)} |",
              "|---|---|" + "---|" * len(arms)]
    for name, fam in families.items():
        label = f"{name} (train)" if name == train_family else name
        cells = " | ".join(_pm(blocks[a]["per_family"].get(name, {}).get("auroc")) for a in arms)
        lines.append(f"| {label} | {fam['kind']} | {cells} |")
    lines += ["", "### AP per family", "", f"| family | {' | '.join(arms)} |", "|---|" + "---|" * len(arms)]
    for name in families:
        label = f"{name} (train)" if name == train_family else name
        cells = " | ".join(_pm(blocks[a]["per_family"].get(name, {}).get("ap")) for a in arms)
        lines.append(f"| {label} | {cells} |")
    if edits:
        lines += ["", f"Local-edit families: {', '.join(edits)}."]
    lines += ["", "### Few-Patch Bias on the analysis images (CDE)", "",
              f"| summary | {' | '.join(arms)} | reading |", "|---|" + "---|" * len(arms) + "---|"]
    for key, reading in CDE_READING.items():
        lines.append(f"| {key} | {' | '.join(_pm(blocks[a]['cde'].get(key)) for a in arms)} | {reading} |")
    lines += ["", "### Training telemetry (collapse indicators)", "",
              f"| quantity | {' | '.join(arms)} |", "|---|" + "---|" * len(arms)]
    for key in TELEMETRY_KEYS:
        lines.append(f"| {key} | {' | '.join(_pm(blocks[a]['telemetry'].get(key)) for a in arms)} |")
    lines.append(f"| threshold (fake probability) | {' | '.join(_pm(blocks[a]['threshold']) for a in arms)} |")
    if all("robustness" in block for block in blocks.values()):
        seeds_note = f"{blocks[arms[0]]['robustness_seeds']} seed(s)"
        lines += ["", f"### Robustness: mean AUROC over unseen families ({seeds_note})", "",
                  f"| perturbation | {' | '.join(arms)} |", "|---|" + "---|" * len(arms)]
        lines.append(f"| none | {' | '.join(_pm(blocks[a]['robustness_clean']['auroc']) for a in arms)} |")
        for name in blocks[arms[0]]["robustness"]:
            lines.append(f"| {name} | {' | '.join(_pm(blocks[a]['robustness'][name]['auroc']) for a in arms)} |")
    lines += ["", "### Wall time per detector (s): train / eval / analyze", "", "| arm | seconds |", "|---|---|"]
    for arm, block in blocks.items():
        w = block["wall_seconds"]
        lines.append(f"| {arm} | {_pm(w['train'], 0)} / {_pm(w['eval'], 0)} / {_pm(w['analyze'], 0)} |")
    return [*lines, ""]


def write_report(results: dict[str, Any], path: str | Path) -> None:
    """The markdown report: set-up, then per regime the ablation, per-family, CDE, telemetry, robustness."""
    bench = results["benchmark"]
    seeds = results.get("seeds", [])
    pre = results.get("pretrained")
    lines = [
        "# synthbench: cross-generator detection on self-trained generators, ablation by ingredient",
        "",
        f"Preset `{bench['preset']}`; every detector trains on **{bench['train_family']}** only and is tested on "
        f"every family; {len(seeds)} seed(s) {seeds} per arm; figures are mean ± sample std over seeds. "
        f"Accuracy is at each detector's own threshold, calibrated to a {bench['target_fpr']:.0%} false-positive "
        "rate on the validation real crops; AUROC and AP need no threshold.",
        "",
        f"Real photos split by source photo (train / val / test): {_slash(results['splits']['photos'])} photos, "
        f"{_slash(results['splits']['crops'])} crops of {bench['crop_size']} px (never resized). Generators: "
        f"{bench['generator_steps']} steps on train-split crops. Detector: {results['detector']['summary']}. "
        f"CDE fill: {bench['cde_fill']}.",
        "",
    ]
    if pre:
        lines += [f"Pretrained stand-in (regime `pretrained-lora`): {bench['pretrain_steps']} steps of masked-patch "
                  f"reconstruction on train-split real crops (loss on the {bench['pretrain_target']} patches), "
                  f"MSE {_fmt(pre['first_loss'])} → "
                  f"{_fmt(pre['final_loss'])}, {_fmt(pre['train_seconds'], 0)} s; then frozen, LoRA "
                  f"({', '.join(bench['lora_overrides'])}).", ""]
    for regime in bench["regimes"]:
        lines += _regime_tables(results, regime)
    families = results["families"]
    lines += ["## Generators", "", "| family | kind | made by | val L1 | train s | cached |",
              "|---|---|---|---|---|---|"]
    for name, fam in families.items():
        lines.append(f"| {name} | {fam['kind']} | {fam['made_by']} | {_fmt(fam.get('val_l1'), 4)} | "
                     f"{_fmt(fam.get('train_seconds'), 0)} | {_yes_no(fam.get('cached'))} |")
    machine = results["machine"]
    lines += ["", "## Wall times", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in results["wall_seconds"].items()]
    lines += ["", f"Machine: {machine['platform']}, {machine['cpu_count']} CPU(s), torch {machine['torch']}"
              + (f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU") + ".", ""]
    Path(path).write_text("\n".join(lines))


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
        (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2) + "\n")

    save({})
    runs = clock.run("detectors", lambda: run_detectors(datasets, cfg, exp, out, pretrained=pretrained,
                                                        progress=progress, log=log, on_run=save))
    clock.stages["total"] = time.perf_counter() - total
    results["status"] = "done"
    save(runs)
    write_report(_jsonable(results), out / "report.md")
    log(f"done in {clock.stages['total'] / 60:.1f} min: {out / 'results.json'}, {out / 'report.md'}")
    return results

