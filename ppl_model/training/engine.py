"""One epoch of training and one pass of validation; no argument parsing, files or process set-up."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ppl_model.config import LossConfig
from ppl_model.detector import PPLDetector
from ppl_model.evaluation.metrics import detection_metrics
from ppl_model.losses import mean_pairwise_cosine, ppl_loss, scheduled

# Mean patch-embedding cosine above which a step's embeddings count as collapsed (0 = spread, 1 = one point).
COLLAPSE_COSINE = 0.9


@dataclass
class TrainState:
    """Where training stands; saved in checkpoints so ``--resume`` continues exactly there."""

    epoch: int = 0
    batch_in_epoch: int = 0  # loader batches consumed in the current epoch
    step: int = 0  # optimiser steps taken
    skipped_files: int = 0
    size_mismatched_pairs: int = 0  # RPR pairs whose reconstruction size differed from the real image


@dataclass
class StepContext:
    device: torch.device
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    grad_accum: int
    max_grad_norm: float
    total_steps: int  # the run's optimiser steps: training stops there, schedules are relative to it
    loss_generator: torch.Generator | None = None  # PCL sampling; checkpointed so resume is exact
    on_collapse: Callable[[dict[str, Any]], None] | None = None  # called once, at the first collapsed step


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _placeholder_batch(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """Stands in for a batch whose files were all unreadable: it keeps distributed ranks and gradient
    accumulation in step, and contributes zero loss."""
    detector = cast(PPLDetector, unwrap(model))
    size, grid = detector.input_size, detector.grid_size
    return {"pixel_values": torch.zeros(1, 3, size, size, device=device), "labels": torch.zeros(1, device=device),
            "patch_labels": torch.zeros(1, grid, grid, device=device), "rpr": torch.zeros(1, dtype=torch.bool),
            "size_mismatched": 0, "size": 0}


def _cls_std(output: Any) -> float:
    """Std over the batch of each pooled feature, averaged over features: near 0 when the image head's input
    no longer differs between images."""
    if output.pooled is None or output.pooled.shape[0] < 2:
        return float("nan")
    return float(output.pooled.detach().float().std(dim=0).mean())


def train_one_epoch(model: nn.Module, loader: Iterable[dict[str, Any]], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loss_cfg: LossConfig, state: TrainState,
                    ctx: StepContext, *, on_step: Callable[[dict[str, Any]], None],
                    on_skipped: Callable[[list], None], total_batches: int | None = None,
                    show_progress: bool = True) -> bool:
    """Train until the loader is exhausted or ``total_steps`` is reached; returns True when it was reached.

    ``on_step`` receives each optimiser step's metrics (and may write checkpoints); ``on_skipped`` the
    unreadable files of each batch.
    """
    model.train()
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)

    def fresh_sums() -> dict[str, float]:
        return {"loss": 0.0, "bce": 0.0, "pcl": 0.0, "patch": 0.0, "patch_cosine": 0.0, "cls_std": 0.0,
                "contrast_cosine": 0.0, "correct": 0, "seen": 0, "rpr": 0}

    sums = fresh_sums()
    micro = 0
    optimizer.zero_grad(set_to_none=True)  # drop any partial accumulation left by the previous epoch
    started = time.perf_counter()
    bar = tqdm(loader, total=total_batches, initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}",
               disable=not show_progress, dynamic_ncols=True, leave=False)
    for batch in bar:
        state.batch_in_epoch += 1
        if batch["skipped"]:
            state.skipped_files += len(batch["skipped"])
            on_skipped(batch["skipped"])
        state.size_mismatched_pairs += int(batch.get("size_mismatched", 0))
        weight = 1.0
        if batch["size"] == 0:
            batch, weight = _placeholder_batch(model, ctx.device), 0.0
        pixels = batch["pixel_values"].to(ctx.device, non_blocking=True)
        labels = batch["labels"].to(ctx.device, non_blocking=True)
        patch_labels = batch["patch_labels"].to(ctx.device, non_blocking=True)

        micro += 1
        boundary = micro % ctx.grad_accum == 0
        sync = contextlib.nullcontext() if (boundary or not is_ddp) else cast(Any, model).no_sync()
        with sync:
            with autocast(ctx.device, ctx.autocast_dtype):
                output = model(pixels)
            step_cfg = scheduled(loss_cfg, state.step, ctx.total_steps)
            terms = ppl_loss(output, labels, patch_labels, step_cfg, ctx.loss_generator)
            loss = terms.total * (weight / ctx.grad_accum)
            (ctx.scaler.scale(loss) if ctx.scaler else loss).backward()

        if weight:
            n = int(labels.numel())
            for key, value in zip(("loss", "bce", "pcl", "patch"), terms, strict=True):
                sums[key] += float(value.detach()) * n
            sums["patch_cosine"] += mean_pairwise_cosine(output.patch_embeddings) * n
            sums["cls_std"] += _cls_std(output) * n
            contrast = output.contrast_embeddings
            sums["contrast_cosine"] += (mean_pairwise_cosine(contrast) if contrast is not None else math.nan) * n
            sums["correct"] += int(((output.image_logit.detach() > 0).float() == labels).sum())
            sums["seen"] += n
            sums["rpr"] += int(batch["rpr"].sum())
        if not boundary:
            continue

        if ctx.scaler:
            ctx.scaler.unscale_(optimizer)
        if ctx.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], ctx.max_grad_norm)
        if ctx.scaler:
            ctx.scaler.step(optimizer)
            ctx.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1

        seen = max(sums["seen"], 1)
        metrics: dict[str, Any] = {"step": state.step, "epoch": state.epoch + 1, "lr": scheduler.get_last_lr()[0],
                   "pcl_weight": step_cfg.pcl_weight,
                   **{k: sums[k] / seen for k in ("loss", "bce", "pcl", "patch", "patch_cosine", "cls_std")},
                   "contrast_cosine": None if math.isnan(sums["contrast_cosine"]) else sums["contrast_cosine"] / seen,
                   "acc": sums["correct"] / seen, "rpr_fraction": sums["rpr"] / seen, "images": sums["seen"],
                   "skipped_files": state.skipped_files, "size_mismatched_pairs": state.size_mismatched_pairs,
                   "images_per_s": sums["seen"] / max(time.perf_counter() - started, 1e-9)}
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", bce=f"{metrics['bce']:.3f}", pcl=f"{metrics['pcl']:.3f}",
                        patch=f"{metrics['patch']:.3f}", cos=f"{metrics['patch_cosine']:.2f}",
                        cls_std=f"{metrics['cls_std']:.3f}", acc=f"{metrics['acc']:.3f}")
        if metrics["patch_cosine"] > COLLAPSE_COSINE and ctx.on_collapse is not None:
            ctx.on_collapse(metrics)
            ctx.on_collapse = None  # warn once per run
        on_step(metrics)
        sums = fresh_sums()
        started = time.perf_counter()
        if state.step >= ctx.total_steps:
            bar.close()
            return True
    bar.close()
    return False


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict[str, Any]], device: torch.device,
             autocast_dtype: torch.dtype | None = None, show_progress: bool = False) -> dict[str, float]:
    """Image-level BCE, and ``ppl eval``'s metrics at probability 0.5: accuracy on real, on fake and their
    mean, AP and AUROC."""
    model.eval()
    logits, labels, skipped = [], [], 0
    for batch in tqdm(loader, desc="validate", disable=not show_progress, leave=False):
        skipped += len(batch["skipped"])
        if batch["size"] == 0:
            continue
        with autocast(device, autocast_dtype):
            logits.append(model(batch["pixel_values"].to(device)).image_logit.float().cpu())
        labels.append(batch["labels"])
    if not logits:
        nan = float("nan")
        return {"loss": nan, "acc_real": nan, "acc_fake": nan, "acc": nan, "images": 0, "skipped_files": skipped}
    logit, label = torch.cat(logits), torch.cat(labels)
    metrics = detection_metrics(torch.sigmoid(logit).numpy(), label.numpy(), threshold=0.5)
    loss = float(F.binary_cross_entropy_with_logits(logit, label))
    return {"loss": loss, **metrics, "images": int(label.numel()), "skipped_files": skipped}
