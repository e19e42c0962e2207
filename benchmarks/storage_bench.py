"""The worker's storage at fleet rate, each figure against its physical limit measured in the same run.

* **writes**: the worker's write of a batch (``BatchProcessor._write``: ``db.upsert_verdicts`` and
  ``db.record_submissions`` in one transaction) of synthetic rows shaped like the worker's, one
  transaction per batch, into a fresh database, at each batch size;
* **rescan**: ``run_rescan`` over synthetic stale verdicts (1,000,000 by default), jobs enqueued per second,
  with this process's resident memory sampled throughout (start, peak, end). A thread empties the detect
  queue as it fills, counting every message, as consuming workers would (``rescan_drain``).

Each against its physical limit in the same run, printed as a ratio: the write against ``COPY`` of the same
rows into unindexed tables of the same columns (``copy_batch``), the rescan against a redis-py pipeline of
one ``LPUSH`` per message, the same messages to the same queue (``measure_lpush``).

Run by ``ppl-worker bench`` (``benchmarks.worker_bench``, parts ``upserts`` and ``rescan``), or alone:
``python -m benchmarks.storage_bench --out DIR`` from the repository root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from benchmarks.harness import (
    DEFAULT_BROKER_URL,
    DEFAULT_SERVER_URL,
    MIB,
    HarnessError,
    bench_database,
    bench_redis,
    insert_synthetic_verdicts,
    load_average,
    profiled,
    redacted,
    redis_db_number,
    rss_bytes,
    server_url_from,
    synthetic_rows,
)
from worker import db

Log = Callable[[str], None]

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
    write_rounds: int = 4  # write and COPY alternate this many times at each batch size
    main_batch: int = 32  # the worker's batch size: the batch sizes below it are measured on fewer rows
    rescan_rows: int = 1_000_000
    rescan_chunk: int = 1000  # PPL_RESCAN_CHUNK
    # Empty the detect queue while a rescan fills it, counting what it held, as workers would.
    rescan_drain: bool = True
    profile: bool = False


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


def submissions_for(rows: Sequence[db.VerdictRow], received_at: datetime) -> list[db.SubmissionRow]:
    """One submission per verdict row, as the worker records for the jobs of a batch."""
    return [db.SubmissionRow(task_id=str(uuid.uuid4()), external_id=row.external_id, source=row.source,
                             metadata=row.metadata, received_at=received_at, verdict=(row.sha256, row.model_version))
            for row in rows]


def write_batch(engine: Engine, rows: Sequence[db.VerdictRow], answered: Sequence[db.SubmissionRow]) -> int:
    """The worker's write of a batch (``BatchProcessor._write``): verdicts, then the submissions that point at
    them, in one transaction; how many verdicts were new."""
    with engine.begin() as conn:
        inserted = db.upsert_verdicts(conn, rows)
        db.record_submissions(conn, answered)
    return inserted


COPY_TABLES = {"verdicts": "copy_verdicts", "submissions": "copy_submissions"}
_COPY_VERDICT_COLUMNS = tuple(f.name for f in dataclasses.fields(db.VerdictRow))
_COPY_SUBMISSION_COLUMNS = ("task_id", "external_id", "source", "metadata", "received_at", "outcome", "verdict_id")


def create_copy_tables(engine: Engine) -> None:
    """Tables with the columns of ``verdicts`` and ``submissions`` (types, NOT NULL, defaults and identities),
    and no index, constraint or foreign key: what ``COPY`` fills at the physical limit."""
    with engine.begin() as conn:
        for table, copy in COPY_TABLES.items():
            conn.execute(text(f"CREATE TABLE {copy} (LIKE {table} INCLUDING DEFAULTS INCLUDING IDENTITY)"))


def copy_batch(engine: Engine, rows: Sequence[db.VerdictRow], answered: Sequence[db.SubmissionRow]) -> int:
    """The same rows as ``write_batch`` by ``COPY`` into the unindexed tables, in one transaction (the
    submissions point at made-up verdict ids: nothing checks them there)."""
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        cursor = raw.cursor()
        with cursor.copy(f"COPY {COPY_TABLES['verdicts']} ({', '.join(_COPY_VERDICT_COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(db.verdict_copy_values(row))  # the values the worker's write stages
        columns = ", ".join(_COPY_SUBMISSION_COLUMNS)
        with cursor.copy(f"COPY {COPY_TABLES['submissions']} ({columns}) FROM STDIN") as copy:
            for i, sub in enumerate(answered):
                copy.write_row((sub.task_id, sub.external_id, sub.source,
                                None if sub.metadata is None else json.dumps(sub.metadata), sub.received_at,
                                "verdict", i + 1))
    return len(rows)


def _timed_batches(engine: Engine, fn: Callable[..., int], rows: Sequence[db.VerdictRow],
                   answered: Sequence[db.SubmissionRow], batch: int) -> tuple[float, float, int]:
    """(seconds, client CPU seconds, rows new) of ``fn`` over the rows, one call (transaction) per batch."""
    done = 0
    cpu, started = time.process_time(), time.perf_counter()
    for i in range(0, len(rows), batch):
        done += fn(engine, rows[i:i + batch], answered[i:i + batch])
    return time.perf_counter() - started, time.process_time() - cpu, done


def measure_writes(config: StorageBenchConfig, log: Log) -> dict[str, Any]:
    """Rows/s of the worker's batch write (``write_batch``: verdicts + submissions, one transaction per batch)
    into a fresh database, against ``COPY`` of the same rows into unindexed tables of the same columns, at each
    batch size. The two alternate in ``rounds`` blocks of distinct rows, so that drift in the machine's load
    falls on both; the ratio is write rows/s ÷ COPY rows/s."""
    by_batch = []
    received_at = datetime.now(UTC)
    with bench_database(config.server_url) as url:
        engine = db.make_engine(url)
        try:
            with engine.begin() as conn:
                db.register_model_version(conn, OLD_VERSION, {}, 0.5, {}, activate=True)
            create_copy_tables(engine)
            start = 0
            for batch in sorted(set(config.write_batches)):
                # The small sizes are measured on fewer rows: at batch 1, 20,000 commits take a while.
                count = config.write_rows if batch >= config.main_batch else max(batch, config.write_rows // 10)
                per_round = max(batch, (count // config.write_rounds) // batch * batch)
                figures = {"write": [0.0, 0.0, 0], "copy": [0.0, 0.0, 0]}
                with profiled(config.profile, config.out / "profiles", f"writes-batch{batch}", log):
                    for _ in range(config.write_rounds):
                        rows = synthetic_rows(per_round, start, OLD_VERSION)
                        start += per_round
                        answered = submissions_for(rows, received_at)
                        for name, fn in (("copy", copy_batch), ("write", write_batch)):
                            seconds, cpu, done = _timed_batches(engine, fn, rows, answered, batch)
                            figures[name] = [figures[name][0] + seconds, figures[name][1] + cpu,
                                             int(figures[name][2]) + done]
                rows_total = per_round * config.write_rounds
                if figures["write"][2] != rows_total:
                    raise StorageBenchError(f"writes at batch {batch}: {figures['write'][2]} of {rows_total} rows new")
                write_rate = rows_total / figures["write"][0]
                copy_rate = rows_total / figures["copy"][0]
                by_batch.append({"batch": batch, "rows": rows_total, "seconds": round(figures["write"][0], 4),
                                 "rows_per_s": round(write_rate, 1), "client_cpu_s": round(figures["write"][1], 2),
                                 "copy_seconds": round(figures["copy"][0], 4), "copy_rows_per_s": round(copy_rate, 1),
                                 "copy_client_cpu_s": round(figures["copy"][1], 2),
                                 "ratio": round(write_rate / copy_rate, 3), "load_average": load_average()})
                log(f"writes, batch {batch}: {rows_total} rows at {write_rate:.0f} rows/s; COPY {copy_rate:.0f} "
                    f"rows/s; ratio {write_rate / copy_rate:.2f}")
        finally:
            engine.dispose()
    chosen = next((b for b in by_batch if b["batch"] == config.main_batch), by_batch[0])
    return {"batch": chosen["batch"], "rows_per_s": chosen["rows_per_s"], "ratio": chosen["ratio"],
            "by_batch": by_batch}


def measure_rescan(config: StorageBenchConfig, log: Log) -> dict[str, Any]:
    """Jobs/s of ``run_rescan`` over ``rescan_rows`` stored verdicts of an old model, all stale for the
    target, with back-pressure out of reach; this process's RSS sampled throughout."""
    from worker.app import DETECT_QUEUE, make_app
    from worker.rescan import RescanRequest, run_rescan
    from worker.settings import Settings

    rows = config.rescan_rows
    with (bench_database(config.server_url) as url,
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
            with (profiled(config.profile, config.out / "profiles", "rescan", log), RssSampler() as rss,
                  QueueDrain(redis_client, config.rescan_drain) as drain):
                cpu = time.process_time()
                result = run_rescan(settings, RescanRequest(target_model_version=NEW_VERSION), app=app,
                                    engine=engine)
                cpu = time.process_time() - cpu
            queued = drain.drained + redis_client.llen(DETECT_QUEUE)
            redis_client.delete(DETECT_QUEUE)
            with QueueDrain(redis_client, config.rescan_drain) as lpush_drain:
                lpush_s, pushed = measure_lpush(engine, redis_client, app, config.rescan_chunk, NEW_VERSION)
            lpush_queued = lpush_drain.drained + redis_client.llen(DETECT_QUEUE)
        finally:
            engine.dispose()
    if result.enqueued != rows or queued != rows:
        raise StorageBenchError(f"rescan: {result.enqueued} enqueued, {queued} in the queue, {rows} expected")
    if pushed != rows or lpush_queued != rows:
        raise StorageBenchError(f"LPUSH baseline: {pushed} pushed, {lpush_queued} in the queue, {rows} expected")
    rate = rows / result.seconds
    lpush_rate = rows / lpush_s
    growth = (rss.peak - rss.start) / MIB
    log(f"rescan: {rows} jobs enqueued in {result.seconds:.1f} s = {rate:.0f} jobs/s, CPU {cpu:.1f} s "
        f"(load average {load}); RSS "
        f"{rss.start / MIB:.0f} → peak {rss.peak / MIB:.0f} → end {rss.end / MIB:.0f} MiB; Redis peak "
        f"{drain.peak_memory / MIB:.0f} MiB" + (" (queue drained as it filled)" if config.rescan_drain else ""))
    log(f"rescan: pipelined LPUSH of the same messages {lpush_rate:.0f} jobs/s; ratio {rate / lpush_rate:.2f}")
    return {"rows": rows, "enqueued": result.enqueued, "queued": queued, "seconds": round(result.seconds, 3),
            "jobs_per_s": round(rate, 1), "cpu_s": round(cpu, 2), "load_average": load,
            "insert_s": round(insert_s, 1), "chunk": config.rescan_chunk,
            "rss_start_mib": round(rss.start / MIB, 1), "rss_peak_mib": round(rss.peak / MIB, 1),
            "rss_end_mib": round(rss.end / MIB, 1), "rss_growth_mib": round(growth, 1),
            "drained": config.rescan_drain, "redis_peak_mib": round(drain.peak_memory / MIB, 1),
            "lpush_seconds": round(lpush_s, 3), "lpush_jobs_per_s": round(lpush_rate, 1),
            "ratio": round(rate / lpush_rate, 3)}


def measure_lpush(engine: Engine, redis_client: Any, app: Any, chunk: int, target: str) -> tuple[float, int]:
    """The rescan's physical limit: the same messages (``DetectMessages`` from ``db.RescanPages``' rows, in the
    same pages) pushed to the same queue by redis-py, one ``LPUSH`` per message, one pipeline per chunk. Only
    the pipelines are timed (reading the pages and rendering the messages are not); (seconds, messages)."""
    from worker.app import DETECT_QUEUE
    from worker.rescan import DetectMessages

    messages = DetectMessages(app)
    pages = db.RescanPages(db.RescanFilters(), target)
    seconds, pushed, cursor = 0.0, 0, 0
    while True:
        with engine.connect() as conn:
            rows = pages.page(conn, cursor, chunk)
        if not rows:
            return seconds, pushed
        cursor = rows[-1][0]
        items = messages.render(rows)
        started = time.perf_counter()
        with redis_client.pipeline(transaction=False) as pipe:
            for item in items:
                pipe.lpush(DETECT_QUEUE, item)
            pipe.execute()
        seconds += time.perf_counter() - started
        pushed += len(rows)


# ------------------------------------------------------------------------------------------ tables

# The targets: each storage path at least this fraction of its physical limit, measured in the same run.
TARGET_RATIO = 0.5
WRITE_TARGET_BATCHES = (32, 256)  # the batch sizes the write target is set at (else the worker's batch)
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

    targets = []
    if upserts:
        rows = [b for b in upserts["by_batch"] if b["batch"] in WRITE_TARGET_BATCHES] or \
            [b for b in upserts["by_batch"] if b["batch"] == upserts["batch"]]
        targets += [target(f"verdict writes ÷ COPY, batch {b['batch']}", b["ratio"], TARGET_RATIO, "×")
                    for b in rows]
    else:
        targets.append(target("verdict writes ÷ COPY", None, TARGET_RATIO, "×"))
    growth = rescan and rescan["rss_growth_mib"]
    targets += [target("rescan enqueue ÷ pipelined LPUSH", rescan and rescan["ratio"], TARGET_RATIO, "×"),
                target("rescan memory flat (peak − start RSS)", growth, RESCAN_FLAT_RSS_MIB, "MiB at most", True)]
    return targets


def table_rows(result: dict[str, Any]) -> list[str]:
    """The storage measurements as rows of a two-column markdown table (measurement, result)."""
    lines = []
    if "upserts" in result:
        for row in result["upserts"]["by_batch"]:
            lines.append(f"| verdict writes (verdicts + submissions), batch {row['batch']}, one transaction each; "
                         f"COPY of the same rows to unindexed tables | {_fmt(row['rows_per_s'], 'rows/s')}; COPY "
                         f"{_fmt(row['copy_rows_per_s'], 'rows/s')}; ratio {row['ratio']:.2f} |")
    if "rescan" in result:
        r = result["rescan"]
        lines.append(f"| rescan of {r['rows']:,} stale verdicts (chunk {r['chunk']}); pipelined LPUSH of the same "
                     f"messages | {_fmt(r['jobs_per_s'], 'jobs/s')} ({r['seconds']:.1f} s); LPUSH "
                     f"{_fmt(r['lpush_jobs_per_s'], 'jobs/s')}; ratio {r['ratio']:.2f} |")
        lines.append(f"| rescan RSS start / peak / end | {r['rss_start_mib']:.0f} / {r['rss_peak_mib']:.0f} / "
                     f"{r['rss_end_mib']:.0f} MiB |")
        drained = "queue drained as it filled" if r["drained"] else "queue kept"
        lines.append(f"| Redis peak memory during the rescan ({drained}) | {r['redis_peak_mib']:.0f} MiB |")
    return lines


def markdown_table(result: dict[str, Any]) -> str:
    """The figures, then each target with PASS or MISS."""
    lines = ["| measurement | result |", "|---|---|", *table_rows(result), "",
             "| target | measured | wanted | result |", "|---|---|---|---|"]
    for t in result["targets"]:
        verdict = "not run" if t["met"] is None else "PASS" if t["met"] else "MISS"
        wanted = f"≤ {t['target']} MiB" if t["unit"] == "MiB at most" else f"≥ {_fmt(t['target'], t['unit'])}"
        unit = "MiB" if t["unit"] == "MiB at most" else t["unit"]
        lines.append(f"| {t['name']} | {_fmt(t['value'], unit)} | {wanted} | {verdict} |")
    return "\n".join(lines)


def run_storage_bench(config: StorageBenchConfig, parts: Sequence[str] = ("writes", "rescan"),
                      log: Log = print) -> dict[str, Any]:
    """The chosen parts, their targets, written to OUT/storage-bench.json."""
    wall = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v
                                         for k, v in dataclasses.asdict(config).items()},
                              "cpus": os.cpu_count(), "load_average_start": load_average()}
    result["config"]["server_url"] = redacted(config.server_url)
    if "writes" in parts:
        result["upserts"] = measure_writes(config, log)
    if "rescan" in parts:
        result["rescan"] = measure_rescan(config, log)
    result["targets"] = check_targets(result)
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    (config.out / "storage-bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.storage_bench``: 0 when it ran (targets met or not), 1 when a step could not."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.storage_bench",
        description="The worker's batch write against COPY of the same rows, and a rescan against a pipelined LPUSH "
                    "of the same messages, each pair in the same run. Creates and drops ppl_bench_* databases; "
                    "flushes its Redis database.")
    parser.add_argument("--out", required=True, type=Path, help="folder for storage-bench.json (and profiles)")
    parser.add_argument("--database-url", help="PostgreSQL server (default: PPL_DATABASE_URL, else local)")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL, help="a Redis database of its own (flushed)")
    parser.add_argument("--parts", default="writes,rescan", help="writes, rescan or both")
    parser.add_argument("--write-rows", type=int, default=20_000, help="rows per batch size (batch 1: a tenth)")
    parser.add_argument("--batches", default="1,32,256", help="batch sizes of the write measurement")
    parser.add_argument("--rescan-rows", type=int, default=1_000_000)
    parser.add_argument("--rescan-chunk", type=int, default=1000, help="PPL_RESCAN_CHUNK")
    parser.add_argument("--keep-rescan-queue", action="store_true", help="do not drain the detect queue")
    parser.add_argument("--profile", action="store_true", help="cProfile each part into OUT/profiles/")
    args = parser.parse_args(argv)
    try:
        broker_db = redis_db_number(args.broker_url)
    except HarnessError as exc:
        parser.error(str(exc))
    if broker_db == 0:
        parser.error("the benchmark flushes its Redis database: give it one of its own, not /0")
    config = StorageBenchConfig(out=args.out.absolute(), server_url=server_url_from(args.database_url),
                                broker_url=args.broker_url,
                                write_rows=args.write_rows,
                                write_batches=tuple(int(b) for b in args.batches.split(",") if b.strip()),
                                rescan_rows=args.rescan_rows, rescan_chunk=args.rescan_chunk,
                                rescan_drain=not args.keep_rescan_queue, profile=args.profile)

    def log(message: str) -> None:
        print(f"[bench storage {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: drop databases, flush Redis
    try:
        result = run_storage_bench(config, [p.strip() for p in args.parts.split(",")], log)
        print(markdown_table(result))
        print(f"\nwall time {result['wall_s']:.0f} s; written to {config.out / 'storage-bench.json'}")
    except HarnessError as exc:
        print(f"storage bench: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
