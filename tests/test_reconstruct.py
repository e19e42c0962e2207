"""``ppl reconstruct`` on a tiny random-initialised diffusers pipeline built here, and training on its output."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ppl_model import reconstruct
from ppl_model.cli import main
from ppl_model.config import DataConfig, RPRConfig
from ppl_model.data.datasets import (
    FAKE,
    REAL,
    RECONSTRUCTION_SUBSET,
    DataLayoutError,
    DetectionDataset,
    detect_layout,
    index_dataset,
)
from tests.helpers import IDENTITY, NO_AUG, REPO, noise_image

FAST_INPAINT = ["--method", "inpaint", "--steps", "4", "--strength", "0.5"]  # two denoising steps


def _write_tokenizer_files(folder):
    """A byte-pair vocabulary of a few tokens, in the files CLIPTokenizer reads."""
    tokens = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>",
              "low</w>", "er</w>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    return folder / "vocab.json", folder / "merges.txt"


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A Stable Diffusion inpainting pipeline of diffusers' own classes with tiny shapes (VAE factor 4, a
    9-channel UNet, a 1-layer CLIP text encoder), saved with save_pretrained as a local pipeline folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                        block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, sample_size=32)
    unet = UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                attention_head_dim=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=8, projection_dim=16))
    vocab, merges = _write_tokenizer_files(root / "tokenizer-source")
    tokenizer = CLIPTokenizer(vocab_file=str(vocab), merges_file=str(merges), model_max_length=8)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(root / "sd-inpaint-tiny")
    return root / "sd-inpaint-tiny"


# Odd sizes and sizes that are a multiple of the VAE's 4, in nested folders, in three formats.
SIZES = {"a.png": (33, 21), "b.jpg": (40, 24), "sub/c.png": (17, 30), "sub/deeper/d.webp": (24, 24),
         "sub/e.png": (33, 21)}


def _make_images(folder, sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    for name, size in sizes.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        options = {".jpg": {"quality": 95}, ".webp": {"lossless": True}}.get(path.suffix, {})
        noise_image(rng, size, smooth=True).save(path, **options)
    return folder


def _run(pipeline, images, out, *extra):
    return main(["reconstruct", "--pipeline", str(pipeline), "--images", str(images), "--out", str(out),
                 "--no-progress", *extra])


def _report(out):
    return json.loads((out / reconstruct.REPORT_NAME).read_text())


def _pngs(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


@pytest.mark.parametrize("method", [["--method", "vae"], FAST_INPAINT])
def test_outputs_mirror_the_inputs_pixel_aligned_lossless_and_bit_identical_on_rerun(tmp_path, tiny_pipeline, method):
    images = _make_images(tmp_path / "images")
    assert _run(tiny_pipeline, images, tmp_path / "out", *method, "--batch-size", "2") == 0
    outputs = _pngs(tmp_path / "out")
    assert sorted(outputs) == sorted(Path(n).with_suffix(".png").as_posix() for n in SIZES)
    for name, size in SIZES.items():
        with Image.open(tmp_path / "out" / Path(name).with_suffix(".png")) as out:
            assert out.format == "PNG" and out.mode == "RGB" and out.size == size
            with Image.open(images / name) as original:
                # A reconstruction, not a copy, but of the same picture (pixel differences bounded by a random VAE's).
                assert not np.array_equal(np.asarray(out), np.asarray(original.convert("RGB")))
    report = _report(tmp_path / "out")
    assert report["status"] == "done" and report["written"] == 5 and report["skipped"] == []
    assert report["layout"] == "plain" and report["recipe"]["method"] == method[1]

    # A second run from scratch, with another batch size: the same bytes, file for file.
    assert _run(tiny_pipeline, images, tmp_path / "again", *method, "--batch-size", "1") == 0
    assert _pngs(tmp_path / "again") == outputs
    # Another seed draws other noise (vae samples its latent; inpaint noises the latents).
    assert _run(tiny_pipeline, images, tmp_path / "seed1", *method, "--seed", "1") == 0
    assert _pngs(tmp_path / "seed1")["a.png"] != outputs["a.png"]


def test_vae_mode_is_deterministic_without_a_seed_and_differs_from_inpaint(tmp_path, tiny_pipeline):
    images = _make_images(tmp_path / "images", {"x.png": (20, 12)})
    for seed in ("0", "7"):
        assert _run(tiny_pipeline, images, tmp_path / f"mode{seed}", "--latent", "mode", "--seed", seed) == 0
    assert _pngs(tmp_path / "mode0") == _pngs(tmp_path / "mode7")
    assert _run(tiny_pipeline, images, tmp_path / "inpaint", *FAST_INPAINT) == 0
    assert _pngs(tmp_path / "inpaint") != _pngs(tmp_path / "mode0")


def test_a_rerun_skips_finished_files_and_redoes_only_what_is_missing(tmp_path, tiny_pipeline):
    images = _make_images(tmp_path / "images")
    out = tmp_path / "out"
    assert _run(tiny_pipeline, images, out) == 0
    first = _pngs(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert _run(tiny_pipeline, images, out) == 0
    assert _report(out)["written"] == 0 and _report(out)["already_done"] == 5
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps
    # A missing file and a damaged one are made again; the damaged one is not "valid" just for existing.
    (out / "sub" / "c.png").unlink()
    (out / "a.png").write_bytes(first["a.png"][:-20])  # header intact, pixel data and end cut off
    assert _run(tiny_pipeline, images, out) == 0
    assert _report(out)["written"] == 2 and _report(out)["already_done"] == 3
    assert _pngs(out) == first  # per-file seeds: the same bytes, though they were now reconstructed apart


def test_a_run_killed_while_writing_leaves_no_partial_png_and_resumes(tmp_path, tiny_pipeline, monkeypatch):
    images = _make_images(tmp_path / "images")
    out = tmp_path / "out"
    original_save = Image.Image.save
    calls = []

    def save_then_die(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:  # the third PNG: half written, then the process is interrupted
            with open(fp, "wb") as handle:
                handle.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
            raise KeyboardInterrupt
        return original_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_pipeline, images, out, "--batch-size", "1")
    monkeypatch.setattr(Image.Image, "save", original_save)
    written = sorted(out.rglob("*.png"))
    assert len(written) == 2  # the two finished ones; the third never got its final name
    for path in written:
        with Image.open(path) as img:
            img.load()  # whole files only
    assert not [p for p in out.rglob("*") if p.name.endswith(reconstruct.PARTIAL_SUFFIX)]
    assert _report(out)["status"] == "running"  # the report says the run did not finish

    # A hard kill (no cleanup) can leave a temporary file: hidden, no image suffix, removed by the next run.
    stale = out / "sub" / f".c.png{reconstruct.PARTIAL_SUFFIX}"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"\x89PNG")
    assert _run(tiny_pipeline, images, out) == 0
    assert _report(out)["written"] == 3 and _report(out)["already_done"] == 2 and not stale.exists()
    assert _run(tiny_pipeline, images, tmp_path / "clean") == 0
    assert _pngs(out) == _pngs(tmp_path / "clean")


def test_unreadable_inputs_are_reported_and_do_not_stop_the_run(tmp_path, tiny_pipeline, capsys):
    images = _make_images(tmp_path / "images", {"good.png": (20, 20), "z/later.png": (20, 20)})
    (images / "corrupt.png").write_bytes((images / "good.png").read_bytes()[:60])
    (images / "text.jpg").write_bytes(b"not an image at all")
    _make_images(images, {"huge.png": (64, 64)})
    assert _run(tiny_pipeline, images, tmp_path / "out", "--max-pixels", "1000") == 0
    report = _report(tmp_path / "out")
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert reasons == {"corrupt.png": "corrupt", "text.jpg": "not_an_image", "huge.png": "too_large"}
    assert report["written"] == 2 and report["skipped_count"] == 3
    assert sorted(_pngs(tmp_path / "out")) == ["good.png", "z/later.png"]
    assert "3 input(s) skipped" in capsys.readouterr().out


def test_genimage_tree_reconstructs_real_training_images_and_trains_with_rpr(tmp_path, tiny_pipeline):
    data = tmp_path / "genimage"
    for gen in ("sd14", "midj"):
        for split in ("train", "val"):
            _make_images(data / gen / split / "nature", {f"n{i}.png": (32, 32) for i in range(3)}, seed=1)
            _make_images(data / gen / split / "ai", {f"a{i}.png": (32, 32) for i in range(3)}, seed=2)
    recon = tmp_path / "recon"
    assert _run(tiny_pipeline, data, recon, "--generators", "sd14") == 0
    # Only the chosen generator's real training images, at their paths relative to the data folder.
    assert sorted(_pngs(recon)) == [f"sd14/train/nature/n{i}.png" for i in range(3)]
    assert _report(recon)["layout"] == "genimage"

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every real training image of the chosen generator has its partner
        splits = index_dataset(data, DataConfig(generators=["sd14"], reconstructions=str(recon)))
    assert splits.layout == "genimage"
    paired = [s for s in splits.train if s.partner is not None]
    assert len(paired) == 3 and all(s.label == FAKE and s.subset == RECONSTRUCTION_SUBSET for s in paired)
    assert {s.partner.relative_to(data).with_suffix("") for s in paired} == \
        {s.path.relative_to(recon).with_suffix("") for s in paired}
    assert len(splits.train) == 6 + 3 and len(splits.val) == 6  # GenImage's own fakes stay, unpaired
    with pytest.warns(UserWarning, match="3 of 6 real training images have no reconstruction"):
        index_dataset(data, DataConfig(reconstructions=str(recon)))  # midj's were not reconstructed

    dataset = DetectionDataset(paired, input_size=32, patch_size=8, train=True, augment=NO_AUG,
                               rpr=RPRConfig(prob=1.0, ratio=0.5), **IDENTITY)
    for index, sample in enumerate(paired):
        item = dataset[index]
        assert item["rpr"] is True and item["label"] == 1 and item["size_mismatched"] is False
        pixels = item["pixel_values"].permute(1, 2, 0).numpy().round().astype(np.uint8)
        real = np.asarray(Image.open(sample.partner).convert("RGB"))
        made = np.asarray(Image.open(sample.path).convert("RGB"))
        labels = item["patch_labels"].numpy()
        assert labels.mean() == 0.5
        for i in range(4):
            for j in range(4):
                block = np.s_[8 * i:8 * i + 8, 8 * j:8 * j + 8]
                source = made if labels[i, j] == 1 else real
                assert np.array_equal(pixels[block], source[block])  # the patch label says where it came from
                assert not np.array_equal(real[block], made[block])  # and the two sources do differ there


def test_folders_layout_keeps_its_fakes_and_gains_paired_reconstructions(tmp_path, tiny_pipeline):
    data = tmp_path / "data"
    _make_images(data / "real", {f"r{i}.png": (24, 20) for i in range(4)}, seed=3)
    _make_images(data / "fake", {f"r{i}.png": (24, 20) for i in range(4)}, seed=4)  # same names, unrelated pictures
    recon = tmp_path / "recon"
    assert _run(tiny_pipeline, data, recon) == 0
    assert sorted(_pngs(recon)) == [f"real/r{i}.png" for i in range(4)] and _report(recon)["layout"] == "folders"
    splits = index_dataset(data, DataConfig(reconstructions=str(recon), val_fraction=0.0))
    assert splits.layout == "folders"
    fakes = [s for s in splits.train if s.label == FAKE]
    assert sum(s.partner is not None for s in fakes) == 4  # the reconstructions, and only they
    assert all(s.subset == RECONSTRUCTION_SUBSET for s in fakes if s.partner is not None)
    assert sum(s.label == REAL for s in splits.train) == 4


def test_reconstructing_real_into_a_sibling_folder_is_the_paired_layout(tmp_path, tiny_pipeline):
    data = tmp_path / "data"
    _make_images(data / "real", {f"r{i}.jpg": (24, 20) for i in range(4)}, seed=3)
    assert _run(tiny_pipeline, data / "real", data / "sd-vae") == 0
    assert detect_layout(data) == "paired"
    splits = index_dataset(data, DataConfig(val_fraction=0.0))
    assert sum(s.partner is not None for s in splits.train) == 4


def test_a_reconstruction_folder_that_matches_nothing_or_sits_inside_the_data_is_refused(tmp_path):
    data = _make_images(tmp_path / "data", {"real/a.png": (16, 16), "fake/b.png": (16, 16)})
    elsewhere = _make_images(tmp_path / "elsewhere", {"a.png": (16, 16)})  # not at real/a.png
    with pytest.raises(DataLayoutError, match="expected e.g"):
        index_dataset(data, DataConfig(reconstructions=str(elsewhere)))
    with pytest.raises(DataLayoutError, match="inside the data folder"):
        index_dataset(data, DataConfig(reconstructions=str(data / "fake")))
    with pytest.raises(DataLayoutError, match="not found"):
        index_dataset(data, DataConfig(reconstructions=str(tmp_path / "none")))


def test_user_errors_exit_2_with_a_reason(tmp_path, tiny_pipeline, capsys):
    images = _make_images(tmp_path / "images", {"a.png": (16, 16)})
    assert _run(tiny_pipeline, images, images / "out") == 2
    assert "inside --images" in capsys.readouterr().err
    assert _run(tiny_pipeline, images, tmp_path / "out", "--method", "inpaint", "--steps", "2") == 2
    assert "no denoising step" in capsys.readouterr().err
    assert _run(tmp_path / "no-pipeline", images, tmp_path / "out") == 2
    assert "pipeline folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _run(tiny_pipeline, tmp_path / "empty", tmp_path / "out") == 2
    assert "no images to reconstruct" in capsys.readouterr().err
    assert _run(tiny_pipeline, images, tmp_path / "out", "--precision", "fp16", "--device", "cpu") == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    # One folder never mixes two recipes.
    assert _run(tiny_pipeline, images, tmp_path / "out") == 0
    assert _run(tiny_pipeline, images, tmp_path / "out", "--latent", "mode") == 2
    assert "other settings" in capsys.readouterr().err


def test_without_diffusers_the_command_exits_2_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what an environment without the package gives
    images = _make_images(tmp_path / "images", {"a.png": (16, 16)})
    assert _run(tmp_path / "pipeline", images, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[reconstruct]"' in err and "diffusers" in err
    assert not (tmp_path / "out").exists()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["reconstruct", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--pipeline", "--images", "--out", "--method", "--latent", "--strength", "--steps", "--guidance",
                 "--mask", "--seed", "--batch-size", "--device", "--precision", "--layout", "--generators",
                 "--max-pixels", "--no-progress"):
        assert flag in text
    assert "only doubles the cost" in text and ".[reconstruct]" in text
    from ppl_model.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command")
    undocumented = [a.dest for a in commands.choices["reconstruct"]._actions if not a.help]
    assert undocumented == []


def test_padding_reflects_out_to_the_multiple_and_keeps_the_image_at_the_top_left():
    pixels = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3)
    padded = reconstruct.pad_to_multiple(pixels, 4)
    assert padded.shape == (8, 4, 3) and np.array_equal(padded[:5, :3], pixels)
    assert np.array_equal(padded[5, :3], pixels[3]) and np.array_equal(padded[:5, 3], pixels[:, 1])  # reflected
    assert reconstruct.pad_to_multiple(np.zeros((1, 1, 3), np.uint8), 8).shape == (8, 8, 3)
    assert reconstruct.file_seed("a/b.png", 0) == reconstruct.file_seed("a/b.png", 0)
    assert len({reconstruct.file_seed(p, s) for p in ("a.png", "b.png") for s in (0, 1)}) == 4


@pytest.mark.slow
def test_ppl_train_with_reconstructions_runs_rpr_on_a_genimage_tree(tmp_path, tiny_pipeline):
    data = tmp_path / "genimage"
    for split in ("train", "val"):
        _make_images(data / "sd14" / split / "nature", {f"n{i}.png": (40, 40) for i in range(8)}, seed=5)
        _make_images(data / "sd14" / split / "ai", {f"a{i}.png": (40, 40) for i in range(8)}, seed=6)
    ppl = [sys.executable, "-m", "ppl_model.cli"]
    result = subprocess.run([*ppl, "reconstruct", "--pipeline", str(tiny_pipeline), "--images", str(data),
                             "--out", str(tmp_path / "recon"), "--no-progress", *FAST_INPAINT],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "8 reconstruction(s) written" in result.stdout
    out = tmp_path / "model"
    result = subprocess.run([*ppl, "train", "--config", "configs/tiny.toml", "--data", str(data), "--out", str(out),
                             "--reconstructions", str(tmp_path / "recon"), "--set", "train.epochs=1",
                             "--set", "train.batch_size=8", "--set", "data.workers=0", "--no-progress"],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "RPR is on but" not in result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["layout"] == "genimage" and rows[0]["rpr_pairs"] == 8
    assert sum(r["rpr_fraction"] for r in rows if r["event"] == "train") > 0
