"""Benchmark-only: ``detect_image`` served the naive way, the baseline ``ppl-worker bench`` compares with.

One image per task, one inference call per image and one transaction per verdict, with the same code as the
real pipeline for everything else (``worker.loading``'s ``fetch_and_hash`` and ``decode_crops``, the served
model's backend, ``make_verdict``, ``upsert_verdicts``) and the same settings (``PPL_*``). It has no verdict-cache
lookup and no failure handling: the benchmark feeds it good, distinct images only, and leaving those steps
out can only make the baseline faster. It lives with the benchmarks, outside the shipped packages; the
benchmark runs it as ``python -m benchmarks.naive_worker`` (one process, threads pool, concurrency 1, as
one batch in flight).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from celery import Celery
from kombu import Queue
from sqlalchemy.engine import Engine

from worker import db
from worker.app import DETECT_QUEUE, DETECT_TASK
from worker.model import ServedModel, load_model
from worker.settings import Settings

settings = Settings.from_env()
app = Celery("ppl-naive", broker=settings.broker_url)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=settings.prefetch_multiplier,  # the real worker's prefetch
    broker_connection_retry_on_startup=True,
    task_queues=(Queue(DETECT_QUEUE),),
    task_default_queue=DETECT_QUEUE,
    worker_hijack_root_logger=False,
)

_lock = threading.Lock()
_engine: Engine | None = None


def _database(model: ServedModel) -> Engine:
    """The engine, made on first use (after the fork, like the real worker's), with the model registered."""
    global _engine
    with _lock:
        if _engine is None:
            engine = db.make_engine(settings.database_url)
            info = model.info
            with engine.begin() as conn:
                db.register_model_version(conn, info.version_id, info.architecture(), info.threshold,
                                          info.training.get("validation") or {}, activate=True)
            _engine = engine
        return _engine


@app.task(name=DETECT_TASK, acks_late=True)
def detect_image(source: str, external_id: str | None = None, metadata: dict[str, Any] | None = None) -> None:
    from ppl_model.inference.preprocess import aggregate, normalise
    from ppl_model.inference.verdict import make_verdict
    from worker.loading import CropSpec, decode_crops, fetch_and_hash

    model = load_model(settings)
    engine = _database(model)
    data, digest, _, error = fetch_and_hash(source, settings)  # the worker's own per-image steps, one at a time
    if error is not None:
        raise error
    prep = model.preprocessing
    decoded = decode_crops(data or b"", settings, CropSpec(prep.input_size, prep.tiles, prep.mean))
    if decoded.error is not None or decoded.crops is None:
        raise decoded.error or RuntimeError("no crops")
    pixels = normalise(decoded.crops, prep.mean, prep.std, model.backend.device)
    prediction = aggregate(model.backend.predict(pixels), [len(decoded.crops)])[0]
    grid = prediction.patch_prob[0]
    verdict = make_verdict(float(prediction.image_prob[0]), grid, model.threshold)
    row = db.VerdictRow.of(verdict, grid, sha256=digest, model_version=model.version_id, source=source,
                           external_id=external_id, metadata=metadata, width=decoded.width, height=decoded.height,
                           format=decoded.format, timings_ms={})
    with engine.begin() as conn:
        db.upsert_verdicts(conn, [row])


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.naive_worker [--hostname NAME]``: one worker process on the detect queue."""
    app.worker_main(["worker", "--queues", DETECT_QUEUE, "--pool", "threads", "--concurrency", "1",
                     "--loglevel", settings.log_level, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
