"""Bulk rescans: re-enqueue ``detect_image`` for stored images that the current model has not judged.

Keyset-paginated over ``verdicts.id`` (no OFFSET, so the millionth page costs what the first does),
enqueued in chunks through one broker connection, paused while the ``detect`` queue is longer than
``PPL_RESCAN_MAX_QUEUE`` (back-pressure: a rescan must not bury fresh uploads), and resumable: the cursor
is committed in ``rescan_runs`` after every chunk, and a new run with the same target and filters
continues an unfinished one. A chunk enqueued but not yet recorded when a run dies is enqueued again on
resume, which is harmless: verdict writes are idempotent.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from celery import Celery
from kombu import Producer
from kombu.exceptions import ChannelError
from tqdm import tqdm

from ppl_model.categories import Label, choices
from ppl_model.model_dir import ModelDirError, read_model_info
from worker import db
from worker.app import DETECT_QUEUE, DETECT_TASK, DetectKwargs, detect_kwargs
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
    total: int
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


def _kwargs_repr(kwargs: DetectKwargs, maxsize: int) -> str:
    """What the ``kwargsrepr`` header shows (Flower, worker logs): ``repr``, cut at ``maxsize`` characters. The
    values come from the database's text and JSON columns, so plain ``repr`` is safe, and it is 30 times
    cheaper than Celery's ``saferepr``, which was a third of a rescan's time."""
    text = repr(kwargs)
    return text if len(text) <= maxsize else text[:maxsize - 3] + "..."


# Placeholders in the reference message that DetectMessages cuts into a template: values that no real
# message field can hold.
_ID, _TAG = "\x01ppl-task-id\x01", "\x01ppl-delivery-tag\x01"
_REPR, _BODY = "\x01ppl-kwargsrepr\x01", "\x01ppl-body\x01"
_KWARGS: Final = {"\x01ppl-kwargs\x01": 0}


class DetectMessages:
    """The Redis list items of ``detect_image`` jobs, as ``app.send_task(DETECT_TASK, kwargs=...,
    queue=DETECT_QUEUE)`` would push them, made from a template.

    The template is one reference message built once, by Celery's message factory
    (``app.amqp.create_task_message``: protocol 2, JSON) wrapped in kombu's Redis envelope (base64 body,
    ``delivery_info`` for the default exchange and the ``detect`` queue, priority 0, persistent), with
    placeholders where each message differs: its task id (``id``, ``root_id``, ``correlation_id``), delivery
    tag, ``kwargsrepr`` and body. A message is then the template's fixed text joined with those values: no
    Celery or kombu call per message (they were 80 % of a rescan's CPU). ``tests/worker/test_rescan.py``
    checks the result against what kombu publishes, and that the real worker judges the jobs.
    """

    def __init__(self, app: Celery):
        from kombu.serialization import dumps as serialize
        from kombu.utils.json import dumps as json_dumps

        amqp = app.amqp
        self.maxsize: int = amqp.kwargsrepr_maxsize
        reference = amqp.create_task_message(_ID, DETECT_TASK, (), dict(_KWARGS), reply_to=app.thread_oid,
                                             argsrepr="()", kwargsrepr=_REPR)
        content_type, content_encoding, body = serialize(reference.body, serializer="json")
        kwargs_json = json_dumps(_KWARGS)
        self._body = tuple(part.encode() for part in str(body).split(kwargs_json))
        if len(self._body) != 2:
            raise RuntimeError("unexpected Celery message body layout: the rescan's message template needs updating")
        properties = {**reference.properties, "delivery_mode": 2,
                      "delivery_info": {"exchange": "", "routing_key": DETECT_QUEUE}, "priority": 0,
                      "body_encoding": "base64", "delivery_tag": _TAG}
        envelope = json_dumps({"body": _BODY, "content-encoding": content_encoding, "content-type": content_type,
                               "headers": reference.headers, "properties": properties})
        # The fixed text between placeholders, and which value follows each piece.
        slots = {json_dumps(_ID)[1:-1]: "id", json_dumps(_TAG)[1:-1]: "tag", json_dumps(_REPR): "repr",
                 json_dumps(_BODY)[1:-1]: "body"}
        pieces: list[tuple[str, str | None]] = []
        rest = envelope
        while rest:
            found = [(rest.find(marker), marker) for marker in slots if marker in rest]
            if not found:
                pieces.append((rest, None))
                break
            at, marker = min(found)
            pieces.append((rest[:at], slots[marker]))
            rest = rest[at + len(marker):]
        names = [slot for _, slot in pieces if slot]
        if sorted(names) != sorted(["id", "id", "id", "tag", "repr", "body"]):
            raise RuntimeError(f"unexpected kombu envelope layout {names}: the rescan's message template needs "
                               "updating")
        # One %-format over the fixed text, the values in slot order.
        self._format = "".join(text.replace("%", "%%") + ("%s" if slot else "") for text, slot in pieces)
        self._slots = tuple(names)

    def build(self, jobs: Sequence[DetectKwargs]) -> list[bytes]:
        """One list item per job, in order, each with a new random (version 4) task id and delivery tag."""
        # Task ids as kombu's uuid() makes them, from one os.urandom call per chunk: a call per id was 8 % of a
        # rescan's time (each is a system call, and slow in a VM).
        entropy = os.urandom(32 * len(jobs))
        prefix, suffix = self._body
        slots, fmt, maxsize, dumps, b64 = self._slots, self._format, self.maxsize, json.dumps, base64.b64encode
        out = []
        for i, kwargs in enumerate(jobs):
            values = {"id": _uuid4(entropy, 32 * i), "tag": _uuid4(entropy, 32 * i + 16),
                      "repr": dumps(_kwargs_repr(kwargs, maxsize)),
                      "body": b64(prefix + dumps(kwargs).encode() + suffix).decode("ascii")}
            out.append((fmt % tuple(values[slot] for slot in slots)).encode())
        return out


def _uuid4(entropy: bytes, at: int) -> str:
    """``str(uuid.UUID(bytes=entropy[at:at + 16], version=4))``, without the UUID object."""
    raw = bytearray(entropy[at:at + 16])
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def publish_chunk(app: Celery, producer: Producer, jobs: list[DetectKwargs],
                  messages: DetectMessages | None = None) -> None:
    """Enqueue one ``detect_image`` message per keyword-argument dict with one ``LPUSH`` of the whole chunk.

    The messages are those ``app.send_task(DETECT_TASK, kwargs=..., queue=DETECT_QUEUE)`` sends
    (``DetectMessages``); one LPUSH of many items leaves them in the list as that many LPUSHes in the same
    order would, so workers (which take from the other end) receive them in chunk order. If the push fails,
    the caller has not recorded the chunk, so a resumed run enqueues it again (verdict writes are idempotent).
    """
    messages = messages or DetectMessages(app)
    producer.maybe_declare(app.amqp.queues[DETECT_QUEUE])  # a no-op after the first chunk on this channel
    if jobs:
        with producer.channel.conn_or_acquire() as client:  # the synchronous client kombu's own _put uses
            client.lpush(DETECT_QUEUE, *messages.build(jobs))


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
        total = enqueued + db.count_rescan_candidates(conn, filters, target, after_id=cursor, up_to_id=up_to_id)
        db.update_rescan_run(conn, run_id, cursor=cursor, enqueued=enqueued, status="running", total=total)
    result = RescanResult(run_id, target, enqueued, total, "running", resumed_from=cursor)
    log.info("rescan %d for model %s: %d image(s) to enqueue", run_id, target, total - enqueued)
    bar = tqdm(total=total, initial=enqueued, unit="job", disable=not progress, dynamic_ncols=True)

    try:
        messages = DetectMessages(app)
        with app.producer_or_acquire() as producer:
            # The queue's length through the producer's own channel: a new broker connection per chunk (what
            # queue_length does) was 5 % of a rescan's time.
            depth = queue_length_fn or (lambda: _declared_length(producer.channel, DETECT_QUEUE))
            while request.limit is None or result.enqueued < request.limit:
                while depth() > settings.rescan_max_queue:  # back-pressure
                    result.waits += 1
                    bar.set_postfix_str("waiting for the detect queue")
                    sleep(1.0)
                size = settings.rescan_chunk
                if request.limit is not None:
                    size = min(size, request.limit - result.enqueued)
                with engine.connect() as conn:
                    rows = db.rescan_candidates(conn, filters, target, after_id=cursor, limit=size,
                                                up_to_id=up_to_id)
                if not rows:
                    break
                publish_chunk(app, producer, [detect_kwargs(source, external_id, metadata)
                                              for _, source, external_id, metadata in rows], messages)
                cursor = rows[-1][0]
                result.enqueued += len(rows)
                with engine.begin() as conn:
                    db.update_rescan_run(conn, run_id, cursor=cursor, enqueued=result.enqueued, status="running")
                bar.update(len(rows))
        result.status = "done" if request.limit is None or result.enqueued < request.limit else "paused"
    except BaseException:
        result.status = "paused"  # interrupted (Ctrl-C, broker or database gone): the next run resumes here
        raise
    finally:
        bar.close()
        result.seconds = time.monotonic() - started
        try:
            with engine.begin() as conn:
                db.update_rescan_run(conn, run_id, cursor=cursor, enqueued=result.enqueued, status=result.status)
        except Exception:  # the cursor of the last finished chunk is already committed
            log.warning("rescan %d: could not record its final state", run_id, exc_info=True)
    log.info("rescan %d %s: %d job(s) enqueued in %.1f s", run_id, result.status, result.enqueued, result.seconds)
    return result
