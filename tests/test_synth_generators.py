"""synthbench generators: shapes, distinct upsamplers, training, sampling, caching, cropping."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ppl_model.synthbench.generators import (
    FAMILIES,
    ConvAutoencoder,
    GeneratorSpec,
    crops_from_images,
    load_generator,
    reconstruct,
    sample_images,
    sample_latents,
    save_generator,
    to_uint8_images,
    train_autoencoder,
)
from tests.helpers import PHOTOS

TRAIN_STEPS = 100
UPSAMPLER_LAYER = {"transposed": nn.ConvTranspose2d, "pixel_shuffle": nn.PixelShuffle}


def untrained(spec: GeneratorSpec, seed: int = 0) -> ConvAutoencoder:
    torch.manual_seed(seed)
    return ConvAutoencoder(spec).eval()


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().mean().item()


@pytest.fixture(scope="module")
def photo_crops() -> torch.Tensor:
    paths = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[:6]
    assert len(paths) == 6, f"expected photos in {PHOTOS}"
    crops = crops_from_images([Image.open(p).convert("RGB") for p in paths], 32, per_image=16, seed=0)
    assert crops.shape == (96, 3, 32, 32)
    return crops


@pytest.fixture(scope="module")
def trained(photo_crops: torch.Tensor) -> dict[str, ConvAutoencoder]:
    return {name: train_autoencoder(spec, photo_crops, steps=TRAIN_STEPS, batch_size=16, seed=0)
            for name, spec in FAMILIES.items()}


def test_registry_names_and_spec_validation():
    short = {"transposed": "transposed", "nearest_conv": "nearest", "pixel_shuffle": "shuffle",
             "bilinear_conv": "bilinear"}
    assert {"ae_transposed_x4", "ae_nearest_x4", "ae_shuffle_x4", "ae_bilinear_x4", "ae_transposed_x8"} <= set(FAMILIES)
    for name, spec in FAMILIES.items():
        assert spec.name == name == f"ae_{short[spec.upsampler]}_x{spec.downsample}"
    with pytest.raises(ValueError, match="upsampler"):
        GeneratorSpec("bad", "deconv", 4)
    with pytest.raises(ValueError, match="downsample"):
        GeneratorSpec("bad", "transposed", 2)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_reconstruct_keeps_exact_shape_and_rejects_misaligned_sizes(name):
    spec = FAMILIES[name]
    model = untrained(spec)
    for height, width in [(32, 32), (64, 64), (32, 64)]:
        x = torch.rand(3, 3, height, width)
        out = reconstruct(model, x, batch_size=2)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        z = model.encode(x)
        assert z.shape == (3, spec.latent_channels, height // spec.downsample, width // spec.downsample)
    with pytest.raises(ValueError, match="multiple"):
        reconstruct(model, torch.rand(2, 3, 30, 30))
    if spec.downsample == 8:
        with pytest.raises(ValueError, match="multiple"):
            reconstruct(model, torch.rand(2, 3, 36, 36))  # a multiple of 4 only
    with pytest.raises(ValueError, match="shape"):
        reconstruct(model, torch.rand(2, 1, 32, 32))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_decoders_use_their_own_upsampler_once_per_stage(name):
    spec = FAMILIES[name]
    model = ConvAutoencoder(spec)
    stages = int(math.log2(spec.downsample))
    strided = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == stages and all(m.kernel_size == (3, 3) for m in strided)
    decoder = list(model.decoder.modules())
    for upsampler, layer in UPSAMPLER_LAYER.items():
        expected = stages if spec.upsampler == upsampler else 0
        assert sum(isinstance(m, layer) for m in decoder) == expected
    modes = [m.mode for m in decoder if isinstance(m, nn.Upsample)]
    expected_mode = {"nearest_conv": "nearest", "bilinear_conv": "bilinear"}.get(spec.upsampler)
    assert modes == ([expected_mode] * stages if expected_mode else [])
    assert isinstance(decoder[-1], nn.Sigmoid)


def test_upsamplers_leave_different_traces():
    """A constant latent decodes to a pattern of period ``downsample`` through transposed convs and pixel
    shuffle (the checkerboard), and to a flat image through nearest/bilinear + conv, away from the borders."""
    for name, periodic in [("ae_transposed_x4", True), ("ae_shuffle_x4", True), ("ae_nearest_x4", False),
                           ("ae_bilinear_x4", False), ("ae_transposed_x8", True)]:
        spec = FAMILIES[name]
        model = untrained(spec)
        with torch.no_grad():
            out = model.decode(torch.full((1, spec.latent_channels, 16, 16), 0.5))[0]
        margin = out.shape[-1] // 4
        centre, p = out[:, margin:-margin, margin:-margin], spec.downsample
        if periodic:
            assert torch.allclose(centre[:, p:, p:], centre[:, :-p, :-p], atol=1e-5), name
            assert centre.std(dim=(1, 2)).max().item() > 1e-4, name
        else:
            assert centre.std(dim=(1, 2)).max().item() < 1e-5, name


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_training_lowers_reconstruction_error(trained, photo_crops):
    for name, model in trained.items():
        before = l1(reconstruct(untrained(FAMILIES[name]), photo_crops), photo_crops)
        after = l1(reconstruct(model, photo_crops), photo_crops)
        assert after < 0.5 * before, (name, before, after)
        assert after < 0.08, (name, after)
        assert not model.training


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_training_is_deterministic_for_a_seed(photo_crops):
    spec = FAMILIES["ae_shuffle_x4"]
    torch.manual_seed(123)  # the global RNG state must not matter
    first = train_autoencoder(spec, photo_crops, steps=5, batch_size=8, seed=7).state_dict()
    torch.manual_seed(456)
    second = train_autoencoder(spec, photo_crops, steps=5, batch_size=8, seed=7).state_dict()
    other = train_autoencoder(spec, photo_crops, steps=5, batch_size=8, seed=8).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_interpolated_latents_are_convex_mixes_of_two_different_references(trained, photo_crops):
    """Each sampled latent is w·z_i + (1−w)·z_j with i ≠ j and w in [0.3, 0.7], and its image lies
    clearly away from both endpoints' images."""
    model, refs = trained["ae_nearest_x4"], photo_crops[::16]  # one crop per photo
    with torch.no_grad():
        ref_latents = model.encode(refs).flatten(1)
    recons = reconstruct(model, refs)
    latents = sample_latents(model, refs, 20, seed=3, mode="interpolate")
    with torch.no_grad():
        images = model.decode(latents)
    for z, image in zip(latents.flatten(1), images, strict=True):
        fits = []
        for i in range(len(refs)):
            for j in range(len(refs)):
                if i == j:
                    continue
                direction = ref_latents[i] - ref_latents[j]
                w = torch.dot(z - ref_latents[j], direction) / torch.dot(direction, direction)
                residual = (z - (w * ref_latents[i] + (1 - w) * ref_latents[j])).abs().max()
                fits.append((residual.item(), w.item(), i, j))
        residual, w, i, j = min(fits)
        assert residual < 1e-4 and 0.3 - 1e-4 <= w <= 0.7 + 1e-4
        gap = l1(recons[i], recons[j])
        assert min(l1(image, recons[i]), l1(image, recons[j])) > 0.1 * gap


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
@pytest.mark.parametrize("mode", ["interpolate", "gaussian"])
def test_samples_are_new_images(trained, photo_crops, mode):
    model, refs = trained["ae_transposed_x4"], photo_crops[::16]  # one crop per photo
    samples = sample_images(model, refs, 12, seed=0, mode=mode)
    assert samples.shape == (12, 3, 32, 32) and samples.dtype == torch.float32
    assert samples.min() >= 0.0 and samples.max() <= 1.0
    recons = reconstruct(model, refs)  # the decoded endpoints of every interpolation
    for sample in samples:
        assert min(l1(sample, r) for r in recons) > 1e-3
    assert torch.equal(samples, sample_images(model, refs, 12, seed=0, mode=mode))
    assert not torch.equal(samples, sample_images(model, refs, 12, seed=1, mode=mode))


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_gaussian_latents_follow_the_reference_statistics(trained, photo_crops):
    model = trained["ae_bilinear_x4"]
    with torch.no_grad():
        refs = model.encode(photo_crops)
    latents = sample_latents(model, photo_crops, 256, seed=0, mode="gaussian")
    assert latents.shape == (256, *refs.shape[1:])
    ref_mean, ref_std = refs.mean(dim=(0, 2, 3)), refs.std(dim=(0, 2, 3))
    assert torch.allclose(latents.mean(dim=(0, 2, 3)), ref_mean, atol=0.05 * ref_std.max().item())
    assert torch.allclose(latents.std(dim=(0, 2, 3)), ref_std, rtol=0.05)


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_sampling_rejects_bad_requests(trained, photo_crops):
    model = trained["ae_nearest_x4"]
    with pytest.raises(ValueError, match="mode"):
        sample_images(model, photo_crops[:4], 2, seed=0, mode="diffusion")
    with pytest.raises(ValueError, match="two"):
        sample_images(model, photo_crops[:1], 2, seed=0, mode="interpolate")


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_save_load_round_trip(trained, photo_crops, tmp_path):
    spec, model = FAMILIES["ae_transposed_x8"], trained["ae_transposed_x8"]
    path = tmp_path / "gens" / "ae_transposed_x8.safetensors"
    save_generator(model, spec, path)
    loaded, loaded_spec = load_generator(path)
    assert loaded_spec == spec and not loaded.training
    assert torch.equal(reconstruct(loaded, photo_crops[:8]), reconstruct(model, photo_crops[:8]))
    assert json.loads(path.with_suffix(".json").read_text())["upsampler"] == "transposed"

    with pytest.raises(ValueError, match="built from"):
        save_generator(model, FAMILIES["ae_transposed_x4"], tmp_path / "wrong.safetensors")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_generator(tmp_path / "absent.safetensors")
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "width": 16}))
    with pytest.raises(ValueError, match="do not match"):
        load_generator(path)
    sidecar.write_text("{not json")
    with pytest.raises(ValueError, match="not a generator spec"):
        load_generator(path)
    sidecar.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_generator(path)


def test_crops_are_exact_windows_and_small_images_are_skipped():
    rng = np.random.default_rng(0)
    sources = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.integers(0, 256, (20, 60, 3), dtype=np.uint8),
               rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
    crops = crops_from_images([Image.fromarray(a) for a in sources], 32, per_image=4, seed=1)
    assert crops.shape == (8, 3, 32, 32)  # the 20-pixel-high image is skipped
    images = to_uint8_images(crops)
    assert len(images) == 8 and all(img.size == (32, 32) and img.mode == "RGB" for img in images)
    for k, img in enumerate(images):
        window = np.asarray(img)
        source = sources[0] if k < 4 else sources[2]
        found = any(np.array_equal(window, source[t:t + 32, s:s + 32])
                    for t in range(source.shape[0] - 31) for s in range(source.shape[1] - 31))
        assert found, f"crop {k} is not a window of its source"
    assert torch.equal(crops, crops_from_images([Image.fromarray(a) for a in sources], 32, per_image=4, seed=1))
    assert crops_from_images([Image.fromarray(sources[1])], 32, per_image=4, seed=0).shape == (0, 3, 32, 32)
