"""``ppl bench synth``'s stages, in order: split the photos, crop them, train the generator families, write the
detectors' datasets, pretrain the stand-in backbone, train and evaluate the detectors (``benchmark.py`` runs
them; see its docstring for the protocol)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ppl_model.config import ExperimentConfig, ModelConfig, apply_overrides, from_dict, load_config
from ppl_model.data.datasets import DataLayoutError, list_images
from ppl_model.data.transforms import UnreadableImage, load_rgb
from ppl_model.evaluation.metrics import mean_over_subsets
from ppl_model.synthbench.config import ARMS, REAL, Log, SynthBenchConfig, SynthBenchError, fmt
from ppl_model.synthbench.generators import (
    FAMILIES,
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


def jsonable(value: Any) -> Any:
    """NaN and infinities become null (JSON has none); tuples become lists; paths strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return jsonable(value.item())
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
        return Crops(key, folder, manifest["split_sizes"], manifest["photos"], manifest["names"],
                     load_file(str(folder / "crops.safetensors")), manifest["skipped"], False)

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
        return Datasets(key, folder, folder / "detector", folder / "test", folder / "analysis_images",
                        json.loads(manifest_path.read_text())["counts"], False)

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
    options: dict[str, Any] = {"backend": cfg.backend, "batch_size": cfg.eval_batch_size, "workers": cfg.workers,
                               "progress": progress}
    # Calibration on the detector's own validation split (real crops of photos it never trained on).
    calibration = evaluate_model(model_dir, datasets.detector_data, layout="paired", target_fpr=cfg.target_fpr,
                                 **options)
    result = evaluate_model(model_dir, datasets.test_data, layout="paired", robustness=robustness, **options)
    (out_dir / "eval.json").write_text(json.dumps(jsonable(result), indent=2) + "\n")
    times["eval"] = time.perf_counter() - start

    start = time.perf_counter()
    summary = analyze(model_dir, datasets.analysis_images, out_dir / "analysis", baseline=cfg.cde_fill,
                      seed=exp.train.seed, progress=progress)
    times["analyze"] = time.perf_counter() - start

    robustness_by_perturbation = None
    if "robustness" in result:
        robustness_by_perturbation = {
            name: {"subsets": block["subsets"], "mean_unseen": _unseen_mean(block["subsets"], cfg.unseen)}
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
        "robustness": robustness_by_perturbation,
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
                    f"CDE entropy (fakes) {fmt(cde['normalized_entropy_fake']['mean'])}, "
                    f"patch cos end {fmt(record['telemetry']['patch_cosine_end'])}")
                if on_run is not None:
                    on_run(runs)
    return runs


