"""Configs as data: TOML, overrides, validation, the baseline switch, and the shipped files."""

from pathlib import Path

import pytest

from ppl_model.config import ConfigError, ExperimentConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_toml_values_and_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\narch = "dinov2"\n[model.lora]\nrank = 8\n[train]\nepochs = 3\n')
    cfg = load_config(path)
    assert (cfg.model.arch, cfg.model.lora.rank, cfg.train.epochs) == ("dinov2", 8, 3)
    assert cfg.rpr.ratio == 0.5 and cfg.rpr.prob == 0.9 and cfg.loss.pcl_weight == 0.3 and cfg.loss.margin == 1.0


def test_overrides_parse_toml_literals(tmp_path):
    cfg = load_config(None, ["train.epochs=7", "optim.lr=3e-4", "rpr.enabled=false",
                             "augment.jpeg_quality=[50, 90]", "model.pretrained=/models/clip", "model.lora.rank=2"])
    assert cfg.train.epochs == 7 and cfg.optim.lr == 3e-4 and cfg.rpr.enabled is False
    assert cfg.augment.jpeg_quality == [50, 90] and cfg.model.pretrained == "/models/clip"
    assert cfg.model.lora.rank == 2


@pytest.mark.parametrize(("override", "message"), [
    ("train.epochz=3", "unknown key"),
    ("train.epochs=three", "must be int"),
    ("rpr.ratio=1.5", "rpr.ratio"),
    ("model.arch=resnet", "model.arch"),
    ("rpr.enabled=1", "true or false"),
    ("epochs", "section.key=value"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("[train\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(tmp_path / "bad.toml")


def test_baseline_switches_off_only_the_ppl_parts():
    cfg = load_config(None, ["train.epochs=5"])
    base = cfg.as_baseline()
    assert base.rpr.enabled is False and base.loss.pcl_weight == 0 and base.loss.patch_weight == 0
    for section in ("model", "data", "augment", "optim", "train"):
        assert getattr(base, section) == getattr(cfg, section)
    assert cfg.rpr.enabled is True  # the original is untouched


@pytest.mark.parametrize("name", ["tiny.toml", "clip-vit-l14.toml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, ExperimentConfig)


def test_paper_recipe_config():
    cfg = load_config(CONFIGS / "clip-vit-l14.toml")
    assert (cfg.model.arch, cfg.model.finetune, cfg.model.lora.rank, cfg.model.input_size) == ("clip", "lora", 4, 224)
    assert (cfg.rpr.ratio, cfg.rpr.prob, cfg.loss.pcl_weight, cfg.loss.margin) == (0.5, 0.9, 0.3, 1.0)
    assert cfg.augment.jpeg_quality == [30, 100] and cfg.augment.jpeg_prob == 0.5 and cfg.augment.blur_prob == 0.1
