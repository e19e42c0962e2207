"""Decode + prepare of real-sized JPEGs: today's full Pillow decode against the partial decode of the crops.

    nice .venv/bin/python benchmarks/jpeg_decode.py [--repeat 5] [--sizes 1mp,3mp,12mp]

Today's path is ``ppl_model.inference.preprocess.prepare`` (``decode_rgb``: Pillow decodes the whole image and
applies the EXIF orientation; then the centre crop or K tiles, normalised); the new one is ``prepare_jpeg``
(``ppl_model.jpeg_region``: libjpeg-turbo decodes only the regions the crops cover). Both run in this process,
alternately on the same bytes, so the ratio is a same-run figure; each time is the median of ``--repeat``
runs. Every row also checks that both paths give the same tensors, bit for bit.

The photos are made here, no downloads: a photo the repository ships (demo/photos) upscaled to the size, with
detail at several scales and sensor-like noise added, so that the files have the entropy of camera JPEGs
(a 12 MP q90 file of about 3-4 MB, as phones write); encoded by Pillow at the qualities uploads come in.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ppl_model.inference.preprocess import Preprocessing, prepare, prepare_jpeg
from ppl_model.jpeg_region import available

ROOT = Path(__file__).resolve().parent.parent

PHOTO = ROOT / "demo" / "photos" / "caer_puppy.png"
# (name, width, height, quality, progressive, EXIF orientation)
CASES: dict[str, list[tuple[str, int, int, int, bool, int]]] = {
    "1mp": [("1 MP q85 baseline", 1280, 960, 85, False, 1)],
    "3mp": [("2.8 MP q85 baseline", 2048, 1365, 85, False, 1),
            ("2.8 MP q85 progressive", 2048, 1365, 85, True, 1)],
    "12mp": [("12 MP q90 baseline", 4032, 3024, 90, False, 1),
             ("12 MP q90 baseline, EXIF 6", 4032, 3024, 90, False, 6),
             ("12 MP q90 progressive", 4032, 3024, 90, True, 1)],
}
TILES = (1, 4, 9)
INPUT_SIZE, MEAN, STD = 224, (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)  # CLIP ViT-L/14


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A camera-like photo: the shipped one upscaled, plus detail at three scales and sensor noise."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(Image.open(PHOTO).convert("RGB").resize((width, height), Image.Resampling.BICUBIC),
                        dtype=np.float32)
    for scale, amplitude in ((64, 10.0), (8, 7.0), (2, 4.0)):
        small = rng.normal(0.0, amplitude, (height // scale + 1, width // scale + 1, 1)).astype(np.float32)
        layer = Image.fromarray(small[..., 0], mode="F").resize((width, height), Image.Resampling.BICUBIC)
        pixels += np.asarray(layer, dtype=np.float32)[..., None]
    pixels += rng.normal(0.0, 2.5, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, quality: int, progressive: bool, orientation: int) -> bytes:
    buffer = io.BytesIO()
    params: dict[str, Any] = {"quality": quality, "subsampling": 2, "progressive": progressive}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    image.save(buffer, "JPEG", **params)
    return buffer.getvalue()


def median_ms(runs: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median milliseconds of each run, the runs interleaved (on a shared machine, load then hits both alike)."""
    for run in runs.values():
        run()  # warm: the library loaded, the allocator's pages touched
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def row(name: str, data: bytes, tiles: int, repeat: int) -> str:
    prep = Preprocessing(INPUT_SIZE, MEAN, STD, tiles)
    new = prepare_jpeg(data, prep)
    old = prepare(data, prep)
    exact = new is not None and torch.equal(new.crops, old.crops) and new[1:] == old[1:]
    ms = median_ms({"today": lambda: prepare(data, prep), "new": lambda: prepare_jpeg(data, prep)}, repeat)
    today, partial = ms["today"], ms["new"]
    return f"{name:30} {len(data):9d} {tiles:2d} {today:9.1f} {partial:8.1f} {today / partial:5.1f}x  {exact}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sizes", default="1mp,3mp,12mp", help="comma-separated: " + ", ".join(CASES))
    args = parser.parse_args(argv)
    if not available():
        print("the partial decoder's library (the turbojpeg wheel) is not installed here")
        return 2
    torch.set_num_threads(1)
    print(f"{'image':30} {'bytes':>9} {'K':>2} {'today ms':>9} {'new ms':>8} {'ratio':>6}  exact")
    for key in args.sizes.split(","):
        for name, width, height, quality, progressive, orientation in CASES[key]:
            data = encode(photo(width, height), quality, progressive, orientation)
            for tiles in TILES:
                print(row(name, data, tiles, args.repeat), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
