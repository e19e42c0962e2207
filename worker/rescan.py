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
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

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


def publish_chunk(app: Celery, producer: Producer, jobs: list[DetectKwargs]) -> None:
    """Enqueue one ``detect_image`` message per keyword-argument dict, in one Redis round trip.

    The messages are the ones ``app.send_task(DETECT_TASK, kwargs=..., queue=DETECT_QUEUE)`` sends, made by
    the same Celery message factory (``app.amqp.create_task_message``: protocol 2, JSON) and published by
    kombu to the same queue; what is skipped is send_task's per-call routing, queue declaration and result
    bookkeeping (two thirds of its time per message; docs/PERFORMANCE.md), and kombu's batch publishing
    sends the chunk as one pipeline instead of a round trip per message. If that pipeline fails, the caller
    has not recorded the chunk, so a resumed run enqueues it again (verdict writes are idempotent).
    """
    amqp = app.amqp
    producer.maybe_declare(amqp.queues[DETECT_QUEUE])  # a no-op after the first chunk on this channel
    # Random (version 4) task ids as kombu's uuid() makes them, from one os.urandom call per chunk: a call per
    # id was 8 % of a rescan's time (each is a system call, and slow in a VM).
    entropy = os.urandom(16 * len(jobs))
    with producer.batch(max_size=max(1, len(jobs))):
        for i, kwargs in enumerate(jobs):
            task_id = str(uuid.UUID(bytes=entropy[16 * i:16 * i + 16], version=4))
            message = amqp.create_task_message(
                task_id, DETECT_TASK, (), kwargs, reply_to=app.thread_oid, argsrepr="()",
                kwargsrepr=_kwargs_repr(kwargs, amqp.kwargsrepr_maxsize))
            producer.publish(message.body, exchange="", routing_key=DETECT_QUEUE, headers=message.headers,
                             serializer="json", retry=False, **message.properties)


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
                                              for _, source, external_id, metadata in rows])
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
