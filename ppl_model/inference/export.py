"""``ppl export``: the model directory's detector as one ONNX file, checked against torch.

The graph has one input ``pixel_values`` (batch, 3, S, S) with a dynamic batch dimension and two outputs,
``image_logit`` (batch,) and ``patch_logits`` (batch, G, G). The weights are already LoRA-merged in the
model directory. The model's version id is stored in the ONNX metadata so a stale file is detected.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import torch
from torch import nn

from ppl_model.detector import PPLDetector
from ppl_model.errors import PPLError
from ppl_model.model_dir import load_model_dir

ONNX_FILE = "model.onnx"
FP16_ONNX_FILE = "model.fp16.onnx"  # for TensorRT 11, whose networks take their precision from the ONNX types
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("image_logit", "patch_logits")
VERSION_KEY = "ppl_version_id"
TOLERANCE = 1e-3
FP16_TOLERANCE = 5e-2  # on logits: float16 keeps about 3 significant digits through 24 blocks
OPSET = 18


class ExportError(PPLError, RuntimeError):
    """The exported graph is missing or disagrees with the torch model."""


class ExportReport(NamedTuple):
    path: Path
    max_abs_diff: dict[int, float]  # batch size → largest |onnx − torch| over both outputs


class LogitsOnly(nn.Module):
    """The detector's serving outputs (the PCL embeddings are for training only), float32 in and out; with
    ``dtype`` float16 the network inside computes in float16."""

    def __init__(self, detector: PPLDetector, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.detector = detector.to(dtype)
        self.dtype = dtype

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.detector(pixel_values.to(self.dtype))
        return out.image_logit.float(), out.patch_logits.float()


def verify_onnx(path: Path, model: nn.Module, input_size: int, batch_sizes: tuple[int, ...],
                seed: int = 0) -> dict[int, float]:
    """Largest absolute difference between onnxruntime (CPU) and torch on fresh random inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    diffs = {}
    for batch in batch_sizes:
        x = torch.randn(batch, 3, input_size, input_size, generator=generator)
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
        with torch.inference_mode():
            expected = model(x)
        diffs[batch] = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected, strict=True))
    return diffs


def export_onnx(model_dir: str | Path, *, fp16: bool = False, batch_sizes: tuple[int, ...] = (1, 3),
                tolerance: float | None = None) -> ExportReport:
    """Write ``model_dir/model.onnx`` (or ``model.fp16.onnx``) and check it against the float32 torch model;
    the file is only put in place if it passes."""
    model_dir = Path(model_dir)
    detector, info = load_model_dir(model_dir)
    reference = LogitsOnly(detector).eval()
    model = LogitsOnly(copy.deepcopy(detector), torch.float16).eval() if fp16 else reference
    tolerance = tolerance if tolerance is not None else FP16_TOLERANCE if fp16 else TOLERANCE
    target = model_dir / (FP16_ONNX_FILE if fp16 else ONNX_FILE)
    example = torch.zeros(2, 3, info.input_size, info.input_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    tmp = target.with_name(target.name + ".tmp")
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                                output_names=list(OUTPUT_NAMES), dynamic_shapes={"pixel_values": {0: batch}},
                                verbose=False)
    if program is None:  # only the legacy exporter (dynamo=False) returns nothing
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {VERSION_KEY: info.version_id})
    onnx.save_model(proto, str(tmp), save_as_external_data=proto.ByteSize() > 1_900_000_000)
    diffs = verify_onnx(tmp, reference, info.input_size, batch_sizes)
    worst = max(diffs.values())
    if worst > tolerance:
        tmp.unlink()
        raise ExportError(f"ONNX output differs from torch by {worst:.3g} (> {tolerance}) at batch sizes "
                          f"{diffs}; nothing written")
    os.replace(tmp, target)
    return ExportReport(target, diffs)


def onnx_version_id(path: Path) -> str:
    """The model version id an exported file was made from ("" for a file without one)."""
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return props.get(VERSION_KEY, "")
