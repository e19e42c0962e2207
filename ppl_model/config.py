"""Training configuration as data: nested dataclasses read from TOML, overridable with ``key=value``.

Every field has a default, so a TOML file only names what differs. Unknown keys are errors (a typo must
not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppl_model.errors import PPLError


class ConfigError(PPLError, ValueError):
    """A configuration file or override that cannot be applied."""


@dataclass
class LoRAConfig:
    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    # Module-name suffixes to adapt; empty means the backbone's attention query and value projections.
    targets: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    arch: str = "clip"  # backbone family: "clip" or "dinov2"
    size: str = "tiny"  # named shape for random initialisation: tiny, vit-b-16, vit-l-14
    pretrained: str = ""  # local Hugging Face-format folder; when set, `size` is ignored
    input_size: int = 0  # 0: the size's (or pretrained config's) own image size
    patch_size: int = 0  # 0: the size's own patch size (random initialisation only)
    finetune: str = "lora"  # "lora" (backbone frozen, adapters trained) or "full"
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class DataConfig:
    layout: str = "auto"  # auto, genimage, paired, folders
    generators: list[str] = field(default_factory=list)  # genimage: subsets to train on (empty = all)
    val_fraction: float = 0.1  # used when the data has no train/val split of its own
    # A folder of reconstructions of the real images (`ppl reconstruct --images DATA --out DIR`), at their paths
    # relative to the data folder (any image suffix): each joins its real image's split as a fake paired with
    # it, so RPR composites it whatever the layout. "" = none (the paired layout pairs its own folders).
    reconstructions: str = ""
    workers: int = 2


@dataclass
class AugmentConfig:
    flip_prob: float = 0.5
    jpeg_prob: float = 0.5
    jpeg_quality: list[int] = field(default_factory=lambda: [30, 100])
    blur_prob: float = 0.1
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 3.0])
    # Fraction of each training image's grid patches set to the normalisation mean (0 = off): the
    # patch-dropout control of the synthbench ablation, which hides patches without RPR's patch labels.
    patch_dropout: float = 0.0


@dataclass
class RPRConfig:
    enabled: bool = True
    ratio: float = 0.5  # r: fraction of patches taken from the donor
    prob: float = 0.9  # p: chance that a fake sample is replaced by its RPR composite
    # Both need pixel-aligned (real, fake) pairs (the paired layout); unpaired fakes are used as they are.
    # "reconstruction": generator patches into the real image; "real-into-fake": real patches into the fake.
    variant: str = "reconstruction"
    # A reconstruction whose size differs from its real image (e.g. 512-px SD outputs of smaller photos):
    # "resize" it to the real image's size (bicubic) before the shared crop, or "refuse" to composite it
    # (the fake is then used whole). Never cropped to a common corner, which would shift its content
    # against the real image. Each case is counted in metrics.jsonl (size_mismatched_pairs).
    size_mismatch: str = "resize"


@dataclass
class LossConfig:
    pcl_weight: float = 0.3  # λ in L = λ·L_con + (1−λ)·L_bce
    # Ramp λ up from 0 over this fraction of the optimiser steps. A backbone that cannot tell patches apart
    # yet (random initialisation) otherwise lowers L_con fastest by collapsing all patch embeddings to one
    # point, which starves the image head (docs/TRAINING.md). 0 = the paper's constant λ.
    pcl_warmup_fraction: float = 0.0
    margin: float = 1.0  # α
    # "balanced": pairs across the batch and within each image, same-label and different-label pairs
    # weighted equally, which cannot collapse label-blind embeddings; "paper": the paper's exact PCL, the
    # mean over pairs across the batch on the patch tokens themselves (pcl_projection is then ignored), so
    # `--set loss.pcl_form=paper` is the whole switch back. ppl_model/losses.py explains both; the default
    # was chosen by measurement (docs/TRAINING.md).
    pcl_form: str = "balanced"
    # Width of a small MLP on the patch tokens whose output alone feeds PCL (0: PCL acts on the tokens the
    # heads read). It keeps the contrastive geometry off those tokens, as supervised-contrastive methods do;
    # it is used in training only and is not part of the saved model.
    pcl_projection: int = 64
    patch_weight: float = 0.5  # weight of the patch-head BCE (this project's addition)
    patches_per_image: int = 16  # patches sampled per image for PCL
    pairs_per_patch: int = 32  # partners per sampled patch: PCL cost is linear in batch size


@dataclass
class OptimConfig:
    lr: float = 1e-4
    head_lr: float = 0.0  # 0: same as lr
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.01
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32  # per process
    grad_accum: int = 1
    seed: int = 0
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off on CPU), bf16, fp16, off
    checkpoint_every: int = 200  # optimiser steps; a checkpoint is also written at each epoch end
    log_every: int = 1
    eval_every: int = 1  # epochs; 0 disables validation
    max_steps: int = 0  # 0: no cap (for smoke runs)


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    rpr: RPRConfig = field(default_factory=RPRConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def as_baseline(self) -> ExperimentConfig:
        """The plain BCE fine-tuning baseline: RPR, PCL and the patch-head loss off, all else identical."""
        cfg = from_dict(self.to_dict())
        cfg.rpr.enabled = False
        cfg.loss.pcl_weight = 0.0
        cfg.loss.patch_weight = 0.0
        return cfg

    def validate(self) -> None:
        checks = [
            (self.model.arch in {"clip", "dinov2"}, f"model.arch must be clip or dinov2, not {self.model.arch!r}"),
            (self.model.finetune in {"lora", "full"}, "model.finetune must be lora or full"),
            (self.data.layout in {"auto", "genimage", "paired", "folders"}, "data.layout is not a known layout"),
            (0.0 <= self.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)"),
            (0.0 < self.rpr.ratio < 1.0, "rpr.ratio must be in (0, 1)"),
            (0.0 <= self.rpr.prob <= 1.0, "rpr.prob must be in [0, 1]"),
            (self.rpr.variant in {"reconstruction", "real-into-fake"}, "rpr.variant: reconstruction or real-into-fake"),
            (0.0 <= self.loss.pcl_weight <= 1.0, "loss.pcl_weight (λ) must be in [0, 1]"),
            (0.0 <= self.loss.pcl_warmup_fraction <= 1.0, "loss.pcl_warmup_fraction must be in [0, 1]"),
            (self.loss.patches_per_image >= 1 and self.loss.pairs_per_patch >= 1, "PCL sampling must be ≥ 1"),
            (self.loss.pcl_form in {"paper", "balanced"}, "loss.pcl_form must be paper or balanced"),
            (self.loss.pcl_projection >= 0, "loss.pcl_projection must be ≥ 0 (0 = no projection head)"),
            (self.rpr.size_mismatch in {"resize", "refuse"}, "rpr.size_mismatch must be resize or refuse"),
            (0.0 <= self.augment.patch_dropout < 1.0, "augment.patch_dropout must be in [0, 1)"),
            (self.train.amp in {"auto", "bf16", "fp16", "off"}, "train.amp must be auto, bf16, fp16 or off"),
            (self.train.batch_size >= 1 and self.train.grad_accum >= 1, "batch_size and grad_accum must be ≥ 1"),
            (len(self.augment.jpeg_quality) == 2 and min(self.augment.jpeg_quality) >= 1, "jpeg_quality: [lo, hi]"),
            (len(self.augment.blur_sigma) == 2, "augment.blur_sigma: [lo, hi]"),
        ]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ConfigError("; ".join(errors))


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in [{where or 'top level'}]: {', '.join(unknown)}")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a table")
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list")
        return [_coerce(v, item_tp, key) for v in value]
    if isinstance(tp, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {tp.__name__}, not {value!r}")
    return value


def from_dict(values: dict[str, Any]) -> ExperimentConfig:
    cfg = _build(ExperimentConfig, values, "")
    cfg.validate()
    return cfg


def _parse_override_value(text: str) -> Any:
    """A TOML literal (1, 0.5, true, [1, 2], "x"); anything that does not parse is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config dict (before it is validated)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {part} is not a table")
        node[parts[-1]] = _parse_override_value(text.strip())
    return values


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return from_dict(apply_overrides(values, overrides or []))
