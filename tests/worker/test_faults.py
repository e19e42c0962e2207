"""Fault injection: real worker processes over a Redis and a PostgreSQL that each test owns (tests/worker/
services.py) and breaks on purpose. The claim under test, every time: each job ends with exactly one row
(verdict or failure) once the fault is over. Nothing is lost, nothing is written twice.

Every job carries a distinct image, so "one row per job" is "one verdict row per job's external id"
(verdicts are unique per image content and model version, so a redelivered job cannot add a second row).
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from tests.worker.processes import WorkerProcess, produce, wait_until
from tests.worker.services import PostgresCluster, RedisServer
from worker import db

pytestmark = [pytest.mark.slow, pytest.mark.faults]

BATCH = 32


@pytest.fixture(scope="module")
def upload_root(tmp_path_factory) -> Path:
    """1,000 distinct small PNGs (distinct content, so no job is answered from another job's verdict)."""
    root = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(11)
    for i in range(1000):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / f"img{i:04d}.png",
                                                                                compress_level=1)
    return root


def jobs_for(root: Path, count: int, start: int = 0) -> list[dict]:
    return [{"source": (root / f"img{i:04d}.png").as_uri(), "external_id": f"job-{i}"}
            for i in range(start, start + count)]


@pytest.fixture(scope="module")
def postgres():
    cluster = PostgresCluster().init().start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def database(postgres):
    """A fresh migrated database on the test's own cluster; the cluster is running again afterwards."""
    if not postgres.running():
        postgres.start()
    name = f"faults_{os.urandom(4).hex()}"
    url = postgres.url.rsplit("/", 1)[0] + f"/{name}"
    db.create_database_if_missing(url)
    db.migrate(url)
    engine = db.make_engine(url)
    yield url, engine
    engine.dispose()


@pytest.fixture
def broker(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.close()


@pytest.fixture
def make_worker(tmp_path, database, broker, tiny_model_dir, upload_root):
    started: list[WorkerProcess] = []

    def make(**overrides: str) -> WorkerProcess:
        env = dict(os.environ)
        env.update({"PPL_DATABASE_URL": database[0], "PPL_BROKER_URL": broker.url,
                    "PPL_MODEL_DIR": str(tiny_model_dir), "PPL_BACKEND": "torch", "PPL_FILE_ROOTS": str(upload_root),
                    "PPL_BATCH_SIZE": str(BATCH), "PPL_BATCH_TIMEOUT_MS": "100", "PPL_DECODE_THREADS": "4",
                    "PPL_METRICS_PORT": "0", "PPL_VISIBILITY_TIMEOUT_S": "8", "PPL_RETRY_BACKOFF_S": "0.5",
                    "PPL_DATABASE_RETRY_S": "10"})
        env.update(overrides)
        worker = WorkerProcess(env, tmp_path / f"worker{len(started)}.log", name=f"faults{len(started)}")
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop()


def committed(engine) -> int:
    """Verdict rows, or -1 while the database cannot be reached."""
    try:
        with engine.connect() as conn:
            return conn.execute(text("select count(*) from verdicts")).scalar()
    except OperationalError:
        return -1


def assert_exactly_one_row_per_job(engine, jobs: list[dict]) -> None:
    with engine.connect() as conn:
        ids = conn.execute(text("select external_id from verdicts")).scalars().all()
        failures = conn.execute(text("select reason, source from detection_failures")).all()
    assert failures == [], f"unexpected failure rows: {failures[:5]}"
    assert len(ids) == len(set(ids)), "a job has two verdict rows"
    missing = {job["external_id"] for job in jobs} - set(ids)
    assert not missing, f"{len(missing)} job(s) lost, e.g. {sorted(missing)[:5]}"
    assert len(ids) == len(jobs)


def held_by_redis(broker: RedisServer) -> tuple[int, int]:
    """(messages waiting in the detect queue, messages delivered but not acknowledged)."""
    client = broker.client()
    waiting = sum(client.llen(key) for key in client.keys("detect*") if client.type(key) == b"list")
    return waiting, client.hlen("unacked")


def wait_for_all(engine, jobs: list[dict], worker: WorkerProcess, timeout: float = 180.0) -> None:
    try:
        wait_until(lambda: committed(engine) >= len(jobs), timeout=timeout, what=f"{len(jobs)} verdicts")
    except AssertionError as exc:
        tail = worker.log()[-3000:]
        raise AssertionError(f"{exc}; {committed(engine)} committed; worker log tail:\n{tail}") from None


def start_mid_run(make_worker, engine, broker: RedisServer, jobs: list[dict], **overrides: str) -> WorkerProcess:
    """Queue ``jobs``, start a worker, and return once its first batch is committed: the run is under way, the
    moment to break something."""
    produce(broker.url, jobs)
    worker = make_worker(**overrides).start()
    wait_until(lambda: committed(engine) >= BATCH, timeout=120, what="the first batch", every=0.05)
    return worker


def test_kill_9_mid_batch_loses_and_duplicates_nothing(make_worker, database, broker, upload_root):
    _, engine = database
    jobs = jobs_for(upload_root, 1000)
    worker = start_mid_run(make_worker, engine, broker, jobs)
    worker.kill()
    in_flight = len(jobs) - committed(engine)
    assert in_flight >= 500, f"only {in_flight} jobs were in flight when the worker was killed"
    _, unacknowledged = held_by_redis(broker)
    assert unacknowledged > 0, "the killed worker held no messages: the test did not kill it mid-batch"

    # The killed worker's jobs come back once the visibility timeout (8 s) has passed: worker.broker takes a
    # message off the queue and records it as held in one step, so there is no instant at which it is in
    # the dead worker's memory only.
    worker.start()
    wait_for_all(engine, jobs, worker, timeout=90)
    wait_until(lambda: held_by_redis(broker) == (0, 0), timeout=60, what="every message acknowledged")
    assert_exactly_one_row_per_job(engine, jobs)


def test_redis_restart_mid_run_loses_nothing(make_worker, database, broker, upload_root):
    _, engine = database
    jobs = jobs_for(upload_root, 600)
    worker = start_mid_run(make_worker, engine, broker, jobs)
    broker.kill()  # a crash, not a shutdown: only the append-only file (fsync always) survives
    time.sleep(3)
    broker.start()
    assert worker.alive
    later = jobs_for(upload_root, 100, start=600)  # the restarted broker takes new work too
    produce(broker.url, later)
    wait_for_all(engine, jobs + later, worker)
    assert_exactly_one_row_per_job(engine, jobs + later)
    # Acknowledgements sent while Redis was down were lost; those messages come back after the visibility
    # timeout, are answered from the stored verdicts, and are acknowledged: nothing stays stuck.
    wait_until(lambda: held_by_redis(broker) == (0, 0), timeout=60, what="every message acknowledged")
    assert_exactly_one_row_per_job(engine, jobs + later)
    assert worker.alive


def test_database_outage_of_30_s_retries_and_acknowledges_only_committed_jobs(make_worker, database, broker,
                                                                              postgres, upload_root):
    _, engine = database
    jobs = jobs_for(upload_root, 600)
    # The visibility timeout exceeds the database retry (10 s), as docs/OPERATIONS.md asks: a batch waiting
    # out the outage hands its jobs back itself instead of having them redelivered under it.
    worker = start_mid_run(make_worker, engine, broker, jobs, PPL_VISIBILITY_TIMEOUT_S="30")
    postgres.stop("immediate")
    # Taken once the server is down, not before: a batch may commit while the stop is under way. Every row
    # created before this instant was committed before the outage (a transaction cannot outlive the stop),
    # and every row created after it was committed after the restart.
    stopped_at = datetime.now(UTC)
    engine.dispose()

    # While the database is down nothing can be committed, so every job without a row must still be in
    # Redis, waiting or delivered-but-unacknowledged. Sample that at intervals through the outage (the
    # largest reading within a second: a message moves between the two Redis keys in two steps).
    held: list[int] = []
    outage_end = time.monotonic() + 30
    while time.monotonic() < outage_end:
        readings = []
        for _ in range(5):
            readings.append(sum(held_by_redis(broker)))
            time.sleep(0.2)
        held.append(max(readings))
        time.sleep(3)
    assert worker.alive
    postgres.start()

    wait_for_all(engine, jobs, worker)
    assert_exactly_one_row_per_job(engine, jobs)
    with engine.connect() as conn:
        before_outage = conn.execute(text("select count(*) from verdicts where created_at < :t"),
                                     {"t": stopped_at}).scalar()
    assert len(held) >= 5
    assert min(held) >= len(jobs) - before_outage, (
        f"Redis held only {min(held)} messages during the outage for {len(jobs) - before_outage} uncommitted jobs")
    log = worker.log()
    assert "database unreachable" in log and "handed back to the queue" in log  # retried, then requeued


def test_sigterm_with_a_partly_filled_batch_hands_its_jobs_back(make_worker, database, broker, upload_root):
    _, engine = database
    jobs = jobs_for(upload_root, 10)
    # A batch that would wait 60 s to fill, and a visibility timeout too long to help: the jobs can only
    # come back at once if the shutdown itself hands them back.
    worker = make_worker(PPL_BATCH_TIMEOUT_MS="60000", PPL_VISIBILITY_TIMEOUT_S="3600").start()
    produce(broker.url, jobs)
    wait_until(lambda: held_by_redis(broker) == (0, len(jobs)), timeout=120, what="the worker holding all 10 jobs")
    assert committed(engine) == 0

    assert worker.terminate(timeout=60) == 0
    waiting, unacknowledged = held_by_redis(broker)
    assert unacknowledged == 0 and waiting + committed(engine) == len(jobs), (waiting, unacknowledged)

    replacement = make_worker(PPL_BATCH_TIMEOUT_MS="200", PPL_VISIBILITY_TIMEOUT_S="3600").start()
    wait_for_all(engine, jobs, replacement, timeout=120)
    assert_exactly_one_row_per_job(engine, jobs)
