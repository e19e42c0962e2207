"""The demo's data: the repository's sample photos, split by photo, with fakes from a generator family."""

from __future__ import annotations

import json

from PIL import Image

from ppl_model.synthbench.demo import FAMILY, held_out, make_demo_data
from tests.helpers import REPO

SAMPLES = REPO / "demo" / "photos"


def test_sample_photos_are_small_and_attributed():
    photos = sorted(SAMPLES.glob("*.png"))
    assert photos and sum(p.stat().st_size for p in photos) <= 10 * 1024 * 1024
    sources = (SAMPLES / "SOURCES.md").read_text()
    assert all(f"| {p.name} |" in sources for p in photos)
    assert any(held_out(p) for p in photos) and not all(held_out(p) for p in photos)


def test_demo_data_has_aligned_training_pairs_and_held_out_submissions(tmp_path):
    counts = make_demo_data(SAMPLES, tmp_path, crops_per_photo=1, submit_per_photo=1, generator_steps=2)
    real = sorted(p.name for p in (tmp_path / "train" / "real").iterdir())
    fake = sorted(p.name for p in (tmp_path / "train" / FAMILY).iterdir())
    assert real == fake and len(real) == counts["train_pairs"]
    with Image.open(tmp_path / "train" / FAMILY / fake[0]) as f, Image.open(tmp_path / "train" / "real" / real[0]) as r:
        assert f.size == r.size
    submitted_real = list((tmp_path / "submit" / "real").iterdir())
    submitted_fake = list((tmp_path / "submit" / "fake").iterdir())
    assert len(submitted_real) == counts["submit_real"] == sum(held_out(p) for p in SAMPLES.glob("*.png"))
    assert len(submitted_fake) == counts["submit_fake"] and any(p.name.startswith("sampled") for p in submitted_fake)
    assert json.loads((tmp_path / "demo_data.json").read_text())["family"] == FAMILY
