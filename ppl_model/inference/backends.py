"""Choosing an inference backend by name.

``auto`` takes the fastest that works here: TensorRT (an engine built for this GPU), then torch on CUDA,
then onnxruntime on the CPU (when ``model.onnx`` has been exported), then torch on the CPU. It says why it
passed over each.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ppl_model.categories import Backend, Precision, choices
from ppl_model.inference.base import BackendError, InferenceBackend

BACKENDS = tuple(Backend)


def load_backend(name: Backend | str, model_dir: str | Path, *, device: str | None = None,
                 precision: Precision | str = Precision.FP32, cuda_graphs: bool = False,
                 max_batch: int = 256) -> InferenceBackend:
    """The backend ``name``. Names and precisions may be given as the strings users type (``--backend``,
    ``Detector.load``): checked here, once, and members from here on."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if precision not in tuple(Precision):
        raise BackendError(f"precision must be {choices(Precision)}, not {precision!r}")
    name, precision = Backend(name), Precision(precision)
    if name is Backend.AUTO:
        backend, _ = choose_backend(model_dir, precision=precision, cuda_graphs=cuda_graphs, max_batch=max_batch)
        return backend
    if name is Backend.TENSORRT:
        from ppl_model.inference.tensorrt_engine import TensorRTBackend

        return TensorRTBackend(model_dir, device=device or "cuda:0")
    if name is Backend.TORCH:
        default = "cuda:0" if torch.cuda.is_available() else "cpu"
        return _torch(model_dir, device or default, precision, cuda_graphs, max_batch)
    from ppl_model.inference.onnx_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model_dir, max_batch=max_batch)


def _torch(model_dir: str | Path, device: str, precision: Precision, cuda_graphs: bool,
           max_batch: int) -> InferenceBackend:
    from ppl_model.inference.torch_backend import TorchBackend

    return TorchBackend(model_dir, device=device, precision=precision, cuda_graphs=cuda_graphs, max_batch=max_batch)


def choose_backend(model_dir: str | Path, *, precision: Precision = Precision.FP32, cuda_graphs: bool = False,
                   max_batch: int = 256) -> tuple[InferenceBackend, list[str]]:
    """The first backend that loads, and why each one before it was passed over."""
    passed_over: list[str] = []
    if torch.cuda.is_available():
        if importlib.util.find_spec("tensorrt") is None:
            passed_over.append("tensorrt: not installed")
        else:
            try:
                return load_backend(Backend.TENSORRT, model_dir), passed_over
            except BackendError as exc:
                passed_over.append(f"tensorrt: {exc}")
        return _torch(model_dir, "cuda:0", precision, cuda_graphs, max_batch), passed_over
    passed_over.append("tensorrt, torch on CUDA: no CUDA device")
    try:
        return load_backend(Backend.ONNXRUNTIME, model_dir, max_batch=max_batch), passed_over
    except BackendError as exc:
        passed_over.append(f"onnxruntime: {exc}")
    return _torch(model_dir, "cpu", Precision.FP32, False, max_batch), passed_over
