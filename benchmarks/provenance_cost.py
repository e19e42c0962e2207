"""What reading provenance (``ppl_model.provenance.read_provenance``) costs per image, against decoding and
preparing the same image (``ppl_model.imageio.decode`` + ``prepare_image`` at 224 px), on files with and without a
C2PA manifest.

    nice .venv/bin/python -m benchmarks.provenance_cost [--repeats 7] [--json runs/provenance_cost.json]

The images are the repository's sample photos (demo/photos, 0.1-0.7 MP), each saved as JPEG, PNG, WebP and HEIC,
plus a few upscaled to 12 MP (a phone camera's size) as JPEG and HEIC; "signed" copies carry a C2PA manifest
(trainedAlgorithmicMedia) signed with the tests' throw-away chain (tests/provenance_files.py), read with its root
as a trust anchor. Every file is timed ``--repeats`` times after one untimed read; median and p99 are over all
timed reads of a group. Single-threaded, in this process.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ppl_model.imageio import decode, register_heif_opener
from ppl_model.inference.preprocess import Preprocessing, prepare_image
from ppl_model.provenance import ProvenancePolicy, read_provenance
from tests import provenance_files

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "demo" / "photos"
PREP = Preprocessing(224, (0.481, 0.458, 0.408), (0.269, 0.261, 0.276))  # CLIP ViT-L/14's input
TWELVE_MP = (4032, 3024)


def encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    params: dict[str, Any] = {"quality": 90} if image_format in ("JPEG", "WEBP", "HEIF") else {}
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


def corpus(photo_count: int, large_count: int) -> dict[tuple[str, str, str], list[bytes]]:
    """(format, size, manifest) → files."""
    register_heif_opener()
    groups: dict[tuple[str, str, str], list[bytes]] = {}
    photos = sorted(PHOTOS.glob("*.png"))
    for index, path in enumerate(photos[:photo_count]):
        image = Image.open(path).convert("RGB")
        cases = [(fmt, "native", image) for fmt in ("JPEG", "PNG", "WEBP", "HEIF")]
        if index < large_count:
            large = image.resize(TWELVE_MP, Image.Resampling.LANCZOS)
            cases += [(fmt, "12mp", large) for fmt in ("JPEG", "HEIF")]
        for image_format, size, pixels in cases:
            plain = encode(pixels, image_format)
            groups.setdefault((image_format, size, "none"), []).append(plain)
            signed = provenance_files.sign(plain, image_format, provenance_files.TRAINED)
            groups.setdefault((image_format, size, "c2pa"), []).append(signed)
    return groups


def timed(files: list[bytes], work: Callable[[bytes], object], repeats: int) -> list[float]:
    samples = []
    for data in files:
        work(data)  # untimed: first-use costs (plugin registration, the c2pa context) are not per image
        for _ in range(repeats):
            started = time.perf_counter()
            work(data)
            samples.append(time.perf_counter() - started)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = np.sort(np.asarray(samples) * 1000)
    return {"median_ms": round(float(statistics.median(ordered)), 3),
            "p99_ms": round(float(np.percentile(ordered, 99)), 3), "n": len(samples)}


def decode_and_prepare(data: bytes) -> object:
    decoded = decode(data)
    return prepare_image(decoded.image, PREP, decoded.format)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed reads per file")
    parser.add_argument("--photos", type=int, default=24, help="sample photos used (at most the 24 shipped)")
    parser.add_argument("--large", type=int, default=3, help="of them, upscaled to 12 MP as well")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    policy = ProvenancePolicy(trust_anchors_pem=provenance_files.signing_chain().root_pem)
    rows: list[dict[str, Any]] = []
    for (image_format, size, manifest), files in corpus(args.photos, args.large).items():
        provenance = summary(timed(files, lambda data: read_provenance(data, policy), args.repeats))
        baseline = summary(timed(files, decode_and_prepare, args.repeats))
        rows.append({"format": image_format, "size": size, "manifest": manifest, "files": len(files),
                     "mean_file_kib": round(sum(map(len, files)) / len(files) / 1024, 1),
                     "provenance": provenance, "decode_prepare": baseline,
                     "share_of_median": round(provenance["median_ms"] / baseline["median_ms"], 4)})
    print("| format | size | manifest | files | KiB | provenance median / p99 ms | decode+prepare median / p99 ms "
          "| provenance / decode+prepare (medians) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        p, d = row["provenance"], row["decode_prepare"]
        print(f"| {row['format']} | {row['size']} | {row['manifest']} | {row['files']} | {row['mean_file_kib']} "
              f"| {p['median_ms']} / {p['p99_ms']} | {d['median_ms']} / {d['p99_ms']} "
              f"| {100 * row['share_of_median']:.1f} % |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
