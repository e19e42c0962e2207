"""The Celery application, ``worker.app:app``, configured from ``Settings`` (``PPL_*`` variables).

Run a worker (one per GPU; the model loads in it on the first batch):

    celery -A worker.app:app worker -Q detect --pool threads --concurrency 3

or ``ppl-worker run``, which does the same with the settings' defaults (``PPL_BATCHES_IN_FLIGHT`` batches at
once; a ``--queues rescan`` worker runs one task at a time).

Delivery guarantees, and the settings they rest on:
* JSON only, both ways: a message in any other format is refused before it is decoded.
* Late acknowledgement: a ``detect_image`` message is acknowledged after its batch's rows are committed
  (``worker.tasks.DetectBatches``); a worker killed before that leaves it unacknowledged, and Redis hands
  it to another worker once ``visibility_timeout`` has passed (``task_reject_on_worker_lost`` does the
  same for a pool child that dies).
* ``visibility_timeout`` must exceed the longest a message can wait unacknowledged in a worker: the
  prefetch buffer (up to ``prefetch`` jobs ahead of the current batch) plus one batch's fetch, inference
  and database write, plus retries of a database outage (PPL_DATABASE_RETRY_S) and the longest retry
  countdown. The default, one hour, is far above all of these; lower it only with that sum in mind.
"""

from __future__ import annotations

from typing import Any, Required, TypedDict

from celery import Celery, signals
from kombu import Queue

from worker import logs
from worker.broker import transport_for
from worker.settings import Settings

DETECT_TASK, DETECT_QUEUE = "detect_image", "detect"
RESCAN_TASK, RESCAN_QUEUE = "rescan", "rescan"


class DetectKwargs(TypedDict, total=False):
    """The keyword arguments of a ``detect_image`` job (docs/ARCHITECTURE.md, "Contracts")."""

    source: Required[str]
    external_id: str
    metadata: dict[str, Any]


def detect_kwargs(source: str, external_id: str | None = None, metadata: dict[str, Any] | None = None
                  ) -> DetectKwargs:
    """The keyword arguments of one ``detect_image`` job, leaving out the optional ones that are unset."""
    kwargs = DetectKwargs(source=source)
    if external_id is not None:
        kwargs["external_id"] = external_id
    if metadata is not None:
        kwargs["metadata"] = metadata
    return kwargs


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    app = Celery("ppl", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.broker_transport = transport_for(settings.broker_url)  # Redis: worker.broker's safer delivery
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,  # verdicts go to PostgreSQL, not to a result backend
        result_expires=None,  # no results, so no daily celery.backend_cleanup task from beat
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        # Enough prefetched messages to fill the next batch while one is in flight, and no more.
        worker_prefetch_multiplier=settings.prefetch_multiplier,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_queues=(Queue(DETECT_QUEUE), Queue(RESCAN_QUEUE)),
        task_default_queue=DETECT_QUEUE,
        task_routes={DETECT_TASK: {"queue": DETECT_QUEUE}, RESCAN_TASK: {"queue": RESCAN_QUEUE}},
        worker_hijack_root_logger=False,
        # Messages Celery cannot run (unknown task, undecodable, invalid) are quarantined, not only logged.
        worker_consumer="worker.consumer:Consumer",
        beat_schedule=beat_schedule(settings),
        timezone="UTC",
    )
    app.ppl_settings = settings  # one settings object for the tasks of this app
    return app


def broker_transport_options(settings: Settings) -> dict:
    """Redis transport options. kombu sweeps for messages that a dead worker left unacknowledged every
    ``unacked_restore_interval × unacked_restore_throttle`` seconds (100 s by default, whatever the
    visibility timeout): sweep every quarter of the timeout instead, at most once a minute, so that a killed
    worker's jobs come back about one visibility timeout after it died. The socket timeout keeps a publish
    from waiting forever on a connection that a vanished broker left open (kombu's advice)."""
    sweep_s = max(1, min(60, settings.visibility_timeout_s // 4))
    options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s,
                               "unacked_restore_interval": sweep_s, "unacked_restore_throttle": 1,
                               "socket_timeout": 30, "socket_connect_timeout": 10}
    if settings.heartbeat_file is not None:
        options["heartbeat_file"] = str(settings.heartbeat_file)  # read by worker.broker.Transport
    return options


def beat_schedule(settings: Settings) -> dict:
    """The periodic stale-model rescan, when PPL_RESCAN_INTERVAL_S is set (run ``celery -A worker.app:app
    beat`` as a single instance)."""
    if settings.rescan_interval_s <= 0:
        return {}
    return {"stale-model-rescan": {"task": RESCAN_TASK, "schedule": float(settings.rescan_interval_s),
                                   "kwargs": {"stale_only": True}, "options": {"queue": RESCAN_QUEUE}}}


app = make_app()


@signals.setup_logging.connect
def _structured_logs(**_: object) -> None:
    logs.configure(app.ppl_settings.log_level)
