"""Training and validation data: three folder layouts, one dataset class.

Layouts (``data.layout``; ``auto`` tells them apart):

* ``genimage``: ``ROOT/<generator>/{train,val}/{ai,nature}/...``
* ``paired``: ``ROOT/real/...`` plus reconstruction folders ``ROOT/<name>/...`` whose files have the same
  relative paths as the real ones (extension may differ); the pairs feed RPR's reconstruction variant.
* ``folders``: ``ROOT/real/...`` and ``ROOT/fake/...``.

For paired and folders, ``ROOT/train/...`` and ``ROOT/val/...`` are used when present; otherwise a
fixed fraction is held out by hashing each (real) file's relative path, so a pair never straddles splits.

Any layout can take a reconstruction folder besides (``data.reconstructions``, what ``ppl reconstruct``
writes): a file there at a real image's path relative to ``ROOT`` (suffix aside) is that image's
pixel-aligned reconstruction, and joins the real image's split as a fake paired with it, as the paired
layout's folders do.

Augmentation is drawn from a generator seeded by (seed, epoch, index): runs are reproducible whatever
the number of loader workers. An unreadable file yields a :class:`Skipped` marker that ``collate``
drops and counts, never an exception.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ppl_model.config import AugmentConfig, DataConfig, RPRConfig
from ppl_model.data.transforms import (
    UnreadableImage,
    augment_quality,
    crop_at,
    fill_colour,
    load_rgb,
    random_offset,
    to_tensor,
)
from ppl_model.errors import PPLError
from ppl_model.imageio import IMAGE_SUFFIXES, list_images  # noqa: F401  (importable from here, as always)
from ppl_model.inference.preprocess import Preprocessing, prepare_image, rgb_triple
from ppl_model.rpr import make_rpr_sample

REAL, FAKE = 0, 1
RECONSTRUCTION_SUBSET = "reconstruction"  # the subset of the fakes data.reconstructions adds


class DataLayoutError(PPLError, ValueError):
    """A data folder that matches no supported layout, or has nothing to train on."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 real, 1 fake
    subset: str = ""  # generator name, where the layout has one
    partner: Path | None = None  # for a fake: the real image it reconstructs (pixel-aligned)


@dataclass
class DataSplits:
    layout: str
    train: list[Sample]
    val: list[Sample]


class Skipped(NamedTuple):
    path: str
    reason: str


def _in_val(key: str, fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") / 2**32
    return bucket < fraction


def detect_layout(root: Path) -> str:
    base = root / "train" if (root / "train").is_dir() else root
    if (base / "real").is_dir():
        others = [d for d in base.iterdir() if d.is_dir() and d.name != "real"]
        if [d.name for d in others] == ["fake"]:
            return "folders"
        if others:
            return "paired"
    if any((d / split / kind).is_dir() for d in root.iterdir() if d.is_dir()
           for split in ("train", "val") for kind in ("ai", "nature")):
        return "genimage"
    raise DataLayoutError(
        f"{root}: no known layout; expected <generator>/{{train,val}}/{{ai,nature}} (genimage), "
        "real/ + fake/ (folders) or real/ + reconstruction folders (paired)")


def _genimage(root: Path, cfg: DataConfig) -> DataSplits:
    generators = sorted(d.name for d in root.iterdir() if d.is_dir())
    if cfg.generators:
        unknown = sorted(set(cfg.generators) - set(generators))
        if unknown:
            raise DataLayoutError(f"{root}: no generator folder(s) {', '.join(unknown)}")
        generators = [g for g in generators if g in cfg.generators]
    splits: dict[str, list[Sample]] = {"train": [], "val": []}
    for gen in generators:
        for split, samples in splits.items():
            for kind, label in (("nature", REAL), ("ai", FAKE)):
                folder = root / gen / split / kind
                if folder.is_dir():
                    samples.extend(Sample(p, label, gen) for p in list_images(folder))
    return DataSplits("genimage", splits["train"], splits["val"])


def _relative_key(path: Path, folder: Path) -> str:
    """What pairs a reconstruction with its real image, and decides the split: the path without extension."""
    return path.relative_to(folder).with_suffix("").as_posix()


def _real_and_fakes(base: Path, paired: bool) -> list[tuple[str, Sample]]:
    """Real samples, then fakes, each with the relative key that decides its split."""
    reals = {_relative_key(p, base / "real"): p for p in list_images(base / "real")}
    keyed = [(key, Sample(p, REAL, "real")) for key, p in reals.items()]
    for folder in sorted(d for d in base.iterdir() if d.is_dir() and d.name != "real"):
        for p in list_images(folder):
            key = _relative_key(p, folder)
            keyed.append((key, Sample(p, FAKE, folder.name, reals.get(key) if paired else None)))
    return keyed


def _two_folder(root: Path, cfg: DataConfig, layout: str) -> DataSplits:
    paired = layout == "paired"
    if (root / "train").is_dir():
        train = [s for _, s in _real_and_fakes(root / "train", paired)]
        val = [s for _, s in _real_and_fakes(root / "val", paired)] if (root / "val").is_dir() else []
        return DataSplits(layout, train, val)
    if not (root / "real").is_dir():
        raise DataLayoutError(f"{root}: the {layout} layout needs a real/ folder")
    keyed = _real_and_fakes(root, paired)
    train = [s for key, s in keyed if not _in_val(key, cfg.val_fraction)]
    val = [s for key, s in keyed if _in_val(key, cfg.val_fraction)]
    return DataSplits(layout, train, val)


def evaluation_subsets(root: str | Path, layout: str = "auto") -> tuple[str, dict[str, list[Sample]]]:
    """What ``ppl eval`` judges, per subset: each GenImage generator's val split with its own real images;
    otherwise each folder beside ``real/`` (under ``val/`` when there is one) together with all of ``real/``."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"data folder not found: {root}")
    layout = detect_layout(root) if layout == "auto" else layout
    subsets: dict[str, list[Sample]] = {}
    if layout == "genimage":
        for sample in _genimage(root, DataConfig()).val:
            subsets.setdefault(sample.subset, []).append(sample)
    else:
        base = root / "val" if (root / "val" / "real").is_dir() else root
        samples = [s for _, s in _real_and_fakes(base, paired=False)]
        reals = [s for s in samples if s.label == REAL]
        for sample in samples:
            if sample.label == FAKE:
                subsets.setdefault(sample.subset, list(reals)).append(sample)
    if not subsets:
        raise DataLayoutError(f"{root} ({layout} layout): nothing to evaluate")
    return layout, subsets


def _with_reconstructions(root: Path, splits: DataSplits, folder: Path) -> DataSplits:
    """Each real image with a file at its relative path in ``folder`` gains that file as its paired fake."""
    if not folder.is_dir():
        raise DataLayoutError(f"reconstruction folder not found: {folder}")
    if folder.resolve().is_relative_to(root.resolve()):
        raise DataLayoutError(f"reconstruction folder {folder} is inside the data folder {root}, where it would be "
                              "read as data too; keep it outside (or, for real/ + reconstruction folders, use the "
                              "paired layout without data.reconstructions)")
    made = {_relative_key(p, folder): p for p in list_images(folder)}

    def extend(samples: list[Sample]) -> list[Sample]:
        reals = [s for s in samples if s.label == REAL]
        keyed = [(s, _relative_key(s.path, root)) for s in reals]
        return samples + [Sample(made[key], FAKE, RECONSTRUCTION_SUBSET, s.path) for s, key in keyed if key in made]

    train, val = extend(splits.train), extend(splits.val)
    reals = sum(s.label == REAL for s in splits.train)
    paired = len(train) - len(splits.train)
    if not paired:
        example = next((s.path.relative_to(root).with_suffix(".png") for s in splits.train if s.label == REAL), None)
        raise DataLayoutError(f"no file in {folder} reconstructs a real training image of {root} ({splits.layout} "
                              f"layout){f'; expected e.g. {folder / example}' if example else ''} "
                              "(run `ppl reconstruct --images` on the data folder itself)")
    if paired < reals:
        warnings.warn(f"{reals - paired} of {reals} real training images have no reconstruction in {folder}; "
                      "they train without an RPR partner", stacklevel=3)
    return DataSplits(splits.layout, train, val)


def index_dataset(root: str | Path, cfg: DataConfig) -> DataSplits:
    """Find every image under ``root`` and assign labels, subsets, pairs and splits; with
    ``cfg.reconstructions``, pair the real images with their reconstructions there."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"data folder not found: {root}")
    layout = detect_layout(root) if cfg.layout == "auto" else cfg.layout
    splits = _genimage(root, cfg) if layout == "genimage" else _two_folder(root, cfg, layout)
    if cfg.reconstructions:
        splits = _with_reconstructions(root, splits, Path(cfg.reconstructions))
    labels = {s.label for s in splits.train}
    if labels != {REAL, FAKE}:
        raise DataLayoutError(f"{root} ({layout}): training split needs real and fake images, "
                              f"found {len(splits.train)} image(s) with labels {sorted(labels)}")
    return splits


class DetectionDataset(Dataset):
    """Yields dicts ``pixel_values`` (3, S, S), ``label``, ``patch_labels`` (G, G), ``rpr``; or ``Skipped``."""

    def __init__(self, samples: Sequence[Sample], *, input_size: int, patch_size: int,
                 mean: Sequence[float], std: Sequence[float], train: bool,
                 augment: AugmentConfig | None = None, rpr: RPRConfig | None = None, seed: int = 0):
        if input_size % patch_size:
            raise ValueError("input_size must be a multiple of patch_size")
        self.samples = list(samples)
        self.input_size, self.patch_size = input_size, patch_size
        self.grid = input_size // patch_size
        self.mean, self.std = rgb_triple(mean, "mean"), rgb_triple(std, "std")
        self.fill = fill_colour(self.mean)
        self.eval_prep = Preprocessing(input_size, self.mean, self.std)
        self.train = train
        self.augment = augment or AugmentConfig()
        self.rpr = rpr if (rpr is not None and rpr.enabled and train) else None
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed augmentation; loader workers are recreated each epoch, so they see the new value."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        sample = self.samples[index]
        try:
            if self.train:
                return self._train_item(sample, np.random.default_rng([self.seed, self.epoch, index]))
            return self._eval_item(sample)
        except UnreadableImage as exc:
            return Skipped(exc.path, exc.reason)

    def _item(self, pixels: torch.Tensor, label: int, patch_labels: np.ndarray | None, rpr: bool) -> dict[str, Any]:
        if patch_labels is None:
            patch_labels = np.full((self.grid, self.grid), float(label), dtype=np.float32)
        return {"pixel_values": pixels, "label": label, "patch_labels": torch.from_numpy(patch_labels), "rpr": rpr}

    def _eval_item(self, sample: Sample) -> dict[str, Any]:
        # The same centre crop the deployed model sees (scan, worker).
        pixels = prepare_image(load_rgb(sample.path), self.eval_prep).crops[0]
        return self._item(pixels, sample.label, None, rpr=False)

    def _train_item(self, sample: Sample, rng: np.random.Generator) -> dict[str, Any]:
        size, aug = self.input_size, self.augment
        img = load_rgb(sample.path)
        # RPR composites only pixel-aligned pairs: patches from an unrelated image would leave content seams
        # on the grid, a shortcut ("seams mean fake") the model would learn instead of generation traces.
        use_rpr = (self.rpr is not None and sample.label == FAKE and sample.partner is not None
                   and rng.random() < self.rpr.prob)
        partner = load_rgb(sample.partner) if use_rpr and sample.partner is not None else None
        # A reconstruction of another size than its real image (e.g. a 512-px SD output) is never cut to a
        # common corner: that would shift its content against the real image and leave seams on the grid.
        mismatched = partner is not None and partner.size != img.size
        if mismatched:
            assert self.rpr is not None and partner is not None
            if self.rpr.size_mismatch == "refuse":
                partner = None  # used whole, as a pure fake
            else:
                img = img.resize(partner.size, Image.Resampling.BICUBIC)
        width, height = img.size
        left, top = random_offset(width, size, rng), random_offset(height, size, rng)
        flip = rng.random() < aug.flip_prob

        def take(image: Image.Image) -> Image.Image:
            box = crop_at(image, left, top, size, self.fill)
            return box.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else box

        out, patch_labels = take(img), None
        if partner is not None:
            assert self.rpr is not None
            composite = make_rpr_sample(np.asarray(take(partner)), np.asarray(out), variant=self.rpr.variant,
                                        ratio=self.rpr.ratio, patch_size=self.patch_size, rng=rng)
            out, patch_labels = Image.fromarray(composite.image), composite.patch_labels
        pixels = to_tensor(augment_quality(out, aug, rng), self.mean, self.std)
        if aug.patch_dropout > 0:
            pixels = self._drop_patches(pixels, aug.patch_dropout, rng)
        item = self._item(pixels, sample.label, patch_labels, rpr=partner is not None)
        item["size_mismatched"] = mismatched
        return item

    def _drop_patches(self, pixels: torch.Tensor, fraction: float, rng: np.random.Generator) -> torch.Tensor:
        """Set round(fraction·G²) random grid patches to the normalisation mean (0 once normalised)."""
        count = round(fraction * self.grid * self.grid)
        if count == 0:
            return pixels
        keep = torch.ones(self.grid * self.grid)
        keep[torch.from_numpy(rng.permutation(self.grid * self.grid)[:count])] = 0
        mask = keep.reshape(self.grid, self.grid).repeat_interleave(self.patch_size, 0)
        return pixels * mask.repeat_interleave(self.patch_size, 1)[None]


def collate(items: list[dict[str, Any] | Skipped]) -> dict[str, Any]:
    """Stack the readable items; report the skipped ones in ``skipped``."""
    good = [item for item in items if not isinstance(item, Skipped)]
    skipped = [item for item in items if isinstance(item, Skipped)]
    batch: dict[str, Any] = {"skipped": skipped, "size": len(good), "size_mismatched": 0}
    if good:
        batch["pixel_values"] = torch.stack([item["pixel_values"] for item in good])
        batch["labels"] = torch.tensor([item["label"] for item in good], dtype=torch.float32)
        batch["patch_labels"] = torch.stack([item["patch_labels"] for item in good])
        batch["rpr"] = torch.tensor([item["rpr"] for item in good])
        batch["size_mismatched"] = sum(bool(item.get("size_mismatched")) for item in good)
    return batch
