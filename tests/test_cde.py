"""Few-Patch-Bias analysis: masked copies, batched CDE against a slow reference, uniformity numbers, analyze."""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ppl_model.analysis.cde import (
    SUMMARY_KEYS,
    UNIFORMITY_KEYS,
    analyze,
    counterfactual_effects,
    counterfactual_effects_many,
    patch_masked_copies,
    uniformity,
)
from ppl_model.detector import build_detector
from ppl_model.inference.preprocess import Preprocessing, prepare
from ppl_model.model_dir import load_model_dir, save_model_dir, write_threshold
from tests.helpers import REPO, make_folders_dataset, noise_image, tiny_model_config

S, P, G = 32, 8, 4


def random_detector(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    detector = build_detector(tiny_model_config())
    with torch.no_grad():
        for name, p in detector.named_parameters():
            if "lora_B" in name or "head" in name:
                p.normal_(0, 0.3)  # so that every patch can move the logit
    return detector.eval()


class PatchMeanLinear(nn.Module):
    """A detector stand-in whose logit is Σ w_ij · mean(patch ij) + b: its CDE is known in closed form."""

    def __init__(self, weights: torch.Tensor, bias: float = 0.0):
        super().__init__()
        self.weights, self.bias = weights, bias

    def forward(self, pixels: torch.Tensor) -> SimpleNamespace:
        means = F.avg_pool2d(pixels.mean(dim=1, keepdim=True), P)[:, 0]  # (N, G, G)
        return SimpleNamespace(image_logit=(means * self.weights).sum(dim=(1, 2)) + self.bias)


def reference_effects(detector: nn.Module, pixels: torch.Tensor, fill: torch.Tensor) -> tuple[float, np.ndarray]:
    """One forward per masked copy, the patch written by plain slicing."""
    with torch.no_grad():
        base = float(detector(pixels[None]).image_logit[0])
        cde = np.zeros((G, G))
        for i in range(G):
            for j in range(G):
                masked = pixels.clone()
                masked[:, i * P:(i + 1) * P, j * P:(j + 1) * P] = fill[:, None, None]
                cde[i, j] = base - float(detector(masked[None]).image_logit[0])
    return base, cde


def test_masked_copy_k_differs_exactly_in_patch_ij_and_holds_the_fill():
    pixels = torch.randn(3, S, S)
    fill = torch.tensor([5.0, -6.0, 7.0])  # far outside randn's range: no pixel equals it by chance
    copies = patch_masked_copies(pixels, P, fill)
    assert copies.shape == (G * G, 3, S, S)
    for i in range(G):
        for j in range(G):
            copy = copies[i * G + j]
            expected = torch.zeros(S, S, dtype=torch.bool)
            expected[i * P:(i + 1) * P, j * P:(j + 1) * P] = True
            assert torch.equal((copy != pixels).any(dim=0), expected)
            assert torch.equal(copy[:, expected], fill[:, None].expand(3, P * P))
    with pytest.raises(ValueError, match="grid"):
        patch_masked_copies(torch.zeros(3, 30, 30), P, fill)


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
@pytest.mark.parametrize("batch_size", [1, 4, 5, 16, 17, 256])
def test_batched_cde_equals_one_forward_per_masked_copy(batch_size):
    detector = random_detector()
    pixels, fill = torch.randn(3, S, S), torch.tensor([0.3, -0.2, 0.1])
    base, cde = counterfactual_effects(detector, pixels, P, fill, batch_size=batch_size)
    ref_base, ref_cde = reference_effects(detector, pixels, fill)
    assert cde.shape == (G, G)
    assert base == pytest.approx(ref_base, abs=1e-5)
    np.testing.assert_allclose(cde, ref_cde, atol=1e-4)
    assert np.abs(ref_cde).max() > 1e-3  # the comparison is not between two zero maps


def test_several_images_share_forward_passes_of_at_most_batch_size():
    detector = random_detector(1)
    sizes = []
    detector.register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    crops, fill = torch.randn(3, 3, S, S), torch.zeros(3)
    bases, cdes = counterfactual_effects_many(detector, crops, P, fill, batch_size=10)
    assert sum(sizes) == 3 * (G * G + 1) and max(sizes) <= 10 and len(sizes) == math.ceil(51 / 10)
    for crop, base, cde in zip(crops, bases, cdes, strict=True):
        ref_base, ref_cde = reference_effects(detector, crop, fill)
        assert base == pytest.approx(ref_base, abs=1e-5)
        np.testing.assert_allclose(cde, ref_cde, atol=1e-4)


def test_a_detector_looking_at_one_patch_has_all_its_cde_there():
    weights = torch.zeros(G, G)
    weights[2, 1] = 3.0
    pixels = torch.rand(3, S, S) + 0.5  # positive patch means, fill 0: masking lowers the logit
    base, cde = counterfactual_effects(PatchMeanLinear(weights, bias=-1.0), pixels, P, torch.zeros(3))
    expected = np.zeros((G, G))
    expected[2, 1] = 3.0 * float(pixels[:, 2 * P:3 * P, P:2 * P].mean())
    np.testing.assert_allclose(cde, expected, atol=1e-5)
    assert base == pytest.approx(expected[2, 1] - 1.0, abs=1e-5)
    u = uniformity(cde)
    assert u["top1_mass"] == pytest.approx(1.0) and u["top5pct_mass"] == pytest.approx(1.0)
    assert u["normalized_entropy"] == pytest.approx(0.0, abs=1e-12)
    assert u["gini"] == pytest.approx((G * G - 1) / (G * G))  # the most unequal a distribution over N can be


def test_a_detector_weighting_all_patches_equally_has_uniform_cde():
    pixels = torch.full((3, S, S), 0.7)
    _, cde = counterfactual_effects(PatchMeanLinear(torch.ones(G, G)), pixels, P, torch.zeros(3), batch_size=3)
    np.testing.assert_allclose(cde, np.full((G, G), 0.7), atol=1e-6)
    u = uniformity(cde)
    # Equal up to float32 rounding of the stand-in's logits.
    assert u["normalized_entropy"] == pytest.approx(1.0, abs=1e-6)
    assert u["gini"] == pytest.approx(0.0, abs=1e-6)
    assert u["top1_mass"] == pytest.approx(1 / 16, abs=1e-6) and u["top5pct_mass"] == pytest.approx(1 / 16, abs=1e-6)


def test_uniformity_matches_hand_computed_values():
    # p = [.75, .25, 0, 0]: H = −(.75 ln .75 + .25 ln .25) / ln 4; top 5 % of 4 patches = 1 patch;
    # Gini by mean absolute difference: Σ|p_i − p_j| = 5 over ordered pairs, / (2 · 4² · 0.25) = 0.625.
    u = uniformity(np.array([[3.0, 1.0], [0.0, -2.0]]))
    assert u["normalized_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
    assert u["top1_mass"] == pytest.approx(0.75) and u["top5pct_mass"] == pytest.approx(0.75)
    assert u["gini"] == pytest.approx(0.625)
    # 5×5: p = .5, .3, .2 on three patches; top 5 % = ceil(1.25) = 2 patches; Gini = 45.2 / 50.
    cde = -np.ones((5, 5))
    cde[0, 0], cde[3, 4], cde[4, 4] = 5.0, 3.0, 2.0
    u = uniformity(cde)
    assert u["normalized_entropy"] == pytest.approx(-sum(p * math.log(p) for p in (0.5, 0.3, 0.2)) / math.log(25))
    assert u["top1_mass"] == pytest.approx(0.5) and u["top5pct_mass"] == pytest.approx(0.8)
    assert u["gini"] == pytest.approx(0.904)


@pytest.mark.parametrize("cde", [np.zeros((4, 4)), -np.ones((4, 4))])
def test_uniformity_is_undefined_when_no_patch_pushes_towards_fake(cde):
    u = uniformity(cde)
    assert set(u) == set(UNIFORMITY_KEYS) and all(math.isnan(v) for v in u.values())


def save_random_model(path: Path) -> Path:
    save_model_dir(random_detector(), path)
    return path


def test_analyze_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for kind, smooth in (("real", False), ("fake", True)):
        (data / kind / "sub").mkdir(parents=True)
        noise_image(rng, (40, 40), smooth).save(data / kind / "a.png")
        noise_image(rng, (24, 36), smooth).save(data / kind / "b.png")  # smaller than the crop: padded
        noise_image(rng, (48, 40), smooth).save(data / kind / "sub" / "c.png")
    (data / "fake" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    model = save_random_model(tmp_path / "model")
    readable = sorted(p for p in data.rglob("*.png") if p.name != "broken.png")

    # Threshold at the median score, so some images are predicted fake and the flip rate is defined.
    detector, info = load_model_dir(model)
    prep = Preprocessing.for_model(info)
    crops = torch.cat([prepare(p, prep).crops for p in readable])
    with torch.no_grad():
        logits = detector(crops).image_logit.numpy()
    median = float(np.median(logits))
    write_threshold(model, 1 / (1 + math.exp(-median)))

    out = tmp_path / "out"
    summary = analyze(model, data, out, baseline="mean", batch_size=7, progress=False, device="cpu")
    assert json.loads((out / "summary.json").read_text()) == summary
    for key in SUMMARY_KEYS:
        stats = summary[key]
        assert set(stats) == {"mean", "std", "n"}
        if stats["n"]:
            assert math.isfinite(stats["mean"])
        if stats["n"] > 1:
            assert math.isfinite(stats["std"])
    assert summary["images"] == 6 and summary["grid"] == [G, G] and summary["version_id"] == info.version_id
    assert summary["normalized_entropy_all"]["n"] + summary["undefined_uniformity"] == 6
    assert summary["normalized_entropy_fake"]["n"] + summary["normalized_entropy_real"]["n"] == \
        summary["normalized_entropy_all"]["n"]
    fake_labelled = np.array([p.relative_to(data).parts[0] == "fake" for p in readable])
    assert summary["flip_rate"]["n"] == int((logits[fake_labelled] >= median).sum())
    assert summary["random_patch_accuracy_drop"]["n"] == 6
    assert [(Path(s["path"]).name, s["reason"]) for s in summary["skipped"]] == [("broken.png", "not_an_image")]

    # The mean baseline is the mean colour of the readable centre crops, padding included.
    pixel_means = [(prepare(p, prep).crops[0] * torch.tensor(prep.std)[:, None, None]
                    + torch.tensor(prep.mean)[:, None, None]).mean(dim=(1, 2)) for p in readable]
    np.testing.assert_allclose(summary["fill_rgb"], torch.stack(pixel_means).mean(0).numpy(), atol=1e-5)

    heatmaps = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert heatmaps == sorted(f"{p.relative_to(data).as_posix().replace('/', '__')}.png" for p in readable)
    with Image.open(out / "heatmaps" / "fake__sub__c.png.png") as img:
        assert img.width > 50 and img.height > 50

    records = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in records) == sorted(str(p) for p in readable)
    fill = torch.tensor(summary["fill"])
    for record in records:
        path = Path(record["path"])
        assert record["label"] == (1 if path.relative_to(data).parts[0] == "fake" else 0)
        assert record["probability"] == pytest.approx(1 / (1 + math.exp(-record["base_logit"])))
        fake = record["base_logit"] >= median
        assert record["correct"] == (int(fake) == record["label"])
        assert isinstance(record["random_patch_correct"], bool)
        assert (record["flipped"] is None) == (not (fake and record["label"] == 1))
        # Checked against a fresh forward of the crop with its most influential patch masked.
        crop = prepare(path, prep).crops[0]
        i, j = record["top_patch"]
        masked = patch_masked_copies(crop, P, fill)[i * G + j]
        with torch.no_grad():
            base, masked_logit = detector(torch.stack([crop, masked])).image_logit.tolist()
        assert record["base_logit"] == pytest.approx(base, abs=1e-4)
        assert record["max_cde"] == pytest.approx(base - masked_logit, abs=1e-4)
        if fake and record["label"] == 1:
            assert record["flipped"] == (masked_logit < median)


@pytest.mark.parametrize("baseline", ["zero", "black"])
def test_analyze_unlabelled_folder_with_fixed_baselines(tmp_path, baseline):
    rng = np.random.default_rng(1)
    data = tmp_path / "images"
    data.mkdir()
    for k in range(2):
        noise_image(rng, (36, 36), smooth=bool(k)).save(data / f"img{k}.png")
    model = save_random_model(tmp_path / "model")
    info = load_model_dir(model)[1]
    summary = analyze(model, data, tmp_path / "out", baseline=baseline, progress=False, device="cpu")
    mean, std = np.array(info.mean), np.array(info.std)
    expected = np.zeros(3) if baseline == "zero" else -mean / std
    np.testing.assert_allclose(summary["fill"], expected, atol=1e-6)
    assert summary["baseline"] == baseline and summary["images"] == 2 and summary["skipped"] == []
    assert summary["random_patch_accuracy_drop"] == {"mean": None, "std": None, "n": 0}
    records = [json.loads(line) for line in (tmp_path / "out" / "images.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == [None, None]
    assert all(r["random_patch_correct"] is None and r["correct"] is None for r in records)
    assert len(list((tmp_path / "out" / "heatmaps").glob("img*.png.png"))) == 2


def test_flip_rate_counts_fakes_only_and_uniformity_is_summarised_per_label(tmp_path):
    # Every image predicted fake (threshold ~0): the real ones are false positives, never "flips".
    rng = np.random.default_rng(3)
    data = tmp_path / "data"
    for kind, count in (("real", 4), ("fake", 2)):
        (data / kind).mkdir(parents=True)
        for k in range(count):
            noise_image(rng, (32, 32), smooth=kind == "fake").save(data / kind / f"{k}.png")
    model = save_random_model(tmp_path / "model")
    write_threshold(model, 1e-12)
    summary = analyze(model, data, tmp_path / "out", progress=False, device="cpu")
    records = [json.loads(line) for line in (tmp_path / "out" / "images.jsonl").read_text().splitlines()]
    assert all(r["predicted"] == 1 for r in records)
    assert [r["flipped"] is None for r in records if r["label"] == 0] == [True] * 4
    assert summary["flip_rate"]["n"] == 2  # the two fakes, not all six predicted-fake images
    flips = [float(r["flipped"]) for r in records if r["label"] == 1]
    assert summary["flip_rate"]["mean"] == pytest.approx(sum(flips) / 2)
    for key in UNIFORMITY_KEYS:
        for group, label in (("fake", 1), ("real", 0)):
            values = [r[key] for r in records if r["label"] == label and r[key] is not None]
            assert summary[f"{key}_{group}"]["n"] == len(values)
            if values:
                assert summary[f"{key}_{group}"]["mean"] == pytest.approx(float(np.mean(values)))
    # The paper's fill is the default, and the summary says which fill was used.
    assert summary["baseline"] == "zero" and "paper" in summary["fill_description"]
    np.testing.assert_allclose(summary["fill"], np.zeros(3), atol=1e-6)


def test_analyze_rejects_an_unknown_baseline(tmp_path):
    with pytest.raises(ValueError, match="baseline"):
        analyze(tmp_path, tmp_path, tmp_path / "out", baseline="grey", progress=False)


@pytest.mark.gpu
def test_analyze_on_cuda_agrees_with_cpu(tmp_path):
    rng = np.random.default_rng(2)
    for kind in ("real", "fake"):
        (tmp_path / "data" / kind).mkdir(parents=True)
        for k in range(3):
            noise_image(rng, (40, 40), smooth=kind == "fake").save(tmp_path / "data" / kind / f"{k}.png")
    model = save_random_model(tmp_path / "model")
    results = {}
    for device in ("cpu", "cuda"):
        analyze(model, tmp_path / "data", tmp_path / device, batch_size=16, progress=False, device=device)
        results[device] = [json.loads(line) for line in (tmp_path / device / "images.jsonl").read_text().splitlines()]
    for cpu, cuda in zip(results["cpu"], results["cuda"], strict=True):
        assert cuda["path"] == cpu["path"]
        assert cuda["base_logit"] == pytest.approx(cpu["base_logit"], abs=1e-2)  # TF32 convolutions on CUDA
        assert cuda["max_cde"] == pytest.approx(cpu["max_cde"], abs=1e-2)


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_analyze_command_prints_every_summary_figure(tmp_path, exported_model):
    data = make_folders_dataset(tmp_path / "data", count=3)
    result = subprocess.run([sys.executable, "-m", "ppl_model.cli", "analyze", "--model", str(exported_model),
                             "--images", str(data), "--out", str(tmp_path / "out"), "--no-progress"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    printed = {line.split()[0] for line in result.stdout.splitlines()}
    assert set(SUMMARY_KEYS) <= printed
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["images"] == 6
