"""The data of ``make demo``: real crops of the repository's sample photos, and fakes made on the spot by
one of the benchmark's generator families (``generators.py``).

Writes, under OUT:

* ``train/real/`` and ``train/<family>/``: real crops and their pixel-aligned reconstructions (the
  paired layout, so RPR has donors), from the training photos;
* ``submit/real/`` and ``submit/fake/``: what the demo sends to the worker, from photos the detector never
  saw: held-out real crops, reconstructions of them, and images decoded from interpolated latents (fakes
  with no real partner).

A model trained on this knows one toy generator family and nothing else; it is a pipeline demo, not a
detector of real generators.

    python -m ppl_model.synthbench.demo --photos demo/photos --out runs/demo/data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ppl_model.data.datasets import list_images
from ppl_model.data.transforms import UnreadableImage, load_rgb
from ppl_model.synthbench.generators import (
    FAMILIES,
    crops_from_images,
    reconstruct,
    sample_images,
    to_uint8_images,
    train_autoencoder,
)

FAMILY = "ae_nearest_x4"  # nearest-neighbour upsampling + conv: the Stable Diffusion VAE's decoder style
CROP = 64
HELD_OUT_FRACTION = 0.25


def held_out(photo: Path) -> bool:
    """Fixed by the file name, so reruns and added photos keep every photo on its side."""
    return int(hashlib.sha256(photo.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < HELD_OUT_FRACTION


def _save(images: torch.Tensor, folder: Path, names: Sequence[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(to_uint8_images(images), names, strict=True):
        image.save(folder / f"{name}.png")


def make_demo_data(photos: Path, out: Path, *, crops_per_photo: int = 32, submit_per_photo: int = 2,
                   generator_steps: int = 300, seed: int = 0) -> dict[str, int]:
    loaded = []
    for path in list_images(photos):
        try:
            loaded.append((path, load_rgb(path)))
        except UnreadableImage:
            continue
    train_images = [img for path, img in loaded if not held_out(path)]
    test_images = [img for path, img in loaded if held_out(path)]
    if not train_images or not test_images:
        raise ValueError(f"{photos}: need photos on both sides of the held-out split, found {len(loaded)}")
    train_crops = crops_from_images(train_images, CROP, crops_per_photo, seed=seed)
    test_crops = crops_from_images(test_images, CROP, submit_per_photo, seed=seed + 1)
    generator = train_autoencoder(FAMILIES[FAMILY], train_crops, steps=generator_steps, seed=seed)

    train_names = [f"crop{i:04d}" for i in range(len(train_crops))]
    _save(train_crops, out / "train" / "real", train_names)
    _save(reconstruct(generator, train_crops), out / "train" / FAMILY, train_names)
    test_names = [f"photo{i:03d}" for i in range(len(test_crops))]
    _save(test_crops, out / "submit" / "real", test_names)
    _save(reconstruct(generator, test_crops), out / "submit" / "fake", [f"{n}_reconstructed" for n in test_names])
    sampled = sample_images(generator, test_crops, max(2, len(test_crops) // 2), seed=seed)
    _save(sampled, out / "submit" / "fake", [f"sampled{i:03d}" for i in range(len(sampled))])
    counts = {"train_pairs": len(train_crops), "submit_real": len(test_crops),
              "submit_fake": len(test_crops) + len(sampled)}
    (out / "demo_data.json").write_text(json.dumps({"family": FAMILY, "crop": CROP, **counts}, indent=2) + "\n")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", required=True, type=Path, help="folder of real photos")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--generator-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.photos.is_dir():
        parser.error(f"photo folder not found: {args.photos}")
    started = time.monotonic()
    counts = make_demo_data(args.photos, args.out, generator_steps=args.generator_steps, seed=args.seed)
    print(f"demo data in {args.out} ({time.monotonic() - started:.0f} s): {counts['train_pairs']} training pairs "
          f"(real + {FAMILY}), {counts['submit_real']} real and {counts['submit_fake']} fake images to submit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
