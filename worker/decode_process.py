"""One decode process and the pipe that carries its calls: what ``worker.loading.ProcessLoader`` runs N of.

Why not ``concurrent.futures.ProcessPoolExecutor(max_workers=1)``: each of its calls wakes a manager thread
and a queue feeder thread of the worker process besides the caller, and that serial CPU, paid for every
message to every decode process, is what caps how fast one worker can feed an accelerator
(docs/PERFORMANCE.md, "Serial CPU"). Here the caller pickles and writes its call itself, and one reader thread
per process reads the replies, which come back in the order the calls went (one process, one call at a time),
and completes their futures. The reader keeps the process's replies drained, so a process never waits on a
full pipe while a caller waits to write to it.

A process that dies (a decoder crash, the OOM killer, kill -9) fails every call it has not answered with
``DecodeProcessGone``; so does a call made after that. The caller replaces it (``ProcessLoader._replace``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from typing import Any

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0  # how long ``shutdown(wait=True)`` lets a process finish its calls before it is killed


class DecodeProcessGone(RuntimeError):
    """The decode process died, or was shut down, before it answered."""


class UnreadableReply(RuntimeError):
    """The call ran, but its result (or its exception) could not cross the pipe; the process goes on."""


class DecodeProcess:
    """A spawned process that runs ``initializer(*initargs)`` once, then each call sent to it, in order."""

    def __init__(self, context: SpawnContext, initializer: Callable[..., object], initargs: tuple, name: str):
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, initializer, initargs), name=name, daemon=True)
        self.process.start()
        child.close()  # the process's end lives in the process only: its death closes the pipe (EOF here)
        self._pending: collections.deque[Future] = collections.deque()  # calls sent, not yet answered, in order
        self._lock = threading.Lock()  # one writer at a time; ``_pending`` and ``_gone`` change under it
        self._gone: str | None = None
        self._reader = threading.Thread(target=self._read, name=f"{name}-replies", daemon=True)
        self._reader.start()

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        """``function(*args)`` in the process (``function`` picklable by reference): its result, or its exception
        (``UnreadableReply`` where either cannot be pickled), or ``DecodeProcessGone``, in the future."""
        future: Future = Future()
        self._send(function, args, future)
        return future

    def post(self, function: Callable[..., Any], *args: Any) -> None:
        """``function(*args)`` in the process, after the calls already sent; no reply (an error there is logged
        there). Raises ``DecodeProcessGone`` when the process is gone."""
        self._send(function, args, None)

    def _send(self, function: Callable[..., Any], args: tuple, future: Future | None) -> None:
        with self._lock:
            if self._gone is not None:
                raise DecodeProcessGone(self._gone)
            try:
                self._conn.send((function, args, future is not None))
            except (OSError, ValueError) as exc:  # the process is gone (EPIPE); its reader fails what it owed
                raise DecodeProcessGone(f"decode process {self.process.name} is gone: {exc}") from exc
            if future is not None:
                self._pending.append(future)

    def _read(self) -> None:
        while True:
            try:
                ok, value = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:  # a reply that does not unpickle: that call fails, the process goes on
                ok, value = False, UnreadableReply(f"unreadable reply: {type(exc).__name__}: {exc}")
            with self._lock:
                future = self._pending.popleft()
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        self.process.join(timeout=JOIN_TIMEOUT_S)
        reason = f"decode process {self.process.name} ended (exit code {self.process.exitcode})"
        with self._lock:
            self._gone = self._gone or reason
            owed, self._pending = list(self._pending), collections.deque()
        for future in owed:
            future.set_exception(DecodeProcessGone(reason))

    @property
    def alive(self) -> bool:
        return self._gone is None

    def shutdown(self, wait: bool = True) -> None:
        """Stop the process: after the calls already sent (``wait``), or now. Calls it has not answered fail."""
        with self._lock:
            if self._gone is None:
                self._gone = f"decode process {self.process.name} was shut down"
                with contextlib.suppress(OSError, ValueError):
                    self._conn.send(None)  # the end of its calls: it exits once it has answered the rest
        if not wait:
            self.process.kill()
        self._reader.join(timeout=JOIN_TIMEOUT_S)
        if self._reader.is_alive():  # still busy past the timeout (a decode that hangs): stop it the hard way
            self.process.kill()
            self._reader.join()
        self._conn.close()


def _serve(conn: Connection, initializer: Callable[..., object], initargs: tuple) -> None:
    initializer(*initargs)
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the worker is gone
            return
        if message is None:
            return
        function, args, reply = message
        try:
            result: tuple[bool, Any] = (True, function(*args))
        except Exception as exc:  # handed to the caller; KeyboardInterrupt and the like end the process
            if not reply:
                log.exception("decode process call %s failed", getattr(function, "__name__", function))
                continue
            result = (False, exc)
        if reply:
            try:
                conn.send(result)
            except Exception as exc:  # the result or the exception does not pickle: say so instead
                conn.send((False, UnreadableReply(f"unpicklable reply: {type(exc).__name__}: {exc}")))
