"""The Celery tasks: ``detect_image`` (micro-batched, queue ``detect``) and ``rescan`` (queue ``rescan``).

Thin on purpose: the work is in ``worker.pipeline`` and ``worker.rescan``, which know nothing of Celery. What
is here is the edge where raw messages become jobs, and it trusts no producer:

* ``read_task`` checks a delivered message against the task protocol before Celery builds a request from it;
  anything else (and anything Celery itself refuses, see ``worker.consumer``) is quarantined by
  ``DetectBatches.quarantine``: stored whole as a dead letter, recorded as a ``malformed_message`` failure with
  its submission row, then acknowledged. No message can stop the worker.
* A job whose ``eta`` is in the future is parked in Redis until due (``worker.broker.QoS.defer``), not held in
  the prefetch window; an expired or revoked job is recorded as ``expired``/``revoked``, never judged.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery import Task, signals
from celery.worker import state as worker_state
from kombu.message import Message

from ppl_model.reasons import Reason
from worker import broker, db, metrics
from worker.app import DETECT_QUEUE, DETECT_TASK, RESCAN_TASK, app, detect_kwargs
from worker.dead_letters import DeadLetter, DeadLetterStore
from worker.pipeline import BatchProcessor, DatabaseUnavailable, Job, JobRequest, Refusal
from worker.settings import Settings

log = logging.getLogger(__name__)
BATCH_DONE = "batch-done"  # what a batch returns once its rows are committed
ETA_SLACK_S = 1.0  # a job due within this long runs now
RELEASE_EVERY_S = 1.0  # how often each worker returns due delayed jobs to their queues

QUEUE_DEPTH_EVERY_S = 5.0  # how often a worker samples the detect queue's length for its metrics

_processor_lock = threading.Lock()
_processor: BatchProcessor | None = None
_dead_letters: DeadLetterStore | None = None
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


def install_processor(made: BatchProcessor) -> None:
    """Serve with a processor built elsewhere (the worker benchmark's emulated accelerator), before any batch."""
    global _processor
    with _processor_lock:
        _processor = made


def dead_letter_store() -> DeadLetterStore:
    global _dead_letters
    with _processor_lock:
        if _dead_letters is None:
            settings = _settings()
            _dead_letters = DeadLetterStore.from_url(settings.broker_url, settings.dead_letter_max)
        return _dead_letters


@signals.worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    """Metrics from the start, so an idle or stuck worker is visible too (the model still loads lazily)."""
    metrics.serve(_settings().metrics_port)


def resend(job: Job, countdown: float) -> None:
    """Re-enqueue a job after a transient failure, counting the attempt in Celery's ``retries`` header. It keeps
    its task id, so that its submission row, written when it is finally answered, carries the id the
    producer knows."""
    app.send_task(DETECT_TASK, kwargs=detect_kwargs(job.source, job.external_id, job.metadata), queue=DETECT_QUEUE,
                  countdown=countdown, retries=job.retries + 1, task_id=job.task_id)


# ------------------------------------------------------------------------------ reading task messages


class MalformedMessage(ValueError):
    """A delivered message that is not a task this worker can run; the text says what is wrong with it."""


@dataclass(frozen=True)
class TaskFields:
    task_id: str
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    eta: datetime | None
    expires: datetime | None
    retries: int  # how many times the job was resent after a transient failure (Celery's ``retries`` header)


def parse_time(name: str, value: Any) -> datetime | None:
    """An ``eta``/``expires`` header: None, or an ISO 8601 string (UTC when it names no zone)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedMessage(f"{name} must be an ISO 8601 string, got {type(value).__name__}")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        raise MalformedMessage(f"{name} is not an ISO 8601 date-time: {value[:80]!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def read_task(message: Message) -> TaskFields:
    """The task a message carries, checked against Celery's protocols 2 (``[args, kwargs, embed]`` body, task and
    id in the headers) and 1 (one object body); ``MalformedMessage`` for anything else."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    try:
        payload = message.payload  # decodes: refused content types and broken JSON raise here
    except Exception as exc:
        raise MalformedMessage(f"the body cannot be decoded ({message.content_type}): {type(exc).__name__}: "
                               f"{exc}"[:500]) from None
    if "task" in headers:  # protocol 2
        if not isinstance(payload, list | tuple) or len(payload) != 3:
            shape = f"a {len(payload)}-element array" if isinstance(payload, list | tuple) else \
                f"a JSON {type(payload).__name__}"
            raise MalformedMessage(f"a protocol-2 body must be the array [args, kwargs, embed], got {shape}")
        args, kwargs, embed = payload
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict) or not isinstance(embed, dict | None):
            raise MalformedMessage("a protocol-2 body must be [array, object, object or null], got "
                                   f"[{type(args).__name__}, {type(kwargs).__name__}, {type(embed).__name__}]")
        fields = headers
    else:  # protocol 1: everything in the body
        if not isinstance(payload, dict):
            raise MalformedMessage(f"a protocol-1 body must be an object, got a JSON {type(payload).__name__}")
        args, kwargs = payload.get("args", []), payload.get("kwargs", {})
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            raise MalformedMessage("a protocol-1 body needs args as an array and kwargs as an object")
        fields = {**payload, **headers}
    task_id, name = fields.get("id"), fields.get("task")
    if not isinstance(task_id, str) or not task_id:
        raise MalformedMessage("the message has no task id (headers.id)")
    if not isinstance(name, str) or not name:
        raise MalformedMessage("the message names no task")
    return TaskFields(task_id, name, tuple(args), kwargs, parse_time("eta", fields.get("eta")),
                      parse_time("expires", fields.get("expires")), _retries(fields.get("retries")))


def _retries(value: Any) -> int:
    """A producer's garbage in the ``retries`` header counts as 0 instead of refusing the job."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError, OverflowError):
        return 0


def _guess_kwargs(message: Message) -> dict[str, Any]:
    """The job's arguments, as far as a malformed message shows them (for its failure row): the kwargs of a
    body that is almost right, or a body that is the kwargs object itself."""
    try:
        payload = message.payload
    except Exception:
        return {}
    if isinstance(payload, list | tuple) and len(payload) >= 2 and isinstance(payload[1], dict):
        return payload[1]
    if isinstance(payload, dict):
        kwargs = payload.get("kwargs")
        return kwargs if isinstance(kwargs, dict) else payload
    return {}


def _task_id_of(message: Message) -> tuple[str | None, str | None]:
    headers = message.headers if isinstance(message.headers, dict) else {}
    task_id, name = headers.get("id"), headers.get("task")
    if task_id is None:
        try:
            payload = message.payload
            if isinstance(payload, dict):
                task_id, name = payload.get("id"), name or payload.get("task")
        except Exception:
            pass
    return (task_id if isinstance(task_id, str) else None), (name if isinstance(name, str) else None)


def dead_letter_for(message: Message, detail: str) -> DeadLetter:
    raw = getattr(message, "raw", None)  # worker.broker.Message keeps the message as taken off the queue
    if raw is None:
        raw = json.dumps({"body": message.body if isinstance(message.body, str) else repr(message.body),
                          "headers": message.headers, "properties": message.properties}, default=str).encode()
    queue = getattr(message, "queue", None) or (message.delivery_info or {}).get("routing_key") or ""
    task_id, name = _task_id_of(message)
    return DeadLetter.of(raw, queue, detail, task_id, name)


# ------------------------------------------------------------------------------------ detect_image


@dataclass(slots=True)
class Delivery:
    """A ``detect_image`` message waiting in the batch buffer, with Celery's promises that acknowledge it or hand it
    back to the queue (each schedules the broker call onto the consumer's event loop, from whichever thread)."""

    fields: TaskFields
    ack: Callable[..., Any]
    reject: Callable[..., Any]


def _refusal(fields: TaskFields) -> Refusal | None:
    """Revoked (``celery control revoke``, which every running worker hears) or past ``expires``: recorded, not run."""
    if fields.task_id in worker_state.revoked:
        return Refusal(Reason.REVOKED, "revoked before it ran")
    if fields.expires is not None and fields.expires <= datetime.now(UTC):
        return Refusal(Reason.EXPIRED, f"expired at {fields.expires.isoformat()} before it ran")
    return None


class DetectBatches(Task):
    """Micro-batching of ``detect_image`` in the consumer: messages are buffered as they arrive and handed to the
    pool as one batch when ``flush_every`` have arrived or ``flush_interval`` seconds after the first of them. A
    batch's messages are acknowledged only when the batch says its rows are committed (``BATCH_DONE``); anything
    else hands every one of them back to the queue, for this or another worker. The way in is guarded (module
    docstring).

    This is what celery-batches did, without its per-message cost: it built a Celery ``Request`` for every
    message, then a second, picklable copy of it for the pool; here a message becomes one small ``Delivery``
    (docs/PERFORMANCE.md, "Micro-batching without celery-batches"). Everything but the pool runs in the
    consumer's event-loop thread, so the buffer needs no lock.
    """

    abstract = True
    typing = False  # the batch function takes the batch, not a message's keyword arguments
    flush_every = 32
    flush_interval = 0.2
    _pool: Any = None
    _release_timer: Any = None

    def Strategy(self, task: Task, app_: Any, consumer: Any) -> Callable[..., None]:
        self._pool = consumer.pool
        connection_errors = consumer.connection_errors
        delayed = broker.DelayedJobs.from_url(_settings().broker_url)
        if self._release_timer is not None:  # the consumer restarts its strategies after a reconnection
            self._release_timer.cancel()
        self._release_timer = consumer.timer.call_repeatedly(RELEASE_EVERY_S, _release_due, (delayed,))
        buffer: list[Delivery] = []
        flush_timer: Any = None

        def flush() -> None:
            nonlocal buffer, flush_timer
            if flush_timer is not None:
                flush_timer.cancel()
                flush_timer = None
            batch, buffer = buffer, []
            if batch:
                self.flush(batch, connection_errors)

        def add(delivery: Delivery) -> None:
            nonlocal flush_timer
            buffer.append(delivery)
            if len(buffer) >= self.flush_every:
                flush()
            elif flush_timer is None:
                flush_timer = consumer.timer.call_after(self.flush_interval, flush)

        def on_message(message: Message, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> None:
            try:
                fields = read_task(message)
            except MalformedMessage as exc:
                return self.quarantine(message, str(exc))
            if fields.eta is None or (delay := fields.eta.timestamp() - time.time()) <= ETA_SLACK_S:
                return add(Delivery(fields, ack, reject))
            qos = getattr(message.channel, "qos", None)
            if isinstance(qos, broker.QoS) and isinstance(message, broker.Message):  # ours, with .raw
                qos.defer(message, fields.eta.timestamp())
                metrics.DELAYED.inc()
            else:  # another transport: held in this worker until due
                consumer.timer.call_after(delay, add, (Delivery(fields, ack, reject),))
            return None

        return on_message

    def quarantine(self, message: Message, detail: str) -> None:
        """Store the message as a dead letter and record its failure and submission rows (on the pool, which may
        wait for the database), then acknowledge it; if that fails, hand it back to the queue."""
        letter = dead_letter_for(message, detail)
        kwargs = _guess_kwargs(message)
        if not isinstance(kwargs.get("source"), str) or not kwargs["source"]:
            kwargs = {**kwargs, "source": f"dead-letter:{letter.id}"}
        request = JobRequest(task_id=letter.task_id, kwargs=kwargs, refused=Refusal(Reason.MALFORMED_MESSAGE, detail))
        log.error("message quarantined as a dead letter", extra={
            "dead_letter_id": letter.id, "task_id": letter.task_id, "queue": letter.queue, "detail": detail})
        metrics.DEAD_LETTERS.inc()

        def on_return(result: Any) -> None:
            if result == BATCH_DONE:
                message.ack()
            else:
                message.reject(requeue=True)

        self._pool.apply_async(_record_refused, (letter, request), callback=on_return)

    def flush(self, batch: list[Delivery], connection_errors: Any) -> None:
        """Run ``batch`` on the pool; acknowledge its messages once it is committed, else hand them back."""
        jobs = [JobRequest(task_id=d.fields.task_id, args=d.fields.args, kwargs=d.fields.kwargs,
                           retries=d.fields.retries, refused=_refusal(d.fields)) for d in batch]

        def on_return(result: Any) -> None:
            if result == BATCH_DONE:
                for delivery in batch:
                    delivery.ack(log, connection_errors)
            else:
                metrics.BATCHES_REQUEUED.inc()
                for delivery in batch:
                    delivery.reject(log, connection_errors, True)

        self._pool.apply_async(self.run, (jobs,), callback=on_return)


def _release_due(delayed: broker.DelayedJobs) -> None:
    try:
        delayed.release_due()
    except Exception as exc:  # Redis away: the jobs wait in the set, and the next tick tries again
        log.warning("could not return due delayed jobs to their queues: %s", exc)


def _record_refused(letter: DeadLetter, request: JobRequest) -> str | None:
    try:
        dead_letter_store().add(letter)
        processor().process([request])
    except Exception:
        log.exception("could not record dead letter %s; the message goes back to the queue", letter.id)
        time.sleep(_settings().retry_backoff_s)
        return None
    return BATCH_DONE


@app.task(base=DetectBatches, name=DETECT_TASK, acks_late=True, flush_every=_settings().batch_size,
          flush_interval=_settings().batch_timeout_ms / 1000)
def detect_image(jobs: list[JobRequest]) -> str | None:
    """Judge a micro-batch of images (``DetectBatches`` collects it); keyword arguments per job: source,
    external_id, metadata."""
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


# ------------------------------------------------------------------------------------------ rescan


class GuardedTask(Task):
    """A plain task whose messages pass ``read_task`` first; the others are quarantined like detect_image's."""

    abstract = True

    def start_strategy(self, app_: Any, consumer: Any, **kwargs: Any) -> Callable[..., None]:
        handler = super().start_strategy(app_, consumer, **kwargs)

        def guarded(message: Message, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> None:
            try:
                read_task(message)
            except MalformedMessage as exc:
                return app.tasks[DETECT_TASK].quarantine(message, str(exc))
            return handler(message, body, ack, reject, callbacks, **kw)

        return guarded


@app.task(base=GuardedTask, name=RESCAN_TASK, acks_late=True)
def rescan(**filters: Any) -> dict[str, Any]:
    """Re-enqueue ``detect_image`` for stored images the current model has not judged (see worker.rescan)."""
    from worker.rescan import RescanRequest, run_rescan

    return run_rescan(_settings(), RescanRequest.from_kwargs(filters), app=app).as_dict()
