"""ppl_model.categories: backends, precisions and labels are StrEnums whose members are the strings users type
and rows hold; plain strings are accepted where users give them and checked there, once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from ppl_model.categories import Backend, Label, Precision, choices
from ppl_model.inference.backends import BACKENDS, load_backend
from ppl_model.inference.base import BackendError
from ppl_model.inference.scan import ScanRecord
from ppl_model.inference.tensorrt_engine import SIDECAR_FILE, EngineSidecar
from ppl_model.inference.verdict import make_verdict
from ppl_model.reasons import Reason


def test_the_values_are_the_strings_that_are_typed_and_stored() -> None:
    assert [b.value for b in Backend] == ["auto", "tensorrt", "torch", "onnxruntime"] == list(BACKENDS)
    assert [p.value for p in Precision] == ["fp32", "bf16", "fp16"]
    assert [label.value for label in Label] == ["real", "fake"]
    assert choices(Precision) == "fp32, bf16 or fp16" and choices(Label) == "real or fake"


def test_verdict_labels_are_members_and_serialise_as_their_values() -> None:
    assert make_verdict(0.7, np.zeros((2, 2)), 0.5).label is Label.FAKE
    assert make_verdict(0.2, np.zeros((2, 2)), 0.5).label is Label.REAL
    record = ScanRecord(path="a.png", label=Label.FAKE)
    failed = ScanRecord(path="b.png", error=Reason.CORRUPT)
    rows = [json.loads(json.dumps(dataclasses.asdict(r))) for r in (record, failed)]
    assert (rows[0]["label"], rows[1]["label"], rows[1]["error"]) == ("fake", "", "corrupt")


def test_backend_names_and_precisions_are_checked_before_anything_loads(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        load_backend("tpu", tmp_path)
    with pytest.raises(BackendError, match="precision must be fp32, bf16 or fp16, not 'fp8'"):
        load_backend("torch", tmp_path, precision="fp8")


def test_an_engine_sidecar_precision_becomes_a_member_or_is_refused(tmp_path: Path) -> None:
    sidecar = EngineSidecar(tensorrt_version="10.3.0", gpu_name="GPU", compute_capability="9.0",
                            precision=Precision.FP16, min_batch=1, opt_batch=8, max_batch=8, input_size=32,
                            model_version_id="abc")
    path = tmp_path / SIDECAR_FILE
    path.write_text(sidecar.to_json())
    assert json.loads(path.read_text())["precision"] == "fp16"
    assert EngineSidecar.from_json(path).precision is Precision.FP16
    path.write_text(json.dumps(dataclasses.asdict(sidecar) | {"precision": "fp8"}))
    with pytest.raises(BackendError, match="precision must be one of fp32, fp16, bf16, not 'fp8'"):
        EngineSidecar.from_json(path)
