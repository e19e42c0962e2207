"""PPL training losses.

``L = λ·L_con + (1−λ)·L_bce + w·L_patch``: the image-level BCE, the patch-wise contrastive loss (PCL)
over patch embeddings, and this project's patch-head BCE against the per-patch labels RPR provides.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ppl_model.config import LossConfig
from ppl_model.detector import DetectorOutput


class LossTerms(NamedTuple):
    total: torch.Tensor
    bce: torch.Tensor
    pcl: torch.Tensor
    patch: torch.Tensor


def contrastive_margin_loss(z_a: torch.Tensor, z_b: torch.Tensor, same: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean of ``Y·d² + (1−Y)·max(0, α − d²)`` over pairs (rows of z_a, z_b), d = ‖z_a − z_b‖."""
    d2 = (z_a - z_b).pow(2).sum(-1)
    same = same.to(d2.dtype)
    return (same * d2 + (1 - same) * (margin - d2).clamp_min(0)).mean()


def sample_pairs(count: int, pairs_per_item: int, device: torch.device,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i, j), i ≠ j: all unordered pairs when that is no more than ``pairs_per_item`` each,
    otherwise ``pairs_per_item`` random partners per item, so the number of pairs grows linearly."""
    if pairs_per_item >= count - 1:
        i, j = torch.triu_indices(count, count, offset=1, device=device)
        return i, j
    i = torch.arange(count, device=device).repeat_interleave(pairs_per_item)
    # Draw from count-1 others and skip over i itself.
    j = torch.randint(0, count - 1, (i.numel(),), device=device, generator=generator)
    return i, j + (j >= i).long()


def pcl_loss(embeddings: torch.Tensor, patch_labels: torch.Tensor, *, margin: float, patches_per_image: int,
             pairs_per_patch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Patch-wise contrastive loss across the batch.

    embeddings: (B, N, D) L2-normalised patch embeddings; patch_labels: (B, N) with 1 = generated.
    ``patches_per_image`` patches of each image are sampled, then pairs among all sampled patches.
    """
    batch, n, dim = embeddings.shape
    if patches_per_image < n:
        noise = torch.rand(batch, n, device=embeddings.device, generator=generator)
        keep = noise.argsort(dim=1)[:, :patches_per_image]
        embeddings = embeddings.gather(1, keep[..., None].expand(-1, -1, dim))
        patch_labels = patch_labels.gather(1, keep)
    z = embeddings.reshape(-1, dim).float()
    y = patch_labels.reshape(-1)
    if z.shape[0] < 2:
        return z.sum() * 0
    i, j = sample_pairs(z.shape[0], pairs_per_patch, z.device, generator)
    return contrastive_margin_loss(z[i], z[j], (y[i] == y[j]), margin)


def scheduled(cfg: LossConfig, step: int, total_steps: int) -> LossConfig:
    """The loss config in force at optimiser step ``step``: λ ramps linearly over the PCL warm-up."""
    warmup_steps = cfg.pcl_warmup_fraction * total_steps
    if warmup_steps <= 0 or step >= warmup_steps:
        return cfg
    return dataclasses.replace(cfg, pcl_weight=cfg.pcl_weight * step / warmup_steps)


def ppl_loss(output: DetectorOutput, labels: torch.Tensor, patch_labels: torch.Tensor, cfg: LossConfig,
             generator: torch.Generator | None = None) -> LossTerms:
    """All terms, with those whose weight is zero skipped (returned as zero). ``generator`` drives PCL's
    patch and pair sampling (on the embeddings' device)."""
    logit = output.image_logit.float()
    bce = F.binary_cross_entropy_with_logits(logit, labels.float())
    zero = logit.new_zeros(())
    flat_labels = patch_labels.flatten(1).float()
    pcl = zero
    if cfg.pcl_weight > 0:
        pcl = pcl_loss(output.patch_embeddings, flat_labels, margin=cfg.margin,
                       patches_per_image=cfg.patches_per_image, pairs_per_patch=cfg.pairs_per_patch,
                       generator=generator)
    patch = zero
    if cfg.patch_weight > 0:
        patch = F.binary_cross_entropy_with_logits(output.patch_logits.flatten(1).float(), flat_labels)
    total = cfg.pcl_weight * pcl + (1 - cfg.pcl_weight) * bce + cfg.patch_weight * patch
    return LossTerms(total, bce, pcl, patch)
