"""Helpers the tests share: paths, tiny model configs, and small images and folders the tests make."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from ppl_model.config import AugmentConfig, ExperimentConfig, ModelConfig, from_dict

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "demo" / "photos"  # real photos the repository ships (attribution in SOURCES.md there)

# Dataset settings under which a sample's tensor is its pixels: no augmentation, identity normalisation
NO_AUG = AugmentConfig(flip_prob=0.0, jpeg_prob=0.0, blur_prob=0.0)
IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)}  # tensor values = pixel values


T = TypeVar("T")


def run_concurrently(action: Callable[[T], object], args: Iterable[T], timeout: float = 60.0) -> list[BaseException]:
    """``action(arg)`` for every arg, each in its own thread, all at once; the exceptions they raised."""
    errors: list[BaseException] = []

    def run(arg: T) -> None:
        try:
            action(arg)
        except BaseException as exc:  # the caller asserts on the list
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(arg,)) for arg in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    return errors


def tiny_model_config(arch: str = "clip", finetune: str = "lora", **overrides) -> ModelConfig:
    """A 2-layer ViT on 32×32 crops with 8-pixel patches: a 4×4 grid."""
    values = {"arch": arch, "size": "tiny", "input_size": 32, "patch_size": 8, "finetune": finetune} | overrides
    return ModelConfig(**values)


def noise_image(rng: np.random.Generator, size: tuple[int, int], smooth: bool) -> Image.Image:
    """'Real' images are per-pixel noise; 'fake' ones are blocky (2×2 nearest upsampling), a trace in
    every patch that a tiny model learns within a few steps."""
    width, height = size
    if smooth:
        small = rng.integers(0, 256, ((height + 1) // 2, (width + 1) // 2, 3), dtype=np.uint8)
        array = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)[:height, :width]
    else:
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array)


def make_folders_dataset(root: Path, count: int = 24, size: tuple[int, int] = (40, 40), seed: int = 0,
                         paired: bool = False) -> Path:
    """``root/real`` and ``root/fake`` with ``count`` PNGs each. ``paired``: each fake is a reconstruction
    of the real image of the same name (its 2×2 block means), pixel-aligned, as RPR needs."""
    rng = np.random.default_rng(seed)
    (root / "real").mkdir(parents=True, exist_ok=True)
    (root / "fake").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        real = noise_image(rng, size, smooth=False)
        if paired:
            small = real.resize(((size[0] + 1) // 2, (size[1] + 1) // 2), Image.Resampling.BOX)
            real.save(root / "real" / f"img_{i:03d}.png")
            small.resize(size, Image.Resampling.NEAREST).save(root / "fake" / f"img_{i:03d}.png")
        else:
            real.save(root / "real" / f"real_{i:03d}.png")
            noise_image(rng, size, smooth=True).save(root / "fake" / f"fake_{i:03d}.png")
    return root


def tiny_experiment(**sections) -> ExperimentConfig:
    """A fast training config for the tiny model; ``sections`` override whole-key values per section."""
    values = {
        "model": {"arch": "clip", "size": "tiny", "input_size": 32, "patch_size": 8, "finetune": "full"},
        "data": {"layout": "paired", "workers": 0, "val_fraction": 0.2},
        "train": {"epochs": 2, "batch_size": 8, "seed": 0, "checkpoint_every": 1000},
        "optim": {"lr": 1e-3, "warmup_fraction": 0.1},
        "loss": {"patches_per_image": 8, "pairs_per_patch": 8},
    }
    for section, updates in sections.items():
        values.setdefault(section, {}).update(updates)
    return from_dict(values)
