"""What the worker tests and the worker benchmark share: worker child processes, bounded waits, producers and
synthetic verdict rows.

``tests/`` imports it as ``benchmarks.harness`` (pytest puts the repository root on the import path) and the
benchmarks import it from the repository root; it is not part of the shipped packages. Every wait here is
bounded and says what it waited for when it gives up; every child process is stopped on the way out.
"""

from __future__ import annotations

import cProfile
import dataclasses
import hashlib
import io
import json
import os
import pstats
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url

from ppl_model.inference.verdict import make_verdict
from worker.db import VerdictRow

T = TypeVar("T")

# Child workers start here, so that ``python -m worker.cli`` and ``python -m benchmarks.naive_worker`` are this
# checkout's modules, whatever the caller's working directory.
REPO_ROOT = Path(__file__).resolve().parent.parent

# ``python -m MODULE ARGS``: the real worker, and the one-image-per-task baseline the benchmark compares with.
WORKER_COMMANDS: dict[str, tuple[str, ...]] = {
    "batched": ("worker.cli", "run", "--queues", "detect"),
    "naive": ("benchmarks.naive_worker",),
    "emulated": ("benchmarks.emulated_worker",),  # the real worker, serving an emulated accelerator
}


class HarnessError(RuntimeError):
    """A worker process that died while something waited on it, or a bounded wait that ran out."""


class WaitTimeout(HarnessError, AssertionError):
    """A bounded wait that ran out; an AssertionError too, so that a test fails on it as on an assert."""


# ------------------------------------------------------------------------------------- processes


class WorkerProcess:
    """A worker (``kind``: ``batched``, ``ppl-worker run``; ``naive``, the benchmark's baseline) as a child
    process with its own log file: one process, threads pool (``PPL_BATCHES_IN_FLIGHT`` threads for
    ``batched``); ``name`` starts its Celery node name. Start and stop it by hand, or use it as a context
    manager (started on entry, stopped on exit)."""

    def __init__(self, env: Mapping[str, str], log_path: Path, name: str = "worker", kind: str = "batched"):
        if kind not in WORKER_COMMANDS:
            raise ValueError(f"unknown worker kind {kind!r}; choose from {', '.join(WORKER_COMMANDS)}")
        self.env = dict(env)
        self.log_path = log_path
        self.name = name
        self.kind = kind
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._token = secrets.token_hex(3)  # distinct Celery node names for workers one process starts in turn

    @property
    def hostname(self) -> str:
        return f"{self.name}{os.getpid()}-{self._token}-{self.starts}@%h"

    def start(self) -> WorkerProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A restart appends, so a test that kills and restarts the worker keeps the whole story in one log.
        with self.log_path.open("w" if self.starts == 1 else "a") as log:
            log.write(f"---- start {self.starts} ----\n")
            log.flush()
            argv = [sys.executable, "-m", *WORKER_COMMANDS[self.kind], "--hostname", self.hostname]
            self.proc = subprocess.Popen(argv, env=self.env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        return self

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise HarnessError, with the end of the log, if the process has exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise HarnessError(f"the {self.kind} worker exited with status {self.proc.returncode}; the end of its "
                               f"log ({self.log_path}):\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when the machine or the OOM killer takes the process."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (Celery's warm shutdown) and wait for the process to exit by itself."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Best-effort cleanup for fixtures and the benchmark's way out: SIGTERM, then SIGKILL."""
        if not self.alive:
            return
        try:
            self.terminate(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(no log)"


def worker_environment(database_url: str, broker_url: str, model_dir: Path, file_root: Path,
                    **settings: str) -> dict[str, str]:
    """The environment of a test worker: this process's, plus the services, a tiny model on torch, one file
    root, small quick batches and no metrics port; ``settings`` (``PPL_*`` names) add or override."""
    env = dict(os.environ)
    env.update({"PPL_DATABASE_URL": database_url, "PPL_BROKER_URL": broker_url, "PPL_MODEL_DIR": str(model_dir),
                "PPL_BACKEND": "torch", "PPL_FILE_ROOTS": str(file_root), "PPL_BATCH_SIZE": "8",
                "PPL_BATCH_TIMEOUT_MS": "200", "PPL_METRICS_PORT": "0", "PPL_VISIBILITY_TIMEOUT_S": "30",
                "PPL_RETRY_BACKOFF_S": "0.2"})
    env.update(settings)
    return env


def wait_until(condition: Callable[[], T | None], timeout: float = 60.0, what: str | Callable[[], str] = "condition",
               every: float = 0.3, worker: WorkerProcess | None = None) -> T:
    """Poll ``condition`` until it returns something truthy, and return that. Raises WaitTimeout after
    ``timeout`` seconds (``what`` may be a callable, to describe how far it got), and HarnessError as soon as
    ``worker``, when given, has exited; both end with the worker's log tail."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if worker is not None:
            worker.check_alive()
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            tail = f"; the end of the worker log ({worker.log_path}):\n{worker.log_tail()}" if worker else ""
            raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {described}{tail}")
        time.sleep(every)


# ------------------------------------------------------------------------------------- producers

PRODUCER = """
import json, sys
from celery import Celery
app = Celery(broker=sys.argv[1])
app.conf.task_serializer = "json"
app.conf.broker_connection_retry = True
for kwargs in json.loads(sys.stdin.read()):
    app.send_task("detect_image", kwargs=kwargs, queue="detect")
"""


def produce(broker_url: str, jobs: list[dict], timeout: float = 120.0) -> None:
    """Send jobs from a separate Python process that knows only Celery, the task name and the queue (as the
    services that feed the worker do); it starts outside the checkout, so it cannot import the worker."""
    subprocess.run([sys.executable, "-c", PRODUCER, broker_url], input=json.dumps(jobs), text=True, check=True,
                   timeout=timeout, cwd="/")


def send_jobs(broker_url: str, paths: Sequence[Path], pipeline: int = 100) -> None:
    """One ``detect_image`` message per file from this process, made by ``send_task`` through one pooled
    producer as ``ppl-worker submit`` sends them, but pipelined ``pipeline`` messages per Redis round trip
    (kombu's ``producer.batch``). For timed runs: on a 2-core machine that the producer shares with the worker,
    a process start or a round trip per message would take the worker's CPU."""
    from worker.app import DETECT_QUEUE, DETECT_TASK, make_app
    from worker.settings import Settings

    app = make_app(Settings.from_env({}, broker_url=broker_url))
    with app.producer_or_acquire() as producer:
        for start in range(0, len(paths), pipeline):
            with producer.batch(max_size=pipeline):
                for path in paths[start:start + pipeline]:
                    app.send_task(DETECT_TASK, kwargs={"source": path.resolve().as_uri()}, queue=DETECT_QUEUE,
                                  producer=producer)


# ---------------------------------------------------------------------------------- verdict rows


def sha_of(name: str) -> str:
    """A stable content hash for a synthetic image name."""
    return hashlib.sha256(name.encode()).hexdigest()


def verdict_row(name: str, model_version: str, score: float = 0.25, threshold: float = 0.5,
                grid: np.ndarray | None = None, **overrides: Any) -> VerdictRow:
    """A valid verdict row for image ``name``; the label follows score and threshold, as in make_verdict, and
    the patch statistics follow the grid (a uniform 4×4 grid of ``score`` when none is given)."""
    patch_grid = np.full((4, 4), score, dtype=np.float32) if grid is None else grid
    context: dict[str, Any] = {
        "sha256": sha_of(name), "model_version": model_version, "source": f"https://images.example.com/{name}.jpg",
        "external_id": f"ext-{name}", "metadata": {"name": name}, "width": 640, "height": 480, "format": "JPEG",
        "timings_ms": {"fetch": 12.5, "decode": 3.0, "infer": 8.25, "db": 1.5},
    }
    row = VerdictRow.of(make_verdict(score, patch_grid, threshold), patch_grid,
                        **{k: overrides.pop(k, v) for k, v in context.items()})
    return dataclasses.replace(row, **overrides) if overrides else row


def synthetic_rows(count: int, start: int, model_version: str, grid: int = 4) -> list[VerdictRow]:
    """``count`` verdict rows with distinct content hashes (images ``bench-<start>`` on), shaped like the
    worker's for the tiny model: a random grid, scored by its most suspicious patch. Deterministic for a start."""
    rng = np.random.default_rng(start)
    rows = []
    for i in range(start, start + count):
        patches = rng.random((grid, grid)).astype(np.float32)  # as the worker's grids are
        rows.append(verdict_row(
            f"bench-{i}", model_version, score=float(patches.max()), grid=patches,
            source=f"file:///srv/uploads/2026/05/{i:09d}.jpg", external_id=f"post-{i}", metadata=None, width=256,
            height=256, timings_ms={"fetch": 0.4, "decode": 1.2, "infer": 3.1, "batch_images": 32}))
    return rows


# In SQL, so that a million rows take seconds: the same shape as synthetic_rows, one stored verdict per image.
INSERT_VERDICTS_SQL = """
INSERT INTO verdicts (sha256, model_version, score, label, threshold, source, external_id, metadata, width, height,
                      format, patch_mean, patch_max, patch_p90, patch_frac_above, top_patch_row, top_patch_col,
                      patch_grid, grid_rows, grid_cols, timings_ms)
SELECT md5(i::text) || md5('bench' || i::text), :version, s, CASE WHEN s >= 0.5 THEN 'fake' ELSE 'real' END, 0.5,
       'file:///srv/uploads/2026/05/' || lpad(i::text, 9, '0') || '.jpg', 'post-' || i,
       jsonb_build_object('post', i), 256, 256, 'JPEG', s / 2, s, s, 0.25, 1, 2,
       decode(repeat('7f', 16), 'hex'), 4, 4, '{"infer": 3.1}'::jsonb
FROM (SELECT i, (i % 1000) / 1000.0 AS s FROM generate_series(1, :rows) AS i) AS t
"""


def insert_synthetic_verdicts(conn: Connection, model_version: str, rows: int) -> None:
    """``rows`` stored verdicts of ``model_version`` for distinct images, made by the server."""
    conn.execute(text(INSERT_VERDICTS_SQL), {"version": model_version, "rows": rows})


# ----------------------------------------------------------------------------------- measuring

# Where the benchmarks make their databases and which Redis database they flush, unless told otherwise.
DEFAULT_SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/14"
BENCH_DATABASE_PREFIX = "ppl_bench_"  # each measurement's database: <prefix><hex>, dropped afterwards
MIB = 1024 * 1024


def server_url_from(given: str | None) -> str:
    """The PostgreSQL server a benchmark creates its databases on: the one given (``--database-url``), else
    ``PPL_DATABASE_URL``, else the local default."""
    return given or os.environ.get("PPL_DATABASE_URL") or DEFAULT_SERVER_URL


def redacted(database_url: str) -> str:
    """A database URL as a result file may show it: the password hidden."""
    return make_url(database_url).render_as_string(hide_password=True)


def redis_db_number(broker_url: str) -> int:
    """The database number of a ``redis://host:port/N`` URL (0 when none is given)."""
    path = broker_url.split("://", 1)[-1].partition("/")[2].split("?")[0]
    try:
        return int(path) if path else 0
    except ValueError:
        raise HarnessError(f"cannot read a Redis database number from {broker_url!r}") from None


def bench_database(server_url: str) -> AbstractContextManager[str]:
    """A new migrated database ``ppl_bench_<hex>`` on the server, dropped afterwards even on error."""
    from worker import db

    return db.temporary_database(server_url, prefix=BENCH_DATABASE_PREFIX)



def load_average() -> float:
    """The machine's 1-minute load average: other work competing for the same cores shows here."""
    return round(os.getloadavg()[0], 2)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (``/proc/PID/statm``, the same figure as VmRSS)."""
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time a process has used so far, all its threads (``/proc/PID/stat``), or one of its
    threads (``/proc/PID/task/TID/stat``; the main thread's id is the process id)."""
    with open(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def bench_redis(broker_url: str) -> Iterator[Any]:
    """A benchmark's Redis database, empty on entry and flushed on exit."""
    import redis

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=5)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


@contextmanager
def profiled(enabled: bool, folder: Path, name: str, log: Callable[[str], None]) -> Iterator[None]:
    """cProfile what it wraps into FOLDER/NAME.txt (top 40 by cumulative time, top 25 by own time) and
    FOLDER/NAME.prof, when ``enabled``."""
    if not enabled:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        folder.mkdir(parents=True, exist_ok=True)
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
        (folder / f"{name}.txt").write_text(stream.getvalue())
        profiler.dump_stats(folder / f"{name}.prof")
        log(f"profile written to {folder / name}.txt")
