"""The worker's storage at fleet rate, each figure against its physical limit measured in the same run.

* **writes**: the worker's write of a batch (``BatchProcessor._write``: ``db.upsert_verdicts`` and
  ``db.record_submissions`` in one transaction) of synthetic rows shaped like the worker's, one
  transaction per batch, into a fresh database, at each batch size;
* **rescan**: ``run_rescan`` over synthetic stale verdicts (1,000,000 by default), jobs enqueued per second,
  with this process's resident memory sampled throughout (start, peak, end). A thread empties the detect
  queue as it fills, counting every message, as consuming workers would (``rescan_drain``).

Run by ``ppl-worker bench`` (``benchmarks.worker_bench``, parts ``upserts`` and ``rescan``), or alone:
``python -m benchmarks.storage_bench --out DIR`` from the repository root.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text

from benchmarks.harness import HarnessError, insert_synthetic_verdicts, synthetic_rows
from worker import db

Log = Callable[[str], None]

DEFAULT_SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/14"
BENCH_DATABASE_PREFIX = "ppl_bench_"
MIB = 1024 * 1024
OLD_VERSION, NEW_VERSION = "bench-old-model", "bench-new-model"


class StorageBenchError(HarnessError):
    """A storage measurement that could not finish or whose counts do not add up."""


@dataclass(frozen=True)
class StorageBenchConfig:
    out: Path  # profiles go here
    server_url: str = DEFAULT_SERVER_URL
    broker_url: str = DEFAULT_BROKER_URL  # a Redis database of its own: flushed before and after
    write_rows: int = 20_000  # rows at the main batch size (batch 1 uses a tenth)
    write_batches: tuple[int, ...] = (1, 32, 256)
    main_batch: int = 32  # the worker's batch size: the batch sizes below it are measured on fewer rows
    rescan_rows: int = 1_000_000
    rescan_chunk: int = 1000  # PPL_RESCAN_CHUNK
    # Empty the detect queue while a rescan fills it, counting what it held, as workers would.
    rescan_drain: bool = True
    profile: bool = False


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (``/proc/PID/statm``, the same figure as VmRSS)."""
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def bench_redis(broker_url: str) -> Iterator[Any]:
    """The benchmark's Redis database, empty on entry and flushed on exit."""
    import redis

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=5)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


@contextmanager
def profiled(config: StorageBenchConfig, name: str, log: Log) -> Iterator[None]:
    """cProfile what it wraps into OUT/profiles/NAME.txt when asked."""
    if not config.profile:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        folder = config.out / "profiles"
        folder.mkdir(parents=True, exist_ok=True)
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
        (folder / f"{name}.txt").write_text(stream.getvalue())
        log(f"profile written to {folder / name}.txt")


class RssSampler:
    """This process's RSS every ``every`` seconds in a thread: start, peak and end of what it wraps."""

    def __init__(self, every: float = 0.02):
        self.every = every
        self.start = self.peak = self.end = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssSampler:
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.end = rss_bytes()
        self.peak = max(self.peak, self.end)


class QueueDrain:
    """Every ``every`` seconds, take the whole detect queue out of Redis (LLEN and UNLINK in one transaction)
    and count it, as consuming workers would; Redis's peak memory is sampled at the same time."""

    def __init__(self, client: Any, enabled: bool = True, every: float = 0.5):
        self.client, self.enabled, self.every = client, enabled, every
        self.drained = self.peak_memory = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-drain", daemon=True)

    def _run(self) -> None:
        from worker.app import DETECT_QUEUE

        while not self._stop.wait(self.every):
            if self.enabled:
                with self.client.pipeline(transaction=True) as pipe:
                    pipe.llen(DETECT_QUEUE)
                    pipe.unlink(DETECT_QUEUE)
                    self.drained += pipe.execute()[0]
            self.peak_memory = max(self.peak_memory, int(self.client.info("memory")["used_memory"]))

    def __enter__(self) -> QueueDrain:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_memory = max(self.peak_memory, int(self.client.info("memory")["used_memory"]))


# ------------------------------------------------------------------------------------- measures


def measure_writes(config: StorageBenchConfig, log: Log) -> dict[str, Any]:
    """Rows/s of ``db.upsert_verdicts``, one transaction per batch (as the worker commits a batch), into a
    fresh database, at each batch size."""
    by_batch = []
    with db.temporary_database(config.server_url, prefix=BENCH_DATABASE_PREFIX) as url:
        engine = db.make_engine(url)
        try:
            with engine.begin() as conn:
                db.register_model_version(conn, OLD_VERSION, {}, 0.5, {}, activate=True)
            start = 0
            for batch in sorted(set(config.write_batches)):
                # The small sizes are measured on fewer rows: at batch 1, 20,000 commits take a while.
                count = config.write_rows if batch >= config.main_batch else max(batch, config.write_rows // 10)
                count = max(batch, count - count % batch)
                rows = synthetic_rows(count, start, OLD_VERSION)
                start += count
                inserted = 0
                with profiled(config, f"upserts-batch{batch}", log):
                    cpu, started = time.process_time(), time.perf_counter()
                    for i in range(0, count, batch):
                        with engine.begin() as conn:
                            inserted += db.upsert_verdicts(conn, rows[i:i + batch])
                    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
                if inserted != count:
                    raise StorageBenchError(f"upserts at batch {batch}: {inserted} of {count} rows inserted")
                by_batch.append({"batch": batch, "rows": count, "seconds": round(seconds, 4),
                                 "rows_per_s": round(count / seconds, 1), "client_cpu_s": round(cpu, 2)})
                log(f"upserts, batch {batch}: {count} rows in {seconds:.2f} s = {count / seconds:.0f} rows/s")
        finally:
            engine.dispose()
    chosen = next((b for b in by_batch if b["batch"] == config.main_batch), by_batch[0])
    return {"batch": chosen["batch"], "rows_per_s": chosen["rows_per_s"], "by_batch": by_batch}


def measure_rescan(config: StorageBenchConfig, log: Log) -> dict[str, Any]:
    """Jobs/s of ``run_rescan`` over ``rescan_rows`` stored verdicts of an old model, all stale for the
    target, with back-pressure out of reach; this process's RSS sampled throughout."""
    from worker.app import DETECT_QUEUE, make_app
    from worker.rescan import RescanRequest, run_rescan
    from worker.settings import Settings

    rows = config.rescan_rows
    with (db.temporary_database(config.server_url, prefix=BENCH_DATABASE_PREFIX) as url,
          bench_redis(config.broker_url) as redis_client):
        engine = db.make_engine(url)
        try:
            started = time.perf_counter()
            with engine.begin() as conn:
                db.register_model_version(conn, OLD_VERSION, {}, 0.5, {}, activate=False)
                db.register_model_version(conn, NEW_VERSION, {}, 0.5, {}, activate=True)
                insert_synthetic_verdicts(conn, OLD_VERSION, rows)
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM (ANALYZE) verdicts"))  # as autovacuum leaves a table that has settled
            insert_s = time.perf_counter() - started
            log(f"rescan: {rows} stale verdicts stored in {insert_s:.1f} s")
            settings = Settings.from_env({}, database_url=url, broker_url=config.broker_url,
                                         rescan_chunk=config.rescan_chunk, rescan_max_queue=2 * rows + 1)
            app = make_app(settings)
            load = load_average()
            with (profiled(config, "rescan", log), RssSampler() as rss,
                  QueueDrain(redis_client, config.rescan_drain) as drain):
                cpu = time.process_time()
                result = run_rescan(settings, RescanRequest(target_model_version=NEW_VERSION), app=app,
                                    engine=engine)
                cpu = time.process_time() - cpu
            queued = drain.drained + redis_client.llen(DETECT_QUEUE)
        finally:
            engine.dispose()
    if result.enqueued != rows or queued != rows:
        raise StorageBenchError(f"rescan: {result.enqueued} enqueued, {queued} in the queue, {rows} expected")
    rate = rows / result.seconds
    growth = (rss.peak - rss.start) / MIB
    log(f"rescan: {rows} jobs enqueued in {result.seconds:.1f} s = {rate:.0f} jobs/s, CPU {cpu:.1f} s "
        f"(load average {load}); RSS "
        f"{rss.start / MIB:.0f} → peak {rss.peak / MIB:.0f} → end {rss.end / MIB:.0f} MiB; Redis peak "
        f"{drain.peak_memory / MIB:.0f} MiB" + (" (queue drained as it filled)" if config.rescan_drain else ""))
    return {"rows": rows, "enqueued": result.enqueued, "queued": queued, "seconds": round(result.seconds, 3),
            "jobs_per_s": round(rate, 1), "cpu_s": round(cpu, 2), "load_average": load,
            "insert_s": round(insert_s, 1), "chunk": config.rescan_chunk,
            "rss_start_mib": round(rss.start / MIB, 1), "rss_peak_mib": round(rss.peak / MIB, 1),
            "rss_end_mib": round(rss.end / MIB, 1), "rss_growth_mib": round(growth, 1),
            "drained": config.rescan_drain, "redis_peak_mib": round(drain.peak_memory / MIB, 1)}


# ------------------------------------------------------------------------------------------ tables

TARGET_UPSERT_ROWS_PER_S = 5_000
TARGET_RESCAN_JOBS_PER_S = 10_000
# "Flat" memory during a rescan: its peak RSS at most this far above its start, whatever the row count
# (the messages of 1,000,000 jobs would take about a gigabyte if anything kept them).
RESCAN_FLAT_RSS_MIB = 64


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    text_value = f"{value:,.2f}" if abs(value) < 10 else f"{value:,.0f}"
    return f"{text_value} {unit}".strip()


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The storage targets with the measured value and whether each is met (None where its part did not run),
    from a result holding ``upserts`` (``measure_writes``) and ``rescan`` (``measure_rescan``)."""
    upserts, rescan = result.get("upserts"), result.get("rescan")

    def target(name: str, value: float | None, wanted: float, unit: str, at_most: bool = False) -> dict[str, Any]:
        met = None if value is None else value <= wanted if at_most else value >= wanted
        return {"name": name, "value": value, "target": wanted, "unit": unit, "met": met}

    growth = rescan and rescan["rss_growth_mib"]
    return [target(f"upserts at batch {upserts['batch'] if upserts else '-'}", upserts and upserts["rows_per_s"],
                   TARGET_UPSERT_ROWS_PER_S, "rows/s"),
            target("rescan enqueue rate", rescan and rescan["jobs_per_s"], TARGET_RESCAN_JOBS_PER_S, "jobs/s"),
            target("rescan memory flat (peak − start RSS)", growth, RESCAN_FLAT_RSS_MIB, "MiB at most", True)]


def table_rows(result: dict[str, Any]) -> list[str]:
    """The storage measurements as rows of a two-column markdown table (measurement, result)."""
    lines = []
    if "upserts" in result:
        for row in result["upserts"]["by_batch"]:
            lines.append(f"| PostgreSQL upserts, batch {row['batch']}, one transaction each | "
                         f"{_fmt(row['rows_per_s'], 'rows/s')} |")
    if "rescan" in result:
        r = result["rescan"]
        lines.append(f"| rescan of {r['rows']:,} stale verdicts (chunk {r['chunk']}) | "
                     f"{_fmt(r['jobs_per_s'], 'jobs/s')} ({r['seconds']:.1f} s) |")
        lines.append(f"| rescan RSS start / peak / end | {r['rss_start_mib']:.0f} / {r['rss_peak_mib']:.0f} / "
                     f"{r['rss_end_mib']:.0f} MiB |")
        drained = "queue drained as it filled" if r["drained"] else "queue kept"
        lines.append(f"| Redis peak memory during the rescan ({drained}) | {r['redis_peak_mib']:.0f} MiB |")
    return lines
