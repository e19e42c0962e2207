"""Choosing an inference backend by name.

``auto`` takes the fastest that works here: TensorRT (an engine built for this GPU), then torch on CUDA,
then onnxruntime on the CPU (when ``model.onnx`` has been exported), then torch on the CPU. It says why it
passed over each.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ppl_model.inference.base import BackendError, InferenceBackend

BACKENDS = ("auto", "tensorrt", "torch", "onnxruntime")


def load_backend(name: str, model_dir: str | Path, *, device: str | None = None, precision: str = "fp32",
                 cuda_graphs: bool = False, max_batch: int = 256) -> InferenceBackend:
    if name == "auto":
        backend, _ = choose_backend(model_dir, precision=precision, cuda_graphs=cuda_graphs, max_batch=max_batch)
        return backend
    if name == "tensorrt":
        from ppl_model.inference.tensorrt_engine import TensorRTBackend

        return TensorRTBackend(model_dir, device=device or "cuda:0")
    if name == "torch":
        default = "cuda:0" if torch.cuda.is_available() else "cpu"
        return _torch(model_dir, device or default, precision, cuda_graphs, max_batch)
    if name == "onnxruntime":
        from ppl_model.inference.onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model_dir, max_batch=max_batch)
    raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


def _torch(model_dir, device, precision, cuda_graphs, max_batch) -> InferenceBackend:
    from ppl_model.inference.torch_backend import TorchBackend

    return TorchBackend(model_dir, device=device, precision=precision, cuda_graphs=cuda_graphs, max_batch=max_batch)


def choose_backend(model_dir: str | Path, *, precision: str = "fp32", cuda_graphs: bool = False,
                   max_batch: int = 256) -> tuple[InferenceBackend, list[str]]:
    """The first backend that loads, and why each one before it was passed over."""
    passed_over: list[str] = []
    if torch.cuda.is_available():
        if importlib.util.find_spec("tensorrt") is None:
            passed_over.append("tensorrt: not installed")
        else:
            try:
                return load_backend("tensorrt", model_dir), passed_over
            except BackendError as exc:
                passed_over.append(f"tensorrt: {exc}")
        return _torch(model_dir, "cuda:0", precision, cuda_graphs, max_batch), passed_over
    passed_over.append("tensorrt, torch on CUDA: no CUDA device")
    try:
        return load_backend("onnxruntime", model_dir, max_batch=max_batch), passed_over
    except BackendError as exc:
        passed_over.append(f"onnxruntime: {exc}")
    return _torch(model_dir, "cpu", "fp32", False, max_batch), passed_over
