"""``python -m benchmarks.emulated_worker``: the real worker (``ppl-worker run``: Celery, the batch pipeline,
PostgreSQL) serving the emulated accelerator of ``benchmarks.emulated_accelerator`` instead of the model's own
backend. The model directory (``PPL_MODEL_DIR``) gives the version and normalisation; the accelerator's rate
and latency come from ``BENCH_ACCELERATOR_RATE`` (images/s) and ``BENCH_ACCELERATOR_LATENCY_MS``, the crop size
from ``BENCH_INPUT_SIZE`` (224: a ViT-L/14's). Every other setting is the worker's own ``PPL_*``. With
``BENCH_GC_LOG`` set, each full collection of the garbage collector (a pause of every thread) appends
``<epoch seconds at its end> <milliseconds>`` to that file.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from typing import Any

RATE_ENV, LATENCY_ENV, INPUT_SIZE_ENV = "BENCH_ACCELERATOR_RATE", "BENCH_ACCELERATOR_LATENCY_MS", "BENCH_INPUT_SIZE"
GC_LOG_ENV = "BENCH_GC_LOG"


def log_full_collections(path: str) -> None:
    """Append each full (generation 2) collection's end time and duration to ``path``."""
    started = 0.0

    def on_collection(phase: str, info: dict[str, Any]) -> None:
        nonlocal started
        if info["generation"] != 2:
            return
        if phase == "start":
            started = time.perf_counter()
            return
        with open(path, "a") as fh:
            fh.write(f"{time.time():.6f} {1000 * (time.perf_counter() - started):.3f}\n")

    gc.callbacks.append(on_collection)


def main() -> int:
    # As ppl-worker run: OpenMP reads its wait policy when torch loads, so it is set before anything imports torch
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if os.environ.get(GC_LOG_ENV):
        log_full_collections(os.environ[GC_LOG_ENV])
    import numpy as np

    from benchmarks.emulated_accelerator import EmulatedAccelerator
    from ppl_model.inference.preprocess import Preprocessing, normalise
    from ppl_model.model_dir import read_model_info
    from worker import cli, db, tasks
    from worker.model import ServedModel, freeze_long_lived_objects
    from worker.pipeline import BatchProcessor
    from worker.settings import Settings

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
    freeze_long_lived_objects()  # as the worker does once its model is loaded
    tasks.install_processor(BatchProcessor(settings, db.make_engine(settings.database_url), resend=tasks.resend,
                                           model_loader=lambda _: served))
    return cli.main(["run", "--queues", "detect"])  # the real worker's own start, with this processor


if __name__ == "__main__":
    sys.exit(main())
