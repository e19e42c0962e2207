"""The Celery tasks: ``detect_image`` (micro-batched, queue ``detect``) and ``rescan`` (queue ``rescan``).

Thin on purpose: the work is in ``worker.pipeline`` and ``worker.rescan``, which know nothing of Celery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from typing import Any

from celery import signals
from celery.worker.request import Request
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from worker import db, metrics
from worker.app import DETECT_QUEUE, DETECT_TASK, RESCAN_TASK, app, detect_kwargs
from worker.pipeline import BatchProcessor, DatabaseUnavailable, Job, JobRequest
from worker.settings import Settings

log = logging.getLogger(__name__)
BATCH_DONE = "batch-done"  # what a batch returns once its rows are committed

QUEUE_DEPTH_EVERY_S = 5.0  # how often a worker samples the detect queue's length for its metrics

_processor_lock = threading.Lock()
_processor: BatchProcessor | None = None
_queue_depth_sampled = 0.0


def _settings() -> Settings:
    return app.ppl_settings


def processor() -> BatchProcessor:
    """This process's batch processor (database engine, thread pool, metrics endpoint), made on first use."""
    global _processor
    with _processor_lock:
        if _processor is None:
            settings = _settings()
            metrics.serve(settings.metrics_port)
            _processor = BatchProcessor(settings, db.make_engine(settings.database_url), resend=resend)
        return _processor


@signals.worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    """Metrics from the start, so an idle or stuck worker is visible too (the model still loads lazily)."""
    metrics.serve(_settings().metrics_port)


def resend(job: Job, countdown: float) -> None:
    """Re-enqueue a job after a transient failure, counting the attempt in Celery's ``retries`` header."""
    app.send_task(DETECT_TASK, kwargs=detect_kwargs(job.source, job.external_id, job.metadata), queue=DETECT_QUEUE,
                  countdown=countdown, retries=job.retries + 1)


class DetectBatches(Batches):
    """celery-batches, acknowledging a batch's messages only when the batch says its rows are committed.

    Stock ``Batches`` acknowledges late-ack messages whenever the batch function returns, even after an
    exception (it logs and returns None): a database outage would then lose the batch. Here anything but
    ``BATCH_DONE`` hands every message back to the queue unacknowledged, for this or another worker.
    """

    abstract = True

    def flush(self, requests: Collection[Request]) -> Any:
        requests = list(requests)
        simple = ([SimpleRequest.from_request(r) for r in requests],)

        def on_return(result: Any) -> None:
            if result == BATCH_DONE:
                for request in requests:
                    request.acknowledge()
            else:
                metrics.BATCHES_REQUEUED.inc()
                for request in requests:
                    request.reject(requeue=True)

        return self._pool.apply_async(apply_batches_task, (self, simple, 0, None), callback=on_return)


@app.task(base=DetectBatches, name=DETECT_TASK, acks_late=True, flush_every=_settings().batch_size,
          flush_interval=_settings().batch_timeout_ms / 1000)
def detect_image(requests: list[SimpleRequest]) -> str | None:
    """Judge a micro-batch of images; keyword arguments per job: source, external_id, metadata."""
    jobs = [JobRequest(task_id=r.id, args=tuple(r.args or ()), kwargs=r.kwargs, retries=_retries(r))
            for r in requests]
    try:
        processor().process(jobs)
        _sample_queue_depth()
    except DatabaseUnavailable as exc:
        log.error("batch handed back to the queue: %s", exc, extra={"jobs": len(jobs)})
        return None
    except Exception:
        # Model missing, broker down while re-sending, a bug: the jobs go back to the queue, after a pause
        # so that a worker that cannot work does not spin on them.
        log.exception("batch failed; its %d job(s) go back to the queue", len(jobs))
        time.sleep(_settings().retry_backoff_s)
        return None
    return BATCH_DONE


def _retries(request: SimpleRequest) -> int:
    """The ``retries`` header a resent job carries; a producer's garbage there counts as 0 instead of failing
    the whole batch before its jobs are even parsed."""
    try:
        return max(0, int((request.request_dict or {}).get("retries") or 0))
    except (TypeError, ValueError):
        return 0


def _sample_queue_depth() -> None:
    global _queue_depth_sampled
    now = time.monotonic()
    if now - _queue_depth_sampled < QUEUE_DEPTH_EVERY_S:
        return
    _queue_depth_sampled = now
    from worker.rescan import queue_length

    try:
        metrics.QUEUE_DEPTH.labels(DETECT_QUEUE).set(queue_length(app))
    except Exception as exc:  # a metric is not worth failing a committed batch for
        log.warning("could not sample the queue depth: %s", exc)


@app.task(name=RESCAN_TASK, acks_late=True)
def rescan(**filters: Any) -> dict[str, Any]:
    """Re-enqueue ``detect_image`` for stored images the current model has not judged (see worker.rescan)."""
    from worker.rescan import RescanRequest, run_rescan

    return run_rescan(_settings(), RescanRequest.from_kwargs(filters), app=app).as_dict()
