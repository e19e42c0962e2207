"""The ``ppl`` command as a user runs it: a real process, real photos, exit codes and messages."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from ppl_model.data.toy import make_toy_dataset
from ppl_model.model_dir import load_model_dir
from tests.helpers import REPO, make_folders_dataset

PPL = [sys.executable, "-m", "ppl_model.cli"]
FAST = ["--set", "train.epochs=1", "--set", "data.workers=2", "--no-progress"]


def _run(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO, **kwargs)


@pytest.fixture(scope="module")
def photo_data(tmp_path_factory, photos):
    """real/ and fake/ crops of a few of the shared photos."""
    subset = tmp_path_factory.mktemp("photos")
    for path in sorted(photos.glob("*.png"))[:12]:
        shutil.copy(path, subset / path.name)
    out = tmp_path_factory.mktemp("toy")
    counts = make_toy_dataset(subset, out, crops_per_photo=3, crop=80)
    assert counts["pairs"] == 36
    return out


@pytest.mark.slow
@pytest.mark.parametrize("baseline", [False, True])
def test_train_on_real_photos_writes_a_loadable_model_directory(tmp_path, photo_data, baseline):
    out = tmp_path / "model"
    args = [*PPL, "train", "--config", "configs/tiny.toml", "--data", str(photo_data), "--out", str(out), *FAST]
    result = _run([*args, "--baseline"] if baseline else args)
    assert result.returncode == 0, result.stderr
    assert "written to" in result.stdout
    _, info = load_model_dir(out)
    assert info.training["baseline"] is baseline and info.grid == [8, 8] and info.input_size == 64
    assert (out / "checkpoints" / "last.pt").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "start" and rows[-1]["event"] == "done"


@pytest.mark.slow
def test_paired_layout_from_the_same_folder_uses_reconstruction_rpr(tmp_path, photo_data):
    out = tmp_path / "model"
    result = _run([*PPL, "train", "--config", "configs/tiny.toml", "--data", str(photo_data), "--out", str(out),
                   *FAST, "--set", "data.layout=paired", "--set", 'rpr.variant="reconstruction"'])
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["layout"] == "paired"
    assert sum(r["rpr_fraction"] for r in rows if r["event"] == "train") > 0


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_user_errors_exit_2_with_one_line(tmp_path):
    result = _run([*PPL, "train", "--config", "configs/tiny.toml", "--data", str(tmp_path / "none"),
                   "--out", str(tmp_path / "o")])
    assert result.returncode == 2
    assert "data folder not found" in result.stderr and "Traceback" not in result.stderr
    result = _run([*PPL, "train", "--config", "configs/tiny.toml", "--data", str(tmp_path), "--out",
                   str(tmp_path / "o"), "--set", "train.nope=1"])
    assert result.returncode == 2 and "unknown key" in result.stderr


@pytest.mark.slow
def test_torchrun_two_processes_train_without_code_change(tmp_path):
    data = make_folders_dataset(tmp_path / "data", count=16)
    out = tmp_path / "model"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "ppl_model.cli", "train", "--config", "configs/tiny.toml", "--data", str(data), "--out",
                   str(out), "--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "data.workers=0",
                   "--set", "model.input_size=32", "--no-progress"], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = rows[0]
    assert start["world_size"] == 2
    # 27 training images over 2 ranks: 14 per rank, 4 per batch, 4 steps an epoch.
    assert [r["step"] for r in rows if r["event"] == "train"] == list(range(1, 9))
    load_model_dir(out)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["clip", "dinov2"])
def test_train_from_a_local_pretrained_folder_with_lora(tmp_path, arch):
    """The main use: a downloaded Hugging Face folder, LoRA on q/v, merged into the saved model."""
    import torch
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    if arch == "clip":  # a full CLIP folder, text tower included, as published
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                "vocab_size": 99}
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision)).save_pretrained(tmp_path / "hf")
    else:
        Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                 image_size=32, patch_size=8)).save_pretrained(tmp_path / "hf")
    data = make_folders_dataset(tmp_path / "data", count=8, paired=True)
    out = tmp_path / "model"
    result = _run([*PPL, "train", "--config", "configs/clip-vit-l14.toml", "--data", str(data), "--out", str(out),
                   "--set", f"model.arch={arch}", "--set", f"model.pretrained={tmp_path / 'hf'}",
                   "--set", "model.input_size=32", "--set", "data.layout=paired", "--set", "data.workers=0",
                   "--set", "train.batch_size=4", "--set", "train.amp=off", "--no-progress"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = rows[0]
    assert start["trainable_params"] < start["total_params"] / 3 and start["rpr_pairs"] > 0
    detector, info = load_model_dir(out)
    assert info.arch == arch and info.grid == [4, 4] and info.backbone_config["hidden_size"] == 32
    assert not any("lora" in key for key in detector.state_dict())
