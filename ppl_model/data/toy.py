"""A small training folder built from real photos, for trying the pipeline where no AI-image data exists.

Writes ``OUT/real/<photo>_<k>.png`` (random crops of the photos) and ``OUT/fake/<photo>_<k>.png`` with
the same names: each fake is its real crop downscaled 2× and upscaled back by pixel repetition, plus a
faint period-2 checkerboard (the artifact of stride-2 transposed convolutions), so every patch carries
the same trace whatever its content, as every patch of a generated image carries its generator's. It is a stand-in to
exercise training (folders layout, or paired with ``--set data.layout=paired``), not a model of real
generators: a detector trained on it only knows this resampling.

    python -m ppl_model.data.toy --photos ../shared/data/photos --out runs/toy-data
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ppl_model.data.datasets import list_images
from ppl_model.data.transforms import UnreadableImage, load_rgb, random_offset

CHECKER_AMPLITUDE = 6  # grey levels: invisible to the eye, present in every patch


def resample_fake(crop: Image.Image) -> Image.Image:
    half = crop.resize((crop.width // 2, crop.height // 2), Image.Resampling.BOX)
    upsampled = np.asarray(half.resize(crop.size, Image.Resampling.NEAREST), dtype=np.int16)
    rows, cols = np.indices(upsampled.shape[:2])
    checker = np.where((rows + cols) % 2 == 0, CHECKER_AMPLITUDE, -CHECKER_AMPLITUDE)[..., None]
    return Image.fromarray(np.clip(upsampled + checker, 0, 255).astype(np.uint8))


def make_toy_dataset(photos: Path, out: Path, *, crops_per_photo: int = 4, crop: int = 96,
                     seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    (out / "real").mkdir(parents=True, exist_ok=True)
    (out / "fake").mkdir(parents=True, exist_ok=True)
    counts = {"photos": 0, "skipped": 0, "pairs": 0}
    for path in list_images(photos):
        try:
            img = load_rgb(path)
        except UnreadableImage:
            counts["skipped"] += 1
            continue
        if min(img.size) < crop:
            counts["skipped"] += 1
            continue
        counts["photos"] += 1
        for k in range(crops_per_photo):
            left, top = random_offset(img.width, crop, rng), random_offset(img.height, crop, rng)
            real = img.crop((left, top, left + crop, top + crop))
            name = f"{path.stem}_{k}.png"
            real.save(out / "real" / name)
            resample_fake(real).save(out / "fake" / name)
            counts["pairs"] += 1
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", required=True, type=Path, help="folder of real photos")
    parser.add_argument("--out", required=True, type=Path, help="folder to write real/ and fake/ into")
    parser.add_argument("--crops-per-photo", type=int, default=4)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.photos.is_dir():
        parser.error(f"photo folder not found: {args.photos}")
    counts = make_toy_dataset(args.photos, args.out, crops_per_photo=args.crops_per_photo, crop=args.crop,
                              seed=args.seed)
    print(f"{counts['pairs']} real/fake pairs from {counts['photos']} photos "
          f"({counts['skipped']} skipped) in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
