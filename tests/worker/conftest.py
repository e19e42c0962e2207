"""PostgreSQL fixtures for the worker tests: a reachable server, and a fresh migrated database per test.

Integration tests talk to a real server, as the service does. When none answers they fail, never skip: a CI
run without its database must not pass by testing nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from benchmarks.harness import sha_of  # noqa: F401 (tests import it from here)
from benchmarks.harness import verdict_row as build_verdict_row
from worker.db import VerdictRow, make_engine, temporary_database

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TEST_DATABASE_PREFIX = "ppl_test_"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", None}
START_WAIT_S = 30.0


def _reachable(url: str) -> str | None:
    """None when the server answers, else why not."""
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except OperationalError as exc:
        return str(exc.orig).strip()
    finally:
        engine.dispose()


def _start_local_clusters() -> None:
    """What `pg_ctlcluster --skip-systemctl-redirect <version> main start` does for each installed version."""
    pg_ctlcluster = shutil.which("pg_ctlcluster")
    versions = Path("/etc/postgresql")
    if pg_ctlcluster is None or not versions.is_dir():
        return
    for version in sorted(p.name for p in versions.iterdir() if (p / "main").is_dir()):
        subprocess.run([pg_ctlcluster, "--skip-systemctl-redirect", version, "main", "start"],
                       check=False, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """URL of a database on the test server (``PPL_TEST_PG_URL``), starting the local cluster if need be."""
    url = os.environ.get("PPL_TEST_PG_URL", DEFAULT_PG_URL)
    error = _reachable(url)
    if error is None:
        return url
    if make_url(url).host in LOCAL_HOSTS:
        _start_local_clusters()
        deadline = time.monotonic() + START_WAIT_S
        while (error := _reachable(url)) is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        if error is None:
            return url
    pytest.fail(f"PostgreSQL at {make_url(url).render_as_string(hide_password=True)} does not answer ({error}). "
                "The worker's database tests need a real server: start one, or point PPL_TEST_PG_URL at one.",
                pytrace=False)


@pytest.fixture
def empty_database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh database with no schema (for migration tests)."""
    with temporary_database(pg_server_url, prefix=TEST_DATABASE_PREFIX, migrated=False) as url:
        yield url


@pytest.fixture
def database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh database migrated to head, private to one test."""
    with temporary_database(pg_server_url, prefix=TEST_DATABASE_PREFIX) as url:
        yield url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def module_engine(pg_server_url: str) -> Iterator[Engine]:
    """One migrated database shared by a module's tests, for read-only tests over an expensive fixture."""
    with temporary_database(pg_server_url, prefix=TEST_DATABASE_PREFIX) as url:
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


@pytest.fixture(scope="session")
def verdict_row() -> Callable[..., VerdictRow]:
    """``verdict_row(name, model_version, score=..., **column_overrides)`` builds a valid VerdictRow."""
    return build_verdict_row
