"""The Celery application, ``worker.app:app``, configured from ``Settings`` (``PPL_*`` variables).

Run a worker (one per GPU; the model loads in it on the first batch):

    celery -A worker.app:app worker -Q detect,rescan --pool threads --concurrency 1

or ``ppl-worker run``, which does the same with the settings' defaults.

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

from celery import Celery, signals
from kombu import Queue

from worker import logs
from worker.settings import Settings

DETECT_TASK, DETECT_QUEUE = "detect_image", "detect"
RESCAN_TASK, RESCAN_QUEUE = "rescan", "rescan"


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    app = Celery("ppl", broker=settings.broker_url, include=["worker.tasks"])
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
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        task_queues=(Queue(DETECT_QUEUE), Queue(RESCAN_QUEUE)),
        task_default_queue=DETECT_QUEUE,
        task_routes={DETECT_TASK: {"queue": DETECT_QUEUE}, RESCAN_TASK: {"queue": RESCAN_QUEUE}},
        worker_hijack_root_logger=False,
        beat_schedule=beat_schedule(settings),
        timezone="UTC",
    )
    app.ppl_settings = settings  # one settings object for the tasks of this app
    return app


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
