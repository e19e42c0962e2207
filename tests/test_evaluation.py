"""ppl eval: metrics, calibration, subsets per layout, robustness, the command's JSON."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ppl_model.data.datasets import evaluation_subsets
from ppl_model.evaluation.evaluate import evaluate_model
from ppl_model.evaluation.metrics import detection_metrics, threshold_for_fpr
from ppl_model.evaluation.perturbations import ROBUSTNESS
from ppl_model.model_dir import read_model_info
from tests.helpers import REPO, make_folders_dataset, noise_image


def test_metrics_match_hand_computed_values():
    scores = np.array([0.1, 0.4, 0.6, 0.35, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    m = detection_metrics(scores, labels, threshold=0.5)
    assert m["acc_real"] == pytest.approx(2 / 3) and m["acc_fake"] == pytest.approx(2 / 3)
    assert m["acc"] == pytest.approx(2 / 3)
    # AUROC = P(fake score > real score) over the 9 pairs: 0.35 beats only 0.1, 0.8 and 0.9 beat all three.
    assert m["auroc"] == pytest.approx(7 / 9)
    # AP: ranked 0.9+, 0.8+, 0.6-, 0.4-, 0.35+, 0.1- → precisions at the fakes 1, 1, 3/5.
    assert m["ap"] == pytest.approx((1 + 1 + 3 / 5) / 3)
    assert (m["real"], m["fake"]) == (3, 3)


def test_one_class_has_no_ranking_metrics():
    m = detection_metrics(np.array([0.2, 0.7]), np.array([0, 0]), 0.5)
    assert m["acc_real"] == 0.5 and np.isnan(m["acc_fake"]) and np.isnan(m["auroc"])


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_calibrated_threshold_meets_the_target_and_is_as_low_as_possible(fpr):
    real = np.random.default_rng(0).random(200)
    threshold = threshold_for_fpr(real, fpr)
    assert (real >= threshold).mean() <= fpr
    lower = np.nextafter(np.sort(real)[::-1][int(fpr * 200)], -np.inf)
    assert (real >= lower).mean() > fpr or lower >= threshold
    with pytest.raises(ValueError):
        threshold_for_fpr(real, 0.0)


def test_subsets_per_layout(tmp_path):
    rng = np.random.default_rng(0)
    for gen in ("sd14", "wukong"):
        for kind in ("ai", "nature"):
            (tmp_path / "g" / gen / "val" / kind).mkdir(parents=True)
            for i in range(2):
                noise_image(rng, (16, 16), kind == "ai").save(tmp_path / "g" / gen / "val" / kind / f"{i}.png")
    layout, subsets = evaluation_subsets(tmp_path / "g")
    assert layout == "genimage" and sorted(subsets) == ["sd14", "wukong"]
    assert sorted(s.label for s in subsets["sd14"]) == [0, 0, 1, 1]
    paired = make_folders_dataset(tmp_path / "p", count=3, paired=True)
    shutil.copytree(paired / "fake", paired / "other")
    layout, subsets = evaluation_subsets(paired, "paired")
    assert sorted(subsets) == ["fake", "other"] and all(len(items) == 6 for items in subsets.values())


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_evaluate_calibrates_writes_the_threshold_and_covers_every_perturbation(tmp_path, exported_model):
    model = tmp_path / "model"
    shutil.copytree(exported_model, model)
    data = make_folders_dataset(tmp_path / "data", count=20)
    (data / "fake" / "broken.png").write_bytes((data / "fake" / "fake_000.png").read_bytes()[:100])
    version = read_model_info(model).version_id
    result = evaluate_model(model, data, backend="torch", robustness=True, target_fpr=0.1,
                            roc_png=tmp_path / "roc.png", batch_size=8, workers=2, progress=False)
    info = read_model_info(model)
    assert info.threshold == result["threshold"] and info.version_id == version
    fake = result["subsets"]["fake"]
    assert (fake["real"], fake["fake"]) == (20, 20) and fake["acc_real"] >= 0.9
    assert list(result["skipped"].values()) == ["corrupt"]
    assert set(result["robustness"]) == set(ROBUSTNESS)
    assert all(0 <= block["mean"]["auroc"] <= 1 for block in result["robustness"].values())
    assert Image.open(tmp_path / "roc.png").size[0] > 100


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_eval_command_prints_a_table_and_writes_the_json(tmp_path, exported_model):
    data = make_folders_dataset(tmp_path / "data", count=6)
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, "-m", "ppl_model.cli", "eval", "--model", str(exported_model),
                             "--data", str(data), "--json", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[:3] == ["subset", "real", "fake"]
    figures = json.loads(out.read_text())
    assert set(figures["subsets"]["fake"]) >= {"acc_real", "acc_fake", "acc", "ap", "auroc"}
    assert set(figures["mean"]) == {"acc_real", "acc_fake", "acc", "ap", "auroc"}
    result = subprocess.run([sys.executable, "-m", "ppl_model.cli", "eval", "--model", str(exported_model),
                             "--data", str(data), "--calibrate"], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 2 and "--target-fpr" in result.stderr
