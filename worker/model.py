"""The model a worker process serves: loaded once per process, on first use, and cached.

Loading is lazy on purpose: Celery kills a ``worker_process_init`` handler after 4 s, and building a
TensorRT context or moving a ViT-L to the GPU can take longer. The first batch pays for it instead.
"""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from ppl_model.inference.backends import load_backend
from ppl_model.inference.base import InferenceBackend
from ppl_model.inference.preprocess import Preprocessing
from ppl_model.model_dir import ModelInfo
from worker import metrics
from worker.settings import Settings

log = logging.getLogger(__name__)


class ModelNotConfigured(RuntimeError):
    """PPL_MODEL_DIR is unset or does not hold a loadable model."""


@dataclass(frozen=True)
class ServedModel:
    backend: InferenceBackend
    preprocessing: Preprocessing

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    @property
    def version_id(self) -> str:
        return self.backend.info.version_id

    @property
    def threshold(self) -> float:
        return self.backend.info.threshold


_lock = threading.Lock()
_cache: dict[tuple, ServedModel] = {}


def _key(settings: Settings) -> tuple:
    model_dir = settings.model_dir.resolve() if settings.model_dir else None
    return (model_dir, settings.backend, settings.precision, settings.device, settings.tiles, settings.batch_size)


def load_model(settings: Settings) -> ServedModel:
    """The process's model for these settings; the first call loads it (thread-safe), later calls are free."""
    key = _key(settings)
    served = _cache.get(key)
    if served is not None:
        return served
    with _lock:
        served = _cache.get(key)
        if served is None:
            served = _load(settings)
            _cache[key] = served
    return served


def _load(settings: Settings) -> ServedModel:
    if settings.model_dir is None:
        raise ModelNotConfigured("PPL_MODEL_DIR is not set: point it at a model directory (ppl train --out ...)")
    model_dir = Path(settings.model_dir)
    if not model_dir.is_dir():
        raise ModelNotConfigured(f"PPL_MODEL_DIR={model_dir} is not a directory")
    backend = load_backend(settings.backend, model_dir, device=settings.device, precision=settings.precision,
                           max_batch=max(1, settings.batch_size * settings.tiles))
    served = ServedModel(backend, Preprocessing.for_model(backend.info, tiles=settings.tiles))
    metrics.MODEL_INFO.labels(version=served.version_id, backend=backend.name).set(1)
    log.info("model %s loaded with the %s backend on %s", served.version_id, backend.name, backend.device)
    freeze_long_lived_objects()
    return served


def freeze_long_lived_objects() -> None:
    """Take every object alive now out of the garbage collector's full collections, once the model is loaded:
    by then they are what lives as long as the process (modules, torch, the model, Celery's machinery), and a
    full collection, a pause of every thread, scanned them all again each time (docs/PERFORMANCE.md). Only
    the cyclic collector skips them; reference counting frees them as before."""
    gc.freeze()


def clear_cache() -> None:
    """Forget loaded models (tests; a process that must pick up a new model directory)."""
    with _lock:
        _cache.clear()
