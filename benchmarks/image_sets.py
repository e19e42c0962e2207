"""The worker benchmark's images, made here (nothing downloaded): the ``overhead`` set of small JPEGs, where
per-job costs dominate, and the ``realistic`` set, at the sizes and encodings uploads come in.

Photo-like content: smooth random colour fields with edges and sensor-like noise, so that files compress
to the sizes real photos of those dimensions have (a 12 MP q90 photo is megabytes, not kilobytes).
Deterministic for a seed.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Kind:
    """One kind of upload: its share of the set, size and encoding."""

    name: str
    share: float
    width: int
    height: int
    format: str  # JPEG, PNG or WEBP
    quality: int = 90
    progressive: bool = False
    subsampling: int = 2  # JPEG chroma: 2 = 4:2:0, 1 = 4:2:2, 0 = 4:4:4
    screenshot: bool = False  # flat colours and text-like strokes instead of a photo


# What the realistic set is made of; duplicates (byte-identical copies of earlier files) come on top.
REALISTIC: tuple[Kind, ...] = (
    Kind("1 MP JPEG q85 baseline", 0.30, 1280, 800, "JPEG", quality=85),
    Kind("2 MP JPEG q85 progressive", 0.15, 1920, 1080, "JPEG", quality=85, progressive=True),
    Kind("3 MP JPEG q90 baseline", 0.10, 2048, 1536, "JPEG", quality=90),
    Kind("12 MP JPEG q90 4:2:0 baseline", 0.08, 4032, 3024, "JPEG", quality=90),
    Kind("12 MP JPEG q90 4:2:0 progressive", 0.07, 4032, 3024, "JPEG", quality=90, progressive=True),
    Kind("PNG screenshot 1280x720", 0.10, 1280, 720, "PNG", screenshot=True),
    Kind("WebP q80 1200x800", 0.10, 1200, 800, "WEBP", quality=80),
)
DUPLICATE_SHARE = 0.10
IMAGE_SETS = ("overhead", "realistic")


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A photo-like RGB image: a smooth colour field (upsampled noise), a few hard edges, sensor noise."""
    small = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x, y, x + width // 5, y + height // 5), fill=colour)
    pixels = np.asarray(img, dtype=np.int16)
    noise = rng.normal(0, 5, (height, width, 1)).astype(np.int16)  # luminance-like grain
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def screenshot(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A screenshot-like image: flat panels and rows of short dark strokes standing in for text."""
    img = Image.new("RGB", (width, height), (246, 246, 248))
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        colour = tuple(int(c) for c in rng.integers(180, 256, 3))
        draw.rectangle((x, y, x + int(rng.integers(width // 8, width // 2)),
                        y + int(rng.integers(height // 8, height // 3))), fill=colour)
    for row in range(20, height - 10, 18):
        x = 16
        while x < width - 60:
            length = int(rng.integers(8, 48))
            draw.rectangle((x, row, x + length, row + 8), fill=(40, 40, 48))
            x += length + int(rng.integers(5, 12))
    return img


def encode(img: Image.Image, kind: Kind) -> bytes:
    out = io.BytesIO()
    if kind.format == "JPEG":
        img.save(out, format="JPEG", quality=kind.quality, progressive=kind.progressive, subsampling=kind.subsampling)
    elif kind.format == "WEBP":
        img.save(out, format="WEBP", quality=kind.quality)
    else:
        img.save(out, format="PNG")
    return out.getvalue()


EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}


def make_realistic(folder: Path, count: int, seed: int, kinds: Sequence[Kind] = REALISTIC,
                   duplicate_share: float = DUPLICATE_SHARE) -> tuple[list[Path], list[dict]]:
    """``count`` files: each kind's share of the distinct ones, then byte-identical duplicates of earlier files
    under other names (the verdict cache answers those). Returns the paths and the mix (per kind: count, mean
    bytes, size), which the benchmark prints with its results."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    duplicates = round(count * duplicate_share)
    distinct = count - duplicates
    total = sum(k.share for k in kinds)
    counts = [int(distinct * k.share / total) for k in kinds]
    counts[0] += distinct - sum(counts)
    paths: list[Path] = []
    mix = []
    for kind, n in zip(kinds, counts, strict=True):
        sizes = []
        for _ in range(n):
            img = screenshot(kind.width, kind.height, rng) if kind.screenshot else photo(kind.width, kind.height, rng)
            data = encode(img, kind)
            path = folder / f"img_{len(paths):06d}{EXTENSIONS[kind.format]}"
            path.write_bytes(data)
            paths.append(path)
            sizes.append(len(data))
        mix.append({"kind": kind.name, "count": n, "width": kind.width, "height": kind.height,
                    "mean_bytes": round(float(np.mean(sizes))) if sizes else 0})
    originals = list(paths)
    for i in range(duplicates):
        source = originals[int(rng.integers(0, len(originals)))]
        path = folder / f"dup_{i:06d}{source.suffix}"
        shutil.copyfile(source, path)
        paths.append(path)
    mix.append({"kind": "duplicate of an earlier file (same bytes)", "count": duplicates, "width": None,
                "height": None, "mean_bytes": None})
    order = rng.permutation(len(paths))  # duplicates arrive mixed in, not at the end
    return [paths[i] for i in order], mix


def mix_table(mix: Sequence[dict]) -> str:
    lines = ["| kind | files | size | mean bytes |", "|---|---|---|---|"]
    for row in mix:
        size = f"{row['width']}×{row['height']}" if row["width"] else "–"
        mean = f"{row['mean_bytes']:,}" if row["mean_bytes"] else "–"
        lines.append(f"| {row['kind']} | {row['count']} | {size} | {mean} |")
    return "\n".join(lines)
