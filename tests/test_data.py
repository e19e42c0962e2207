"""Data layouts, pairing and splits; crops without resizing; EXIF; RPR inside the loader; bad files."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ppl_model.config import AugmentConfig, DataConfig, RPRConfig
from ppl_model.data.datasets import (
    DataLayoutError,
    DetectionDataset,
    Sample,
    Skipped,
    collate,
    detect_layout,
    index_dataset,
)
from ppl_model.data.transforms import UnreadableImage, load_rgb
from tests.helpers import IDENTITY, NO_AUG, make_folders_dataset, noise_image


def _save(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_folders_layout_labels_and_holds_out_a_fraction(folders_dataset):
    splits = index_dataset(folders_dataset, DataConfig(val_fraction=0.25))
    assert splits.layout == "folders"
    everything = splits.train + splits.val
    assert len(everything) == 48 and 0 < len(splits.val) < 24
    assert {s.label for s in everything if s.path.parent.name == "real"} == {0}
    assert {s.label for s in everything if s.path.parent.name == "fake"} == {1}
    assert all(s.partner is None for s in everything)
    again = index_dataset(folders_dataset, DataConfig(val_fraction=0.25))
    assert [s.path for s in again.val] == [s.path for s in splits.val]


def test_paired_layout_matches_names_across_extensions_and_keeps_pairs_in_one_split(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(30):
        _save(tmp_path / "real" / "sub" / f"p{i}.jpg", noise_image(rng, (40, 40), False))
        _save(tmp_path / "sd14" / "sub" / f"p{i}.png", noise_image(rng, (40, 40), True))
    _save(tmp_path / "sd14" / "orphan.png", noise_image(rng, (40, 40), True))
    splits = index_dataset(tmp_path, DataConfig(val_fraction=0.3))
    assert splits.layout == "paired"
    fakes = [s for s in splits.train + splits.val if s.label == 1]
    assert len(fakes) == 31 and sum(s.partner is not None for s in fakes) == 30
    for s in fakes:
        if s.partner is not None:
            assert s.partner.stem == s.path.stem and s.partner.suffix == ".jpg"
            assert s.subset == "sd14"
    val_paths = {s.path for s in splits.val}
    for s in fakes:
        if s.partner is not None:
            assert (s.path in val_paths) == (s.partner in val_paths)


def test_genimage_layout_uses_its_own_splits_and_generator_choice(tmp_path):
    rng = np.random.default_rng(0)
    for gen in ("sdv14", "midjourney"):
        for split in ("train", "val"):
            for kind in ("ai", "nature"):
                for i in range(2):
                    _save(tmp_path / gen / split / kind / f"{i}.png", noise_image(rng, (16, 16), kind == "ai"))
    splits = index_dataset(tmp_path, DataConfig(generators=["sdv14"]))
    assert splits.layout == "genimage"
    assert len(splits.train) == 4 and len(splits.val) == 4
    assert {s.subset for s in splits.train + splits.val} == {"sdv14"}
    assert all(("ai" in s.path.parts) == (s.label == 1) for s in splits.train)
    with pytest.raises(DataLayoutError, match="dalle"):
        index_dataset(tmp_path, DataConfig(generators=["dalle"]))


def test_explicit_train_val_folders_are_used(tmp_path):
    make_folders_dataset(tmp_path / "train", count=4)
    make_folders_dataset(tmp_path / "val", count=2, seed=1)
    splits = index_dataset(tmp_path, DataConfig())
    assert (splits.layout, len(splits.train), len(splits.val)) == ("folders", 8, 4)


def test_unknown_or_one_class_folders_are_clear_errors(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(DataLayoutError, match="no known layout"):
        detect_layout(tmp_path)
    with pytest.raises(DataLayoutError, match="not found"):
        index_dataset(tmp_path / "missing", DataConfig())
    make_folders_dataset(tmp_path / "one", count=3)
    for f in (tmp_path / "one" / "fake").iterdir():
        f.unlink()
    with pytest.raises(DataLayoutError, match="needs real and fake"):
        index_dataset(tmp_path / "one", DataConfig(layout="folders"))


def _dataset(samples, train, size=32, **kwargs):
    return DetectionDataset(samples, input_size=size, patch_size=8, train=train, augment=NO_AUG, **IDENTITY,
                            **kwargs)


def test_crop_never_resizes_and_pads_small_images_with_the_mean(tmp_path):
    rng = np.random.default_rng(0)
    big, small = noise_image(rng, (50, 45), False), noise_image(rng, (20, 12), False)
    _save(tmp_path / "big.png", big)
    _save(tmp_path / "small.png", small)
    mean = (0.2, 0.4, 0.6)
    ds = DetectionDataset([Sample(tmp_path / "big.png", 0), Sample(tmp_path / "small.png", 1)], input_size=32,
                          patch_size=8, train=True, augment=NO_AUG, mean=mean, std=(1, 1, 1))
    big_px = np.asarray(big).astype(np.float32) / 255
    crop = ds[0]["pixel_values"].permute(1, 2, 0).numpy() + np.array(mean, dtype=np.float32)
    windows = [(t, left) for t in range(45 - 31) for left in range(50 - 31)
               if np.allclose(big_px[t:t + 32, left:left + 32], crop, atol=1e-6)]
    assert len(windows) == 1  # an exact window of the original pixels: no resampling
    padded = ds[1]["pixel_values"]
    assert padded.shape == (3, 32, 32)
    assert (padded.abs().sum(0) == 0).sum() >= 32 * 32 - 20 * 12  # padding normalises to exactly zero
    assert ds[1]["patch_labels"].eq(1).all()


def test_eval_takes_the_centre_crop(tmp_path):
    image = noise_image(np.random.default_rng(0), (48, 40), False)
    _save(tmp_path / "a.png", image)
    item = _dataset([Sample(tmp_path / "a.png", 0)], train=False)[0]
    expected = np.asarray(image)[4:36, 8:40].astype(np.float32)
    np.testing.assert_allclose(item["pixel_values"].permute(1, 2, 0).numpy(), expected, atol=1e-3)
    assert item["patch_labels"].eq(0).all() and item["rpr"] is False


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((10, 20, 3), dtype=np.uint8)
    array[:, :10] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.fromarray(array).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    upright = np.asarray(load_rgb(tmp_path / "rot.jpg"))
    assert upright.shape == (20, 10, 3)
    assert upright[:8].mean() > 200 and upright[12:].mean() < 50  # the white half is now on top


def test_rpr_in_the_loader_composites_aligned_crops_on_the_grid(tmp_path):
    rng = np.random.default_rng(0)
    real = Image.fromarray(rng.integers(0, 100, (40, 48, 3), dtype=np.uint8))
    fake = Image.fromarray(rng.integers(150, 256, (40, 48, 3), dtype=np.uint8))
    _save(tmp_path / "real.png", real)
    _save(tmp_path / "fake.png", fake)
    samples = [Sample(tmp_path / "real.png", 0), Sample(tmp_path / "fake.png", 1, partner=tmp_path / "real.png")]
    ds = _dataset(samples, train=True, rpr=RPRConfig(prob=1.0, ratio=0.5, variant="reconstruction"))
    for epoch in range(3):
        ds.set_epoch(epoch)
        item = ds[1]
        assert item["rpr"] is True and item["label"] == 1
        pixels = item["pixel_values"].permute(1, 2, 0).numpy().round().astype(int)
        labels = item["patch_labels"].numpy()
        assert labels.mean() == 0.5
        for i in range(4):
            for j in range(4):
                block = pixels[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8]
                assert (block >= 150).all() if labels[i, j] == 1 else (block < 100).all()
        # Same box on both: the real patches are the real image's pixels at the fake patches' position.
        real_px, fake_px = np.asarray(real).astype(int), np.asarray(fake).astype(int)
        i, j = np.argwhere(labels == 0)[0]
        k, m = np.argwhere(labels == 1)[0]
        hits = [(t, left) for t in range(9) for left in range(17)
                if (real_px[t + 8 * i:t + 8 * i + 8, left + 8 * j:left + 8 * j + 8] ==
                    pixels[8 * i:8 * i + 8, 8 * j:8 * j + 8]).all()
                and (fake_px[t + 8 * k:t + 8 * k + 8, left + 8 * m:left + 8 * m + 8] ==
                     pixels[8 * k:8 * k + 8, 8 * m:8 * m + 8]).all()]
        assert hits


def test_rpr_applies_to_paired_fakes_with_probability_p_and_never_to_reals(paired_dataset):
    splits = index_dataset(paired_dataset, DataConfig(layout="paired", val_fraction=0.0))
    ds = _dataset(splits.train, train=True, rpr=RPRConfig(prob=0.5, variant="real-into-fake", ratio=0.25))
    items = [ds[i] for i in range(len(ds))]
    fake_rpr = [it["rpr"] for it in items if it["label"] == 1]
    assert not any(it["rpr"] for it in items if it["label"] == 0)
    assert 0.2 < np.mean(fake_rpr) < 0.8
    for it in items:
        if it["rpr"]:  # real-into-fake: the real patches cover r, the generated ones 1 − r
            assert it["patch_labels"].mean().item() == 0.75


def test_unpaired_fakes_are_never_composited(folders_dataset):
    splits = index_dataset(folders_dataset, DataConfig(val_fraction=0.0))
    ds = _dataset(splits.train, train=True, rpr=RPRConfig(prob=1.0))
    items = [ds[i] for i in range(len(ds))]
    assert not any(it["rpr"] for it in items)
    assert all(it["patch_labels"].eq(it["label"]).all() for it in items)


def test_augmentation_is_reproducible_per_epoch_and_index(folders_dataset):
    splits = index_dataset(folders_dataset, DataConfig(val_fraction=0.0))
    ds = DetectionDataset(splits.train, input_size=32, patch_size=8, train=True, mean=(0, 0, 0), std=(1, 1, 1),
                          augment=AugmentConfig(jpeg_prob=1.0, blur_prob=0.5), rpr=RPRConfig(prob=0.9))
    first = ds[5]["pixel_values"]
    assert torch.equal(first, ds[5]["pixel_values"])
    ds.set_epoch(1)
    assert not torch.equal(first, ds[5]["pixel_values"])


def test_unreadable_files_are_skipped_and_counted_in_worker_processes(folders_dataset):
    (folders_dataset / "real" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folders_dataset / "fake" / "empty.jpg").write_bytes(b"")
    (folders_dataset / "fake" / "notes.txt").write_text("not an image; ignored by extension")
    splits = index_dataset(folders_dataset, DataConfig(val_fraction=0.0))
    assert len(splits.train) == 50
    ds = _dataset(splits.train, train=True)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=collate)
    batches = list(loader)
    skipped = [s for b in batches for s in b["skipped"]]
    assert sorted(s.path.rsplit("/", 1)[-1] for s in skipped) == ["broken.png", "empty.jpg"]
    assert sum(b["size"] for b in batches) == 48
    assert all(isinstance(s, Skipped) and s.reason for s in skipped)


def test_load_rgb_gives_reasons(tmp_path):
    (tmp_path / "x.png").write_bytes(b"<html></html>")
    with pytest.raises(UnreadableImage, match="not_an_image"):
        load_rgb(tmp_path / "x.png")
    with pytest.raises(UnreadableImage, match="missing"):
        load_rgb(tmp_path / "nope.png")
    Image.new("L", (4, 4), 128).save(tmp_path / "grey.png")
    assert load_rgb(tmp_path / "grey.png").mode == "RGB"


def test_collate_of_only_skipped_items_is_empty():
    batch = collate([Skipped("a", "missing")])
    assert batch["size"] == 0 and "pixel_values" not in batch


# -- decode_rgb: limits, formats, frames and colour modes ---------------------------------------------------------


def _encoded(image, format, **params):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def test_decode_rgb_keeps_its_positional_signature_and_format_name(tmp_path):
    from ppl_model.data.transforms import decode_rgb

    Image.new("RGB", (3, 2), (4, 5, 6)).save(tmp_path / "a.png")
    image, image_format = decode_rgb(tmp_path / "a.png", "named.png")
    assert (image.mode, image.size, image_format) == ("RGB", (3, 2), "PNG")
    with pytest.raises(UnreadableImage) as info:
        decode_rgb(b"not an image", "named.bin")
    assert (info.value.reason, info.value.path) == ("not_an_image", "named.bin")


def test_decode_rgb_formats_and_pixel_cap_are_checked_before_decoding():
    from ppl_model.data.transforms import decode_rgb

    ico = _encoded(Image.new("RGB", (16, 16)), "ICO")
    with pytest.raises(UnreadableImage) as info:
        decode_rgb(ico, formats={"PNG", "JPEG"})
    assert info.value.reason == "unsupported_format"
    assert decode_rgb(ico)[1] == "ICO"  # no formats given: anything Pillow reads
    png = _encoded(Image.new("RGB", (100, 10)), "PNG")
    with pytest.raises(UnreadableImage) as info:
        decode_rgb(png, max_pixels=999)
    assert info.value.reason == "too_large" and "100x10" in info.value.detail
    assert decode_rgb(png, max_pixels=1000)[0].size == (100, 10)


def test_decode_rgb_truncated_data_is_corrupt():
    from ppl_model.data.transforms import decode_rgb

    data = _encoded(noise_image(np.random.default_rng(3), (48, 48), smooth=False), "JPEG")
    with pytest.raises(UnreadableImage) as info:
        decode_rgb(data[: len(data) // 3])
    assert info.value.reason == "corrupt"


def test_decode_rgb_takes_the_first_frame_of_multi_frame_files():
    from ppl_model.data.transforms import decode_rgb

    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    tiff = _encoded(frames[1], "TIFF", save_all=True, append_images=frames[:1])
    assert decode_rgb(gif)[0].getpixel((1, 1)) == (255, 0, 0)
    assert decode_rgb(tiff)[0].getpixel((1, 1)) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_to_rgb_scales_sixteen_bit_modes(mode):
    from ppl_model.data.transforms import to_rgb

    image = Image.new(mode, (4, 1))
    for x, value in enumerate((0, 255, 32768, 65535)):
        image.putpixel((x, 0), value)
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 0, 128, 255]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_to_rgb_scales_32_bit_integer_and_float_modes():
    from ppl_model.data.transforms import to_rgb

    sixteen_in_i = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert sixteen_in_i.mode == "I"
    assert np.asarray(to_rgb(sixteen_in_i))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[0, 500_000, 1_000_000]], dtype=np.int32))  # beyond 16 bits: by its max
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
    hdr = Image.fromarray(np.array([[0.0, 2.0, 4.0, np.nan]], dtype=np.float32))
    assert np.asarray(to_rgb(hdr))[0, :, 0].tolist() == [0, 128, 255, 0]
    flat = Image.fromarray(np.zeros((2, 2), dtype=np.float32) - 5.0)
    assert np.asarray(to_rgb(flat)).max() == 0


@pytest.mark.parametrize(("mode", "value", "expected"), [
    ("1", 1, (255, 255, 255)),
    ("L", 77, (77, 77, 77)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("YCbCr", (76, 85, 255), (254, 0, 0)),
    ("HSV", (0, 255, 255), (255, 0, 0)),
    ("LAB", (255, 128, 128), (254, 255, 254)),
    ("RGBX", (1, 2, 3, 0), (1, 2, 3)),
])
def test_to_rgb_colour_modes(mode, value, expected):
    from ppl_model.data.transforms import to_rgb

    rgb = to_rgb(Image.new(mode, (2, 2), value))
    assert rgb.mode == "RGB"
    assert all(abs(a - b) <= 1 for a, b in zip(rgb.getpixel((1, 1)), expected, strict=True)), rgb.getpixel((1, 1))


def test_to_rgb_composites_every_kind_of_transparency_onto_mid_grey():
    from ppl_model.data.transforms import decode_rgb, to_rgb

    grey = (128, 128, 128)
    rgba = Image.new("RGBA", (2, 1), (0, 255, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    assert [to_rgb(rgba).getpixel((x, 0)) for x in (0, 1)] == [grey, (10, 20, 30)]
    assert to_rgb(Image.new("LA", (1, 1), (255, 0))).getpixel((0, 0)) == grey
    pa = Image.new("PA", (1, 1), (0, 0))
    pa.putpalette([255, 0, 0] * 256)
    assert to_rgb(pa).getpixel((0, 0)) == grey
    # tRNS chunks: a transparent colour in RGB, a transparent value in L and in 16-bit greyscale
    rgb = _encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG", transparency=(9, 9, 9))
    assert decode_rgb(rgb)[0].getpixel((0, 0)) == grey
    sixteen = Image.fromarray(np.array([[1000, 65535]], dtype=np.uint16))
    decoded = decode_rgb(_encoded(sixteen, "PNG", transparency=1000))[0]
    assert [decoded.getpixel((x, 0)) for x in (0, 1)] == [grey, (255, 255, 255)]


def _smooth(height, width, shift=0.0):
    """A smooth RGB image (low-frequency waves), so resampling it changes little but shifting it changes a lot."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [127 + 100 * np.sin(2 * np.pi * (1.3 * x + 0.7 * y + shift + c / 3)) for c in range(3)]
    return Image.fromarray(np.stack(channels, -1).round().astype(np.uint8))


@pytest.mark.parametrize("policy", ["resize", "refuse"])
def test_a_size_mismatched_pair_is_resized_to_the_real_image_or_refused_never_shifted(tmp_path, policy):
    real = _smooth(40, 48)
    _save(tmp_path / "real.png", real)
    # A reconstruction at twice the size (as SD outputs at 512 px are for smaller photos), a little brighter so
    # its patches can be told from the real ones.
    fake = Image.fromarray(np.clip(np.asarray(real.resize((96, 80), Image.Resampling.BICUBIC)).astype(int) + 20,
                                   0, 255).astype(np.uint8))
    _save(tmp_path / "fake.png", fake)
    samples = [Sample(tmp_path / "fake.png", 1, partner=tmp_path / "real.png")]
    ds = _dataset(samples, train=True, rpr=RPRConfig(prob=1.0, ratio=0.5, size_mismatch=policy))
    real_px = np.asarray(real).astype(float)
    for epoch in range(3):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["size_mismatched"] is True and item["label"] == 1
        pixels = item["pixel_values"].permute(1, 2, 0).numpy().round()
        labels = item["patch_labels"].numpy()
        if policy == "refuse":  # not composited: the whole fake, labelled fake everywhere
            assert item["rpr"] is False and labels.min() == 1
            continue
        assert item["rpr"] is True and labels.mean() == 0.5
        # Where the crop box sits in the real image: the real patches are its exact pixels.
        i, j = np.argwhere(labels == 0)[0]
        offsets = [(t, left) for t in range(40 - 31) for left in range(48 - 31)
                   if np.array_equal(real_px[t + 8 * i:t + 8 * i + 8, left + 8 * j:left + 8 * j + 8],
                                     pixels[8 * i:8 * i + 8, 8 * j:8 * j + 8])]
        assert len(offsets) == 1
        t, left = offsets[0]
        # Every generated patch shows the same content at the same place (+20 brightness, resampling error):
        # aligned, not a shifted or zoomed corner of the reconstruction.
        for k, m in np.argwhere(labels == 1):
            patch = pixels[8 * k:8 * k + 8, 8 * m:8 * m + 8]
            under = real_px[t + 8 * k:t + 8 * k + 8, left + 8 * m:left + 8 * m + 8]
            assert abs(np.abs(patch - under - 20).mean()) < 4
    batch = collate([ds[0], ds[0]])
    assert batch["size_mismatched"] == 2


def test_aligned_pairs_are_not_counted_as_mismatched(tmp_path):
    real = _smooth(40, 48)
    _save(tmp_path / "real.png", real)
    _save(tmp_path / "fake.png", _smooth(40, 48, shift=0.1))
    ds = _dataset([Sample(tmp_path / "fake.png", 1, partner=tmp_path / "real.png")], train=True,
                  rpr=RPRConfig(prob=1.0))
    assert ds[0]["size_mismatched"] is False and ds[0]["rpr"] is True
    assert collate([ds[0]])["size_mismatched"] == 0


def test_patch_dropout_sets_a_fixed_share_of_grid_patches_to_the_mean(tmp_path):
    _save(tmp_path / "a.png", _smooth(32, 32))
    ds = DetectionDataset([Sample(tmp_path / "a.png", 0)], input_size=32, patch_size=8, train=True,
                          augment=AugmentConfig(flip_prob=0, jpeg_prob=0, blur_prob=0, patch_dropout=0.25),
                          mean=(0.5, 0.5, 0.5), std=(0.1, 0.1, 0.1))
    pixels = ds[0]["pixel_values"]
    zero_patches = pixels.abs().reshape(3, 4, 8, 4, 8).sum(dim=(0, 2, 4)).eq(0)
    assert int(zero_patches.sum()) == 4  # round(0.25 · 16)
    assert ds[0]["patch_labels"].eq(0).all()  # labels untouched: no patch supervision in this control
