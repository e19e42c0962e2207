"""Structured logs: one JSON object per line, with the task and batch ids that produced them.

Celery's own logging set-up is replaced (``setup_logging`` signal in ``worker.app``) so that every record,
Celery's and ours, goes through the same formatter. Native libraries (libtiff, libjpeg, libpng through
Pillow's C code) write their warnings straight to file descriptor 2, past Python: ``configure`` points
that descriptor at a pipe whose lines a thread logs as records of the ``native`` logger, and the JSON
lines themselves go to the original stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime
from typing import TextIO

# Attributes every LogRecord has; anything else was passed in ``extra=`` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "process": record.process,
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", capture_native: bool = True) -> None:
    """JSON lines on stderr for every logger; with ``capture_native``, also for what C code writes to fd 2."""
    if capture_native:
        capture_native_stderr()
    handler = logging.StreamHandler(_output())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


NATIVE_LOGGER = "native"
_native: NativeStderr | None = None
_native_lock = threading.Lock()


def _output() -> TextIO:
    """Where JSON lines go: the original stderr once fd 2 is captured (else they would come back as input)."""
    return _native.stream if _native is not None else sys.stderr


class NativeStderr:
    """File descriptor 2 redirected into a pipe; a daemon thread logs each line written to it."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self.original_fd = os.dup(2)
        self.stream = os.fdopen(os.dup(self.original_fd), "w", buffering=1, encoding="utf-8",
                                errors="backslashreplace")
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._reader = os.fdopen(read_fd, "rb", buffering=0)
        self.thread = threading.Thread(target=self._pump, name="ppl-native-stderr", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        log = logging.getLogger(NATIVE_LOGGER)
        pending = b""
        while True:
            chunk = self._reader.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode("utf-8", "backslashreplace").rstrip()
                if text:
                    log.warning(text, extra={"stream": "stderr"})
        if pending.strip():
            log.warning(pending.decode("utf-8", "backslashreplace").rstrip(), extra={"stream": "stderr"})

    def restore(self) -> None:
        """Put the original stderr back on fd 2; the thread ends once the pipe's last writer is gone."""
        sys.stderr.flush()
        os.dup2(self.original_fd, 2)
        os.close(self.original_fd)
        self.thread.join(timeout=5)


def capture_native_stderr() -> NativeStderr:
    """Start capturing fd 2 (once per process); existing stderr handlers are moved to the original stderr."""
    global _native
    with _native_lock:
        if _native is None:
            _native = NativeStderr()
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.__stderr__):
                    handler.setStream(_native.stream)
        return _native
