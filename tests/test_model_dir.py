"""The model directory round-trips exactly and refuses what is missing, partial or mismatched."""

import json

import pytest
import torch

from ppl_model.detector import build_detector
from ppl_model.model_dir import MODEL_JSON, WEIGHTS_FILE, ModelDirError, load_model_dir, read_model_info, save_model_dir
from tests.helpers import tiny_model_config


def _trained_like_detector(arch="clip", seed=0):
    torch.manual_seed(seed)
    detector = build_detector(tiny_model_config(arch))
    with torch.no_grad():
        for name, p in detector.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return detector.eval()


@pytest.mark.parametrize("arch", ["clip", "dinov2"])
def test_round_trip_gives_identical_outputs(tmp_path, arch):
    detector = _trained_like_detector(arch)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before_merge = detector(x)
    info = save_model_dir(detector, tmp_path / "m", threshold=0.7, training={"note": "test"})
    loaded, loaded_info = load_model_dir(tmp_path / "m")
    with torch.no_grad():
        merged, reloaded = detector(x), loaded(x)
    for a, b in zip(merged, reloaded, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(before_merge, reloaded, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert loaded_info == info
    assert info.grid == [4, 4] and info.input_size == 32 and info.patch_size == 8 and info.threshold == 0.7
    assert info.arch == arch and len(info.mean) == 3 and len(info.version_id) == 16
    assert not any("lora" in k for k in loaded.state_dict())


def test_version_id_follows_the_weights(tmp_path):
    a = save_model_dir(_trained_like_detector(seed=0), tmp_path / "a")
    b = save_model_dir(_trained_like_detector(seed=0), tmp_path / "b")
    c = save_model_dir(_trained_like_detector(seed=1), tmp_path / "c")
    assert a.version_id == b.version_id != c.version_id


def test_missing_directory_json_or_weights(tmp_path):
    with pytest.raises(ModelDirError, match="not found"):
        load_model_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match="model.json is missing"):
        load_model_dir(tmp_path / "empty")
    save_model_dir(_trained_like_detector(), tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelDirError, match="model.safetensors is missing"):
        load_model_dir(tmp_path / "m")


def test_partial_weights_are_refused(tmp_path):
    save_model_dir(_trained_like_detector(), tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelDirError, match="partial, corrupt"):
        load_model_dir(tmp_path / "m")
    with pytest.raises(ModelDirError, match="cannot read"):
        load_model_dir(tmp_path / "m", verify=False)


def test_description_that_does_not_fit_the_weights_is_refused(tmp_path):
    save_model_dir(_trained_like_detector(), tmp_path / "m")
    meta_path = tmp_path / "m" / MODEL_JSON
    meta = json.loads(meta_path.read_text())
    meta["backbone_config"]["num_hidden_layers"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="does not match model.json"):
        load_model_dir(tmp_path / "m")
    with pytest.raises(ModelDirError, match="does not fit the architecture"):
        load_model_dir(tmp_path / "m", verify=False)


def test_malformed_or_future_description_is_refused(tmp_path):
    save_model_dir(_trained_like_detector(), tmp_path / "m")
    meta_path = tmp_path / "m" / MODEL_JSON
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ModelDirError, match="format_version 99"):
        read_model_info(tmp_path / "m")
    del meta["grid"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="lacks grid"):
        read_model_info(tmp_path / "m")
    meta_path.write_text("{not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        read_model_info(tmp_path / "m")
