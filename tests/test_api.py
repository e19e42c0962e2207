"""``from ppl_model import Detector``: the library API gives ``ppl scan``'s verdicts for paths, bytes and PIL
images, an error reason per unreadable input, and the README's example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppl_model import Detection, Detector
from ppl_model.inference.preprocess import Preprocessing
from ppl_model.inference.scan import scan
from tests.helpers import PHOTOS, REPO


@pytest.fixture(scope="module")
def detector(tiny_model_dir: Path) -> Detector:
    return Detector.load(tiny_model_dir, backend="torch")


def test_paths_bytes_and_images_get_the_verdicts_ppl_scan_gives(detector: Detector, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    files = []
    for i in range(5):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (48 + i, 40, 3), dtype=np.uint8)).save(path)
        files.append(path)
    (tmp_path / "page.jpg").write_text("<html>not an image</html>")
    inputs = [*map(str, files[:3]), files[3].read_bytes(), Image.open(files[4]), tmp_path / "page.jpg",
              tmp_path / "gone.png"]
    results = detector.detect(inputs, batch_size=2)  # batches split mid-list, errors between them

    assert [type(r) for r in results] == [Detection] * len(inputs)
    judged, errors = results[:5], results[5:]
    assert [(e.error, e.score) for e in errors] == [("not_an_image", None), ("missing", None)]
    assert results[3].source == "<bytes #3>" and results[4].source == "<image #4>"
    info = detector.info
    records = list(scan(files, detector.backend, Preprocessing.for_model(info), info.threshold, batch_size=3,
                        workers=1, progress=False))
    for result, record in zip(judged, records, strict=True):
        assert result.score == pytest.approx(record.score, abs=1e-6)
        assert result.label == ("fake" if result.score >= info.threshold else "real") == record.label
        assert result.patch_grid is not None and result.patch_grid.shape == tuple(info.grid)
        assert result.patch_max == pytest.approx(float(result.patch_grid.max()))
        assert (result.width, result.height, result.format) == (record.width, record.height, "PNG")
        assert result.model_version == info.version_id
    assert [r.sha256 for r in judged[:4]] == [rec.sha256 for rec in records[:4]]  # a PIL image has no bytes
    assert judged[4].sha256 == ""


def test_importing_ppl_model_alone_loads_no_torch() -> None:
    code = "import sys, ppl_model, ppl_model.model_dir; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^### Python API\n.*?^```python\n(?P<code>.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert match, "the README's Python API section has no python example"
    return match["code"]


def test_the_readme_example_runs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Run as a user would, from a folder laid out like the repository after `make demo`."""
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "model").symlink_to(tiny_model_dir)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "photos").symlink_to(PHOTOS)
    result = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) >= 2 and all(re.search(r"\b(real|fake)\b", line) for line in lines), result.stdout
