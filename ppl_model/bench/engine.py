"""``ppl bench engine``: images/s and latency per batch size for each available inference backend.

For a named architecture with random weights (the speed does not depend on the values), each backend is
timed on pre-made input tensors and, separately, from encoded JPEG bytes through the shared preprocessing
(decode in a thread pool, crop, normalise, infer). Also printed: the model's FLOPs per image and, on CUDA,
the fraction of the GPU's dense bf16 matmul rate, measured in the same run, that the model achieves.
"""

from __future__ import annotations

import functools
import io
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from PIL import Image

from ppl_model.categories import Backend, Precision
from ppl_model.config import ModelConfig
from ppl_model.detector import build_detector
from ppl_model.inference.backends import load_backend
from ppl_model.inference.base import BackendError, InferenceBackend
from ppl_model.inference.preprocess import Preprocessing, prepare
from ppl_model.model_dir import ModelInfo, save_model_dir


@dataclass
class BenchRow:
    backend: str
    variant: str  # precision and options, e.g. "bf16+graphs"
    inputs: str  # "tensors" or "jpeg"
    batch: int
    images_per_s: float
    latency_ms_p50: float
    latency_ms_p90: float
    matmul_fraction: float | None  # achieved model FLOP/s over the measured bf16 matmul rate (CUDA only)


def vit_flops_per_image(info: ModelInfo) -> float:
    """Multiply-adds ×2 of one forward pass: patch embedding, attention and MLP of every block, heads.

    Norms, softmax and activations are left out (they are a fraction of a percent at these sizes).
    """
    cfg = info.backbone_config
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    mlp = cfg.get("intermediate_size") or int(cfg.get("mlp_ratio", 4) * hidden)
    patches = info.grid[0] * info.grid[1]
    tokens = patches + 1
    embed = patches * (3 * info.patch_size**2) * hidden
    attention = 4 * tokens * hidden * hidden + 2 * tokens * tokens * hidden  # q, k, v, out; QKᵀ and AV
    per_block = attention + 2 * tokens * hidden * mlp
    heads = (1 + patches) * hidden
    return 2.0 * (embed + layers * per_block + heads)


def measure_matmul_rate(device: str, size: int = 8192, repeats: int = 20) -> float:
    """Dense bf16 matmul FLOP/s on this GPU, the ceiling the model's rate is compared with."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def make_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    """Photo-sized JPEGs (the crop's size plus a margin) of smooth random content."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, (size // 8 + 8, size // 8 + 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size + 64, size + 64), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def _sync(backend: InferenceBackend) -> None:
    if backend.device.startswith("cuda"):
        torch.cuda.synchronize(backend.device)


def time_calls(fn: Callable[[], object], backend: InferenceBackend, *, warmup: int, iters: int,
               min_seconds: float) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(backend)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < iters or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(backend)
        times.append(time.perf_counter() - t0)
    return times


def _row(backend: InferenceBackend, variant: str, inputs: str, batch: int, times: list[float],
         flops: float, matmul_rate: float | None) -> BenchRow:
    p50 = statistics.median(times)
    rate = batch / p50
    fraction = flops * rate / matmul_rate if matmul_rate else None
    p90 = float(np.percentile(times, 90))
    return BenchRow(backend.name, variant, inputs, batch, rate, p50 * 1e3, p90 * 1e3, fraction)


def backend_variants(names: Sequence[str], cuda: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(backend, label, load_backend options) to run: on CUDA, torch in bf16 with and without CUDA graphs.
    Names are as the user typed them: an unknown one is refused by load_backend, and reported, in its turn."""
    variants: list[tuple[str, str, dict[str, Any]]] = []
    for name in names:
        if name == Backend.TORCH and cuda:
            variants += [(name, "bf16", {"precision": Precision.BF16}),
                         (name, "bf16+graphs", {"precision": Precision.BF16, "cuda_graphs": True})]
        elif name == Backend.TORCH:
            variants.append((name, "fp32-cpu", {"device": "cpu"}))
        else:
            variants.append((name, "default", {}))
    return variants


class EngineBench(TypedDict):
    """``run_engine_bench``'s result: what ``ppl bench engine`` writes as JSON and ``markdown_table`` tables."""

    arch: str
    size: str
    device: str
    threads: int
    gflop_per_image: float
    matmul_tflops: float | None
    rows: list[dict[str, Any]]  # BenchRow fields


def run_engine_bench(arch: str, size: str, backends: Sequence[str], batch_sizes: Sequence[int], *,
                     jpeg: bool = True, warmup: int = 3, iters: int = 10, min_seconds: float = 1.0,
                     workers: int = 4, log: Callable[[str], None] = print) -> EngineBench:
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="ppl-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        torch.manual_seed(0)
        info = save_model_dir(build_detector(ModelConfig(arch=arch, size=size, finetune="full")), model_dir)
        flops = vit_flops_per_image(info)
        matmul_rate = measure_matmul_rate("cuda:0") if cuda else None
        log(f"{arch} {size}: input {info.input_size}, grid {info.grid[0]}x{info.grid[1]}, "
            f"{flops / 1e9:.3g} GFLOP/image"
            + (f"; bf16 matmul {matmul_rate / 1e12:.0f} TFLOP/s" if matmul_rate is not None else ""))
        if Backend.ONNXRUNTIME in backends:
            from ppl_model.inference.export import export_onnx

            export_onnx(model_dir)
        if Backend.TENSORRT in backends and cuda:
            from ppl_model.inference.tensorrt_engine import build_engine

            try:
                build_engine(model_dir, precision=Precision.BF16, max_batch=max(batch_sizes),
                             opt_batch=max(batch_sizes))
            except BackendError as exc:
                log(f"tensorrt: skipped ({exc})")
        prep = Preprocessing.for_model(info)
        jpegs = make_jpegs(max(batch_sizes), info.input_size) if jpeg else []
        rows: list[BenchRow] = []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for name, variant, options in backend_variants(backends, cuda):
                try:
                    backend = load_backend(name, model_dir, max_batch=max(batch_sizes), **options)
                except BackendError as exc:
                    log(f"{name} {variant}: not available here ({exc})")
                    continue
                for batch in batch_sizes:
                    pixels = torch.randn(batch, 3, info.input_size, info.input_size).to(backend.device)
                    times = time_calls(functools.partial(backend.predict, pixels), backend, warmup=warmup,
                                       iters=iters, min_seconds=min_seconds)
                    rows.append(_row(backend, variant, "tensors", batch, times, flops, matmul_rate))
                    log(_format(rows[-1]))
                    if not jpeg:
                        continue

                    def from_jpeg(b: InferenceBackend = backend, n: int = batch) -> object:
                        crops = [p.crops for p in pool.map(lambda data: prepare(data, prep), jpegs[:n])]
                        return b.predict(torch.cat(crops).to(b.device))

                    times = time_calls(from_jpeg, backend, warmup=1, iters=max(3, iters // 2), min_seconds=min_seconds)
                    rows.append(_row(backend, variant, "jpeg", batch, times, flops, matmul_rate))
                    log(_format(rows[-1]))
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    return EngineBench(arch=arch, size=size, device=device, threads=torch.get_num_threads(),
                       gflop_per_image=flops / 1e9, matmul_tflops=matmul_rate / 1e12 if matmul_rate else None,
                       rows=[asdict(row) for row in rows])


def _format(row: BenchRow) -> str:
    fraction = f"  {100 * row.matmul_fraction:5.1f}% of matmul" if row.matmul_fraction is not None else ""
    return (f"{row.backend:12s} {row.variant:12s} {row.inputs:8s} batch {row.batch:4d}  {row.images_per_s:9.1f} img/s"
            f"  p50 {row.latency_ms_p50:8.2f} ms  p90 {row.latency_ms_p90:8.2f} ms{fraction}")


def markdown_table(result: EngineBench) -> str:
    lines = ["| backend | variant | inputs | batch | images/s | p50 ms | p90 ms | % of bf16 matmul |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        fraction = f"{100 * row['matmul_fraction']:.1f}" if row["matmul_fraction"] is not None else "–"
        lines.append(f"| {row['backend']} | {row['variant']} | {row['inputs']} | {row['batch']} | "
                     f"{row['images_per_s']:.1f} | {row['latency_ms_p50']:.2f} | {row['latency_ms_p90']:.2f} | "
                     f"{fraction} |")
    return "\n".join(lines)
