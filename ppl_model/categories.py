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


class Decision(StrEnum):
    """What decided a verdict's label (``ppl_model.provenance.decide``): a validating C2PA manifest that declares
    trained-algorithmic media, unsigned metadata that declares a generator (only when the operator trusts it),
    or the model's score."""

    C2PA = "c2pa"
    METADATA = "metadata"
    MODEL = "model"


class ProvenanceKind(StrEnum):
    """The strongest provenance signal an image carries, strongest first; ``NONE`` when it carries none."""

    C2PA = "c2pa"  # a C2PA manifest (whatever its validation state)
    IPTC = "iptc"  # an IPTC digital source type in the XMP packet
    GENERATOR_METADATA = "generator_metadata"  # a generator's own text chunks, or a known generator's name
    NONE = "none"


class C2paState(StrEnum):
    """A C2PA manifest's validation state, as c2pa-rs reports it (``Invalid``/``Valid``/``Trusted``), lower-cased.
    ``TRUSTED``: its signing chain ends at one of the operator's trust anchors; ``VALID``: intact and signed,
    by a chain nobody configured as trusted; ``INVALID``: altered, damaged or wrongly signed."""

    INVALID = "invalid"
    VALID = "valid"
    TRUSTED = "trusted"


def choices(enum: type[StrEnum]) -> str:
    """``a, b or c``: for error messages that list what is accepted."""
    values = [member.value for member in enum]
    return f"{', '.join(values[:-1])} or {values[-1]}" if len(values) > 1 else values[0]
