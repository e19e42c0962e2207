"""``python -m benchmarks.emulated_worker``: the real worker (``ppl-worker run``: Celery, the batch pipeline,
PostgreSQL) serving the emulated accelerator of ``benchmarks.emulated_accelerator`` instead of the model's own
backend. The model directory (``PPL_MODEL_DIR``) gives the version and normalisation; the accelerator's rate
and latency come from ``BENCH_ACCELERATOR_RATE`` (images/s) and ``BENCH_ACCELERATOR_LATENCY_MS``, the crop size
from ``BENCH_INPUT_SIZE`` (224: a ViT-L/14's). Every other setting is the worker's own ``PPL_*``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from ppl_model.inference.preprocess import Preprocessing, normalise
from ppl_model.model_dir import read_model_info
from worker.model import ServedModel
from worker.settings import Settings

RATE_ENV, LATENCY_ENV, INPUT_SIZE_ENV = "BENCH_ACCELERATOR_RATE", "BENCH_ACCELERATOR_LATENCY_MS", "BENCH_INPUT_SIZE"


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from benchmarks.emulated_accelerator import EmulatedAccelerator
    from worker import db, tasks
    from worker.app import app
    from worker.pipeline import BatchProcessor

    settings = Settings.from_env()
    if settings.model_dir is None:
        raise SystemExit("PPL_MODEL_DIR must name a model directory (its version and normalisation are used)")
    accelerator = EmulatedAccelerator(read_model_info(settings.model_dir), float(os.environ[RATE_ENV]),
                                      float(os.environ.get(LATENCY_ENV, "2")) / 1000,
                                      int(os.environ.get(INPUT_SIZE_ENV, "224")))
    served = ServedModel(accelerator, Preprocessing.for_model(accelerator.info, tiles=settings.tiles))
    # torch's first operation on the meta device imports its reference implementations (about a second): paid
    # here, not by the first batch.
    normalise(np.zeros((1, 2, 2, 3), dtype=np.uint8), served.preprocessing.mean, served.preprocessing.std,
              accelerator.device)
    tasks.install_processor(BatchProcessor(settings, db.make_engine(settings.database_url), resend=tasks.resend,
                                           model_loader=lambda _: served))
    argv = ["worker", "--queues", "detect", "--pool", "threads", "--concurrency", str(settings.batches_in_flight),
            "--loglevel", settings.log_level]
    return int(app.start(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
