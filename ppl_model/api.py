"""The library API for Python users: load a model directory once, judge images in batches.

    from ppl_model import Detector

    detector = Detector.load("runs/demo/model")          # backend "auto": TensorRT, torch, onnxruntime
    for result in detector.detect(["a.jpg", open("b.png", "rb").read()]):
        print(result.label, result.score, result.patch_grid.shape)

The same decoding (``ppl_model.imageio``), preprocessing, aggregation and verdict as ``ppl scan`` and the
worker, so a score here is the score the service stores for the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from ppl_model.categories import Backend, Label, Precision
from ppl_model.imageio import UnreadableImage, decode_rgb, to_rgb
from ppl_model.inference.backends import load_backend
from ppl_model.inference.base import InferenceBackend
from ppl_model.inference.preprocess import Prepared, Preprocessing, aggregate, prepare_image
from ppl_model.inference.verdict import make_verdict
from ppl_model.model_dir import ModelInfo, read_model_info
from ppl_model.reasons import Reason

ImageInput = str | Path | bytes | Image.Image


@dataclass(frozen=True)
class Detection:
    """The verdict on one input, or why there is none (``error``, a stable reason code such as
    ``not_an_image``; ``score`` and ``patch_grid`` are then None).

    ``sha256`` (of the encoded bytes; empty for a PIL image), ``format``, ``width`` and ``height`` identify
    the content as the worker's ``verdicts`` rows do, so results can be joined with stored verdicts or with
    provenance read from the same bytes."""

    source: str  # the path, or "<bytes #i>" / "<image #i>" by position in the call
    model_version: str
    threshold: float
    score: float | None = None  # probability that the image is AI-generated
    label: Label | Literal[""] = ""  # FAKE when score >= threshold, else REAL; "" when not judged
    patch_grid: np.ndarray | None = None  # (rows, cols) per-patch probabilities of the deciding crop
    patch_max: float | None = None
    patch_frac_above: float | None = None  # share of patches at or above the threshold
    top_patch: tuple[int, int] | None = None  # (row, col) of the most generated-looking patch
    sha256: str = ""
    format: str = ""
    width: int | None = None
    height: int | None = None
    error: Reason | Literal[""] = ""
    error_detail: str = ""


class Detector:
    """A loaded model: ``Detector.load(model_dir)``, then ``detect(images)`` as often as needed."""

    def __init__(self, backend: InferenceBackend, info: ModelInfo, preprocessing: Preprocessing,
                 aggregation: str = "max"):
        self.backend = backend
        self.info = info
        self.preprocessing = preprocessing
        self.aggregation = aggregation

    @classmethod
    def load(cls, model_dir: str | Path, backend: Backend | str = Backend.AUTO, *, device: str | None = None,
             precision: Precision | str = Precision.FP32, tiles: int = 1, aggregation: str = "max") -> Detector:
        """``backend``: auto, tensorrt, torch or onnxruntime. ``tiles`` > 1 judges up to that many crops
        spread over a large image and combines them by ``aggregation`` (max or mean)."""
        info = read_model_info(model_dir)
        served = load_backend(backend, model_dir, device=device, precision=precision)
        return cls(served, info, Preprocessing.for_model(info, tiles=tiles), aggregation)

    @property
    def threshold(self) -> float:
        return self.info.threshold

    def detect(self, images: Iterable[ImageInput], batch_size: int = 32) -> list[Detection]:
        """One ``Detection`` per input, in order. Inputs: file paths, encoded bytes, or PIL images. An input
        that cannot be decoded gets a Detection with its ``error`` reason; the others are still judged."""
        results: list[Detection] = []
        batch: list[tuple[int, Detection, Prepared]] = []
        for index, image in enumerate(images):
            header, prepared = self._prepare(index, image)
            results.append(header)  # replaced by its verdict when its batch runs
            if prepared is None:
                continue
            batch.append((index, header, prepared))
            if len(batch) >= batch_size:
                self._judge(batch, results)
                batch = []
        if batch:
            self._judge(batch, results)
        return results

    def _prepare(self, index: int, image: ImageInput) -> tuple[Detection, Prepared | None]:
        version, threshold = self.info.version_id, self.info.threshold
        if isinstance(image, Image.Image):
            rgb = to_rgb(ImageOps.exif_transpose(image))
            prepared = prepare_image(rgb, self.preprocessing, image.format or "")
            return Detection(source=f"<image #{index}>", model_version=version, threshold=threshold,
                             format=image.format or "", width=rgb.width, height=rgb.height), prepared
        if isinstance(image, bytes | bytearray | memoryview):
            source, data = f"<bytes #{index}>", bytes(image)
        else:
            source = str(image)
            try:
                data = Path(image).read_bytes()
            except OSError as exc:
                reason = Reason.MISSING if isinstance(exc, FileNotFoundError) else Reason.UNREADABLE
                return Detection(source=source, model_version=version, threshold=threshold, error=reason,
                                 error_detail=str(exc)), None
        digest = hashlib.sha256(data).hexdigest()
        try:
            rgb, image_format = decode_rgb(data, source)
        except UnreadableImage as exc:
            return Detection(source=source, model_version=version, threshold=threshold, sha256=digest,
                             error=exc.reason, error_detail=exc.detail), None
        prepared = prepare_image(rgb, self.preprocessing, image_format)
        return Detection(source=source, model_version=version, threshold=threshold, sha256=digest,
                         format=image_format, width=rgb.width, height=rgb.height), prepared

    def _judge(self, batch: list[tuple[int, Detection, Prepared]], results: list[Detection]) -> None:
        crops = torch.cat([prepared.crops for _, _, prepared in batch]).to(self.backend.device)
        predictions = aggregate(self.backend.predict(crops), [len(p.crops) for _, _, p in batch], self.aggregation)
        for (index, header, _), prediction in zip(batch, predictions, strict=True):
            grid = np.asarray(prediction.patch_prob[0], dtype=np.float32)
            verdict = make_verdict(float(prediction.image_prob[0]), grid, self.info.threshold)
            results[index] = Detection(
                source=header.source, model_version=header.model_version, threshold=verdict.threshold,
                score=verdict.score, label=verdict.label, patch_grid=grid, patch_max=verdict.patch_max,
                patch_frac_above=verdict.patch_frac_above, top_patch=(verdict.top_patch_row, verdict.top_patch_col),
                sha256=header.sha256, format=header.format, width=header.width, height=header.height)
