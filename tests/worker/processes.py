"""Real worker processes for the integration tests: start, kill, stop; a producer that knows only Celery;
and polling with a deadline. Every wait here is bounded and says what it waited for when it gives up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

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
    services that feed the worker do)."""
    subprocess.run([sys.executable, "-c", PRODUCER, broker_url], input=json.dumps(jobs), text=True, check=True,
                   timeout=timeout, cwd="/")


def wait_until(condition: Callable[[], T], timeout: float = 60.0, what: str = "condition",
               every: float = 0.3) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class WorkerProcess:
    """``ppl-worker run`` as a child process with its own log file; one process (threads pool)."""

    def __init__(self, env: Mapping[str, str], log_path: Path, name: str = "worker"):
        self.env = dict(env)
        self.log_path = log_path
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> WorkerProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        log = self.log_path.open("a")
        log.write(f"---- start {self.starts} ----\n")
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run", "--hostname", f"{self.name}{os.getpid()}-{self.starts}@%h"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

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
        """Best-effort cleanup for fixtures: SIGTERM, then SIGKILL."""
        if not self.alive:
            return
        try:
            self.terminate(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
