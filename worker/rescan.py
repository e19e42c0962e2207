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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from kombu.exceptions import ChannelError
from tqdm import tqdm

from ppl_model.model_dir import ModelDirError, read_model_info
from worker import db
from worker.app import DETECT_QUEUE, DETECT_TASK
from worker.settings import Settings

log = logging.getLogger(__name__)


class RescanError(ValueError):
    """A rescan that cannot start: bad filters, or no model version to rescan for."""


@dataclass(frozen=True)
class RescanRequest:
    stale_only: bool = True  # images with no verdict from the target version; False = every image matched
    since: datetime | None = None  # verdict created_at range
    until: datetime | None = None
    label: str | None = None  # "real" | "fake"
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
        request = cls(**values)
        if request.label not in (None, "real", "fake"):
            raise RescanError(f"label must be real or fake, got {request.label!r}")
        return request

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
        try:
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
        except ChannelError:
            return 0


def run_rescan(settings: Settings, request: RescanRequest, *, app: Celery, progress: bool = False,
               engine: Any = None, queue_length_fn: Callable[[], int] | None = None,
               sleep: Callable[[float], None] = time.sleep) -> RescanResult:
    started = time.monotonic()
    engine = engine or db.make_engine(settings.database_url)
    target = target_version(settings, engine, request.target_model_version)
    filters = request.filters()
    queue_length_fn = queue_length_fn or (lambda: queue_length(app))
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
            while request.limit is None or result.enqueued < request.limit:
                while queue_length_fn() > settings.rescan_max_queue:  # back-pressure
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
                for _, source, external_id, metadata in rows:
                    kwargs: dict[str, Any] = {"source": source}
                    if external_id is not None:
                        kwargs["external_id"] = external_id
                    if metadata is not None:
                        kwargs["metadata"] = metadata
                    app.send_task(DETECT_TASK, kwargs=kwargs, queue=DETECT_QUEUE, producer=producer)
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
