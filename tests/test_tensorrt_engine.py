"""TensorRT engine: sidecar checks, argument validation and error messages without TensorRT; a GPU round trip."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from ppl_model.config import ModelConfig
from ppl_model.detector import build_detector
from ppl_model.inference.base import BackendError
from ppl_model.inference.tensorrt_engine import (
    ENGINE_FILE,
    SIDECAR_FILE,
    TIMING_CACHE_FILE,
    EngineSidecar,
    TensorRTBackend,
    build_engine,
    check_sidecar,
)
from ppl_model.model_dir import ModelInfo, load_model_dir, save_model_dir

EXTRA_HINT = 'pip install "ppl-detector[tensorrt]"'

SIDECAR = EngineSidecar(tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                        precision="fp16", min_batch=1, opt_batch=32, max_batch=128, input_size=224,
                        model_version_id="abc123")
MATCHING = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
            "model_version_id": "abc123"}


@pytest.fixture
def model_dir(tmp_path: Path) -> tuple[Path, ModelInfo]:
    detector = build_detector(ModelConfig(arch="clip", size="tiny", input_size=32, patch_size=8))
    path = tmp_path / "m"
    return path, save_model_dir(detector, path)


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import tensorrt`` fails here even where TensorRT is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def write_onnx(path: Path, version_id: str) -> None:
    """A tiny valid ONNX file carrying a version id, as ``ppl export`` writes one (the graph itself is a stand-in)."""
    graph = helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["image_logit"])], "stub",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch"])],
                              [helper.make_tensor_value_info("image_logit", TensorProto.FLOAT, ["batch"])])
    model = helper.make_model(graph)
    helper.set_model_props(model, {"ppl_version_id": version_id})
    onnx.save_model(model, str(path))


def test_sidecar_round_trip(tmp_path: Path) -> None:
    path = tmp_path / SIDECAR_FILE
    path.write_text(SIDECAR.to_json())
    assert json.loads(path.read_text())["compute_capability"] == "9.0"
    assert EngineSidecar.from_json(path) == SIDECAR


def test_sidecar_ignores_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / SIDECAR_FILE
    path.write_text(json.dumps(dataclasses.asdict(SIDECAR) | {"built_by": "a later version"}))
    assert EngineSidecar.from_json(path) == SIDECAR


def test_sidecar_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="is missing: rebuild with `ppl build-engine --model"):
        EngineSidecar.from_json(tmp_path / SIDECAR_FILE)


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_sidecar_unparsable(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / SIDECAR_FILE
    path.write_text(text)
    with pytest.raises(BackendError, match=message):
        EngineSidecar.from_json(path)


def test_sidecar_incomplete_names_every_problem(tmp_path: Path) -> None:
    raw = dataclasses.asdict(SIDECAR)
    del raw["gpu_name"]
    raw["max_batch"] = "128"
    raw["min_batch"] = True
    path = tmp_path / SIDECAR_FILE
    path.write_text(json.dumps(raw))
    with pytest.raises(BackendError) as info:
        EngineSidecar.from_json(path)
    message = str(info.value)
    assert "gpu_name is missing" in message
    assert "max_batch must be int, not str" in message
    assert "min_batch must be int, not bool" in message


def test_check_sidecar_accepts_exact_match() -> None:
    check_sidecar(SIDECAR, **MATCHING)


@pytest.mark.parametrize(("key", "value", "named"), [
    ("tensorrt_version", "10.5.0", "TensorRT version '10.3.0' != '10.5.0'"),
    ("gpu_name", "NVIDIA A100-SXM4-80GB", "GPU 'NVIDIA H100 80GB HBM3' != 'NVIDIA A100-SXM4-80GB'"),
    ("compute_capability", "8.0", "compute capability '9.0' != '8.0'"),
    ("model_version_id", "def456", "model version 'abc123' != 'def456'"),
])
def test_check_sidecar_refuses_each_mismatch(key: str, value: str, named: str) -> None:
    with pytest.raises(BackendError) as info:
        check_sidecar(SIDECAR, **(MATCHING | {key: value}), model_dir="/models/m")
    message = str(info.value)
    assert named in message
    assert message.count("!=") == 1
    assert "rebuild with `ppl build-engine --model /models/m`" in message


def test_check_sidecar_names_all_mismatches_in_one_message() -> None:
    with pytest.raises(BackendError) as info:
        check_sidecar(SIDECAR, tensorrt_version="10.5.0", gpu_name="NVIDIA A100-SXM4-80GB",
                      compute_capability="8.0", model_version_id="def456")
    message = str(info.value)
    assert message.startswith("engine was built for TensorRT 10.3.0 on NVIDIA H100 80GB HBM3 (sm 9.0) for model "
                              "abc123; this process has TensorRT 10.5.0 on NVIDIA A100-SXM4-80GB (sm 8.0) for model "
                              "def456")
    for what in ("TensorRT version", "GPU", "compute capability", "model version"):
        assert f"{what} '" in message
    assert message.count("!=") == 4


def test_build_engine_without_tensorrt_names_the_extra(model_dir: tuple[Path, ModelInfo], no_tensorrt: None) -> None:
    path, info = model_dir
    write_onnx(path / "model.onnx", info.version_id)
    with pytest.raises(BackendError, match="TensorRT is not installed") as caught:
        build_engine(path)
    assert EXTRA_HINT in str(caught.value)
    assert not (path / ENGINE_FILE).exists() and not (path / SIDECAR_FILE).exists()


def test_tensorrt_older_than_10_is_refused(model_dir: tuple[Path, ModelInfo], monkeypatch: pytest.MonkeyPatch) -> None:
    path, info = model_dir
    write_onnx(path / "model.onnx", info.version_id)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(BackendError, match="TensorRT 8.6.1 is too old"):
        build_engine(path)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"precision": "int8"}, "precision must be one of fp32, fp16, bf16, not 'int8'"),
    ({"min_batch": 0, "opt_batch": 1, "max_batch": 1}, "1 <= min <= opt <= max, got min 0"),
    ({"min_batch": 4, "opt_batch": 2, "max_batch": 8}, "got min 4, opt 2, max 8"),
    ({"min_batch": 1, "opt_batch": 16, "max_batch": 8}, "got min 1, opt 16, max 8"),
    ({"workspace_gib": 0.0}, "workspace_gib must be positive"),
])
def test_build_engine_refuses_bad_arguments_before_tensorrt(model_dir: tuple[Path, ModelInfo], no_tensorrt: None,
                                                            kwargs: dict, message: str) -> None:
    path, info = model_dir
    write_onnx(path / "model.onnx", info.version_id)
    with pytest.raises(BackendError, match=message):  # not "TensorRT is not installed": checked first
        build_engine(path, **kwargs)


def test_build_engine_without_onnx_says_to_export(model_dir: tuple[Path, ModelInfo], no_tensorrt: None) -> None:
    path, _ = model_dir
    with pytest.raises(BackendError, match=r"model.onnx is missing: run `ppl export --model .*` first"):
        build_engine(path)


def test_build_engine_refuses_stale_onnx(model_dir: tuple[Path, ModelInfo], no_tensorrt: None) -> None:
    path, info = model_dir
    write_onnx(path / "model.onnx", "0123456789abcdef")
    with pytest.raises(BackendError, match=f"model version '0123456789abcdef', but model.json says "
                                           f"'{info.version_id}': re-run `ppl export"):
        build_engine(path)


def test_build_engine_refuses_unreadable_onnx(model_dir: tuple[Path, ModelInfo], no_tensorrt: None) -> None:
    path, _ = model_dir
    (path / "model.onnx").write_bytes(b"\xff\x00 definitely not protobuf \x13\x37" * 10)
    with pytest.raises(BackendError, match="cannot read .*model.onnx"):
        build_engine(path)


def test_build_engine_refuses_a_non_model_directory(tmp_path: Path, no_tensorrt: None) -> None:
    with pytest.raises(BackendError, match="model directory not found"):
        build_engine(tmp_path / "nowhere")


def test_backend_without_plan_says_to_build(model_dir: tuple[Path, ModelInfo], no_tensorrt: None) -> None:
    path, _ = model_dir
    with pytest.raises(BackendError, match=r"model.plan is missing: run `ppl build-engine --model .*` first"):
        TensorRTBackend(path)


def test_backend_without_tensorrt_names_the_extra(model_dir: tuple[Path, ModelInfo], no_tensorrt: None) -> None:
    path, info = model_dir
    (path / ENGINE_FILE).write_bytes(b"plan")
    (path / SIDECAR_FILE).write_text(dataclasses.replace(SIDECAR, model_version_id=info.version_id).to_json())
    with pytest.raises(BackendError) as caught:
        TensorRTBackend(path)
    assert EXTRA_HINT in str(caught.value)


def test_backend_with_plan_but_no_sidecar(model_dir: tuple[Path, ModelInfo], no_tensorrt: None) -> None:
    path, _ = model_dir
    (path / ENGINE_FILE).write_bytes(b"plan")
    with pytest.raises(BackendError, match="model.plan.json is missing"):
        TensorRTBackend(path)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("tensorrt")),
                    reason="needs a CUDA GPU and TensorRT installed")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_torch(model_dir: tuple[Path, ModelInfo], precision: str) -> None:
    export = pytest.importorskip("ppl_model.inference.export")
    path, info = model_dir
    export.export_onnx(path)
    # min 2 pads a batch of 1; max 2 splits a batch of 3 into 2 + 1 (the 1 padded again).
    sidecar = build_engine(path, precision=precision, min_batch=2, opt_batch=2, max_batch=2, workspace_gib=1.0)
    assert sidecar.model_version_id == info.version_id and sidecar.precision == precision
    assert (path / ENGINE_FILE).is_file() and (path / TIMING_CACHE_FILE).is_file()
    assert EngineSidecar.from_json(path / SIDECAR_FILE) == sidecar
    backend = TensorRTBackend(path)
    detector, _ = load_model_dir(path)
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        pixels = torch.randn(batch, 3, info.input_size, info.input_size, generator=generator)
        got = backend.predict(pixels)
        with torch.inference_mode():
            out = detector(pixels)
        expected_image = torch.sigmoid(out.image_logit).numpy()
        expected_patch = torch.sigmoid(out.patch_logits).numpy()
        assert got.image_prob.shape == (batch,) and got.patch_prob.shape == (batch, *info.grid)
        assert abs(got.image_prob - expected_image).max() < 1e-2
        assert abs(got.patch_prob - expected_patch).max() < 1e-2


@pytest.fixture
def tensorrt_11(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TensorRT 11 stand-in (no FP16/BF16 builder flags) on a pretend GPU: enough to reach the choice of
    ONNX file, which happens before any builder object is made."""
    fake = types.SimpleNamespace(__version__="11.0.0", BuilderFlag=types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Pretend GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_tensorrt_11_fp16_needs_the_float16_export(model_dir: tuple[Path, ModelInfo], tensorrt_11: None) -> None:
    path, info = model_dir
    write_onnx(path / "model.onnx", info.version_id)
    with pytest.raises(BackendError, match="--fp16"):
        build_engine(path, precision="fp16")
    write_onnx(path / "model.fp16.onnx", "another-version")
    with pytest.raises(BackendError, match="re-run `ppl export"):
        build_engine(path, precision="fp16")


def test_tensorrt_11_refuses_bf16(model_dir: tuple[Path, ModelInfo], tensorrt_11: None) -> None:
    path, info = model_dir
    write_onnx(path / "model.onnx", info.version_id)
    with pytest.raises(BackendError, match="float32 and float16 only"):
        build_engine(path, precision="bf16")
