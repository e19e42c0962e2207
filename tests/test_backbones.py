"""Backbones: named shapes, local Hugging Face folders, LoRA targets, merging, full fine-tuning."""

import json

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

from ppl_model.backbones import BackboneError, build_backbone
from ppl_model.config import LoRAConfig
from tests.helpers import tiny_model_config

TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8}


@pytest.mark.parametrize("arch", ["clip", "dinov2"])
def test_named_shape_gives_pooled_and_patch_tokens(arch):
    backbone = build_backbone(tiny_model_config(arch))
    pooled, patches = backbone(torch.randn(3, 3, 32, 32))
    assert backbone.grid_size == 4
    assert pooled.shape == (3, 64) and patches.shape == (3, 16, 64)


def test_named_shapes_have_paper_dimensions():
    from ppl_model.backbones import NAMED_SHAPES
    large = NAMED_SHAPES["vit-l-14"]
    assert (large.hidden_size, large.num_layers, large.image_size // large.patch_size) == (1024, 24, 16)


def test_input_size_must_fit_patch_grid():
    with pytest.raises(BackboneError, match="multiple"):
        build_backbone(tiny_model_config(input_size=36))


def test_unknown_size_is_a_clear_error():
    with pytest.raises(BackboneError, match="unknown model size"):
        build_backbone(tiny_model_config(size="huge"))


def _same_outputs(a, b, x):
    with torch.no_grad():
        for u, v in zip(a(x), b(x), strict=True):
            torch.testing.assert_close(u, v)


def test_loads_clip_vision_folder(tmp_path):
    torch.manual_seed(0)
    source = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).eval()
    source.save_pretrained(tmp_path / "clip")
    backbone = build_backbone(tiny_model_config(pretrained=str(tmp_path / "clip"))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source(pixel_values=x).pooler_output
        pooled, patches = backbone(x)
    torch.testing.assert_close(pooled, expected)
    assert patches.shape == (2, 16, 32)


def test_loads_vision_tower_of_full_clip_folder(tmp_path):
    torch.manual_seed(0)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 99}
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=16)).eval()
    full.save_pretrained(tmp_path / "clip-full")
    backbone = build_backbone(tiny_model_config(pretrained=str(tmp_path / "clip-full"))).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=x).pooler_output
        torch.testing.assert_close(backbone(x)[0], expected)


def test_loads_dinov2_folder_with_its_normalisation(tmp_path):
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32,
                       patch_size=8)
    source = Dinov2Model(cfg).eval()
    source.save_pretrained(tmp_path / "dino")
    (tmp_path / "dino" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    backbone = build_backbone(tiny_model_config("dinov2", pretrained=str(tmp_path / "dino"))).eval()
    assert backbone.mean == (0.5, 0.5, 0.5) and backbone.std == (0.25, 0.25, 0.25)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)[0], source(pixel_values=x).pooler_output)


def test_folder_of_other_family_is_refused(tmp_path):
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "clip")
    with pytest.raises(BackboneError, match="model.arch is 'dinov2'"):
        build_backbone(tiny_model_config("dinov2", pretrained=str(tmp_path / "clip")))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(BackboneError, match="no config.json"):
        build_backbone(tiny_model_config(pretrained=str(tmp_path)))


@pytest.mark.parametrize("arch", ["clip", "dinov2"])
def test_lora_adapts_query_and_value_of_every_block_only(arch):
    backbone = build_backbone(tiny_model_config(arch))
    backbone.apply_lora(LoRAConfig(rank=4, alpha=8.0))
    trainable = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == set(backbone.lora_targets([]))
    assert len(trainable) == 2 * 2 * 2  # 2 blocks × (q, v) × (A, B)
    assert all(4 in p.shape for p in trainable.values())


def test_lora_targets_are_configurable():
    backbone = build_backbone(tiny_model_config())
    backbone.apply_lora(LoRAConfig(rank=2, targets=["k_proj"]))
    names = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert names and all("k_proj.lora_" in n for n in names)


def test_merged_lora_computes_the_same_function():
    torch.manual_seed(0)
    backbone = build_backbone(tiny_model_config()).eval()
    backbone.apply_lora(LoRAConfig(rank=4))
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero; make the adapters matter
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = backbone(x)
        backbone.merge_lora()
        after = backbone(x)
    assert not any("lora" in n for n, _ in backbone.named_parameters())
    for u, v in zip(before, after, strict=True):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)
