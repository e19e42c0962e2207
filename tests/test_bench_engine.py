"""The engine benchmark: its FLOP count and a smoke run over the CPU backends."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ppl_model.bench.engine import markdown_table, run_engine_bench, vit_flops_per_image
from ppl_model.detector import build_detector
from ppl_model.model_dir import save_model_dir
from tests.helpers import tiny_model_config


@pytest.mark.parametrize("arch", ["clip", "dinov2"])
def test_flop_count_matches_torch_counter_plus_attention(tmp_path, arch):
    detector = build_detector(tiny_model_config(arch, finetune="full", input_size=48)).eval()
    info = save_model_dir(detector, tmp_path / "m")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        detector(torch.randn(1, 3, 48, 48))
    # torch's counter sees the convolution and the linear layers; the attention matmuls (QKᵀ and AV,
    # 2 × 2·N²·D per block) run inside a fused kernel it does not count on the CPU.
    tokens, hidden, layers = 6 * 6 + 1, 64, 2
    attention = layers * 2 * (2 * tokens * tokens * hidden)
    counted = counter.get_total_flops()
    assert counted > 0
    assert vit_flops_per_image(info) - attention == counted


@pytest.mark.slow  # trains, or runs a command end to end: outside make test-fast
def test_engine_bench_times_each_cpu_backend_both_ways():
    logged = []
    result = run_engine_bench("clip", "tiny", ["torch", "onnxruntime", "tensorrt"], [1, 3], iters=2, warmup=1,
                              min_seconds=0.0, workers=2, log=logged.append)
    rows = result["rows"]
    assert [(r["backend"], r["inputs"], r["batch"]) for r in rows] == [
        (b, inputs, n) for b in ("torch", "onnxruntime") for n in (1, 3) for inputs in ("tensors", "jpeg")]
    assert all(r["images_per_s"] > 0 and r["latency_ms_p90"] >= r["latency_ms_p50"] > 0 for r in rows)
    assert all(r["matmul_fraction"] is None for r in rows)  # no GPU: no matmul ceiling to compare with
    assert any("tensorrt" in line and "not available" in line for line in logged)
    assert result["gflop_per_image"] > 0
    assert markdown_table(result).count("\n") == len(rows) + 1
