"""``ppl-worker bench``: the moderation worker's throughput end to end, against its baselines, in one run.

Measured, each on its own fresh database (``ppl_bench_<hex>``, migrated, dropped afterwards) and the
benchmark's own Redis database (flushed before and after), over the same generated images:

* **end to end**: images/s from the first ``send_task`` until every verdict row is in PostgreSQL, through
  Redis and one real worker process (``python -m worker.cli run``, micro-batched); the worker is warmed up
  first on other images, so loading the model is not timed;
* **scan**: ``ppl scan``'s engine (``run_scan``) in this process over the same files, with the same model,
  backend (torch, CPU), batch size and decode threads: what the same work costs with no broker or
  database. *Efficiency* = end to end / scan;
* **naive**: a worker with one image per task and one insert per image (``benchmarks.naive_worker``), same
  model, backend and settings. *Speedup* = end to end / naive;
* **upserts** and **rescan**: the storage measurements of ``benchmarks.storage_bench`` (the worker's batch
  write against ``COPY`` of the same rows, the rescan against a pipelined ``LPUSH`` of the same messages),
  run with this benchmark's databases and sizes.

``run_soak`` (``ppl-worker bench --soak N``) is the separate soak: N distinct images through one worker,
its resident memory at the start and end and the throughput of each successive 1,000 jobs.

Targets (the issue's, for the tiny model on the 2-core CPU machine) are printed with PASS or MISS; see
docs/PERFORMANCE.md for the figures and how they were made. Every wait is bounded (``timeout_s``), child
processes are stopped on the way out, databases dropped and the Redis database flushed, even on error.

A source checkout's benchmark, not shipped: ``ppl-worker bench`` runs ``python -m benchmarks.worker_bench``
from the repository root. Worker processes, waits, producers and synthetic rows come from
``benchmarks.harness``, which the worker tests use too.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import text
from sqlalchemy.engine import Engine

from benchmarks import storage_bench
from benchmarks.emulated_worker import GC_LOG_ENV, INPUT_SIZE_ENV, LATENCY_ENV, RATE_ENV
from benchmarks.harness import (
    DEFAULT_BROKER_URL,
    DEFAULT_SERVER_URL,
    MIB,
    HarnessError,
    WorkerProcess,
    bench_database,
    bench_redis,
    cpu_seconds,
    load_average,
    profiled,
    redacted,
    redis_db_number,
    rss_bytes,
    send_jobs,
    server_url_from,
    wait_until,
)
from benchmarks.image_sets import IMAGE_SETS, make_realistic, mix_table
from worker import db

Log = Callable[[str], None]

PARTS = ("scan", "end_to_end", "naive", "emulated", "upserts", "rescan")

# The targets for the tiny model on the 2-core CPU machine.
TARGET_EFFICIENCY = 0.8
TARGET_SPEEDUP = 5.0
TARGET_ACCELERATOR_SHARE = 0.95  # of the emulated accelerator's rate, where decode capacity allows
TARGET_SERIAL_CPU_MS = 0.3  # the worker process's CPU per image outside decoding: ~3,000 images/s from one process
# The storage targets (write vs COPY, rescan vs LPUSH, rescan memory) are benchmarks.storage_bench's.


class BenchError(HarnessError):
    """A benchmark step that could not finish: a service down, a worker that died or timed out (the harness's
    own errors, HarnessError, are the latter)."""


@dataclass(frozen=True)
class WorkerBenchConfig:
    out: Path  # images, the built model, worker logs, profiles and the JSON result go here
    model_dir: Path | None = None  # None: build a tiny random-initialised model into OUT/model
    server_url: str = DEFAULT_SERVER_URL  # a PostgreSQL server where the benchmark may create databases
    broker_url: str = DEFAULT_BROKER_URL  # a Redis database of its own: flushed before and after
    images: int = 2000  # distinct images for the throughput measurements (and base images of the soak)
    image_set: str = "overhead"  # overhead: image_size² JPEGs; realistic: benchmarks.image_sets.REALISTIC
    image_size: int = 256  # width and height of the overhead set's JPEGs
    batch_size: int = 32  # the worker's PPL_BATCH_SIZE, scan's batch size, the upsert batch size
    batch_timeout_ms: int = 200
    decode_threads: int = 8  # the worker's PPL_DECODE_THREADS, scan's --workers
    decode_processes: int = 0  # the worker's PPL_DECODE_PROCESSES (end to end and naive)
    device: str = "cpu"  # the torch backend's device for scan and the workers, e.g. cuda:0
    batches_in_flight: int = 3  # the worker's PPL_BATCHES_IN_FLIGHT
    # The emulated part: the real worker serving benchmarks.emulated_accelerator at this rate (images/s) and
    # per-batch latency, once per value of decode processes in the sweep
    accelerator_rate: float = 3000.0
    accelerator_latency_ms: float = 2.0
    decode_process_sweep: tuple[int, ...] = (0, 1, 2)
    log_level: str = "INFO"  # both workers' PPL_LOG_LEVEL (INFO is the production default)
    warmup_jobs: int = 8  # jobs a worker judges before the clock starts (model load, first batch)
    repeats: int = 1  # each throughput measurement this many times, interleaved; the median is reported
    upsert_rows: int = 20_000  # rows at the chosen batch size (the context batch sizes use fewer)
    upsert_context_batches: tuple[int, ...] = (1, 256)
    rescan_rows: int = 1_000_000
    rescan_chunk: int = 1000  # PPL_RESCAN_CHUNK
    # Empty the detect queue while a rescan fills it, counting what it held, as workers would: with back-pressure
    # out of reach, 1,000,000 messages would otherwise fill about 1.3 GB of Redis, which slowed the rescan itself.
    rescan_drain: bool = True
    soak_jobs: int = 20_000
    soak_every: int = 1000  # throughput and RSS reported per this many jobs
    soak_rss_growth: float = 0.25  # the soak's bound: end RSS at most this fraction above start
    parts: tuple[str, ...] = PARTS
    timeout_s: float = 900.0  # the most any one wait may take
    profile: bool = False  # cProfile the in-process parts into OUT/profiles/
    seed: int = 0

    def validate(self) -> None:
        positive = ("images", "image_size", "batch_size", "batch_timeout_ms", "decode_threads", "warmup_jobs",
                    "repeats", "upsert_rows", "rescan_rows", "rescan_chunk", "soak_jobs", "soak_every", "timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise BenchError(f"{name} must be positive, got {getattr(self, name)}")
        if self.image_set not in IMAGE_SETS:
            raise BenchError(f"unknown image set {self.image_set!r}; choose from {', '.join(IMAGE_SETS)}")
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown:
            raise BenchError(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
        broker = redis_db_number(self.broker_url)
        if broker == 0:
            raise BenchError(f"the benchmark flushes its Redis database; give it one of its own, not /0 "
                             f"({self.broker_url}), e.g. {DEFAULT_BROKER_URL}")

    def as_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["out"], values["model_dir"] = str(self.out), str(self.model_dir) if self.model_dir else None
        values["server_url"] = redacted(self.server_url)
        return values


# --------------------------------------------------------------------------------------- inputs


def build_tiny_model(model_dir: Path, seed: int = 0) -> Path:
    """A tiny random-initialised detector (CLIP-shaped, hidden 64, 2 layers, 32×32 input, 8-px patches: the
    tests' served model); random weights judge as fast as trained ones."""
    import torch

    from ppl_model.config import ModelConfig
    from ppl_model.detector import build_detector
    from ppl_model.model_dir import save_model_dir

    torch.manual_seed(seed)
    config = ModelConfig(arch="clip", size="tiny", input_size=32, patch_size=8, finetune="full")
    save_model_dir(build_detector(config), model_dir, threshold=0.5)
    return model_dir


def make_images(folder: Path, count: int, size: int, seed: int, prefix: str = "img") -> list[Path]:
    """``count`` distinct JPEGs of size×size with smooth random content (bicubic-upsampled noise, so they
    compress like photos rather than like noise), deterministic for a seed."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (size // 8 + 8, size // 8 + 8, 3), dtype=np.uint8)
        path = folder / f"{prefix}_{i:06d}.jpg"
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def with_comment(jpeg: bytes, comment: bytes) -> bytes:
    """The same JPEG with a COM segment after SOI: identical pixels, different bytes (a distinct sha256, so
    the verdict cache cannot answer it and the worker must judge it)."""
    if jpeg[:2] != b"\xff\xd8" or len(comment) > 65533:
        raise ValueError("not a JPEG, or a comment too long for one segment")
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


# ------------------------------------------------------------------------------------- services


def worker_env(config: WorkerBenchConfig, database_url: str, model_dir: Path, roots: Sequence[Path],
               decode_processes: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PPL_DATABASE_URL": database_url, "PPL_BROKER_URL": config.broker_url,
        "PPL_MODEL_DIR": str(model_dir.resolve()),  # the workers start in the repository root, not here
        "PPL_BACKEND": "torch", "PPL_DEVICE": config.device,
        "PPL_FILE_ROOTS": ",".join(str(r.resolve()) for r in roots),
        "PPL_BATCH_SIZE": str(config.batch_size), "PPL_BATCH_TIMEOUT_MS": str(config.batch_timeout_ms),
        "PPL_DECODE_THREADS": str(config.decode_threads), "PPL_METRICS_PORT": "0", "PPL_LOG_LEVEL": config.log_level,
        "PPL_DECODE_PROCESSES": str(config.decode_processes if decode_processes is None else decode_processes),
        "PPL_BATCHES_IN_FLIGHT": str(config.batches_in_flight),
        RATE_ENV: str(config.accelerator_rate), LATENCY_ENV: str(config.accelerator_latency_ms),
        INPUT_SIZE_ENV: "224",
    })
    return env


def distinct_contents(paths: Sequence[Path]) -> int:
    """How many different files (by sha256) there are among ``paths``: the verdict rows their jobs make."""
    return len({hashlib.sha256(path.read_bytes()).hexdigest() for path in paths})


def verdict_count(engine: Engine) -> tuple[int, int]:
    """(verdict rows, failure rows)."""
    with engine.connect() as conn:
        verdicts, failures = conn.execute(text("SELECT (SELECT count(*) FROM verdicts), "
                                               "(SELECT count(*) FROM detection_failures)")).one()
    return int(verdicts), int(failures)


def wait_for_verdicts(engine: Engine, expected: int, worker: WorkerProcess, timeout: float, what: str,
                      every: float = 0.02, on_poll: Callable[[int], None] | None = None) -> float:
    """Poll until ``expected`` verdict rows exist; the time it happened (perf_counter). Stops with a clear
    error on a timeout, a dead worker, or any failure row (the benchmark's images are all good ones)."""
    seen = 0

    def done() -> float | None:
        nonlocal seen
        seen, failures = verdict_count(engine)
        now = time.perf_counter()
        if on_poll is not None:
            on_poll(seen)
        if failures:
            with engine.connect() as conn:
                reasons = conn.execute(text("SELECT reason, detail FROM detection_failures LIMIT 3")).all()
            raise BenchError(f"{failures} job(s) failed while waiting for {what}: {reasons}")
        return now if seen >= expected else None

    return wait_until(done, timeout, lambda: f"{what} ({seen} of {expected} verdicts)", every, worker=worker)


# ------------------------------------------------------------------------------------- measures


def measure_worker(config: WorkerBenchConfig, kind: str, model_dir: Path, images: Sequence[Path],
                   warmup: Sequence[Path], log: Log, tag: str = "", decode_processes: int | None = None
                   ) -> dict[str, Any]:
    """Images/s through Redis, one worker process (``batched``: the real one; ``naive``) and PostgreSQL:
    from the first ``send_task`` until every verdict row is committed. Fresh database and Redis database."""
    with bench_database(config.server_url) as url, bench_redis(config.broker_url):
        engine = db.make_engine(url).execution_options(isolation_level="AUTOCOMMIT")
        roots = sorted({p.parent for p in [*images, *warmup]})
        env = worker_env(config, url, model_dir, roots, decode_processes)
        gc_log = config.out / "logs" / f"gc-{kind}{tag}.txt"
        if kind == "emulated":  # the worker process's full collections, each a pause of all its threads
            gc_log.unlink(missing_ok=True)
            env[GC_LOG_ENV] = str(gc_log)
        try:
            with WorkerProcess(env, config.out / "logs" / f"worker-{kind}{tag}.log", f"bench-{kind}-",
                               kind) as worker:
                started = time.perf_counter()
                send_jobs(config.broker_url, warmup)
                wait_for_verdicts(engine, len(warmup), worker, config.timeout_s, f"the {kind} worker's warm-up")
                warmup_s = time.perf_counter() - started
                load = load_average()
                cpu, main_cpu = cpu_seconds(worker.pid), cpu_seconds(worker.pid, worker.pid)
                started, window_start = time.perf_counter(), time.time()
                send_jobs(config.broker_url, images)
                sent_s = time.perf_counter() - started
                # One verdict row per distinct content: the realistic set's duplicates add none
                done = wait_for_verdicts(engine, distinct_contents([*warmup, *images]), worker, config.timeout_s,
                                         f"{len(images)} verdicts from the {kind} worker")
                seconds = done - started
                cpu, main_cpu = cpu_seconds(worker.pid) - cpu, cpu_seconds(worker.pid, worker.pid) - main_cpu
                worker_rss = rss_bytes(worker.pid)
                window = (window_start, time.time())
        finally:
            engine.dispose()
    rate = len(images) / seconds
    pauses = full_collections(gc_log, *window) if kind == "emulated" else None
    log(f"{kind} worker{tag}: {len(images)} images in {seconds:.2f} s = {rate:.1f} images/s, worker CPU {cpu:.2f} s "
        f"(warm-up {warmup_s:.1f} s, sending took {sent_s:.2f} s, load average {load})")
    # The worker process's own CPU (its threads, not its decode processes') per image: the serial budget. Its
    # main thread is Celery's consumer (the event loop: fetch, parse, batch, acknowledge); the rest is mostly the
    # batch threads (database, hand-offs to the decoders, the accelerator's calls).
    return {"images": len(images), "seconds": round(seconds, 4), "images_per_s": round(rate, 2),
            "cpu_ms_per_image": round(1000 * cpu / len(images), 3),
            "consumer_cpu_ms_per_image": round(1000 * main_cpu / len(images), 3),
            "cpu_s": round(cpu, 2), "warmup_s": round(warmup_s, 2), "send_s": round(sent_s, 3),
            "worker_rss_mib": round(worker_rss / MIB, 1), "load_average": load,
            **({"full_gc_count": len(pauses), "full_gc_ms_total": round(sum(pauses), 1),
                "full_gc_ms_max": round(max(pauses, default=0.0), 1)} if pauses is not None else {})}


def full_collections(log_path: Path, start: float, end: float) -> list[float]:
    """Milliseconds of each full collection that the emulated worker logged (``GC_LOG_ENV``) between the epoch
    times ``start`` and ``end``."""
    if not log_path.exists():
        return []
    pauses = []
    for line in log_path.read_text().splitlines():
        ended, milliseconds = (float(field) for field in line.split())
        if start <= ended <= end:
            pauses.append(milliseconds)
    return pauses


def measure_scan(config: WorkerBenchConfig, model_dir: Path, images: Sequence[Path], warmup: Sequence[Path],
                 log: Log, tag: str = "") -> dict[str, Any]:
    """``ppl scan``'s engine in this process over the same files: same model, torch on the CPU, same batch
    size and decode threads, output written as JSON lines (to /dev/null). Timed after a warm-up batch."""
    from ppl_model.inference.backends import load_backend
    from ppl_model.inference.preprocess import Preprocessing
    from ppl_model.inference.scan import run_scan

    backend = load_backend("torch", model_dir, device=config.device, max_batch=config.batch_size)
    prep = Preprocessing.for_model(backend.info)
    options = {"batch_size": config.batch_size, "workers": config.decode_threads, "progress": False}
    with open(os.devnull, "w") as out:
        run_scan([str(p) for p in warmup], backend, prep, backend.info.threshold, out, "jsonl", **options)
        load = load_average()
        with profiled(config.profile, config.out / "profiles", f"scan{tag}", log):
            cpu, started = time.process_time(), time.perf_counter()
            summary = run_scan([str(p) for p in images], backend, prep, backend.info.threshold, out, "jsonl",
                               **options)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    if summary["judged"] != len(images):
        raise BenchError(f"scan judged {summary['judged']} of {len(images)} images: {summary['errors']}")
    rate = len(images) / seconds
    log(f"scan: {len(images)} images in {seconds:.2f} s = {rate:.1f} images/s, CPU {cpu:.2f} s (load average {load})")
    return {"images": len(images), "seconds": round(seconds, 4), "images_per_s": round(rate, 2),
            "cpu_s": round(cpu, 2), "load_average": load}


# ------------------------------------------------------------------------------------------ runs


def prepare_inputs(config: WorkerBenchConfig, log: Log) -> tuple[Path, dict[str, Any], list[Path], list[Path]]:
    """The model directory (given, or built), its description, the images and the warm-up images."""
    from ppl_model.model_dir import read_model_info

    config.out.mkdir(parents=True, exist_ok=True)
    if config.model_dir is not None:
        model_dir, origin = config.model_dir, "given"
    else:
        model_dir, origin = build_tiny_model(config.out / "model", config.seed), "built: tiny, random weights"
    info = read_model_info(model_dir)
    model = {"dir": str(model_dir), "origin": origin, "version": info.version_id, "arch": info.arch,
             "input_size": info.input_size, "patch_size": info.patch_size, "grid": info.grid,
             "hidden_size": info.backbone_config.get("hidden_size"),
             "layers": info.backbone_config.get("num_hidden_layers")}
    started = time.perf_counter()
    for folder in (config.out / "images", config.out / "warmup-images"):
        shutil.rmtree(folder, ignore_errors=True)
    if config.image_set == "realistic":
        images, mix = make_realistic(config.out / "images", config.images, config.seed)
        log("the realistic set:\n" + mix_table(mix))
    else:
        images = make_images(config.out / "images", config.images, config.image_size, config.seed)
        mix = [{"kind": f"JPEG q90 {config.image_size}×{config.image_size}", "count": len(images),
                "width": config.image_size, "height": config.image_size,
                "mean_bytes": round(statistics.mean(p.stat().st_size for p in images))}]
    model["image_mix"] = mix
    warmup = make_images(config.out / "warmup-images", max(config.warmup_jobs, config.batch_size),
                         config.image_size, config.seed + 1, prefix="warmup")
    log(f"model {info.version_id[:12]} ({origin}); {len(images)} {config.image_set} images + {len(warmup)} warm-up "
        f"in {time.perf_counter() - started:.1f} s")
    return model_dir, model, images, warmup


def machine() -> dict[str, Any]:
    import torch

    threading_env = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_"))}
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "threading_env": threading_env,
            "load_average_start": load_average()}


def storage_config(config: WorkerBenchConfig) -> storage_bench.StorageBenchConfig:
    """The storage parts' settings (``benchmarks.storage_bench``) from this benchmark's."""
    return storage_bench.StorageBenchConfig(
        out=config.out, server_url=config.server_url, broker_url=config.broker_url, write_rows=config.upsert_rows,
        write_batches=tuple(sorted({config.batch_size, *config.upsert_context_batches})),
        main_batch=config.batch_size, rescan_rows=config.rescan_rows, rescan_chunk=config.rescan_chunk,
        rescan_drain=config.rescan_drain, profile=config.profile)


def run_worker_bench(config: WorkerBenchConfig, log: Log = print) -> dict[str, Any]:
    """Every part in ``config.parts``; the figures, ratios and target checks, also written to
    OUT/worker-bench.json."""
    config.validate()
    wall = time.perf_counter()
    model_dir, model, images, warmup = prepare_inputs(config, log)
    samples: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(config.repeats):
        tag = f"-{repeat + 1}" if config.repeats > 1 else ""
        if "scan" in config.parts:
            samples.setdefault("scan", []).append(
                measure_scan(config, model_dir, images, warmup[:config.batch_size], log, tag))
        if "end_to_end" in config.parts:
            samples.setdefault("end_to_end", []).append(
                measure_worker(config, "batched", model_dir, images, warmup[:config.warmup_jobs], log, tag))
        if "naive" in config.parts:
            samples.setdefault("naive", []).append(
                measure_worker(config, "naive", model_dir, images, warmup[:config.warmup_jobs], log, tag))
        for processes in config.decode_process_sweep if "emulated" in config.parts else ():
            samples.setdefault(f"emulated-{processes}", []).append(
                measure_worker(config, "emulated", model_dir, images, warmup[:config.warmup_jobs], log,
                               f"{tag}-p{processes}", decode_processes=processes))
    result: dict[str, Any] = {"config": config.as_dict(), "machine": machine(), "model": model,
                              "images": {"count": len(images), "size": config.image_size,
                                         "mean_bytes": round(statistics.mean(p.stat().st_size for p in images))}}
    for name, runs in samples.items():
        result[name] = {"images_per_s": statistics.median(r["images_per_s"] for r in runs), "runs": runs}
    rate = {name: result[name]["images_per_s"] for name in samples}
    sweep = []
    for p in config.decode_process_sweep:
        if f"emulated-{p}" not in result:
            continue
        measured = result.pop(f"emulated-{p}")  # reported as the sweep's point instead
        runs = measured["runs"]
        sweep.append({"decode_processes": p, "images_per_s": measured["images_per_s"],
                      "share_of_rate": round(measured["images_per_s"] / config.accelerator_rate, 3),
                      "cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in runs),
                      "consumer_cpu_ms_per_image": statistics.median(r["consumer_cpu_ms_per_image"] for r in runs),
                      "full_gc_ms_max": max(r["full_gc_ms_max"] for r in runs),
                      "full_gc_ms_total": statistics.median(r["full_gc_ms_total"] for r in runs)})
    rate = {name: value for name, value in rate.items() if not name.startswith("emulated-")}
    if sweep:
        result["emulated"] = {"rate": config.accelerator_rate, "latency_ms": config.accelerator_latency_ms,
                              "sweep": sweep}
    result["efficiency"] = rate["end_to_end"] / rate["scan"] if {"end_to_end", "scan"} <= rate.keys() else None
    result["speedup"] = rate["end_to_end"] / rate["naive"] if {"end_to_end", "naive"} <= rate.keys() else None
    if "upserts" in config.parts:
        result["upserts"] = storage_bench.measure_writes(storage_config(config), log)
    if "rescan" in config.parts:
        result["rescan"] = storage_bench.measure_rescan(storage_config(config), log)
    result["targets"] = check_targets(result)
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    (config.out / "worker-bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value and whether it is met (None where that part did not run)."""
    targets = []

    def add(name: str, value: float | None, target: float, unit: str) -> None:
        targets.append({"name": name, "value": value, "target": target, "unit": unit,
                        "met": None if value is None else value >= target})

    add("efficiency (end to end / scan)", result.get("efficiency"), TARGET_EFFICIENCY, "")
    add("speedup (end to end / naive)", result.get("speedup"), TARGET_SPEEDUP, "×")
    emulated = result.get("emulated")
    if emulated:  # the best point of the sweep: the most decode processes this machine could use
        best = max(emulated["sweep"], key=lambda point: point["images_per_s"])
        add(f"emulated accelerator: share of {emulated['rate']:,.0f} images/s sustained "
            f"({best['decode_processes']} decode processes)", best["share_of_rate"], TARGET_ACCELERATOR_SHARE, "")
        serial = [p for p in emulated["sweep"] if p["decode_processes"] > 0]
        if serial:
            lowest = min(p["cpu_ms_per_image"] for p in serial)
            targets.append({"name": "worker serial CPU per image outside decoding (decode in processes)",
                            "value": lowest, "target": TARGET_SERIAL_CPU_MS, "unit": "ms at most",
                            "met": lowest <= TARGET_SERIAL_CPU_MS})
    targets += storage_bench.check_targets(result)
    return targets


def run_soak(config: WorkerBenchConfig, log: Log = print) -> dict[str, Any]:
    """``soak_jobs`` distinct images through one real worker: its RSS after warm-up and at the end (and at
    every ``soak_every`` jobs), and the throughput of each successive ``soak_every`` jobs. Written to
    OUT/worker-soak.json."""
    config.validate()
    if config.image_set != "overhead":  # each job gets distinct bytes by a JPEG comment: JPEGs only
        raise BenchError("the soak runs on the overhead set (--image-set overhead)")
    wall = time.perf_counter()
    model_dir, model, base, warmup = prepare_inputs(dataclasses.replace(config, images=min(config.images,
                                                                                          config.soak_jobs)), log)
    # Distinct bytes for every job (a numbered JPEG comment), so no job is answered from the verdict cache.
    folder = config.out / "soak-images"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    encoded = [p.read_bytes() for p in base]
    paths = []
    for i in range(config.soak_jobs):
        path = folder / f"soak_{i:06d}.jpg"
        path.write_bytes(with_comment(encoded[i % len(encoded)], f"soak job {i}".encode()))
        paths.append(path)
    log(f"soak: {len(paths)} distinct images written")
    blocks: list[dict[str, Any]] = []
    try:
        with bench_database(config.server_url) as url, bench_redis(config.broker_url):
            engine = db.make_engine(url).execution_options(isolation_level="AUTOCOMMIT")
            env = worker_env(config, url, model_dir, [folder, warmup[0].parent])
            try:
                with WorkerProcess(env, config.out / "logs" / "worker-soak.log", "bench-soak-") as worker:
                    send_jobs(config.broker_url, warmup[:config.warmup_jobs])
                    wait_for_verdicts(engine, config.warmup_jobs, worker, config.timeout_s, "the soak's warm-up")
                    rss_start = rss_bytes(worker.pid)
                    started = last = time.perf_counter()
                    sender = threading.Thread(target=send_jobs, args=(config.broker_url, paths), daemon=True)
                    sender.start()
                    boundaries = [*range(config.soak_every, config.soak_jobs, config.soak_every), config.soak_jobs]

                    def on_poll(count: int) -> None:  # a block ends when the verdict count crosses its boundary
                        nonlocal last
                        now = time.perf_counter()
                        while boundaries and count - config.warmup_jobs >= boundaries[0]:
                            jobs = boundaries.pop(0)
                            size = jobs - (blocks[-1]["jobs"] if blocks else 0)
                            rss = rss_bytes(worker.pid)
                            blocks.append({"jobs": jobs, "seconds": round(now - started, 3),
                                           "images_per_s": round(size / max(now - last, 1e-9), 1),
                                           "worker_rss_mib": round(rss / MIB, 1)})
                            log(f"soak: {jobs} jobs, {blocks[-1]['images_per_s']} images/s over the last {size}, "
                                f"worker RSS {rss / MIB:.0f} MiB")
                            last = now

                    wait_for_verdicts(engine, config.warmup_jobs + config.soak_jobs, worker, config.timeout_s,
                                      f"{config.soak_jobs} soak verdicts", every=0.05, on_poll=on_poll)
                    seconds = time.perf_counter() - started
                    sender.join(timeout=config.timeout_s)
                    rss_end = rss_bytes(worker.pid)
            finally:
                engine.dispose()
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # 20,000 files the next run makes again in seconds
    growth = (rss_end - rss_start) / rss_start
    rates = [b["images_per_s"] for b in blocks]
    result = {"config": config.as_dict(), "machine": machine(), "model": model, "jobs": config.soak_jobs,
              "seconds": round(seconds, 2), "images_per_s": round(config.soak_jobs / seconds, 1),
              "rss_start_mib": round(rss_start / MIB, 1), "rss_end_mib": round(rss_end / MIB, 1),
              "rss_growth": round(growth, 4), "rss_growth_bound": config.soak_rss_growth,
              "memory_bounded": growth <= config.soak_rss_growth,
              "block_images_per_s": {"min": min(rates), "median": statistics.median(rates), "max": max(rates)},
              "blocks": blocks, "wall_s": round(time.perf_counter() - wall, 1)}
    (config.out / "worker-soak.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ------------------------------------------------------------------------------------------ tables


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    text_value = f"{value:,.2f}" if abs(value) < 10 else f"{value:,.0f}"
    return f"{text_value} {unit}".strip()


def markdown_table(result: dict[str, Any]) -> str:
    """The benchmark's figures, then each target with PASS or MISS."""
    lines = ["| measurement | result |", "|---|---|"]
    for name, label in (("end_to_end", "end to end: send_task → Redis → worker → PostgreSQL"),
                        ("scan", "`ppl scan` engine in-process (same model, backend, batch, threads)"),
                        ("naive", "naive worker: 1 image per task, 1 insert per image")):
        if name in result:
            runs = result[name]["runs"]
            spread = f" (median of {len(runs)}: {', '.join(_fmt(r['images_per_s']) for r in runs)})" \
                if len(runs) > 1 else ""
            cpu = statistics.median(r["cpu_ms_per_image"] for r in runs) if "cpu_ms_per_image" in runs[0] else None
            cpu_text = f"; worker process CPU {cpu:.2f} ms/image" if cpu is not None else ""
            lines.append(f"| {label} | {_fmt(result[name]['images_per_s'], 'images/s')}{spread}{cpu_text} |")
    emulated = result.get("emulated") or {"sweep": [], "rate": 0}
    for point in emulated["sweep"]:
        lines.append(f"| emulated accelerator at {emulated['rate']:,.0f} images/s, {point['decode_processes']} decode "
                     f"processes | {_fmt(point['images_per_s'], 'images/s')} ({100 * point['share_of_rate']:.0f} % of "
                     f"the rate); worker process CPU {point['cpu_ms_per_image']:.2f} ms/image, of which its consumer "
                     f"thread {point['consumer_cpu_ms_per_image']:.2f}; full collections "
                     f"{point['full_gc_ms_total']:.0f} ms in all, longest {point['full_gc_ms_max']:.0f} ms |")
    lines += storage_bench.table_rows(result)
    lines += ["", "| target | measured | wanted | result |", "|---|---|---|---|"]
    for t in result["targets"]:
        verdict = "not run" if t["met"] is None else "PASS" if t["met"] else "MISS"
        at_most = t["unit"].endswith(" at most")  # an upper bound: "MiB at most", "ms at most"
        unit = t["unit"].removesuffix(" at most")
        wanted = f"≤ {t['target']} {unit}" if at_most else f"≥ {_fmt(t['target'], unit)}"
        lines.append(f"| {t['name']} | {_fmt(t['value'], unit)} | {wanted} | {verdict} |")
    return "\n".join(lines)


def soak_table(result: dict[str, Any]) -> str:
    lines = ["| jobs done | elapsed s | images/s over the block | worker RSS MiB |", "|---|---|---|---|"]
    lines += [f"| {b['jobs']:,} | {b['seconds']:.1f} | {b['images_per_s']:.1f} | {b['worker_rss_mib']:.1f} |"
              for b in result["blocks"]]
    bounded = "bounded" if result["memory_bounded"] else "NOT bounded"
    lines += ["", f"{result['jobs']:,} jobs in {result['seconds']:.1f} s = {result['images_per_s']:.1f} images/s; "
                  f"worker RSS {result['rss_start_mib']:.0f} MiB after warm-up → {result['rss_end_mib']:.0f} MiB at "
                  f"the end ({100 * result['rss_growth']:+.1f} %, bound +{100 * result['rss_growth_bound']:.0f} %): "
                  f"{bounded}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppl-worker bench",
        description="End-to-end images/s from send_task through Redis, one worker process and PostgreSQL, against "
                    "ppl scan's engine in-process and a naive worker (one image per task, one insert per image) on "
                    "the same images; PostgreSQL upsert rows/s; rescan enqueue rate over synthetic stored "
                    "verdicts with its peak memory. --soak N runs the soak instead. Needs PostgreSQL (creates and "
                    "drops ppl_bench_* databases) and Redis (a database of its own, flushed). See "
                    "docs/PERFORMANCE.md.")
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder: worker-bench.json (or worker-soak.json), images, model, logs")
    parser.add_argument("--model", type=Path,
                        help="model directory (default: build a tiny random-initialised one into OUT/model)")
    parser.add_argument("--database-url",
                        help="PostgreSQL server to create the benchmark's databases on (default: PPL_DATABASE_URL, "
                             "else postgresql+psycopg://postgres@127.0.0.1:5432/postgres)")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL,
                        help="Redis database of the benchmark's own: it is flushed before and after (not /0)")
    parser.add_argument("--images", type=int, default=2000, help="distinct images for the throughput figures")
    parser.add_argument("--image-set", choices=IMAGE_SETS, default="overhead",
                        help="overhead: small JPEGs (--image-size), where per-job costs show; realistic: uploads' "
                             "sizes and encodings, 1-12 MP JPEGs, PNG screenshots, WebP, duplicates (the mix is "
                             "printed)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the overhead set's JPEGs")
    parser.add_argument("--batch-size", type=int, default=32, help="the worker's batch, scan's batch, upsert batch")
    parser.add_argument("--decode-threads", type=int, default=8, help="the worker's and scan's decoding threads")
    parser.add_argument("--decode-processes", type=int, default=0,
                        help="the worker's PPL_DECODE_PROCESSES for end to end and naive (0: decode in threads)")
    parser.add_argument("--batches-in-flight", type=int, default=3, help="the worker's PPL_BATCHES_IN_FLIGHT")
    parser.add_argument("--device", default="cpu", help="the torch backend's device for scan and the workers")
    parser.add_argument("--accelerator-rate", type=float, default=3000.0,
                        help="the emulated part: images/s of the emulated accelerator the worker serves")
    parser.add_argument("--accelerator-latency-ms", type=float, default=2.0,
                        help="the emulated part: fixed latency per batch")
    parser.add_argument("--decode-process-sweep", default="0,1,2",
                        help="the emulated part: comma-separated PPL_DECODE_PROCESSES values to measure")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure scan, end to end and naive this many times, interleaved; report the median")
    parser.add_argument("--upsert-rows", type=int, default=20_000)
    parser.add_argument("--rescan-rows", type=int, default=1_000_000, help="synthetic stale verdicts to rescan")
    parser.add_argument("--keep-rescan-queue", action="store_true",
                        help="let the rescan's messages pile up in Redis (about 1.3 kB each) instead of draining "
                             "them as they come, as workers would")
    parser.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--soak", type=int, metavar="JOBS",
                        help="run the soak instead: JOBS distinct images through one worker, RSS and images/s per "
                             "1,000 jobs (writes OUT/worker-soak.json)")
    parser.add_argument("--log-level", default="INFO", help="the workers' PPL_LOG_LEVEL")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds any one wait may take")
    parser.add_argument("--profile", action="store_true", help="cProfile the in-process parts into OUT/profiles/")
    return parser


# ``ppl-worker bench`` starts this module from the repository root (so that it imports) and names here the
# folder it was started in, against which relative paths are read.
CALLER_CWD_ENV = "PPL_BENCH_CWD"


def main(argv: Sequence[str] | None = None) -> int:
    """``ppl-worker bench``: 0 when it ran (targets missed or not), 1 when a step could not finish."""
    caller_cwd = os.environ.pop(CALLER_CWD_ENV, None)
    if caller_cwd:
        os.chdir(caller_cwd)
    args = build_parser().parse_args(argv)
    values = {"out": args.out.absolute(), "model_dir": args.model and args.model.absolute(),
              "broker_url": args.broker_url, "images": args.images, "image_size": args.image_size,
              "image_set": args.image_set, "decode_processes": args.decode_processes, "device": args.device,
              "batches_in_flight": args.batches_in_flight, "accelerator_rate": args.accelerator_rate,
              "accelerator_latency_ms": args.accelerator_latency_ms,
              "decode_process_sweep": tuple(int(p) for p in args.decode_process_sweep.split(",") if p.strip()),
              "batch_size": args.batch_size, "decode_threads": args.decode_threads, "repeats": args.repeats,
              "upsert_rows": args.upsert_rows, "rescan_rows": args.rescan_rows, "timeout_s": args.timeout,
              "profile": args.profile, "log_level": args.log_level, "rescan_drain": not args.keep_rescan_queue}
    values["server_url"] = server_url_from(args.database_url)
    if args.parts:
        values["parts"] = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if args.soak:
        values["soak_jobs"] = args.soak
    config = WorkerBenchConfig(**values)

    def log(message: str) -> None:
        print(f"[bench worker {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    # SIGTERM unwinds like Ctrl-C, so the worker processes are stopped and the databases dropped.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.soak:
            print(soak_table(run_soak(config, log)))
            print(f"\nwritten to {args.out / 'worker-soak.json'}")
        else:
            result = run_worker_bench(config, log)
            print(markdown_table(result))
            print(f"\nwall time {result['wall_s']:.0f} s; written to {args.out / 'worker-bench.json'}")
    except HarnessError as exc:  # BenchError, a dead worker or a wait that ran out: one line, no traceback
        print(f"ppl-worker bench: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
