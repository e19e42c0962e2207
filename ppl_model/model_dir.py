"""The model directory: the one format a trained detector is handed on in (docs/ARCHITECTURE.md, "Contracts").

    model.safetensors   detector weights, LoRA merged (a plain transformers ViT plus two linear heads)
    model.json          architecture, input size, patch grid, normalisation, threshold, version id

The version id is a hash of the weights and of the architecture description, so any change to what the
model computes gives a new id. The threshold is not part of it: calibrating changes labels, not scores,
and every stored verdict records the threshold it was judged with.

Reading ``model.json`` (``read_model_info``) needs only the standard library: torch, safetensors and the
backbones load inside the functions that handle weights, so that tools that only need a model's version
(``ppl-worker submit``, ``rescan``) do not pay for the model stack.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppl_model.errors import PPLError

if TYPE_CHECKING:
    import torch

    from ppl_model.detector import PPLDetector

MODEL_JSON = "model.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


class ModelDirError(PPLError, ValueError):
    """A model directory that is missing, incomplete, or does not match its description."""


@dataclass
class ModelInfo:
    arch: str
    backbone_config: dict[str, Any]
    input_size: int
    patch_size: int
    grid: list[int]
    mean: list[float]
    std: list[float]
    threshold: float = 0.5  # on the fake probability
    version_id: str = ""
    created_at: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def architecture(self) -> dict[str, Any]:
        """What determines the computation (hashed into the version id)."""
        return {"arch": self.arch, "backbone_config": self.backbone_config, "input_size": self.input_size,
                "patch_size": self.patch_size, "grid": self.grid, "mean": self.mean, "std": self.std}


def _weights_digest(path: Path, architecture: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(json.dumps(architecture, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write beside ``path`` and rename into place, so a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_info(model_dir: Path, info: ModelInfo) -> None:
    atomic_write_bytes(model_dir / MODEL_JSON, (json.dumps(asdict(info), indent=2) + "\n").encode())


def describe(detector: PPLDetector) -> ModelInfo:
    backbone = detector.backbone
    config = json.loads(backbone.hf_config.to_json_string())  # exactly what model.json will hold
    # Bookkeeping keys that differ between runs or library versions but change nothing computed.
    for key in ("transformers_version", "_name_or_path", "architectures"):
        config.pop(key, None)
    return ModelInfo(arch=backbone.family.name, backbone_config=config, input_size=backbone.input_size,
                     patch_size=backbone.patch_size, grid=[backbone.grid_size, backbone.grid_size],
                     mean=list(backbone.mean), std=list(backbone.std))


def save_model_dir(detector: PPLDetector, out_dir: str | Path, *, threshold: float = 0.5,
                   training: dict[str, Any] | None = None) -> ModelInfo:
    """Write weights and description. LoRA adapters are merged into the detector in place."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    detector.backbone.merge_lora()
    info = describe(detector)
    info.threshold = float(threshold)
    info.training = training or {}
    info.created_at = datetime.now(UTC).isoformat(timespec="seconds")
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in detector.state_dict().items()}
    tmp_weights = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, out / WEIGHTS_FILE)
    info.version_id = _weights_digest(out / WEIGHTS_FILE, info.architecture())
    _write_info(out, info)
    return info


def read_model_info(model_dir: str | Path) -> ModelInfo:
    """Parse ``model.json`` without touching the weights."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelDirError(f"model directory not found: {path}")
    meta_path = path / MODEL_JSON
    if not meta_path.is_file():
        raise ModelDirError(f"{path} is not a model directory: {MODEL_JSON} is missing")
    try:
        raw = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{meta_path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelDirError(f"{meta_path} must hold a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(f"{meta_path}: format_version {raw.get('format_version')!r} is not supported "
                            f"(this version reads {FORMAT_VERSION})")
    known = ModelInfo.__dataclass_fields__
    required = [name for name, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise ModelDirError(f"{meta_path} lacks {', '.join(missing)}")
    return ModelInfo(**{k: v for k, v in raw.items() if k in known})


def write_threshold(model_dir: str | Path, threshold: float) -> ModelInfo:
    """Set the calibrated threshold in ``model.json``. The version id stays: scores do not change."""
    path = Path(model_dir)
    info = read_model_info(path)
    info.threshold = float(threshold)
    _write_info(path, info)
    return info


def load_model_dir(model_dir: str | Path, device: str | torch.device = "cpu",
                   verify: bool = True) -> tuple[PPLDetector, ModelInfo]:
    """Rebuild the detector from a model directory, in eval mode, checking it is whole and consistent."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ppl_model.backbones import BackboneError, backbone_from_config_dict
    from ppl_model.detector import PPLDetector

    path = Path(model_dir)
    info = read_model_info(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelDirError(f"{path} is incomplete: {WEIGHTS_FILE} is missing")
    if verify:
        actual = _weights_digest(weights, info.architecture())
        if actual != info.version_id:
            raise ModelDirError(f"{weights} does not match model.json (version {info.version_id!r}, weights hash "
                                f"to {actual!r}): the directory is partial, corrupt or was edited")
    try:
        backbone = backbone_from_config_dict(info.arch, info.backbone_config, info.input_size,
                                             tuple(info.mean), tuple(info.std))
    except (BackboneError, TypeError, ValueError) as exc:
        raise ModelDirError(f"{path}: cannot build the architecture in model.json: {exc}") from None
    detector = PPLDetector(backbone)
    if backbone.patch_size != info.patch_size or [backbone.grid_size] * 2 != list(info.grid):
        raise ModelDirError(f"{path}: model.json patch grid {info.grid} disagrees with its backbone config")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ModelDirError(f"cannot read {weights}: {exc}") from None
    try:
        result = detector.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelDirError(f"{weights} does not fit the architecture in model.json: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelDirError(f"{weights} does not fit the architecture in model.json: "
                            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return detector.to(device).eval(), info
