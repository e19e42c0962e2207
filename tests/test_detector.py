"""Detector outputs, and what fine-tuning changes: LoRA and heads, never the frozen backbone."""

import pytest
import torch

from ppl_model.config import LossConfig, OptimConfig
from ppl_model.detector import build_detector
from ppl_model.losses import ppl_loss
from ppl_model.training.runner import build_optimizer
from tests.helpers import tiny_model_config


@pytest.mark.parametrize("arch", ["clip", "dinov2"])
def test_forward_gives_image_logit_patch_logits_and_unit_embeddings(arch):
    detector = build_detector(tiny_model_config(arch))
    out = detector(torch.randn(5, 3, 32, 32))
    assert out.image_logit.shape == (5,)
    assert out.patch_logits.shape == (5, 4, 4)
    assert out.patch_embeddings.shape == (5, 16, 64)
    torch.testing.assert_close(out.patch_embeddings.norm(dim=-1), torch.ones(5, 16))


def _train_steps(detector, steps=3):
    optimizer = build_optimizer(detector, OptimConfig(lr=1e-2, weight_decay=0.1))
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0])
    patch_labels = torch.rand(4, 4, 4).round()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ppl_loss(detector(x), labels, patch_labels, LossConfig(patches_per_image=16, pairs_per_patch=8))
        loss.total.backward()
        optimizer.step()


def test_lora_training_changes_adapters_and_heads_but_not_frozen_backbone():
    torch.manual_seed(0)
    detector = build_detector(tiny_model_config(finetune="lora"))
    before = {n: p.detach().clone() for n, p in detector.named_parameters()}
    _train_steps(detector)
    changed = {n for n, p in detector.named_parameters() if not torch.equal(p, before[n])}
    lora = {n for n in before if "lora_" in n}
    heads = {n for n in before if n.startswith(("image_head", "patch_head"))}
    frozen = set(before) - lora - heads
    assert frozen and not (changed & frozen), f"frozen weights moved: {sorted(changed & frozen)[:3]}"
    assert heads <= changed
    assert {n for n in lora if "lora_B" in n} <= changed  # B leaves zero first, then A gets gradient too


def test_full_finetuning_changes_backbone_weights():
    torch.manual_seed(0)
    detector = build_detector(tiny_model_config(finetune="full"))
    before = {n: p.detach().clone() for n, p in detector.backbone.named_parameters()}
    _train_steps(detector, steps=1)
    moved = [n for n, p in detector.backbone.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) > len(before) // 2
