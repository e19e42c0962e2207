"""The worker's batch path alone, in this process: CPU per batch of ``BatchProcessor.process`` at several
batch sizes, split into a fixed cost per batch and a cost per image.

``ppl-worker bench --parts emulated`` measures the whole worker process (Celery's consumer included) and moves
with the machine's load; this measures the part that the batch size can amortise, without Celery, Redis or a
second process competing: one batch after another, each of new content (no verdict cache hits), the crops
decoded in ``--decode-processes`` processes (their CPU is not counted, as in the emulated part), served by
the emulated accelerator at an unbounded rate. For each size it reports this process's CPU (all threads)
per image and per batch; a least-squares line through CPU per batch against batch size gives the fixed
cost of a batch (database round trips, scheduling, logging) and the cost of each image in it.

``python -m benchmarks.batch_path_cpu --out DIR`` from the repository root. Figures in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.emulated_accelerator import EmulatedAccelerator
from benchmarks.harness import (
    DEFAULT_SERVER_URL,
    HarnessError,
    bench_database,
    load_average,
    profiled,
    redacted,
    server_url_from,
)
from benchmarks.worker_bench import build_tiny_model, make_images
from ppl_model.inference.preprocess import Preprocessing
from ppl_model.model_dir import read_model_info
from worker import db
from worker.model import ServedModel
from worker.pipeline import BatchProcessor, JobRequest
from worker.settings import Settings

Log = Callable[[str], None]
UNBOUNDED_RATE = 1e12  # images/s: the emulated accelerator returns at once


@dataclass(frozen=True)
class BatchPathConfig:
    out: Path
    server_url: str = DEFAULT_SERVER_URL
    batch_sizes: tuple[int, ...] = (32, 128)
    images_per_size: int = 4096  # per round; each size gets the same number of images
    rounds: int = 3  # the sizes alternate, round after round, so that drift falls on all of them
    decode_processes: int = 1
    image_size: int = 256
    profile: bool = False


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process's threads; not the decode processes
    return usage.ru_utime + usage.ru_stime


def fit_fixed_and_per_image(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least squares of CPU seconds per batch = fixed + per_image × batch size, over (size, seconds) points:
    (fixed, per_image)."""
    sizes = np.array([size for size, _ in points], dtype=float)
    seconds = np.array([value for _, value in points], dtype=float)
    if len(set(sizes.tolist())) < 2:
        raise ValueError("the fit needs at least two batch sizes")
    per_image, fixed = np.polyfit(sizes, seconds, 1)
    return float(fixed), float(per_image)


def run_batch_path(config: BatchPathConfig, log: Log = print) -> dict[str, Any]:
    """Measure every size in every round; write OUT/batch-path.json and return its content."""
    if len(config.batch_sizes) < 2 or min(config.batch_sizes) < 1:
        raise ValueError("give at least two positive batch sizes")
    wall = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    model_dir = build_tiny_model(config.out / "model")
    per_size = max(config.batch_sizes) * max(1, config.images_per_size // max(config.batch_sizes))
    needed = per_size * len(config.batch_sizes) * config.rounds + max(config.batch_sizes)
    images = make_images(config.out / "images", needed, config.image_size, seed=7)
    log(f"{needed} images of {config.image_size} px; {per_size} per size and round")
    accelerator = EmulatedAccelerator(read_model_info(model_dir), UNBOUNDED_RATE, 0.0)
    figures: dict[int, dict[str, float]] = {size: {"cpu_s": 0.0, "wall_s": 0.0, "database_s": 0.0, "images": 0,
                                                   "batches": 0} for size in config.batch_sizes}
    with bench_database(config.server_url) as url:
        settings = Settings.from_env({}, database_url=url, model_dir=model_dir, file_roots=(images[0].parent,),
                                     decode_processes=config.decode_processes, batch_size=max(config.batch_sizes))
        served = ServedModel(accelerator, Preprocessing.for_model(accelerator.info, tiles=settings.tiles))
        engine = db.make_engine(url)
        processor = BatchProcessor(settings, engine, resend=_no_resend, model_loader=lambda _: served)
        try:
            unused = iter(images)
            warm = [next(unused) for _ in range(max(config.batch_sizes))]
            processor.process(_requests(warm))  # connections, decode processes, arenas, the model registered
            for round_ in range(config.rounds):
                for size in config.batch_sizes:
                    batches = [_requests([next(unused) for _ in range(size)]) for _ in range(per_size // size)]
                    with profiled(config.profile and round_ == 0, config.out / "profiles", f"batch-{size}", log):
                        spent = _measure(processor, batches)
                    for key, value in spent.items():
                        figures[size][key] += value
        finally:
            processor.close()
            engine.dispose()
    by_size: list[dict[str, Any]] = []
    for size in config.batch_sizes:
        f = figures[size]
        by_size.append({"batch": size, "images": int(f["images"]),
                        "cpu_ms_per_image": round(1000 * f["cpu_s"] / f["images"], 4),
                        "cpu_ms_per_batch": round(1000 * f["cpu_s"] / f["batches"], 3),
                        "database_ms_per_batch": round(1000 * f["database_s"] / f["batches"], 3),
                        "wall_ms_per_image": round(1000 * f["wall_s"] / f["images"], 4)})
    fixed, per_image = fit_fixed_and_per_image([(row["batch"], row["cpu_ms_per_batch"]) for row in by_size])
    result = {
        "config": {"batch_sizes": list(config.batch_sizes), "images_per_size_and_round": per_size,
                   "rounds": config.rounds, "decode_processes": config.decode_processes,
                   "image_size": config.image_size,
                   "server_url": redacted(config.server_url)},
        "cpus": os.cpu_count(), "load_average": load_average(), "by_size": by_size,
        "fixed_ms_per_batch": round(fixed, 3), "cpu_ms_per_image_in_batch": round(per_image, 4),
        "wall_s": round(time.perf_counter() - wall, 1)}
    (config.out / "batch-path.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _no_resend(*_: Any) -> None:
    raise HarnessError("a job was sent back for a retry: the benchmark's images should all decode")


def _requests(paths: Sequence[Path]) -> list[JobRequest]:
    return [JobRequest(task_id=f"bench-{path.stem}", kwargs={"source": path.as_uri()}) for path in paths]


def _measure(processor: BatchProcessor, batches: Sequence[list[JobRequest]]) -> dict[str, float]:
    database = 0.0
    cpu, wall = _cpu_seconds(), time.perf_counter()
    for batch in batches:
        report = processor.process(batch)
        if report.inferred != len(batch):
            raise HarnessError(f"a batch of {len(batch)} new images inferred {report.inferred}: {report}")
        database += report.seconds.get("database", 0.0)
    return {"cpu_s": _cpu_seconds() - cpu, "wall_s": time.perf_counter() - wall, "database_s": database,
            "images": sum(len(batch) for batch in batches), "batches": len(batches)}


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| batch | CPU ms/image | CPU ms/batch | database wall ms/batch | wall ms/image |",
             "|---|---|---|---|---|"]
    lines += [f"| {row['batch']} | {row['cpu_ms_per_image']:.3f} | {row['cpu_ms_per_batch']:.2f} | "
              f"{row['database_ms_per_batch']:.2f} | {row['wall_ms_per_image']:.3f} |"
              for row in result["by_size"]]
    lines.append(f"\nfit: {result['fixed_ms_per_batch']:.2f} ms of CPU per batch + "
                 f"{result['cpu_ms_per_image_in_batch']:.3f} ms per image")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.batch_path_cpu``: 0 when it ran, 1 when a step could not."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batch_path_cpu",
        description="CPU per batch of the worker's batch path (BatchProcessor.process, no Celery) at several batch "
                    "sizes, split into a fixed cost per batch and a cost per image. Creates and drops a "
                    "ppl_bench_* database.")
    parser.add_argument("--out", required=True, type=Path, help="folder for batch-path.json, images, model")
    parser.add_argument("--database-url", help="PostgreSQL server (default: PPL_DATABASE_URL, else local)")
    parser.add_argument("--batches", default="32,128", help="comma-separated batch sizes (at least two)")
    parser.add_argument("--images", type=int, default=4096, help="images per batch size and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-processes", type=int, default=1, help="PPL_DECODE_PROCESSES (0: threads)")
    parser.add_argument("--profile", action="store_true", help="cProfile the first round into OUT/profiles/")
    args = parser.parse_args(argv)
    sizes = tuple(int(b) for b in args.batches.split(",") if b.strip())
    if len(set(sizes)) < 2 or min(sizes) < 1 or args.images < max(sizes) or args.rounds < 1:
        parser.error("give at least two distinct positive batch sizes, --images of at least the largest, "
                     "and --rounds of at least 1")
    config = BatchPathConfig(out=args.out.absolute(),
                             server_url=server_url_from(args.database_url),
                             batch_sizes=sizes, images_per_size=args.images, rounds=args.rounds,
                             decode_processes=args.decode_processes, profile=args.profile)

    def log(message: str) -> None:
        print(f"[bench batch-path {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    try:
        result = run_batch_path(config, log)
    except HarnessError as exc:
        print(f"batch-path bench: {exc}", file=sys.stderr)
        return 1
    print(markdown_table(result))
    print(f"\nwall time {result['wall_s']:.0f} s; written to {config.out / 'batch-path.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
