"""PPL training losses.

``L = λ·L_con + (1−λ)·L_bce + w·L_patch``: the image-level BCE, the patch-wise contrastive loss (PCL)
over patch embeddings, and this project's patch-head BCE against the per-patch labels RPR provides.

PCL comes in two forms (``loss.pcl_form``):

* ``paper``: the mean of ``Y·d² + (1−Y)·max(0, α − d²)`` over pairs drawn across the batch. When most
  pairs share a label (RPR leaves ~70 % of patches real) and the embeddings do not yet encode the label,
  its expectation ``P(same)·E[d²] + P(diff)·E[max(0, α − d²)]`` is lowest at d = 0: it collapses every
  patch embedding to one point (docs/RESULTS.md has the measurements).
* ``balanced``: the same terms, with pairs drawn across the batch *and* within each image (an RPR
  composite gives both labels in one image), reduced as ``½·mean(pull over same-label pairs) +
  ½·mean(push over different-label pairs)``. For label-blind embeddings its expectation is flat for
  d² ≤ α instead of falling to d = 0, so nothing drives a collapse.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ppl_model.config import LossConfig
from ppl_model.detector import DetectorOutput

PCL_FORMS = ("paper", "balanced")


class LossTerms(NamedTuple):
    total: torch.Tensor
    bce: torch.Tensor
    pcl: torch.Tensor
    patch: torch.Tensor


def contrastive_margin_loss(z_a: torch.Tensor, z_b: torch.Tensor, same: torch.Tensor, margin: float,
                            balanced: bool = False) -> torch.Tensor:
    """``Y·d² + (1−Y)·max(0, α − d²)`` over pairs (rows of z_a, z_b), d = ‖z_a − z_b‖: the mean over all pairs,
    or with ``balanced`` ``½·mean over same-label pairs + ½·mean over different-label pairs`` (the mean of the
    group present when only one is)."""
    d2 = (z_a - z_b).pow(2).sum(-1)
    same = same.to(d2.dtype)
    pull, push = same * d2, (1 - same) * (margin - d2).clamp_min(0)
    if not balanced:
        return (pull + push).mean()
    n_same, n_diff = same.sum(), (1 - same).sum()
    if n_same == 0 or n_diff == 0:
        return (pull + push).mean()
    return 0.5 * pull.sum() / n_same + 0.5 * push.sum() / n_diff


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
             pairs_per_patch: int, form: str = "paper", generator: torch.Generator | None = None) -> torch.Tensor:
    """Patch-wise contrastive loss.

    embeddings: (B, N, D) L2-normalised patch embeddings; patch_labels: (B, N) with 1 = generated.
    ``patches_per_image`` patches of each image are sampled, then pairs among all sampled patches of the
    batch; the ``balanced`` form adds every pair within each image's sampled patches and balances the
    reduction (module docstring).
    """
    if form not in PCL_FORMS:
        raise ValueError(f"unknown PCL form {form!r}; known: {', '.join(PCL_FORMS)}")
    batch, n, dim = embeddings.shape
    if patches_per_image < n:
        noise = torch.rand(batch, n, device=embeddings.device, generator=generator)
        keep = noise.argsort(dim=1)[:, :patches_per_image]
        embeddings = embeddings.gather(1, keep[..., None].expand(-1, -1, dim))
        patch_labels = patch_labels.gather(1, keep)
    kept = embeddings.shape[1]
    z = embeddings.reshape(-1, dim).float()
    y = patch_labels.reshape(-1)
    if z.shape[0] < 2:
        return z.sum() * 0
    i, j = sample_pairs(z.shape[0], pairs_per_patch, z.device, generator)
    if form == "balanced" and kept > 1:
        # Every pair within each image: offsets of the image's own sampled patches in the flattened batch.
        a, b = torch.triu_indices(kept, kept, offset=1, device=z.device)
        start = (torch.arange(batch, device=z.device) * kept)[:, None]
        i = torch.cat([i, (start + a).reshape(-1)])
        j = torch.cat([j, (start + b).reshape(-1)])
    return contrastive_margin_loss(z[i], z[j], (y[i] == y[j]), margin, balanced=form == "balanced")


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows of unit vectors ``(..., D)``: about 0 for
    spread-out embeddings, 1 when they have collapsed to one point. From ``‖Σz‖² = M + Σ_{i≠j} cos``, O(M·D)."""
    z = embeddings.detach().reshape(-1, embeddings.shape[-1]).float()
    m = z.shape[0]
    if m < 2:
        return float("nan")
    total = z.sum(0).pow(2).sum() - z.pow(2).sum()
    return float(total / (m * (m - 1)))


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
        # The projection head's output when the detector has one, so PCL's geometry is not the heads' input.
        embeddings = output.contrast_embeddings if output.contrast_embeddings is not None else output.patch_embeddings
        pcl = pcl_loss(embeddings, flat_labels, margin=cfg.margin, patches_per_image=cfg.patches_per_image,
                       pairs_per_patch=cfg.pairs_per_patch, form=cfg.pcl_form, generator=generator)
    patch = zero
    if cfg.patch_weight > 0:
        patch = F.binary_cross_entropy_with_logits(output.patch_logits.flatten(1).float(), flat_labels)
    total = cfg.pcl_weight * pcl + (1 - cfg.pcl_weight) * bce + cfg.patch_weight * patch
    return LossTerms(total, bce, pcl, patch)
