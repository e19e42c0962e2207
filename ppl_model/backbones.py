"""ViT backbones through transformers, adapted with LoRA through peft.

A small registry maps a family name (``clip``, ``dinov2``) to how it is built from a named shape, loaded
from a local Hugging Face-format folder, and read out as (pooled token, patch tokens). Nothing is ever
downloaded: pretrained weights come only from a folder the user gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    PretrainedConfig,
    PreTrainedModel,
)

from ppl_model.config import LoRAConfig, ModelConfig
from ppl_model.errors import PPLError


class BackboneError(PPLError, ValueError):
    """A backbone that cannot be built or loaded as asked."""


@dataclass(frozen=True)
class ViTShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_size: int
    image_size: int
    patch_size: int


NAMED_SHAPES: dict[str, ViTShape] = {
    "tiny": ViTShape(hidden_size=64, num_layers=2, num_heads=2, mlp_size=128, image_size=32, patch_size=8),
    "vit-b-16": ViTShape(hidden_size=768, num_layers=12, num_heads=12, mlp_size=3072, image_size=224, patch_size=16),
    "vit-l-14": ViTShape(hidden_size=1024, num_layers=24, num_heads=16, mlp_size=4096, image_size=224, patch_size=14),
}


@dataclass(frozen=True)
class BackboneFamily:
    name: str
    model_types: tuple[str, ...]  # config.json `model_type` values this family accepts
    model_class: type[PreTrainedModel]
    config_class: type[PretrainedConfig]
    config_from_shape: Callable[[ViTShape], PretrainedConfig]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Whether position embeddings must be interpolated explicitly when the input size differs.
    needs_interpolate_flag: bool


FAMILIES: dict[str, BackboneFamily] = {
    "clip": BackboneFamily(
        name="clip",
        model_types=("clip", "clip_vision_model"),
        model_class=CLIPVisionModel,
        config_class=CLIPVisionConfig,
        config_from_shape=lambda s: CLIPVisionConfig(
            hidden_size=s.hidden_size,
            intermediate_size=s.mlp_size,
            num_hidden_layers=s.num_layers,
            num_attention_heads=s.num_heads,
            image_size=s.image_size,
            patch_size=s.patch_size,
            hidden_act="quick_gelu",
        ),
        mean=(0.48145466, 0.4578275, 0.40821073),
        std=(0.26862954, 0.26130258, 0.27577711),
        needs_interpolate_flag=True,
    ),
    "dinov2": BackboneFamily(
        name="dinov2",
        model_types=("dinov2",),
        model_class=Dinov2Model,
        config_class=Dinov2Config,
        config_from_shape=lambda s: Dinov2Config(
            hidden_size=s.hidden_size,
            num_hidden_layers=s.num_layers,
            num_attention_heads=s.num_heads,
            mlp_ratio=s.mlp_size // s.hidden_size,
            image_size=s.image_size,
            patch_size=s.patch_size,
        ),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        needs_interpolate_flag=False,
    ),
}

# Attention query/value projection names across transformers versions (v5 uses q_proj/v_proj for both).
_QV_NAME_CANDIDATES = (("q_proj", "v_proj"), ("query", "value"))


def get_family(name: str) -> BackboneFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone family {name!r}; known: {', '.join(FAMILIES)}") from None


class ViTBackbone(nn.Module):
    """A transformers ViT that returns ``(pooled, patch_tokens)``, both after the final layer norm."""

    def __init__(self, family: BackboneFamily, model: PreTrainedModel, input_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.family = family
        self.model: PreTrainedModel | PeftModel = model
        self.input_size = input_size
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        cfg = self.hf_config
        if input_size % cfg.patch_size:
            raise BackboneError(f"input size {input_size} is not a multiple of patch size {cfg.patch_size}")
        self._interpolate = family.needs_interpolate_flag and input_size != cfg.image_size

    @property
    def base_model(self) -> PreTrainedModel:
        model = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        if not isinstance(model, PreTrainedModel):  # peft wraps the model it was given, which was one
            raise BackboneError(f"the backbone is a {type(model).__name__}, not a transformers model")
        return model

    @property
    def hf_config(self) -> PretrainedConfig:
        return self.base_model.config

    @property
    def patch_size(self) -> int:
        return int(self.hf_config.patch_size)

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        out = self.model(pixel_values=pixel_values, **kwargs)
        tokens = out.last_hidden_state
        if self.family.name == "clip":
            # CLIP normalises only the pooled CLS token; apply the same norm to the patch tokens.
            norm = getattr(self.base_model, "vision_model", self.base_model).post_layernorm
            if not isinstance(norm, nn.Module):
                raise BackboneError("the CLIP vision model has no post_layernorm module")
            return out.pooler_output, norm(tokens[:, 1:])
        # DINOv2's last_hidden_state is already layer-normed; token 0 is CLS.
        return tokens[:, 0], tokens[:, 1:]

    # -- fine-tuning modes ------------------------------------------------------------------------
    def lora_targets(self, requested: list[str]) -> list[str]:
        if requested:
            return list(requested)
        names = {name.rsplit(".", 1)[-1] for name, _ in self.base_model.named_modules()}
        for candidates in _QV_NAME_CANDIDATES:
            if set(candidates) <= names:
                return list(candidates)
        raise BackboneError("could not find attention query/value projections; set model.lora.targets")

    def apply_lora(self, cfg: LoRAConfig) -> None:
        if isinstance(self.model, PeftModel):
            raise BackboneError("LoRA is already applied")
        # peft annotates lora_alpha as int but scales by lora_alpha / r with any number; model.lora.alpha is a float.
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,  # type: ignore[arg-type]
                          target_modules=self.lora_targets(cfg.targets), bias="none")
        # peft freezes every base weight and leaves only the adapters trainable.
        self.model = get_peft_model(self.model, lora)

    def merge_lora(self) -> None:
        """Fold the adapters into the base weights, leaving a plain transformers model."""
        if isinstance(self.model, PeftModel):
            self.model = self.model.merge_and_unload()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BackboneError(f"cannot read {path}: {exc}") from None


def _load_pretrained(family: BackboneFamily, folder: Path) -> tuple[PreTrainedModel, tuple, tuple]:
    if not (folder / "config.json").is_file():
        raise BackboneError(f"{folder} is not a Hugging Face model folder (no config.json)")
    model_type = _read_json(folder / "config.json").get("model_type")
    if model_type not in family.model_types:
        raise BackboneError(f"{folder} holds a {model_type!r} model, but model.arch is {family.name!r}")
    try:
        model = family.model_class.from_pretrained(str(folder), local_files_only=True)
    except OSError as exc:
        raise BackboneError(f"cannot load weights from {folder}: {exc}") from None
    mean, std = family.mean, family.std
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        pre = _read_json(preprocessor)
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    return model, mean, std


def build_backbone(cfg: ModelConfig) -> ViTBackbone:
    """The backbone as configured: pretrained from a local folder, or random from a named shape."""
    family = get_family(cfg.arch)
    if cfg.pretrained:
        model, mean, std = _load_pretrained(family, Path(cfg.pretrained))
        input_size = cfg.input_size or 224
    else:
        if cfg.size not in NAMED_SHAPES:
            raise BackboneError(f"unknown model size {cfg.size!r}; known: {', '.join(NAMED_SHAPES)}")
        shape = NAMED_SHAPES[cfg.size]
        input_size = cfg.input_size or shape.image_size
        patch_size = cfg.patch_size or shape.patch_size
        shape = ViTShape(shape.hidden_size, shape.num_layers, shape.num_heads, shape.mlp_size,
                         image_size=input_size, patch_size=patch_size)
        model = family.model_class(family.config_from_shape(shape))
        mean, std = family.mean, family.std
    return ViTBackbone(family, model, input_size, mean, std)


def backbone_from_config_dict(arch: str, config: dict[str, Any], input_size: int,
                              mean: tuple, std: tuple) -> ViTBackbone:
    """An uninitialised-weights backbone with a saved config, ready for ``load_state_dict``."""
    family = get_family(arch)
    hf_config = family.config_class.from_dict(config)
    return ViTBackbone(family, family.model_class(hf_config), input_size, mean, std)
