"""Export, backends, preprocessing, verdicts and the offline scan."""

import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from ppl_model.detector import build_detector
from ppl_model.inference.backends import choose_backend, load_backend
from ppl_model.inference.base import BackendError, Prediction
from ppl_model.inference.crops import tile_offsets
from ppl_model.inference.export import LogitsOnly, export_onnx, onnx_version_id, verify_onnx
from ppl_model.inference.preprocess import Preprocessing, aggregate, normalise, prepare
from ppl_model.inference.scan import collect_files, scan
from ppl_model.inference.verdict import make_verdict, make_verdicts
from ppl_model.model_dir import load_model_dir, read_model_info, save_model_dir
from tests.helpers import REPO, noise_image, tiny_model_config


def test_export_writes_a_verified_graph_tagged_with_the_version(exported_model):
    info = read_model_info(exported_model)
    assert onnx_version_id(exported_model / "model.onnx") == info.version_id
    detector, _ = load_model_dir(exported_model)
    diffs = verify_onnx(exported_model / "model.onnx", LogitsOnly(detector).eval(), 32, (1, 4, 9), seed=5)
    assert max(diffs.values()) < 1e-4


def test_verification_catches_a_graph_that_does_not_match(exported_model):
    torch.manual_seed(1)
    other = build_detector(tiny_model_config()).eval()
    diffs = verify_onnx(exported_model / "model.onnx", LogitsOnly(other), 32, (2,))
    assert diffs[2] > 1e-3


@pytest.mark.parametrize("batch", [1, 2, 5, 17])
def test_torch_and_onnxruntime_agree(exported_model, batch):
    torch_backend = load_backend("torch", exported_model, device="cpu", max_batch=4)
    onnx_backend = load_backend("onnxruntime", exported_model, max_batch=4)
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    a, b = torch_backend.predict(pixels), onnx_backend.predict(pixels)
    assert a.image_prob.shape == (batch,) and a.patch_prob.shape == (batch, 4, 4)
    np.testing.assert_allclose(a.image_prob, b.image_prob, atol=1e-4)
    np.testing.assert_allclose(a.patch_prob, b.patch_prob, atol=1e-4)
    assert a.image_prob.min() > 0 and a.image_prob.max() < 1
    assert batch == 1 or a.image_prob.std() > 0  # the inputs really differ per row


def test_onnxruntime_refuses_a_missing_or_stale_export(tmp_path, exported_model):
    model = tmp_path / "m"
    shutil.copytree(exported_model, model)
    torch.manual_seed(7)
    save_model_dir(build_detector(tiny_model_config()), model)  # new weights, old model.onnx
    with pytest.raises(BackendError, match="another version"):
        load_backend("onnxruntime", model)
    (model / "model.onnx").unlink()
    with pytest.raises(BackendError, match="ppl export"):
        load_backend("onnxruntime", model)


def test_auto_takes_onnxruntime_on_cpu_and_torch_without_an_export(tmp_path, exported_model):
    backend, passed_over = choose_backend(exported_model)
    assert backend.name == "onnxruntime" and "no CUDA device" in passed_over[0]
    model = tmp_path / "m"
    shutil.copytree(exported_model, model)
    (model / "model.onnx").unlink()
    backend, passed_over = choose_backend(model)
    assert backend.name == "torch" and backend.device == "cpu" and "ppl export" in passed_over[-1]


def test_torch_backend_refuses_gpu_only_options_on_cpu(exported_model):
    with pytest.raises(BackendError, match="CUDA"):
        load_backend("torch", exported_model, device="cpu", precision="bf16")
    with pytest.raises(BackendError, match="unknown backend"):
        load_backend("tpu", exported_model)


def test_tiles_do_not_overlap_and_stay_in_the_image():
    offsets = tile_offsets(100, 70, 32, max_tiles=16)
    assert len(offsets) == 6  # a 3×2 grid of whole tiles
    boxes = {(left, top) for left, top in offsets}
    assert len(boxes) == 6
    for left, top in offsets:
        assert left >= 0 and left + 32 <= 100 and top >= 0 and top + 32 <= 70
        for other_left, other_top in offsets:
            if (left, top) != (other_left, other_top):
                assert abs(left - other_left) >= 32 or abs(top - other_top) >= 32
    spread = tile_offsets(320, 320, 32, max_tiles=4)
    assert len(spread) == 4 and spread[0] == (0, 0) and spread[-1] == (288, 288)
    assert tile_offsets(100, 70, 32, max_tiles=1) == [(34, 19)]  # the centre crop
    assert tile_offsets(20, 10, 32, max_tiles=8) == [(-6, -11)]  # smaller: one padded crop


def test_prepare_decodes_bytes_and_crops_without_resizing():
    image = noise_image(np.random.default_rng(0), (64, 40), smooth=False)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    prepared = prepare(buffer.getvalue(), Preprocessing(32, (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), tiles=2))
    assert prepared.crops.shape == (2, 3, 32, 32)
    assert (prepared.width, prepared.height, prepared.format) == (64, 40, "PNG")
    expected = np.asarray(image)[4:36, 0:32].astype(np.float32)
    np.testing.assert_allclose(prepared.crops[0].permute(1, 2, 0).numpy(), expected, atol=1e-3)


def test_normalise_is_the_per_channel_standardisation_in_channel_first_order():
    rng = np.random.default_rng(3)
    crops = rng.integers(0, 256, (5, 7, 9, 3), dtype=np.uint8)
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    expected = (crops.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
    got = normalise(crops, mean, std)
    assert got.dtype == torch.float32 and got.shape == (5, 3, 7, 9)
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected, rtol=0, atol=2e-6)
    # Another normalisation on the same device is not served from the first one's cached constants.
    other = normalise(crops, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    np.testing.assert_allclose(other.permute(0, 2, 3, 1).numpy(), crops / 127.5 - 1.0, rtol=0, atol=2e-6)
    assert normalise(crops, mean, std, "meta").device.type == "meta"


def test_aggregate_by_max_keeps_the_deciding_crop_and_by_mean_averages():
    grids = np.stack([np.full((2, 2), v, dtype=np.float32) for v in (0.1, 0.9, 0.3, 0.5)])
    prediction = Prediction(np.array([0.2, 0.8, 0.4, 0.6], dtype=np.float32), grids)
    first, second = aggregate(prediction, [3, 1], "max")
    assert first.image_prob[0] == pytest.approx(0.8) and first.patch_prob[0, 0, 0] == pytest.approx(0.9)
    assert second.image_prob[0] == pytest.approx(0.6)
    mean = aggregate(prediction, [3, 1], "mean")[0]
    assert mean.image_prob[0] == pytest.approx(1.4 / 3) and mean.patch_prob[0, 1, 1] == pytest.approx(1.3 / 3)


def test_verdict_summarises_the_patch_grid():
    grid = np.array([[0.1, 0.2], [0.95, 0.6]], dtype=np.float32)
    verdict = make_verdict(0.7, grid, threshold=0.5)
    assert verdict.label == "fake" and make_verdict(0.4, grid, 0.5).label == "real"
    assert verdict.patch_mean == pytest.approx(0.4625) and verdict.patch_max == pytest.approx(0.95)
    assert verdict.patch_frac_above == 0.5 and (verdict.top_patch_row, verdict.top_patch_col) == (1, 0)
    assert verdict.patch_p90 == pytest.approx(np.percentile(grid, 90))


def test_a_batch_of_verdicts_equals_one_at_a_time():
    rng = np.random.default_rng(1)
    grids = rng.random((17, 14, 14)).astype(np.float32)
    scores = rng.random(17).astype(np.float32)
    batch = make_verdicts(scores, grids, 0.5)
    assert batch == [make_verdict(float(score), grid, 0.5) for score, grid in zip(scores, grids, strict=True)]
    one = batch[3]  # and each one is its grid's own summary, not a neighbour's
    assert one.patch_max == float(grids[3].max()) and one.patch_p90 == float(np.percentile(grids[3], 90))
    assert (one.top_patch_row, one.top_patch_col) == np.unravel_index(int(grids[3].argmax()), (14, 14))


@pytest.fixture
def scan_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    noise_image(rng, (40, 40), False).save(folder / "a.png")
    noise_image(rng, (50, 30), True).save(folder / "sub" / "b.jpg", quality=90)
    Image.new("RGB", (200, 100), (10, 200, 30)).save(folder / "c.webp")
    (folder / "corrupt.png").write_bytes((folder / "a.png").read_bytes()[:100])
    (folder / "page.jpg").write_text("<html>not an image</html>")
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    return folder


def test_scan_gives_one_record_per_file_and_the_right_error(scan_folder, exported_model):
    files = collect_files([scan_folder])
    assert [f.name for f in files] == ["a.png", "c.webp", "corrupt.png", "page.jpg", "b.jpg"]
    backend = load_backend("onnxruntime", exported_model)
    prep = Preprocessing.for_model(read_model_info(exported_model), tiles=3)
    records = list(scan(files, backend, prep, threshold=0.5, batch_size=2, workers=2, progress=False))
    assert [r.path for r in records] == [str(f) for f in files]
    by_name = {r.path.rsplit("/", 1)[-1]: r for r in records}
    assert by_name["corrupt.png"].error == "corrupt" and by_name["corrupt.png"].score is None
    assert by_name["page.jpg"].error == "not_an_image"
    for name in ("a.png", "c.webp", "b.jpg"):
        record = by_name[name]
        assert not record.error and 0 < record.score < 1 and record.label in ("real", "fake")
        assert record.sha256 == hashlib.sha256((scan_folder / name if name != "b.jpg" else
                                                scan_folder / "sub" / name).read_bytes()).hexdigest()
        assert record.patch_max >= record.patch_p90 >= 0 and 0 <= record.patch_frac_above <= 1
    assert (by_name["c.webp"].crops, by_name["c.webp"].format, by_name["c.webp"].width) == (3, "WEBP", 200)


def test_scan_results_do_not_depend_on_batching(scan_folder, exported_model):
    backend = load_backend("torch", exported_model)
    prep = Preprocessing.for_model(read_model_info(exported_model))
    files = collect_files([scan_folder])
    one = [r.score for r in scan(files, backend, prep, 0.5, batch_size=1, workers=1, progress=False)]
    many = [r.score for r in scan(files, backend, prep, 0.5, batch_size=8, workers=3, progress=False)]
    assert [s is None for s in one] == [s is None for s in many] == [False, False, True, True, False]
    assert [s for s in one if s is not None] == pytest.approx([s for s in many if s is not None], abs=1e-5)


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_scan_command_writes_records_and_a_summary(tmp_path, scan_folder, exported_model, suffix):
    out = tmp_path / f"out{suffix}"
    result = subprocess.run([sys.executable, "-m", "ppl_model.cli", "scan", str(scan_folder), "--model",
                             str(exported_model), "--out", str(out), "--no-progress"], capture_output=True,
                            text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stderr.strip().splitlines()[-1])
    assert summary["files"] == 5 and summary["judged"] == 3
    assert summary["errors"] == {"corrupt": 1, "not_an_image": 1} and summary["backend"] == "onnxruntime"
    text = out.read_text()
    rows = text.splitlines()
    assert len(rows) == (5 if suffix == ".jsonl" else 6)
    if suffix == ".jsonl":
        assert {json.loads(r)["error"] for r in rows} == {"", "corrupt", "not_an_image"}


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_export_command_reports_the_differences(tmp_path):
    torch.manual_seed(0)
    save_model_dir(build_detector(tiny_model_config("dinov2")), tmp_path / "m")
    result = subprocess.run([sys.executable, "-m", "ppl_model.cli", "export", "--model", str(tmp_path / "m")],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "batch 1: max |onnxruntime - torch|" in result.stdout and (tmp_path / "m" / "model.onnx").is_file()


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_torch_cuda_bf16_matches_cpu(exported_model, cuda_graphs):
    cpu = load_backend("torch", exported_model, device="cpu")
    gpu = load_backend("torch", exported_model, device="cuda:0", precision="bf16", cuda_graphs=cuda_graphs, max_batch=8)
    for batch in (1, 3, 8, 11):
        pixels = torch.randn(batch, 3, 32, 32)
        np.testing.assert_allclose(gpu.predict(pixels).image_prob, cpu.predict(pixels).image_prob, atol=2e-2)


def test_fp16_export_computes_in_float16_close_to_torch(tmp_path, exported_model):
    model = tmp_path / "m"
    shutil.copytree(exported_model, model)
    report = export_onnx(model, fp16=True)
    assert report.path.name == "model.fp16.onnx" and 0 < max(report.max_abs_diff.values()) < 5e-2
    graph = onnx.load(str(report.path))
    assert onnx_version_id(report.path) == read_model_info(model).version_id
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.graph.initializer)


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_build_engine_command_without_tensorrt_names_the_extra(exported_model):
    result = subprocess.run([sys.executable, "-m", "ppl_model.cli", "build-engine", "--model", str(exported_model),
                             "--fp16"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    if importlib.util.find_spec("tensorrt") is None:
        assert 'pip install "ppl-detector[tensorrt]"' in result.stderr
    else:  # installed, but these machines have no GPU
        assert "CUDA" in result.stderr
