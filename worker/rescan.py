"""Bulk rescans: re-enqueue ``detect_image`` for stored images that the current model has not judged.

Keyset-paginated over ``verdicts.id`` (no OFFSET, so the millionth page costs what the first does),
enqueued in chunks through one broker connection, paused while the ``detect`` queue is longer than
``PPL_RESCAN_MAX_QUEUE`` (back-pressure: a rescan must not bury fresh uploads), and resumable: the cursor
is committed in ``rescan_runs`` after every chunk, and a new run with the same target and filters
continues an unfinished one. A chunk enqueued but not yet recorded when a run dies is enqueued again on
resume, which is harmless: verdict writes are idempotent.
"""

from __future__ import annotations

import logging
import operator
import os
import threading
import time
from binascii import b2a_base64
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any, Final

import numpy as np
from celery import Celery
from kombu import Producer
from kombu.exceptions import ChannelError
from tqdm import tqdm

from ppl_model.categories import Label, choices
from ppl_model.model_dir import ModelDirError, read_model_info
from worker import db
from worker.app import DETECT_QUEUE, DETECT_TASK
from worker.errors import WorkerError
from worker.settings import Settings

log = logging.getLogger(__name__)


class RescanError(WorkerError, ValueError):
    """A rescan that cannot start: bad filters, or no model version to rescan for."""


@dataclass(frozen=True)
class RescanRequest:
    stale_only: bool = True  # images with no verdict from the target version; False = every image matched
    since: datetime | None = None  # verdict created_at range
    until: datetime | None = None
    label: Label | None = None
    min_score: float | None = None
    max_score: float | None = None
    target_model_version: str | None = None  # default: the model in PPL_MODEL_DIR, else the active one
    resume: bool = True  # continue an unfinished run with the same target and filters
    limit: int | None = None  # stop after this many jobs (for trying a rescan out)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> RescanRequest:
        """From task keyword arguments (JSON: dates as ISO strings); unknown names are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise RescanError(f"unknown rescan argument(s): {', '.join(unknown)}")
        values = dict(kwargs)
        for name in ("since", "until"):
            if isinstance(values.get(name), str):
                try:
                    when = datetime.fromisoformat(values[name])
                except ValueError:
                    raise RescanError(f"{name} must be an ISO date-time, got {values[name]!r}") from None
                values[name] = when if when.tzinfo else when.replace(tzinfo=UTC)  # naive = UTC
        return cls(**values)

    def __post_init__(self) -> None:
        if self.label is not None:  # the CLI and task arguments give the plain value
            if self.label not in tuple(Label):
                raise RescanError(f"label must be {choices(Label)}, got {self.label!r}")
            object.__setattr__(self, "label", Label(self.label))  # frozen: the way to normalise a field

    def filters(self) -> db.RescanFilters:
        return db.RescanFilters(stale_only=self.stale_only, since=self.since, until=self.until, label=self.label,
                                min_score=self.min_score, max_score=self.max_score)


@dataclass
class RescanResult:
    run_id: int
    target_model_version: str
    enqueued: int
    total: int | None  # None until the background count (ProgressTotal) finishes
    status: str
    resumed_from: int = 0  # cursor the run started from (0 = a new run)
    seconds: float = 0.0
    waits: int = 0  # times the run paused for the detect queue to drain
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_version(settings: Settings, engine: Any, requested: str | None) -> str:
    if requested:
        return requested
    if settings.model_dir is not None:
        try:
            return read_model_info(settings.model_dir).version_id
        except ModelDirError as exc:
            raise RescanError(f"PPL_MODEL_DIR: {exc}") from exc
    with engine.connect() as conn:
        active = db.active_model_version(conn)
    if active is None:
        raise RescanError("no target model version: set PPL_MODEL_DIR, or let a worker register its model first")
    return active


def queue_length(app: Celery, queue: str = DETECT_QUEUE) -> int:
    """Messages waiting in ``queue`` (not counting those prefetched by workers); 0 for a queue that no worker
    or producer has declared yet."""
    with app.connection_for_write() as conn:
        return _declared_length(conn.default_channel, queue)


def _declared_length(channel: Any, queue: str) -> int:
    try:
        return channel.queue_declare(queue=queue, passive=True).message_count
    except ChannelError:
        return 0


# Placeholders in the reference message that DetectMessages cuts into a template: values that no
# real message field can hold.
_ID, _TAG = "\x01ppl-task-id\x01", "\x01ppl-delivery-tag\x01"
_REPR, _BODY = "\x01ppl-kwargsrepr\x01", "\x01ppl-body\x01"
_KWARGS: Final = {"\x01ppl-kwargs\x01": 0}


class DetectMessages:
    """The Redis list items of ``detect_image`` jobs, as ``app.send_task(DETECT_TASK, kwargs=...,
    queue=DETECT_QUEUE)`` would push them, made from a template and the rows of ``db.RescanPages``.

    The template is one reference message built by Celery's message factory (``app.amqp.create_task_message``:
    protocol 2, JSON) wrapped in kombu's Redis envelope (base64 body, ``delivery_info`` for the default
    exchange and the ``detect`` queue, priority 0, persistent), with placeholders where each message differs:
    its task id (``id``, ``root_id``, ``correlation_id``), delivery tag, ``kwargsrepr`` and body. The database
    renders a row's keyword arguments as JSON; ``kwargsrepr`` is that text cut to Celery's length, the body its
    base64 between the template's fixed prefix and suffix; a message is then the template's fixed text
    joined with those and two new ids: no Celery or kombu call per message. ``tests/worker/test_rescan.py``
    checks the result against what kombu publishes, and that the real worker judges the jobs.

    One difference from ``send_task``: the display-only ``kwargsrepr`` header (worker logs, Flower) shows the
    keyword arguments as JSON, not as Python's ``repr``, cut at the same length.
    """

    def __init__(self, app: Celery):
        from kombu.serialization import dumps as serialize
        from kombu.utils.json import dumps as json_dumps

        amqp = app.amqp
        reference = amqp.create_task_message(_ID, DETECT_TASK, (), dict(_KWARGS), reply_to=app.thread_oid,
                                             argsrepr="()", kwargsrepr=_REPR)
        content_type, content_encoding, body = serialize(reference.body, serializer="json")
        body_parts = str(body).split(json_dumps(_KWARGS))
        if len(body_parts) != 2:
            raise RuntimeError("unexpected Celery message body layout: the rescan's message template needs updating")
        # The body is base64 of prefix + the keyword arguments' JSON + suffix; kwargsrepr is cut at this length.
        self._body_prefix, self._body_suffix = body_parts
        self.repr_maxsize: int = amqp.kwargsrepr_maxsize
        if self.repr_maxsize < 3:
            raise ValueError(f"kwargsrepr_maxsize must be at least 3, got {self.repr_maxsize}")
        properties = {**reference.properties, "delivery_mode": 2,
                      "delivery_info": {"exchange": "", "routing_key": DETECT_QUEUE}, "priority": 0,
                      "body_encoding": "base64", "delivery_tag": _TAG}
        envelope = json_dumps({"body": _BODY, "content-encoding": content_encoding, "content-type": content_type,
                               "headers": reference.headers, "properties": properties})
        # The fixed text between placeholders, and which value follows each piece: the index of the value in
        # (task id, delivery tag, kwargsrepr, body). The ids and the body sit inside JSON strings; kwargsrepr's
        # value is the whole JSON string.
        markers = {json_dumps(_ID)[1:-1]: 0, json_dumps(_TAG)[1:-1]: 1, json_dumps(_REPR): 2,
                   json_dumps(_BODY)[1:-1]: 3}
        pieces: list[tuple[str, int | None]] = []
        rest = envelope
        while rest:
            found = [(rest.find(marker), marker) for marker in markers if marker in rest]
            if not found:
                pieces.append((rest, None))
                break
            at, marker = min(found)
            pieces.append((rest[:at], markers[marker]))
            rest = rest[at + len(marker):]
        slots = [slot for _, slot in pieces if slot is not None]
        if sorted(slots) != [0, 0, 0, 1, 2, 3]:
            raise RuntimeError(f"unexpected kombu envelope layout {slots}: the rescan's message template needs "
                               "updating")
        self._format = "".join(fixed.replace("%", "%%") + ("%s" if slot is not None else "") for fixed, slot in pieces)
        self._values = operator.itemgetter(*slots)  # (id, tag, repr, body) -> the values in template order

    def render(self, rows: Sequence[tuple[int, str]]) -> list[str]:
        """One list item per ``db.RescanPages`` row, in order, each with a new random (version 4) task id and
        delivery tag."""
        ids = _uuid4s(2 * len(rows))
        fmt, values, prefix, suffix = self._format, self._values, self._body_prefix, self._body_suffix
        maxsize = self.repr_maxsize
        return [fmt % values((ids[2 * i], ids[2 * i + 1],
                              encode_basestring(kwargs if len(kwargs) <= maxsize else kwargs[:maxsize - 3] + "..."),
                              b2a_base64(f"{prefix}{kwargs}{suffix}".encode(), newline=False).decode("ascii")))
                for i, (_, kwargs) in enumerate(rows)]


def _uuid4s(count: int) -> list[str]:
    """``count`` random version-4 UUIDs as kombu's ``uuid()`` writes them, from one ``os.urandom`` call (a call
    per id was 8 % of a rescan's time: each is a system call, and slow in a VM) and formatted in numpy."""
    raw = np.frombuffer(os.urandom(16 * count), np.uint8).reshape(count, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    digits = np.frombuffer(raw.tobytes().hex().encode("ascii"), "S1").reshape(count, 32)
    text = np.full((count, 36), b"-", "S1")
    for start, stop, at in ((0, 8, 0), (8, 12, 9), (12, 16, 14), (16, 20, 19), (20, 32, 24)):
        text[:, at:at + stop - start] = digits[:, start:stop]
    return text.view("S36").ravel().astype(str).tolist()


class QueueRoom:
    """Back-pressure for a rescan: whether the ``detect`` queue has room for another chunk, that is, holds at
    most ``limit`` jobs (``PPL_RESCAN_MAX_QUEUE``).

    Asking the broker costs two round trips, a noticeable share of a rescan asked before every chunk
    (docs/PERFORMANCE.md, "Storage and rescans"), so the last answer is reused, plus the jobs this rescan has
    pushed since, until that sum passes ``limit`` or ``recheck_s`` has gone by (other producers fill the queue
    too). As before, the queue can pass ``limit`` by at most one chunk of the rescan's own jobs."""

    def __init__(self, length: Callable[[], int], limit: int, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, recheck_s: float = 1.0):
        self.limit, self.recheck_s = limit, recheck_s
        self._length, self._sleep, self._clock = length, sleep, clock
        self._known: int | None = None  # the last length asked, plus the jobs pushed since
        self._asked_at = 0.0

    def has_room(self) -> bool:
        if self._known is None or self._known > self.limit or self._clock() - self._asked_at >= self.recheck_s:
            self._known, self._asked_at = self._length(), self._clock()
        return self._known <= self.limit

    def wait(self) -> None:
        """Sleep a second; the next ``has_room`` asks again."""
        self._sleep(1.0)
        self._known = None

    def used(self, jobs: int) -> None:
        """This rescan pushed ``jobs`` more."""
        if self._known is not None:
            self._known += jobs


def push_messages(app: Celery, producer: Producer, messages: Sequence[str]) -> None:
    """Enqueue rendered ``detect_image`` messages (``DetectMessages``) with one ``LPUSH`` of the whole
    chunk. One LPUSH of many items leaves them in the list as that many LPUSHes in the same order would, so
    workers (which take from the other end) receive them in chunk order. If the push fails, the caller has
    not recorded the chunk, so a resumed run enqueues it again (verdict writes are idempotent)."""
    producer.maybe_declare(app.amqp.queues[DETECT_QUEUE])  # a no-op after the first chunk on this channel
    if messages:
        with producer.channel.conn_or_acquire() as client:  # the synchronous client kombu's own _put uses
            client.lpush(DETECT_QUEUE, *messages)


class ProgressTotal:
    """A rescan's progress total, counted on a connection of its own in a daemon thread while the run enqueues:
    the count is a pass over every candidate, a large share of the run's time when it came first
    (docs/PERFORMANCE.md, "Storage and rescans"). It counts from the run's start cursor, so a candidate that a
    worker judges before the count reaches it is left out: a total for progress, not for deciding anything.
    ``stop`` cancels its query on the server."""

    def __init__(self, engine: Any, count: Callable[[Any], int]):
        self._engine, self._count = engine, count
        self._lock = threading.Lock()
        self._driver: Any = None  # the count's driver connection while its query may run
        self._stopped = False
        self._done = threading.Event()
        self._value: int | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, name="rescan-count", daemon=True).start()

    def _run(self) -> None:
        try:
            with self._engine.begin() as conn:
                with self._lock:
                    if self._stopped:
                        return
                    self._driver = conn.connection.driver_connection
                self._value = self._count(conn)
        except BaseException as exc:  # handed to whoever asks for the result
            self._error = exc
        finally:
            with self._lock:
                self._driver = None
            self._done.set()

    def ready(self) -> bool:
        return self._done.is_set()

    def result(self) -> int:
        """The total, waiting for it; the count's own error if it failed."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        if self._value is None:
            raise RescanError("the rescan's count was stopped")
        return self._value

    def stop(self) -> None:
        """Cancel the count's query if it still runs: the run ended first."""
        with self._lock:
            self._stopped = True
            if self._driver is not None:
                self._driver.cancel_safe()


def run_rescan(settings: Settings, request: RescanRequest, *, app: Celery, progress: bool = False,
               engine: Any = None, queue_length_fn: Callable[[], int] | None = None,
               sleep: Callable[[float], None] = time.sleep) -> RescanResult:
    started = time.monotonic()
    engine = engine or db.make_engine(settings.database_url)
    target = target_version(settings, engine, request.target_model_version)
    filters = request.filters()
    with engine.begin() as conn:
        run = db.latest_unfinished_rescan_run(conn, target, filters) if request.resume else None
        if run is None:
            run = db.create_rescan_run(conn, filters, target)
        # Only verdicts that existed when the run began: a full rescan must not chase its own new rows.
        run_id, cursor, enqueued, up_to_id = run.id, run.cursor, run.enqueued, run.max_verdict_id
        db.update_rescan_run(conn, run_id, cursor=cursor, enqueued=enqueued, status="running")
    result = RescanResult(run_id, target, enqueued, None, "running", resumed_from=cursor)
    log.info("rescan %d for model %s: starting after verdict %d", run_id, target, cursor)
    bar = tqdm(total=None, initial=enqueued, unit="job", disable=not progress, dynamic_ncols=True)

    def count_total(conn: Any) -> int:
        return enqueued + db.count_rescan_candidates(conn, filters, target, after_id=result.resumed_from,
                                                     up_to_id=up_to_id)

    counting = ProgressTotal(engine, count_total)

    def take_total() -> None:  # once the count is in, or waiting for it
        result.total = bar.total = counting.result()
        bar.refresh()
        log.info("rescan %d: %d image(s) to enqueue", run_id, result.total - enqueued)

    try:
        messages = DetectMessages(app)
        pages = db.RescanPages(filters, target, up_to_id)

        def next_page(after_id: int, already: int) -> list[tuple[int, str]]:
            size = settings.rescan_chunk if request.limit is None else min(settings.rescan_chunk,
                                                                           request.limit - already)
            return read_page(after_id, size) if size > 0 else []

        # The next page is read while this one is pushed and recorded: the page query runs on the database
        # server, so the two overlap (the driver releases the GIL while it waits). The page connection is
        # entered first so that it outlives the thread that reads over it (the executor shuts down first).
        with (pages.reader(engine) as read_page,
              app.producer_or_acquire() as producer,
              ThreadPoolExecutor(max_workers=1, thread_name_prefix="rescan-page") as reader):
            # The queue's length through the producer's own channel: a new broker connection per chunk (what
            # queue_length does) was 5 % of a rescan's time.
            room = QueueRoom(queue_length_fn or (lambda: _declared_length(producer.channel, DETECT_QUEUE)),
                             settings.rescan_max_queue, sleep)
            rows = next_page(cursor, result.enqueued)
            while rows:
                ahead = reader.submit(next_page, rows[-1][0], result.enqueued + len(rows))
                if result.total is None and counting.ready():
                    take_total()
                while not room.has_room():  # back-pressure
                    result.waits += 1
                    bar.set_postfix_str("waiting for the detect queue")
                    room.wait()
                push_messages(app, producer, messages.render(rows))
                room.used(len(rows))
                cursor = rows[-1][0]
                result.enqueued += len(rows)
                with engine.begin() as conn:
                    db.update_rescan_run(conn, run_id, cursor=cursor, enqueued=result.enqueued, status="running",
                                         total=result.total)
                bar.update(len(rows))
                rows = ahead.result()
        if result.total is None:
            take_total()
        result.status = "done" if request.limit is None or result.enqueued < request.limit else "paused"
    except BaseException:
        result.status = "paused"  # interrupted (Ctrl-C, broker or database gone): the next run resumes here
        counting.stop()
        raise
    finally:
        bar.close()
        result.seconds = time.monotonic() - started
        try:
            with engine.begin() as conn:
                db.update_rescan_run(conn, run_id, cursor=cursor, enqueued=result.enqueued, status=result.status,
                                     total=result.total)
        except Exception:  # the cursor of the last finished chunk is already committed
            log.warning("rescan %d: could not record its final state", run_id, exc_info=True)
    log.info("rescan %d %s: %d job(s) enqueued in %.1f s", run_id, result.status, result.enqueued, result.seconds)
    return result
