"""``ppl scan``: judge image files offline, with no services: parallel decode, batched inference.

Yields one record per input file, in input order; a file that cannot be read gets a record with its
``error`` reason instead of a verdict, and the scan goes on. Each judged file's provenance (C2PA, IPTC, generator
metadata: ``ppl_model.provenance``) is read from the same bytes and recorded; the label follows
``provenance.decide`` (``decision`` says what decided it), and ``score``/``model_label`` are the model's own.
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

from ppl_model.categories import Decision, Label
from ppl_model.imageio import UnreadableImage, decode, list_images
from ppl_model.inference.base import InferenceBackend
from ppl_model.inference.preprocess import (
    Perturbation,
    Prepared,
    Preprocessing,
    aggregate,
    prepare_image,
    prepare_jpeg,
)
from ppl_model.inference.verdict import make_verdict
from ppl_model.provenance import Provenance, ProvenancePolicy, decide, read_provenance
from ppl_model.reasons import Reason

DEFAULT_PROVENANCE = ProvenancePolicy()  # no trust anchors; unsigned metadata is evidence only


@dataclass
class ScanRecord:
    path: str
    sha256: str = ""
    score: float | None = None
    label: Label | Literal[""] = ""  # "" when the file could not be judged; else as ``decision`` decided it
    decision: Decision | Literal[""] = ""  # what decided the label: c2pa, metadata or model
    model_label: Label | Literal[""] = ""  # the model's own label at the threshold, whatever decided
    threshold: float | None = None
    width: int | None = None
    height: int | None = None
    format: str = ""
    frames: int | None = None  # frames the file holds (animations, TIFF pages, HEIF images); the first is judged
    crops: int = 0
    patch_mean: float | None = None
    patch_max: float | None = None
    patch_p90: float | None = None
    patch_frac_above: float | None = None
    top_patch_row: int | None = None
    top_patch_col: int | None = None
    error: Reason | Literal[""] = ""  # why the file could not be judged ("" when it was)
    error_detail: str = ""
    provenance: dict[str, Any] | None = None  # Provenance.to_json() of a judged file


class ScanSummary(TypedDict):
    """What ``run_scan`` counted; ``ppl scan`` prints it as one JSON object (a dict, so it serialises as is)."""

    files: int
    judged: int
    fake: int  # judged files labelled fake
    decisions: dict[Decision, int]  # judged files by what decided their label
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


@dataclass(frozen=True)
class _Loaded:
    sha256: str
    prepared: Prepared | UnreadableImage
    frames: int | None = None
    provenance: Provenance | None = None


def _load(path: Path, prep: Preprocessing, perturb: Perturbation | None,
          policy: ProvenancePolicy | None) -> _Loaded:
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = Reason.MISSING if isinstance(exc, FileNotFoundError) else Reason.UNREADABLE
        return _Loaded("", UnreadableImage(path, reason, str(exc)))
    digest = hashlib.sha256(data).hexdigest()
    try:
        # A plain JPEG's crops from their regions alone (bit-identical to a full decode; one frame), unless the
        # whole picture is to be perturbed first.
        prepared = prepare_jpeg(data, prep) if perturb is None else None
        frames: int | None = 1
        if prepared is None:
            decoded = decode(data, name=str(path))
            image = decoded.image if perturb is None else perturb(decoded.image)
            prepared, frames = prepare_image(image, prep, decoded.format), decoded.frames
    except UnreadableImage as exc:
        return _Loaded(digest, exc)
    # Read only for a file that decodes, as the worker does: a failed one records no provenance
    provenance = read_provenance(data, policy) if policy is not None else None
    return _Loaded(digest, prepared, frames, provenance)


def scan(files: Sequence[Path], backend: InferenceBackend, prep: Preprocessing, threshold: float, *,
         how: str = "max", batch_size: int = 64, workers: int = 4, progress: bool = True,
         perturb: Perturbation | None = None, provenance: ProvenancePolicy | None = DEFAULT_PROVENANCE
         ) -> Iterator[ScanRecord]:
    """Decode the next batch in a thread pool while the current one is inferred. ``perturb`` alters each
    decoded image before preprocessing (robustness evaluation). ``provenance``: how provenance is read and
    whether unsigned metadata may decide; ``None`` reads none, and the model decides every label."""
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    bar = tqdm(total=len(files), unit="img", disable=not progress, dynamic_ncols=True, leave=False)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        def submit(chunk: Sequence[Path]) -> list[Future]:
            return [pool.submit(_load, path, prep, perturb, provenance) for path in chunk]

        pending = submit(chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            loaded = [future.result() for future in pending]
            pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []
            good = [(i, item.prepared) for i, item in enumerate(loaded) if isinstance(item.prepared, Prepared)]
            per_image = {}
            if good:
                crops = torch.cat([prepared.crops for _, prepared in good]).to(backend.device)
                combined = aggregate(backend.predict(crops), [len(p.crops) for _, p in good], how)
                per_image = {i: prediction for (i, _), prediction in zip(good, combined, strict=True)}
            for i, (path, item) in enumerate(zip(chunk, loaded, strict=True)):
                prepared = item.prepared
                if isinstance(prepared, UnreadableImage):
                    yield ScanRecord(path=str(path), sha256=item.sha256, error=prepared.reason,
                                     error_detail=prepared.detail)
                    continue
                prediction = per_image[i]
                verdict = make_verdict(float(prediction.image_prob[0]), prediction.patch_prob[0], threshold)
                trust_unsigned = provenance is not None and provenance.trust_unsigned_metadata
                ruling = decide(item.provenance, verdict.label, trust_unsigned_metadata=trust_unsigned)
                fields = dataclasses.asdict(verdict) | {"label": ruling.label}
                yield ScanRecord(path=str(path), sha256=item.sha256, width=prepared.width, height=prepared.height,
                                 format=prepared.format, frames=item.frames, crops=len(prepared.crops),
                                 decision=ruling.decision, model_label=verdict.label,
                                 provenance=item.provenance.to_json() if item.provenance is not None else None,
                                 **fields)
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
            if row["provenance"] is not None:  # one cell: the document as JSON
                row["provenance"] = json.dumps(row["provenance"], ensure_ascii=False)
            self.csv.writerow(row)
        else:
            self.stream.write(json.dumps(row) + "\n")


def run_scan(paths: Sequence[str], backend: InferenceBackend, prep: Preprocessing, threshold: float,
             out: IO[str], fmt: str, **options: Any) -> ScanSummary:
    """Scan, write each record as it comes, and return a summary (counted as it goes: no records kept)."""
    started = time.perf_counter()
    writer = RecordWriter(out, fmt)
    files, judged, fake, errors, decisions = 0, 0, 0, Counter[Reason](), Counter[Decision]()
    for record in scan(collect_files(paths), backend, prep, threshold, **options):
        writer.write(record)
        files += 1
        if record.error:
            errors[record.error] += 1
        else:
            judged += 1
            fake += record.label == Label.FAKE
            if record.decision:
                decisions[record.decision] += 1
    seconds = time.perf_counter() - started
    return ScanSummary(files=files, judged=judged, fake=fake, decisions=dict(decisions), errors=dict(errors),
                       seconds=round(seconds, 3),
                       images_per_s=round(judged / seconds, 2) if seconds else None)
