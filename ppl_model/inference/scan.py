"""``ppl scan``: judge image files offline, with no services: parallel decode, batched inference.

Yields one record per input file, in input order; a file that cannot be read gets a record with its
``error`` reason instead of a verdict, and the scan goes on.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypedDict

import torch
from tqdm import tqdm

from ppl_model.categories import Label
from ppl_model.imageio import UnreadableImage, decode_rgb, list_images
from ppl_model.inference.base import InferenceBackend
from ppl_model.inference.preprocess import (
    Perturbation,
    Prepared,
    Preprocessing,
    aggregate,
    prepare,
    prepare_image,
)
from ppl_model.inference.verdict import make_verdict
from ppl_model.reasons import Reason


@dataclass
class ScanRecord:
    path: str
    sha256: str = ""
    score: float | None = None
    label: Label | Literal[""] = ""  # "" when the file could not be judged
    threshold: float | None = None
    width: int | None = None
    height: int | None = None
    format: str = ""
    crops: int = 0
    patch_mean: float | None = None
    patch_max: float | None = None
    patch_p90: float | None = None
    patch_frac_above: float | None = None
    top_patch_row: int | None = None
    top_patch_col: int | None = None
    error: Reason | Literal[""] = ""  # why the file could not be judged ("" when it was)
    error_detail: str = ""


class ScanSummary(TypedDict):
    """What ``run_scan`` counted; ``ppl scan`` prints it as one JSON object (a dict, so it serialises as is)."""

    files: int
    judged: int
    fake: int  # judged files labelled fake
    errors: dict[Reason, int]  # files that could not be judged, by reason
    seconds: float
    images_per_s: float | None


def collect_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named directly are always scanned; folders contribute their image files, recursively."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(list_images(path))
        else:
            files.append(path)
    return files


def _load(path: Path, prep: Preprocessing, perturb: Perturbation | None) -> tuple[str, Prepared | UnreadableImage]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = Reason.MISSING if isinstance(exc, FileNotFoundError) else Reason.UNREADABLE
        return "", UnreadableImage(path, reason, str(exc))
    digest = hashlib.sha256(data).hexdigest()
    try:
        if perturb is None:
            return digest, prepare(data, prep, name=str(path))
        img, image_format = decode_rgb(data, name=str(path))
        return digest, prepare_image(perturb(img), prep, image_format)
    except UnreadableImage as exc:
        return digest, exc


def scan(files: Sequence[Path], backend: InferenceBackend, prep: Preprocessing, threshold: float, *,
         how: str = "max", batch_size: int = 64, workers: int = 4, progress: bool = True,
         perturb: Perturbation | None = None) -> Iterator[ScanRecord]:
    """Decode the next batch in a thread pool while the current one is inferred. ``perturb`` alters each
    decoded image before preprocessing (robustness evaluation)."""
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    bar = tqdm(total=len(files), unit="img", disable=not progress, dynamic_ncols=True, leave=False)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        def submit(chunk: Sequence[Path]) -> list[Future]:
            return [pool.submit(_load, path, prep, perturb) for path in chunk]

        pending = submit(chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            loaded = [future.result() for future in pending]
            pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []
            good = [(i, prepared) for i, (_, prepared) in enumerate(loaded) if isinstance(prepared, Prepared)]
            per_image = {}
            if good:
                crops = torch.cat([prepared.crops for _, prepared in good]).to(backend.device)
                combined = aggregate(backend.predict(crops), [len(p.crops) for _, p in good], how)
                per_image = {i: prediction for (i, _), prediction in zip(good, combined, strict=True)}
            for i, (path, (digest, prepared)) in enumerate(zip(chunk, loaded, strict=True)):
                if isinstance(prepared, UnreadableImage):
                    yield ScanRecord(path=str(path), sha256=digest, error=prepared.reason, error_detail=prepared.detail)
                    continue
                prediction = per_image[i]
                verdict = make_verdict(float(prediction.image_prob[0]), prediction.patch_prob[0], threshold)
                yield ScanRecord(path=str(path), sha256=digest, width=prepared.width, height=prepared.height,
                                 format=prepared.format, crops=len(prepared.crops), **dataclasses.asdict(verdict))
            bar.update(len(chunk))
    bar.close()


class RecordWriter:
    """JSON lines or CSV, chosen by the output file's extension."""

    def __init__(self, stream: IO[str], fmt: str):
        self.stream, self.fmt = stream, fmt
        self.csv = csv.DictWriter(stream, [f.name for f in dataclasses.fields(ScanRecord)]) if fmt == "csv" else None
        if self.csv:
            self.csv.writeheader()

    def write(self, record: ScanRecord) -> None:
        row = dataclasses.asdict(record)
        if self.csv:
            self.csv.writerow(row)
        else:
            self.stream.write(json.dumps(row) + "\n")


def run_scan(paths: Sequence[str], backend: InferenceBackend, prep: Preprocessing, threshold: float,
             out: IO[str], fmt: str, **options: Any) -> ScanSummary:
    """Scan, write each record as it comes, and return a summary (counted as it goes: no records kept)."""
    started = time.perf_counter()
    writer = RecordWriter(out, fmt)
    files, judged, fake, errors = 0, 0, 0, Counter[Reason]()
    for record in scan(collect_files(paths), backend, prep, threshold, **options):
        writer.write(record)
        files += 1
        if record.error:
            errors[record.error] += 1
        else:
            judged += 1
            fake += record.label == Label.FAKE
    seconds = time.perf_counter() - started
    return ScanSummary(files=files, judged=judged, fake=fake, errors=dict(errors), seconds=round(seconds, 3),
                       images_per_s=round(judged / seconds, 2) if seconds else None)
