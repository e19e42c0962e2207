"""The PPL detector: a ViT backbone with an image head and a patch head.

One forward pass gives everything training and serving need: the image logit (fake > 0), a logit per
patch (which patches look generated), and L2-normalised patch embeddings for the patch-wise contrastive
loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ppl_model.backbones import ViTBackbone, build_backbone
from ppl_model.config import ModelConfig


class DetectorOutput(NamedTuple):
    image_logit: torch.Tensor  # (B,)
    patch_logits: torch.Tensor  # (B, G, G) on the ViT patch grid
    patch_embeddings: torch.Tensor  # (B, G*G, D), unit L2 norm: the tokens the heads read
    pooled: torch.Tensor | None = None  # (B, D): the image head's input (CLIP: the CLS token)
    contrast_embeddings: torch.Tensor | None = None  # (B, G*G, P), unit norm: PCL's space when projected


class PPLDetector(nn.Module):
    def __init__(self, backbone: ViTBackbone):
        super().__init__()
        self.backbone = backbone
        self.image_head = nn.Linear(backbone.hidden_size, 1)
        self.patch_head = nn.Linear(backbone.hidden_size, 1)
        self.pcl_projection: nn.Module | None = None

    @property
    def input_size(self) -> int:
        return self.backbone.input_size

    @property
    def grid_size(self) -> int:
        return self.backbone.grid_size

    def forward(self, pixel_values: torch.Tensor) -> DetectorOutput:
        pooled, patches = self.backbone(pixel_values)
        batch, grid = pixel_values.shape[0], self.grid_size
        image_logit = self.image_head(pooled).squeeze(-1)
        patch_logits = self.patch_head(patches).squeeze(-1).reshape(batch, grid, grid)
        contrast = None
        if self.pcl_projection is not None:
            contrast = F.normalize(self.pcl_projection(patches), dim=-1)
        return DetectorOutput(image_logit, patch_logits, F.normalize(patches, dim=-1), pooled, contrast)

    def add_pcl_projection(self, dim: int) -> None:
        """A two-layer MLP on the patch tokens whose output feeds only PCL (supervised-contrastive style)."""
        hidden = self.backbone.hidden_size
        self.pcl_projection = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def drop_pcl_projection(self) -> None:
        """Training-only: removed before the model directory is written, so serving never carries it."""
        self.pcl_projection = None

    def configure_finetuning(self, cfg: ModelConfig) -> None:
        """LoRA: adapters and heads train, the backbone stays frozen. Full: everything trains."""
        if cfg.finetune == "lora":
            self.backbone.apply_lora(cfg.lora)
        else:
            for param in self.backbone.parameters():
                param.requires_grad_(True)

    def freeze_patch_head(self) -> None:
        """For runs that do not train the patch head (the baseline), so no parameter is left gradient-less."""
        for param in self.patch_head.parameters():
            param.requires_grad_(False)


def build_detector(cfg: ModelConfig) -> PPLDetector:
    """A fresh detector as configured, fine-tuning mode applied."""
    detector = PPLDetector(build_backbone(cfg))
    detector.configure_finetuning(cfg)
    return detector
