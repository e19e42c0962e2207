"""benchmarks/harness.py, which the worker tests and the worker benchmark share: its waits stop early on a dead
worker and say why, its timeouts fail tests as asserts do, and its synthetic rows are valid verdict rows."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from benchmarks.harness import (
    HarnessError,
    WaitTimeout,
    WorkerProcess,
    cpu_seconds,
    sha_of,
    synthetic_rows,
    verdict_row,
    wait_until,
)
from worker.db import dequantise_patch_grid


def test_a_wait_ends_as_soon_as_its_worker_dies_with_the_end_of_its_log(tmp_path):
    env = {**os.environ, "PPL_BACKEND": "no-such-backend"}  # refused at start-up: the process exits at once
    worker = WorkerProcess(env, tmp_path / "logs" / "worker.log", kind="batched")
    with worker:
        started = time.monotonic()
        with pytest.raises(HarnessError, match="exited with status") as caught:
            wait_until(lambda: False, timeout=120, what="nothing", every=0.1, worker=worker)
    assert not isinstance(caught.value, WaitTimeout) and time.monotonic() - started < 60
    assert "no-such-backend" in str(caught.value) and "---- start 1 ----" in worker.log()
    assert not worker.alive


def test_a_timeout_is_an_assertion_error_that_says_how_far_it_got():
    calls = []
    with pytest.raises(AssertionError, match=r"waiting for rows \(\d+ so far\)") as caught:
        wait_until(lambda: calls.append(1), timeout=0.2, what=lambda: f"rows ({len(calls)} so far)", every=0.15)
    assert f"({len(calls)} so far)" in str(caught.value) and len(calls) >= 2  # described when it gave up
    assert wait_until(lambda: 7, timeout=0) == 7
    with pytest.raises(ValueError, match="unknown worker kind"):
        WorkerProcess({}, None, kind="gpu")  # type: ignore[arg-type]


def test_synthetic_rows_are_verdict_rows_of_distinct_images_shaped_by_their_grids():
    rows = synthetic_rows(50, 1000, "v1")
    assert len({r.sha256 for r in rows}) == 50 and rows[0].sha256 == sha_of("bench-1000")
    assert synthetic_rows(50, 1000, "v1") == rows  # deterministic for a start
    for row in rows:
        grid = dequantise_patch_grid(row.patch_grid, row.grid_rows, row.grid_cols)
        assert row.score == row.patch_max and row.label == ("fake" if row.score >= 0.5 else "real")
        assert grid.shape == (4, 4) and abs(float(grid.max()) - row.score) <= 1 / 510 + 1e-6
    uniform = verdict_row("a", "v1", score=0.75)
    assert uniform.label == "fake" and uniform.patch_frac_above == 1.0 and uniform.metadata == {"name": "a"}
    assert verdict_row("a", "v1", grid=np.zeros((2, 3)), width=10).grid_cols == 3


def test_cpu_seconds_splits_a_process_by_thread():
    """A busy thread's CPU shows in its own count and in the process's, not in the idle main thread's."""
    pid = os.getpid()
    main_before, process_before = cpu_seconds(pid, pid), cpu_seconds(pid)
    native_id: list[int] = []
    spun, done = threading.Event(), threading.Event()

    def spin() -> None:
        native_id.append(threading.get_native_id())
        deadline = time.thread_time() + 0.3
        while time.thread_time() < deadline:
            pass
        spun.set()
        done.wait()  # alive until read: a finished thread's count leaves /proc

    thread = threading.Thread(target=spin)
    thread.start()
    assert spun.wait(timeout=30)
    busy = cpu_seconds(pid, native_id[0])
    main = cpu_seconds(pid, pid) - main_before
    process = cpu_seconds(pid) - process_before
    done.set()
    thread.join()
    # The counts are in clock ticks, each rounded on its own: the process's may lag its thread's by a tick
    assert busy >= 0.25 and process >= busy - 0.02 and main < 0.1
