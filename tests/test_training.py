"""Training runs end to end: loss falls, baseline switches the PPL parts off, resume is exact, outputs load."""

import json

import pytest
import torch
from PIL import Image

from ppl_model.model_dir import load_model_dir
from ppl_model.training import runner
from ppl_model.training.runner import EpochSampler, TrainingError, run_training
from tests.helpers import make_folders_dataset, tiny_experiment


def _paired(tmp_path, count):
    return make_folders_dataset(tmp_path / "data", count=count, paired=True)


def _events(out, kind):
    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if row["event"] == kind]


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_tiny_training_run_loss_falls_and_writes_a_loadable_model(tmp_path):
    data = _paired(tmp_path, 48)
    cfg = tiny_experiment(train={"epochs": 20, "batch_size": 8})
    info = run_training(cfg, data, tmp_path / "out", show_progress=False)
    steps = _events(tmp_path / "out", "train")
    assert len(steps) == info.training["steps"] > 100
    first, last = steps[:20], steps[-20:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "loss") < 0.8 * mean(first, "loss")
    assert mean(last, "bce") < 0.9 * mean(first, "bce")
    assert mean(last, "patch") < mean(first, "patch")
    assert mean(last, "acc") > 0.65
    assert _events(tmp_path / "out", "start")[0]["rpr_pairs"] > 30
    assert any(r["rpr_fraction"] > 0 for r in steps) and all(r["pcl"] > 0 for r in steps)
    assert info.training["validation"]["acc"] > 0.75
    _, loaded = load_model_dir(tmp_path / "out")
    assert loaded.version_id == info.version_id and loaded.training["baseline"] is False


def test_baseline_trains_with_plain_bce_only(tmp_path):
    data = _paired(tmp_path, 16)
    cfg = tiny_experiment()
    info = run_training(cfg, data, tmp_path / "out", baseline=True, show_progress=False)
    steps = _events(tmp_path / "out", "train")
    assert all(r["pcl"] == 0 and r["patch"] == 0 and r["rpr_fraction"] == 0 for r in steps)
    assert all(r["loss"] == pytest.approx(r["bce"]) for r in steps)
    saved = info.training["config"]
    assert saved["rpr"]["enabled"] is False and saved["loss"]["pcl_weight"] == 0
    for section in ("model", "data", "augment", "optim", "train"):  # everything else identical
        assert saved[section] == cfg.to_dict()[section]
    load_model_dir(tmp_path / "out")


def test_lora_run_keeps_the_backbone_and_merges_on_save(tmp_path):
    data = _paired(tmp_path, 8)
    cfg = tiny_experiment(model={"finetune": "lora"}, train={"epochs": 1})
    run_training(cfg, data, tmp_path / "out", show_progress=False)
    start = _events(tmp_path / "out", "start")[0]
    assert start["trainable_params"] < start["total_params"] / 5
    detector, _ = load_model_dir(tmp_path / "out")
    assert not any("lora" in k for k in detector.state_dict())


class Crash(RuntimeError):
    pass


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_resume_after_a_crash_reaches_the_same_weights(tmp_path, monkeypatch):
    data = _paired(tmp_path, 20)
    cfg = tiny_experiment(train={"epochs": 2, "batch_size": 4, "checkpoint_every": 3})
    run_training(cfg, data, tmp_path / "straight", show_progress=False)

    real_save = runner._save_checkpoint
    calls = {"n": 0}

    def crash_after_second_checkpoint(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # step 6: part-way through the first epoch (8 batches)
            raise Crash

    monkeypatch.setattr(runner, "_save_checkpoint", crash_after_second_checkpoint)
    with pytest.raises(Crash):
        run_training(cfg, data, tmp_path / "resumed", show_progress=False)
    monkeypatch.setattr(runner, "_save_checkpoint", real_save)
    with pytest.raises(TrainingError, match="--resume"):
        run_training(cfg, data, tmp_path / "resumed", show_progress=False)
    run_training(cfg, data, tmp_path / "resumed", resume=True, show_progress=False)

    a, _ = load_model_dir(tmp_path / "straight")
    b, _ = load_model_dir(tmp_path / "resumed")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    steps = [r["step"] for r in _events(tmp_path / "resumed", "train")]
    assert steps == sorted(set(steps)) and steps[-1] == _events(tmp_path / "straight", "train")[-1]["step"]


def test_resume_refuses_a_changed_config_or_a_missing_checkpoint(tmp_path):
    data = _paired(tmp_path, 8)
    run_training(tiny_experiment(train={"epochs": 1}), data, tmp_path / "out", show_progress=False)
    with pytest.raises(TrainingError, match="train.epochs"):
        run_training(tiny_experiment(train={"epochs": 3}), data, tmp_path / "out", resume=True, show_progress=False)
    with pytest.raises(TrainingError, match="nothing to resume"):
        run_training(tiny_experiment(), data, tmp_path / "fresh", resume=True, show_progress=False)


def test_gradient_accumulation_takes_one_step_per_group(tmp_path):
    data = _paired(tmp_path, 16)
    cfg = tiny_experiment(data={"val_fraction": 0.0}, train={"epochs": 1, "batch_size": 4, "grad_accum": 2})
    info = run_training(cfg, data, tmp_path / "out", show_progress=False)
    assert info.training["steps"] == 4  # 32 images / 4 per batch / 2 batches per step
    assert info.training["epochs"] == 1
    assert [r["images"] for r in _events(tmp_path / "out", "train")] == [8, 8, 8, 8]


def test_rpr_without_pairs_warns(tmp_path):
    data = make_folders_dataset(tmp_path / "data", count=8)
    cfg = tiny_experiment(data={"layout": "folders"}, train={"epochs": 1})
    with pytest.warns(UserWarning, match="no training fake"):
        run_training(cfg, data, tmp_path / "out", show_progress=False)


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_unreadable_training_files_are_logged_not_fatal(tmp_path):
    data = _paired(tmp_path, 8)
    (data / "fake" / "truncated.png").write_bytes((data / "fake" / "img_000.png").read_bytes()[:60])
    cfg = tiny_experiment(data={"val_fraction": 0.0}, train={"epochs": 2})
    info = run_training(cfg, data, tmp_path / "out", show_progress=False)
    skipped = _events(tmp_path / "out", "skipped")
    assert [s["path"].rsplit("/", 1)[-1] for s in skipped] == ["truncated.png", "truncated.png"]
    assert info.training["skipped_files"] == 2


def test_epoch_sampler_shards_evenly_and_resumes_mid_epoch():
    shards = []
    for rank in range(3):
        sampler = EpochSampler(10, seed=1, rank=rank, world_size=3)
        sampler.set_epoch(2)
        shards.append(list(sampler))
    assert [len(s) for s in shards] == [4, 4, 4]
    assert {i for shard in shards for i in shard} == set(range(10))
    sampler = EpochSampler(10, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=6)
    assert list(sampler) == full[6:] and len(sampler) == 4
    sampler.set_epoch(3)
    assert list(sampler) != full


def test_each_step_logs_every_loss_term_and_the_collapse_indicators(tmp_path):
    data = _paired(tmp_path, 16)
    run_training(tiny_experiment(loss={"pcl_projection": 16}), data, tmp_path / "out", show_progress=False)
    steps = _events(tmp_path / "out", "train")
    for row in steps:
        assert {"loss", "bce", "pcl", "patch", "patch_cosine", "cls_std", "contrast_cosine",
                "size_mismatched_pairs"} <= set(row)
        assert -1.0 <= row["patch_cosine"] <= 1.0 and -1.0 <= row["contrast_cosine"] <= 1.0
        assert row["cls_std"] > 0


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_a_collapse_of_the_patch_embeddings_warns_and_is_logged(tmp_path):
    # The paper's PCL alone (λ = 1, no BCE, no patch loss) on label-blind noise: it collapses the tokens.
    data = _paired(tmp_path, 24)
    cfg = tiny_experiment(loss={"pcl_weight": 1.0, "patch_weight": 0.0, "pcl_form": "paper", "pcl_projection": 0,
                                "pcl_warmup_fraction": 0.0}, train={"epochs": 8, "batch_size": 8})
    with pytest.warns(UserWarning, match="patch embeddings collapsed"):
        run_training(cfg, data, tmp_path / "out", show_progress=False)
    warnings = _events(tmp_path / "out", "warning")
    assert len(warnings) == 1 and warnings[0]["kind"] == "collapse" and warnings[0]["patch_cosine"] > 0.9
    steps = _events(tmp_path / "out", "train")
    assert steps[0]["patch_cosine"] < 0.9 < steps[-1]["patch_cosine"]


def test_the_pcl_projection_head_trains_but_is_not_part_of_the_saved_model(tmp_path):
    data = _paired(tmp_path, 8)
    cfg = tiny_experiment(loss={"pcl_projection": 16}, train={"epochs": 1})
    info = run_training(cfg, data, tmp_path / "out", show_progress=False)
    start = _events(tmp_path / "out", "start")[0]
    without = run_training(tiny_experiment(loss={"pcl_projection": 0}, train={"epochs": 1}), data,
                           tmp_path / "plain", show_progress=False)
    assert start["trainable_params"] > _events(tmp_path / "plain", "start")[0]["trainable_params"]
    detector, loaded = load_model_dir(tmp_path / "out")  # strict: no leftover projection weights
    assert loaded.version_id == info.version_id and detector.pcl_projection is None
    assert not any("pcl_projection" in k for k in detector.state_dict())
    assert without.training["config"]["loss"]["pcl_projection"] == 0


def test_size_mismatched_pairs_are_counted_in_the_metrics(tmp_path):
    data = _paired(tmp_path, 12)
    for path in sorted((data / "fake").glob("*.png"))[:6]:  # reconstructions at twice the size
        with Image.open(path) as img:
            img.resize((img.width * 2, img.height * 2), Image.Resampling.NEAREST).save(path)
    cfg = tiny_experiment(data={"val_fraction": 0.0}, rpr={"prob": 1.0}, train={"epochs": 2})
    info = run_training(cfg, data, tmp_path / "out", show_progress=False)
    steps = _events(tmp_path / "out", "train")
    assert steps[-1]["size_mismatched_pairs"] == info.training["size_mismatched_pairs"] == 12  # 6 per epoch
    assert [r["size_mismatched_pairs"] for r in steps] == sorted(r["size_mismatched_pairs"] for r in steps)
