"""ppl bench synth: photo split, caching, dataset layout, and one quick end-to-end run through the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ppl_model.analysis.cde import SUMMARY_KEYS
from ppl_model.cli import main
from ppl_model.config import DataConfig
from ppl_model.data.datasets import evaluation_subsets, index_dataset, list_images
from ppl_model.detector import build_detector
from ppl_model.evaluation.metrics import METRICS
from ppl_model.synthbench.config import ARMS, LocalEditFamily, SampledFamily, SynthBenchConfig, SynthBenchError
from ppl_model.synthbench.generators import local_edit_masks, reconstruct, to_uint8_images
from ppl_model.synthbench.stages import (
    arm_config,
    build_crops,
    build_generators,
    build_pretrained,
    detector_config,
    regime_config,
    split_photos,
    write_datasets,
)
from tests.helpers import PHOTOS

# A few seconds of work: two generator families (one also sampled), tiny crops, a handful of steps.
SMALL = SynthBenchConfig(
    preset="test", crop_size=32, train_crops_per_photo=3, val_crops_per_photo=2, test_crops_per_photo=2,
    val_fraction=0.2, test_fraction=0.3, families=("ae_nearest_x4", "ae_transposed_x8"),
    sampled=(SampledFamily("ae_transposed_x8_sampled", "ae_transposed_x8", "gaussian"),),
    edits=(LocalEditFamily("edit_nearest_x4", "ae_nearest_x4"),),
    train_family="ae_nearest_x4", generator_crop_size=32, generator_steps=4, generator_batch_size=8, seeds=1,
    robustness=False, analysis_real=4, analysis_fake=4, pretrain_steps=30, pretrain_batch_size=8)


@pytest.fixture(scope="module")
def photo_subset(tmp_path_factory) -> Path:
    """Ten of the shared photos."""
    folder = tmp_path_factory.mktemp("photos")
    for path in sorted(PHOTOS.glob("*.png"))[:10]:
        shutil.copy(path, folder / path.name)
    return folder


def _dummy_photos(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        Image.new("RGB", (8, 8)).save(folder / f"{name}.png")
    return folder


def _stems(folder: Path) -> list[str]:
    return [p.stem for p in list_images(folder)]


def test_photo_split_is_disjoint_deterministic_and_independent_of_listing_order(tmp_path):
    names = [f"photo_{i:02d}" for i in range(40)]
    split = split_photos(_dummy_photos(tmp_path / "a", names), val_fraction=0.125, test_fraction=0.25)
    parts = split.names()
    assert split.sizes() == {"train": 25, "val": 5, "test": 10}
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == names  # a partition: disjoint, complete
    # The same file names in another folder, created in another order: the same split.
    again = split_photos(_dummy_photos(tmp_path / "b", names[::-1]), val_fraction=0.125, test_fraction=0.25)
    assert again.names() == parts
    # Decided by the names, not by position: the split is not simply the sorted order cut in three.
    assert parts["test"] != names[:10] and parts["train"] != names[15:]


def test_photo_split_needs_three_photos(tmp_path):
    with pytest.raises(ValueError, match="at least 3"):
        split_photos(_dummy_photos(tmp_path / "p", ["a", "b"]))


def test_every_crop_comes_from_a_photo_of_its_own_split(tmp_path, photo_subset):
    crops = build_crops(photo_subset, SMALL, tmp_path / "cache")
    assert crops.split_sizes == {"train": 5, "val": 2, "test": 3}
    photos = {split: set(names) for split, names in crops.photos.items()}
    assert not (photos["train"] & photos["val"]) and not (photos["train"] & photos["test"])
    assert not (photos["val"] & photos["test"])
    per_photo = {"train": 3, "val": 2, "test": 2}
    for split, names in crops.names.items():
        assert crops.tensors[split].shape == (len(names), 3, 32, 32)
        assert len(names) == per_photo[split] * len(photos[split])
        assert {name.rsplit("_", 1)[0] for name in names} == photos[split]


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_crops_and_generators_are_cached_and_rebuilt_when_a_setting_changes(tmp_path, photo_subset):
    cache = tmp_path / "cache"
    crops = build_crops(photo_subset, SMALL, cache)
    first = build_generators(crops, SMALL, cache)
    assert crops.built and all(g.trained for g in first.values())
    assert set(first) == {"ae_nearest_x4", "ae_transposed_x8"}  # the sampled family reuses its source
    mtimes = {name: g.path.stat().st_mtime_ns for name, g in first.items()}

    crops_again = build_crops(photo_subset, SMALL, cache)
    second = build_generators(crops_again, SMALL, cache)
    assert not crops_again.built and crops_again.key == crops.key
    assert not any(g.trained for g in second.values())
    assert {name: g.path.stat().st_mtime_ns for name, g in second.items()} == mtimes
    for name, g in second.items():
        for a, b in zip(first[name].model.state_dict().values(), g.model.state_dict().values(), strict=True):
            assert (a == b).all()

    more_steps = dataclasses.replace(SMALL, generator_steps=5)
    third = build_generators(build_crops(photo_subset, more_steps, cache), more_steps, cache)
    assert all(g.trained for g in third.values())
    assert all(third[name].path != first[name].path for name in third)

    bigger_crops = dataclasses.replace(SMALL, train_crops_per_photo=4)
    rebuilt = build_crops(photo_subset, bigger_crops, cache)
    assert rebuilt.built and rebuilt.key != crops.key
    assert all(g.trained for g in build_generators(rebuilt, bigger_crops, cache).values())


def test_datasets_have_the_paired_layout_with_aligned_names(tmp_path, photo_subset):
    cache = tmp_path / "cache"
    crops = build_crops(photo_subset, SMALL, cache)
    data = write_datasets(crops, build_generators(crops, SMALL, cache), SMALL, cache)
    assert data.built

    for split in ("train", "val"):
        real, fake = data.detector_data / split / "real", data.detector_data / split / "ae_nearest_x4"
        assert sorted(p.name for p in data.detector_data.joinpath(split).iterdir()) == ["ae_nearest_x4", "real"]
        assert _stems(real) == _stems(fake) == sorted(crops.names[split])
        for a, b in zip(list_images(real), list_images(fake), strict=True):
            assert Image.open(a).size == Image.open(b).size == (32, 32)
    splits = index_dataset(data.detector_data, DataConfig(layout="paired"))
    fakes = [s for s in splits.train if s.label == 1]
    assert fakes and all(s.partner is not None and s.partner.stem == s.path.stem for s in fakes)
    # Each reconstruction is its own real crop through the generator: pixel-aligned with it.
    generators = build_generators(crops, SMALL, cache)
    index = crops.names["train"].index(fakes[0].path.stem)
    expected = to_uint8_images(reconstruct(generators["ae_nearest_x4"].model, crops.floats("train")[index:index + 1]))
    assert np.array_equal(np.asarray(Image.open(fakes[0].path)), np.asarray(expected[0]))
    assert np.array_equal(np.asarray(Image.open(fakes[0].partner)),
                          crops.tensors["train"][index].permute(1, 2, 0).numpy())

    test_real = set(_stems(data.test_data / "real"))
    for name in SMALL.families:
        assert set(_stems(data.test_data / name)) == test_real
    sampled = set(_stems(data.test_data / "ae_transposed_x8_sampled"))
    assert len(sampled) == len(test_real) and not sampled & test_real  # no real partner
    # Local edits: real crops with one region regenerated; most pixels are the real crop's own.
    assert set(_stems(data.test_data / "edit_nearest_x4")) == test_real
    for path in list_images(data.test_data / "edit_nearest_x4"):
        edited = np.asarray(Image.open(path)).astype(int)
        real = np.asarray(Image.open(data.test_data / "real" / path.name)).astype(int)
        same = (np.abs(edited - real).max(-1) == 0).mean()
        assert 0.4 < same < 0.95
    _, subsets = evaluation_subsets(data.test_data, "paired")
    assert set(subsets) == set(SMALL.all_families)
    assert all(sum(s.label == 0 for s in items) == len(test_real) for items in subsets.values())

    analysis_fakes = _stems(data.analysis_images / "fake")
    assert len(_stems(data.analysis_images / "real")) == 4 and len(analysis_fakes) == 4
    assert {name.split("__")[0] for name in analysis_fakes} == set(SMALL.unseen)  # never the train family
    assert not write_datasets(crops, build_generators(crops, SMALL, cache), SMALL, cache).built


def test_config_validation_and_overrides():
    cfg = SynthBenchConfig.full().with_overrides(["generator_steps=2000", 'train_family="ae_shuffle_x4"',
                                                   "robustness=false", 'families=["ae_shuffle_x4", "ae_nearest_x4"]'])
    assert (cfg.generator_steps, cfg.train_family, cfg.robustness) == (2000, "ae_shuffle_x4", False)
    assert cfg.families == ("ae_shuffle_x4", "ae_nearest_x4")
    with pytest.raises(SynthBenchError, match="sampled family"):
        cfg.validate()  # the default sampled families need ae_transposed_x8
    with pytest.raises(SynthBenchError, match="FIELD"):
        cfg.with_overrides(["no_such_field=1"])
    with pytest.raises(SynthBenchError, match="must be int"):
        cfg.with_overrides(["seeds=two"])
    with pytest.raises(SynthBenchError, match="train_family"):
        SynthBenchConfig(train_family="ae_shuffle_x4_sampled").validate()
    for preset in ("quick", "full", "gpu"):
        SynthBenchConfig.preset_named(preset).validate()
    with pytest.raises(SynthBenchError, match="arms"):
        SynthBenchConfig(arms=("baseline", "magic")).validate()
    with pytest.raises(SynthBenchError, match="target_fpr"):
        SynthBenchConfig(target_fpr=0.0).validate()
    assert SynthBenchConfig.full().with_overrides(['arms=["baseline", "rpr"]']).arms == ("baseline", "rpr")


def test_local_edit_masks_cover_the_asked_area_with_a_soft_edge():
    masks = local_edit_masks(50, 64, 64, area=0.25, seed=3)
    assert masks.shape == (50, 1, 64, 64) and masks.min() >= 0 and masks.max() <= 1
    area = masks.mean(dim=(1, 2, 3))
    assert (area > 0.15).all() and (area < 0.35).all() and abs(float(area.mean()) - 0.25) < 0.04
    soft = ((masks > 0) & (masks < 1)).float().mean(dim=(1, 2, 3))
    assert (soft > 0).all()  # a feathered edge, as an inpainting blend
    assert not torch.equal(masks[0], masks[1])  # each edit somewhere else
    assert torch.equal(masks, local_edit_masks(50, 64, 64, area=0.25, seed=3))


def test_each_arm_switches_exactly_its_ingredients():
    exp = detector_config(None, SynthBenchConfig.quick(), ["loss.pcl_weight=0.3", "loss.patch_weight=0.5"])
    table = {arm: arm_config(exp, arm) for arm in ARMS}
    on = {arm: (c.rpr.enabled, c.loss.pcl_weight > 0, c.loss.patch_weight > 0, c.augment.patch_dropout)
          for arm, c in table.items()}
    assert on["baseline"] == (False, False, False, 0.0)
    assert on["patch-dropout"] == (False, False, False, 0.15)
    assert on["rpr"] == (True, False, False, 0.0)
    assert on["pcl"] == (False, True, False, 0.0)
    assert on["rpr+pcl"] == (True, True, False, 0.0)
    assert on["rpr+pcl+patch-head"] == (True, True, True, 0.0)
    assert table["rpr+pcl-paper-form"].loss.pcl_form == "paper"
    # The baseline arm is exactly `ppl train --baseline`; nothing else differs between arms.
    assert table["baseline"].to_dict() == exp.as_baseline().to_dict()
    for arm, cfg in table.items():
        for section in ("model", "data", "optim", "train"):
            assert cfg.to_dict()[section] == exp.to_dict()[section], arm


def test_the_pretrained_stand_in_learns_on_real_crops_and_loads_as_a_lora_backbone(tmp_path, photo_subset):
    cache = tmp_path / "cache"
    crops = build_crops(photo_subset, SMALL, cache)
    exp = detector_config(None, SMALL, ["model.size=tiny", "model.input_size=32", "model.patch_size=8"])
    pre = build_pretrained(crops, SMALL, exp, cache)
    assert pre.built and pre.final_loss < pre.first_loss
    assert (pre.path / "config.json").is_file() and (pre.path / "preprocessor_config.json").is_file()
    again = build_pretrained(crops, SMALL, exp, cache)
    assert not again.built and again.path == pre.path
    lora = regime_config(exp, SMALL, "pretrained-lora", pre)
    assert lora.model.finetune == "lora" and Path(lora.model.pretrained) == pre.path.resolve()
    detector = build_detector(lora.model)
    assert detector.grid_size == 4
    trainable = {n for n, p in detector.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n or "head" in n for n in trainable)
    assert regime_config(exp, SMALL, "scratch", None) is exp


TINY_TOML = """
[model]
arch = "clip"
size = "tiny"
input_size = 32
patch_size = 8
finetune = "full"

[data]
workers = 0

[loss]
pcl_warmup_fraction = 0.6
patches_per_image = 8
pairs_per_patch = 8

[optim]
lr = 1e-3

[train]
epochs = 2
batch_size = 16
checkpoint_every = 1000
"""


@pytest.mark.slow
def test_quick_benchmark_through_the_cli(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    out = tmp_path / "bench"
    args = ["bench", "synth", "--photos", str(PHOTOS), "--out", str(out), "--quick", "--config", str(config),
            "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "stage generators done" in printed and "mean over unseen families" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "done"
    split, photos = results["splits"]["photos"], len(list(PHOTOS.glob("*.png")))  # the repository's samples
    assert sum(split.values()) == photos and split["train"] > split["test"] > split["val"] >= 1
    families = SynthBenchConfig.quick().all_families
    assert set(results["families"]) == set(families) and len(families) >= 7
    assert results["unseen"] == [f for f in families if f != "ae_nearest_x4"]
    runs = results["runs"]["seed0"]
    methods = SynthBenchConfig.quick().methods
    assert set(runs) == set(methods) and len(methods) == 12
    for method in methods:
        record = runs[method]
        assert set(record["subsets"]) == set(families)
        for metrics in [*record["subsets"].values(), record["mean_unseen"]]:
            assert all(math.isfinite(metrics[key]) for key in METRICS)
        assert set(SUMMARY_KEYS) <= set(record["cde"])
        assert record["cde"]["normalized_entropy_fake"]["n"] > 0
        assert 0 < record["threshold"] < 1 and record["calibration"]["target_fpr"] == 0.05
        assert record["telemetry"]["patch_cosine_end"] is not None
        aggregate = results["aggregate"][method]
        assert set(aggregate["per_family"]) == set(families)
        assert aggregate["mean_unseen"]["acc"]["n"] == 1 and set(SUMMARY_KEYS) <= set(aggregate["cde"])
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch"]
    assert results["wall_seconds"]["total"] > 0
    report = (out / "report.md").read_text()
    assert "## Regime `scratch`" in report and "## Regime `pretrained-lora`" in report
    assert "### Few-Patch Bias" in report and "edit_shuffle_x4" in report and "rpr+pcl+patch-head" in report

    # A rerun with the same settings retrains only the detectors.
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["cache"] == results["cache"] | {"generators_trained": []}
    assert results["cache"]["generators_trained"] == list(SynthBenchConfig.quick().families)
