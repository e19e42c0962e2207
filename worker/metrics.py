"""Prometheus metrics of a worker process, served on ``PPL_METRICS_PORT`` (one port per process).

Names are what dashboards and alerts use (docs/OPERATIONS.md lists the alerts); keep them stable.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

STAGES = ("fetch", "decode", "infer", "database")

IMAGES = Counter("ppl_images_processed_total", "Jobs answered with a verdict", ["outcome"])  # inferred | cached
FAILURES = Counter("ppl_failures_total", "Jobs recorded in detection_failures", ["reason"])
RETRIES = Counter("ppl_retries_total", "Jobs sent back with a delay after a transient error", ["reason"])
BATCH_SIZE = Histogram("ppl_batch_size", "Jobs per micro-batch",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
STAGE_SECONDS = Histogram("ppl_stage_seconds", "Wall time of one batch in each stage", ["stage"],
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
BATCHES_REQUEUED = Counter("ppl_batches_requeued_total", "Batches handed back unacknowledged (database down)")
QUEUE_DEPTH = Gauge("ppl_queue_depth", "Messages waiting in a broker queue", ["queue"])
DEAD_LETTERS = Counter("ppl_dead_letters_total", "Messages quarantined as dead letters (not a runnable job)")
DELAYED = Counter("ppl_jobs_delayed_total", "Jobs with a future eta parked in Redis until due")
MODEL_INFO = Gauge("ppl_model_loaded", "1 for the model version this process serves", ["version", "backend"])

_started_lock = threading.Lock()
_started_port: int | None = None


def serve(port: int) -> None:
    """Start the HTTP endpoint once per process; a port already taken is logged, not fatal (the worker's
    job is verdicts, and a second process on one host should be given its own port)."""
    global _started_port
    if port <= 0:
        return
    with _started_lock:
        if _started_port is not None:
            return
        try:
            start_http_server(port)
        except OSError as exc:
            log.warning("metrics endpoint not started on port %d: %s", port, exc)
            _started_port = -1
            return
        _started_port = port
        log.info("metrics on :%d/metrics", port)
