"""A whole training run: process set-up, data, optimiser, checkpoints and the final model directory.

Runs as one process, or as several under ``torchrun`` (DistributedDataParallel over NCCL on GPUs, gloo
on CPU) with no change: the process group is read from the environment torchrun sets.

The output folder holds, besides the model directory files, ``metrics.jsonl`` (one JSON object per
optimiser step, validation and skipped file) and ``checkpoints/last.pt``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ppl_model.config import ExperimentConfig, OptimConfig
from ppl_model.data.datasets import DataSplits, DetectionDataset, collate, index_dataset
from ppl_model.detector import PPLDetector, build_detector
from ppl_model.errors import PPLError
from ppl_model.model_dir import MODEL_JSON, ModelInfo, save_model_dir
from ppl_model.training.engine import COLLAPSE_COSINE, StepContext, TrainState, evaluate, train_one_epoch

CHECKPOINT = Path("checkpoints") / "last.pt"
METRICS = "metrics.jsonl"


class TrainingError(PPLError, RuntimeError):
    """A run that cannot start or continue as asked."""


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


class EpochSampler(Sampler[int]):
    """Shuffles by (seed, epoch), shards across ranks (padding so every rank gets as many), and can
    start part-way through an epoch, which is how a resumed run skips the batches it already did."""

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 10007 + self.epoch))
        else:
            order = torch.arange(self.size)
        total = self.per_rank() * self.world_size
        order = torch.cat([order, order[: total - self.size]]) if total > self.size else order
        return iter(order[self.rank::self.world_size][self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank() - self.start


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(dist_ctx: Distributed) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_ctx.local_rank)
        return torch.device("cuda", dist_ctx.local_rank)
    return torch.device("cpu")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def build_optimizer(model: PPLDetector, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norms; the heads may have their own learning rate."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_head = name.startswith(("image_head.", "patch_head.", "pcl_projection."))
            groups.setdefault((is_head, param.ndim >= 2), []).append(param)
    head_lr = cfg.head_lr or cfg.lr
    param_groups = [{"params": params, "lr": head_lr if is_head else cfg.lr,
                     "weight_decay": cfg.weight_decay if decays else 0.0}
                    for (is_head, decays), params in sorted(groups.items())]
    beta1, beta2 = cfg.betas
    return torch.optim.AdamW(param_groups, betas=(beta1, beta2))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig
                       ) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, round(cfg.warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class MetricsLog:
    """Appends JSON lines; only the main process writes."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, event: str, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"event": event, **record}) + "\n")


def _save_checkpoint(path: Path, model: PPLDetector, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
                     loss_rng: torch.Generator, state: TrainState, cfg: ExperimentConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        # Only what training changes; the frozen backbone is rebuilt from the config on resume.
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else {},
        "state": dataclasses.asdict(state),
        "config": cfg.to_dict(),
        "loss_rng": loss_rng.get_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model: PPLDetector, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
                     loss_rng: torch.Generator, cfg: ExperimentConfig) -> TrainState:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload["config"] != cfg.to_dict():
        saved, now = payload["config"], cfg.to_dict()
        differ = [f"{section}.{key}" for section in now for key in now[section]
                  if saved.get(section, {}).get(key) != now[section][key]]
        raise TrainingError(f"{path} was written with a different configuration ({', '.join(differ)}); "
                            "resume with the same config and flags, or start a new --out")
    params = dict(model.named_parameters())
    for name, tensor in payload["trainable"].items():
        params[name].data.copy_(tensor)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if scaler and payload["scaler"]:
        scaler.load_state_dict(payload["scaler"])
    loss_rng.set_state(payload["loss_rng"])
    return TrainState(**payload["state"])


def _loader(dataset: DetectionDataset, sampler: EpochSampler, batch_size: int, workers: int,
            device: torch.device) -> DataLoader:
    # Workers are recreated each epoch (not persistent) so they see the dataset's new epoch seed.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=device.type == "cuda", persistent_workers=False)


def run_training(cfg: ExperimentConfig, data_dir: str | Path, out_dir: str | Path, *, baseline: bool = False,
                 resume: bool = False, show_progress: bool = True) -> ModelInfo | None:
    """Train and write the model directory to ``out_dir``; returns its description (None on non-main ranks)."""
    if baseline:
        cfg = cfg.as_baseline()
    out = Path(out_dir)
    checkpoint_path = out / CHECKPOINT
    dist_ctx = Distributed.from_env()
    if not resume and (checkpoint_path.exists() or (out / MODEL_JSON).exists()):
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not checkpoint_path.exists():
        raise TrainingError(f"nothing to resume: {checkpoint_path} does not exist")
    device = pick_device(dist_ctx)
    if dist_ctx.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        return _run(cfg, Path(data_dir), out, checkpoint_path, baseline, resume, dist_ctx, device, show_progress)
    finally:
        if dist_ctx.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: ExperimentConfig, data_dir: Path, out: Path, checkpoint_path: Path, baseline: bool, resume: bool,
         dist_ctx: Distributed, device: torch.device, show_progress: bool) -> ModelInfo | None:
    splits: DataSplits = index_dataset(data_dir, cfg.data)
    rpr_pairs = sum(s.partner is not None for s in splits.train)
    if cfg.rpr.enabled and not rpr_pairs and dist_ctx.is_main:
        warnings.warn(f"RPR is on but no training fake in {data_dir} ({splits.layout} layout) has a pixel-aligned "
                      "real pair, so no RPR sample will be made; make reconstructions of the real images with "
                      "`ppl reconstruct` and pass them with --reconstructions (data.reconstructions), or use the "
                      "paired layout (real/ plus reconstruction folders with the same file names)", stacklevel=2)
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    detector = build_detector(cfg.model)
    if cfg.loss.patch_weight == 0:
        detector.freeze_patch_head()
    if cfg.loss.pcl_projection and cfg.loss.pcl_weight > 0 and cfg.loss.pcl_form != "paper":
        detector.add_pcl_projection(cfg.loss.pcl_projection)
    detector.to(device)
    loss_rng = torch.Generator(device).manual_seed(cfg.train.seed + dist_ctx.rank)  # rank-specific PCL sampling

    backbone = detector.backbone
    common: dict[str, Any] = {"input_size": backbone.input_size, "patch_size": backbone.patch_size,
                              "mean": backbone.mean, "std": backbone.std}
    train_set = DetectionDataset(splits.train, train=True, augment=cfg.augment, rpr=cfg.rpr,
                                 seed=cfg.train.seed, **common)
    sampler = EpochSampler(len(train_set), seed=cfg.train.seed, rank=dist_ctx.rank,
                           world_size=dist_ctx.world_size)
    batches_per_epoch = math.ceil(sampler.per_rank() / cfg.train.batch_size)
    # A partial accumulation group left at an epoch's end is dropped, so whole groups only.
    total_steps = cfg.train.epochs * max(1, batches_per_epoch // cfg.train.grad_accum)
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    optimizer = build_optimizer(detector, cfg.optim)
    scheduler = cosine_with_warmup(optimizer, total_steps, cfg.optim)
    amp_dtype = autocast_dtype(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    state = TrainState()
    if resume:
        state = _load_checkpoint(checkpoint_path, detector, optimizer, scheduler, scaler, loss_rng, cfg)
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / METRICS, dist_ctx.is_main)
    if dist_ctx.is_main:
        trainable = sum(p.numel() for p in detector.parameters() if p.requires_grad)
        total = sum(p.numel() for p in detector.parameters())
        log.write("start", {"resume": resume, "baseline": baseline, "layout": splits.layout,
                            "train_images": len(splits.train), "val_images": len(splits.val), "rpr_pairs": rpr_pairs,
                            "trainable_params": trainable, "total_params": total, "device": str(device),
                            "world_size": dist_ctx.world_size, "total_steps": total_steps,
                            "state": dataclasses.asdict(state)})

    model: nn.Module = detector
    if dist_ctx.enabled:
        model = nn.parallel.DistributedDataParallel(
            detector, device_ids=[dist_ctx.local_rank] if device.type == "cuda" else None)
    val_loader = None
    if splits.val and cfg.train.eval_every and dist_ctx.is_main:
        val_set = DetectionDataset(splits.val, train=False, **common)
        val_sampler = EpochSampler(len(val_set), seed=0, shuffle=False)
        val_loader = _loader(val_set, val_sampler, cfg.train.batch_size, cfg.data.workers, device)

    def on_collapse(metrics: dict[str, Any]) -> None:
        message = (f"patch embeddings collapsed at step {metrics['step']}: mean patch cosine "
                   f"{metrics['patch_cosine']:.3f} > {COLLAPSE_COSINE}, CLS feature std {metrics['cls_std']:.3f} "
                   f"(PCL weight {metrics['pcl_weight']:.3f}, form {cfg.loss.pcl_form}); the image head may starve")
        if dist_ctx.is_main:
            warnings.warn(message, stacklevel=2)
        log.write("warning", {"kind": "collapse", "step": metrics["step"], "patch_cosine": metrics["patch_cosine"],
                              "cls_std": metrics["cls_std"], "message": message})

    ctx = StepContext(device, amp_dtype, scaler, cfg.train.grad_accum, cfg.optim.max_grad_norm, total_steps,
                      loss_rng, on_collapse)

    def on_step(metrics: dict[str, Any]) -> None:
        if state.step % cfg.train.log_every == 0 or state.step == total_steps:
            log.write("train", metrics)
        if dist_ctx.is_main and state.step % cfg.train.checkpoint_every == 0:
            _save_checkpoint(checkpoint_path, detector, optimizer, scheduler, scaler, loss_rng, state, cfg)

    def on_skipped(skipped: list) -> None:
        for item in skipped:
            log.write("skipped", {"path": item.path, "reason": item.reason, "rank": dist_ctx.rank})

    last_val: dict[str, Any] = {}
    capped = state.step >= total_steps
    while state.epoch < cfg.train.epochs and not capped:
        train_set.set_epoch(state.epoch)
        sampler.set_epoch(state.epoch, start=state.batch_in_epoch * cfg.train.batch_size)
        loader = _loader(train_set, sampler, cfg.train.batch_size, cfg.data.workers, device)
        capped = train_one_epoch(model, loader, optimizer, scheduler, cfg.loss, state, ctx, on_step=on_step,
                                 on_skipped=on_skipped, total_batches=batches_per_epoch,
                                 show_progress=show_progress and dist_ctx.is_main)
        whole_groups = batches_per_epoch - batches_per_epoch % cfg.train.grad_accum
        epoch_done = not capped or state.batch_in_epoch >= whole_groups
        if epoch_done:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if val_loader is not None and (state.epoch % cfg.train.eval_every == 0 or capped):
            last_val = evaluate(detector, val_loader, device, amp_dtype, show_progress=show_progress)
            log.write("val", {"epoch": state.epoch, "step": state.step, **last_val})
        if dist_ctx.is_main:
            _save_checkpoint(checkpoint_path, detector, optimizer, scheduler, scaler, loss_rng, state, cfg)
        if dist_ctx.enabled:
            dist.barrier()

    if not dist_ctx.is_main:
        return None
    training = {"baseline": baseline, "config": cfg.to_dict(), "data": str(data_dir), "layout": splits.layout,
                "steps": state.step, "epochs": state.epoch, "skipped_files": state.skipped_files,
                "size_mismatched_pairs": state.size_mismatched_pairs, "validation": last_val}
    detector.drop_pcl_projection()
    info = save_model_dir(detector, out, training=training)
    log.write("done", {"version_id": info.version_id, "steps": state.step})
    return info
