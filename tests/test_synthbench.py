"""ppl bench synth: photo split, caching, dataset layout, and one quick end-to-end run through the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppl_model.analysis.cde import SUMMARY_KEYS
from ppl_model.cli import main
from ppl_model.config import DataConfig
from ppl_model.data.datasets import evaluation_subsets, index_dataset, list_images
from ppl_model.evaluation.metrics import METRICS
from ppl_model.synthbench.benchmark import (
    METHODS,
    SampledFamily,
    SynthBenchConfig,
    SynthBenchError,
    build_crops,
    build_generators,
    split_photos,
    write_datasets,
)
from ppl_model.synthbench.generators import reconstruct, to_uint8_images
from tests.helpers import PHOTOS

# A few seconds of work: two generator families (one also sampled), tiny crops, a handful of steps.
SMALL = SynthBenchConfig(
    preset="test", crop_size=32, train_crops_per_photo=3, val_crops_per_photo=2, test_crops_per_photo=2,
    val_fraction=0.2, test_fraction=0.3, families=("ae_nearest_x4", "ae_transposed_x8"),
    sampled=(SampledFamily("ae_transposed_x8_sampled", "ae_transposed_x8", "gaussian"),),
    train_family="ae_nearest_x4", generator_crop_size=32, generator_steps=4, generator_batch_size=8, seeds=1,
    robustness=False, analysis_real=4, analysis_fake=4)


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
    assert results["splits"]["photos"] == {"train": 40, "val": 8, "test": 16}
    families = SynthBenchConfig.quick().all_families
    assert set(results["families"]) == set(families) and len(families) >= 7
    assert results["unseen"] == [f for f in families if f != "ae_nearest_x4"]
    runs = results["runs"]["seed0"]
    assert set(runs) == set(METHODS)
    for method in METHODS:
        record = runs[method]
        assert set(record["subsets"]) == set(families)
        for metrics in [*record["subsets"].values(), record["mean_unseen"]]:
            assert all(math.isfinite(metrics[key]) for key in METRICS)
        assert set(SUMMARY_KEYS) <= set(record["cde"])
        assert record["cde"]["normalized_entropy"]["n"] > 0
        aggregate = results["aggregate"][method]
        assert set(aggregate["per_family"]) == set(families)
        assert aggregate["mean_unseen"]["acc"]["n"] == 1 and set(SUMMARY_KEYS) <= set(aggregate["cde"])
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch"]
    assert results["wall_seconds"]["total"] > 0
    report = (out / "report.md").read_text()
    assert "## Cross-generator accuracy" in report and "## Few-Patch Bias" in report
    assert "| **mean over unseen** |" in report and "ae_transposed_x8_sampled" in report

    # A rerun with the same settings retrains only the detectors.
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["cache"] == results["cache"] | {"generators_trained": []}
    assert results["cache"]["generators_trained"] == list(SynthBenchConfig.quick().families)
