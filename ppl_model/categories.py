"""The small closed sets of names that the CLI, the worker's settings, model directories and the database share.

Members are ``str``: they compare equal to their values, print and serialise as them, and the values are what
users type (``--backend``, ``PPL_BACKEND``) and what rows hold, so none is ever renamed. This module imports
nothing heavy: ``worker.settings`` validates environment variables with it.
"""

from __future__ import annotations

from enum import StrEnum


class Backend(StrEnum):
    """An inference backend (``ppl_model.inference.backends``); ``AUTO`` takes the fastest that works here."""

    AUTO = "auto"
    TENSORRT = "tensorrt"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"


class Precision(StrEnum):
    """Inference precision: the torch backend's autocast on CUDA, or a TensorRT engine's build flag."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Label(StrEnum):
    """A verdict's label: ``FAKE`` when the score is at or above the model's threshold."""

    REAL = "real"
    FAKE = "fake"


def choices(enum: type[StrEnum]) -> str:
    """``a, b or c``: for error messages that list what is accepted."""
    values = [member.value for member in enum]
    return f"{', '.join(values[:-1])} or {values[-1]}" if len(values) > 1 else values[0]
