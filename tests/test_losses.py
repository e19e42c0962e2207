"""PCL against a hand-computed case and a brute-force reference; pair sampling; the combined loss."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from ppl_model.config import LossConfig
from ppl_model.detector import DetectorOutput
from ppl_model.losses import pcl_loss, ppl_loss, sample_pairs, scheduled


def test_pcl_matches_hand_computed_case():
    # z0=(1,0), z1=(0,1), z2=(0.6,0.8); labels 0, 0, 1; margin 1.
    # (0,1) same:  d²=2.0           -> 2.0
    # (0,2) diff:  d²=0.16+0.64=0.8 -> max(0, 1-0.8)=0.2
    # (1,2) diff:  d²=0.36+0.04=0.4 -> max(0, 1-0.4)=0.6
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
    y = torch.tensor([[0.0, 0.0, 1.0]])
    loss = pcl_loss(z, y, margin=1.0, patches_per_image=3, pairs_per_patch=10)
    assert loss.item() == pytest.approx((2.0 + 0.2 + 0.6) / 3, abs=1e-6)


def test_pcl_pairs_span_the_batch_like_a_brute_force_reference():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(3, 4, 5), dim=-1)
    y = torch.randint(0, 2, (3, 4)).float()
    flat_z, flat_y = z.reshape(12, 5), y.reshape(12)
    terms = []
    for i, j in itertools.combinations(range(12), 2):
        d2 = float(((flat_z[i] - flat_z[j]) ** 2).sum())
        terms.append(d2 if flat_y[i] == flat_y[j] else max(0.0, 0.5 - d2))
    loss = pcl_loss(z, y, margin=0.5, patches_per_image=4, pairs_per_patch=11)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_pcl_is_zero_for_collapsed_same_label_and_far_apart_different_labels():
    z = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[-1.0, 0.0], [-1.0, 0.0]]])  # classes 2 apart: d²=4 > α
    y = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert pcl_loss(z, y, margin=1.0, patches_per_image=2, pairs_per_patch=3).item() == 0.0


def test_pair_sampling_is_linear_and_never_pairs_a_patch_with_itself():
    i, j = sample_pairs(1000, 16, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert i.numel() == 16_000
    assert (i != j).all() and j.min() >= 0 and j.max() < 1000
    i_all, j_all = sample_pairs(10, 16, torch.device("cpu"))
    assert i_all.numel() == 45 and (i_all < j_all).all()


def test_patch_sampling_bounds_the_patches_used():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(4, 64, 8), dim=-1).requires_grad_()
    y = torch.randint(0, 2, (4, 64)).float()
    pcl_loss(z, y, margin=1.0, patches_per_image=5, pairs_per_patch=100).backward()
    used = (z.grad.abs().sum(-1) > 0).sum(dim=1)
    assert (used <= 5).all() and (used > 0).all()


def _output(batch=4, grid=2, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DetectorOutput(torch.randn(batch, generator=g), torch.randn(batch, grid, grid, generator=g),
                          F.normalize(torch.randn(batch, grid * grid, dim, generator=g), dim=-1))


def test_combined_loss_weights_each_term():
    out = _output()
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    patch_labels = labels[:, None, None].expand(-1, 2, 2).clone()
    patch_labels[1, 0, 0] = 0.0
    cfg = LossConfig(pcl_weight=0.3, margin=1.0, patch_weight=0.5, patches_per_image=4, pairs_per_patch=100)
    terms = ppl_loss(out, labels, patch_labels, cfg)
    assert terms.bce.item() == pytest.approx(F.binary_cross_entropy_with_logits(out.image_logit, labels).item())
    assert terms.patch.item() == pytest.approx(
        F.binary_cross_entropy_with_logits(out.patch_logits, patch_labels).item())
    assert terms.pcl.item() > 0
    expected = 0.3 * terms.pcl + 0.7 * terms.bce + 0.5 * terms.patch
    assert terms.total.item() == pytest.approx(expected.item())


def test_baseline_weights_reduce_to_plain_bce():
    out = _output()
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    cfg = LossConfig(pcl_weight=0.0, patch_weight=0.0)
    terms = ppl_loss(out, labels, labels[:, None, None].expand(-1, 2, 2), cfg)
    assert terms.pcl.item() == 0.0 and terms.patch.item() == 0.0
    assert terms.total.item() == pytest.approx(terms.bce.item())


def test_pcl_warmup_ramps_lambda_then_holds_it():
    cfg = LossConfig(pcl_weight=0.3, pcl_warmup_fraction=0.5)
    weights = [scheduled(cfg, step, total_steps=100).pcl_weight for step in (0, 25, 49, 50, 99)]
    assert weights == pytest.approx([0.0, 0.15, 0.3 * 49 / 50, 0.3, 0.3])
    constant = LossConfig(pcl_weight=0.3)
    assert scheduled(constant, 0, total_steps=100) is constant
