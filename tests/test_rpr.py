"""RPR: the mask sits on the patch grid, covers the ratio, and pixels and labels come from the right source."""

import numpy as np
import pytest

from ppl_model.rpr import composite, expand_to_pixels, make_rpr_sample, sample_patch_mask


def blocks(image: np.ndarray, patch: int) -> np.ndarray:
    """(G, G, patch, patch, C) view of an (H, W, C) image."""
    g = image.shape[0] // patch
    return image.reshape(g, patch, g, patch, -1).transpose(0, 2, 1, 3, 4)


@pytest.mark.parametrize(("grid", "ratio"), [(16, 0.5), (16, 0.25), (4, 0.5), (7, 0.3), (8, 0.9)])
def test_mask_covers_requested_ratio(grid, ratio):
    rng = np.random.default_rng(1)
    for _ in range(5):
        mask = sample_patch_mask(grid, ratio, rng)
        assert mask.shape == (grid, grid) and mask.dtype == bool
        assert mask.sum() == round(ratio * grid * grid)


def test_mask_never_empty_or_full():
    rng = np.random.default_rng(0)
    assert sample_patch_mask(2, 0.01, rng).sum() == 1
    assert sample_patch_mask(2, 0.99, rng).sum() == 3


def test_masks_vary_between_draws():
    rng = np.random.default_rng(0)
    masks = {sample_patch_mask(8, 0.5, rng).tobytes() for _ in range(10)}
    assert len(masks) == 10


def test_pixel_mask_sits_on_patch_boundaries():
    rng = np.random.default_rng(2)
    mask = sample_patch_mask(6, 0.5, rng)
    pixels = expand_to_pixels(mask, 14)
    assert pixels.shape == (84, 84)
    for i in range(6):
        for j in range(6):
            block = pixels[i * 14:(i + 1) * 14, j * 14:(j + 1) * 14]
            assert block.all() if mask[i, j] else not block.any()


def test_composite_takes_donor_where_masked_and_base_elsewhere():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    donor = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = sample_patch_mask(4, 0.5, rng)
    out = composite(base, donor, mask, patch_size=8)
    out_b, base_b, donor_b = blocks(out, 8), blocks(base, 8), blocks(donor, 8)
    for i in range(4):
        for j in range(4):
            expected = donor_b[i, j] if mask[i, j] else base_b[i, j]
            np.testing.assert_array_equal(out_b[i, j], expected)


@pytest.mark.parametrize(("variant", "fake_fraction"), [("reconstruction", 0.25), ("real-into-fake", 0.75)])
def test_rpr_sample_labels_mark_exactly_the_generated_patches(variant, fake_fraction):
    rng = np.random.default_rng(4)
    real = rng.integers(0, 128, (64, 64, 3), dtype=np.uint8)  # disjoint value ranges: every pixel
    fake = rng.integers(128, 256, (64, 64, 3), dtype=np.uint8)  # tells its source
    sample = make_rpr_sample(real, fake, variant=variant, ratio=0.25, patch_size=8, rng=rng)
    assert sample.patch_labels.shape == (8, 8) and sample.patch_labels.dtype == np.float32
    assert sample.patch_labels.mean() == pytest.approx(fake_fraction)
    out_b, real_b, fake_b = blocks(sample.image, 8), blocks(real, 8), blocks(fake, 8)
    for i in range(8):
        for j in range(8):
            source = fake_b if sample.patch_labels[i, j] == 1 else real_b
            np.testing.assert_array_equal(out_b[i, j], source[i, j])
    # Reconstruction pastes donor (fake) patches where the mask is set; the other variant pastes real ones.
    expected_labels = sample.mask if variant == "reconstruction" else ~sample.mask
    np.testing.assert_array_equal(sample.patch_labels.astype(bool), expected_labels)


def test_rpr_rejects_unaligned_or_off_grid_crops():
    rng = np.random.default_rng(5)
    mask = sample_patch_mask(4, 0.5, rng)
    with pytest.raises(ValueError, match="aligned"):
        composite(np.zeros((32, 32, 3)), np.zeros((32, 40, 3)), mask, 8)
    with pytest.raises(ValueError, match="patch grid"):
        composite(np.zeros((30, 30, 3)), np.zeros((30, 30, 3)), mask, 8)
    with pytest.raises(ValueError, match="variant"):
        make_rpr_sample(np.zeros((32, 32, 3)), np.zeros((32, 32, 3)), variant="x", ratio=0.5, patch_size=8, rng=rng)
