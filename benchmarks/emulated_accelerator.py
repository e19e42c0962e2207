"""An emulated accelerator for the worker benchmark (never a served backend): how much of a given accelerator
rate one worker process sustains, whatever this machine's own compute.

``EmulatedAccelerator`` has the ``InferenceBackend`` interface and "computes" a batch of N crops by sleeping
``latency_s + N / rate`` seconds, one batch at a time, holding no GIL, as a GPU kernel does not: the worker's
own CPU (messages, hashing, crops, database) is then the only cost that competes. Its device is torch's
``meta`` device, on which tensors have shapes but no data: moving and normalising the crops costs nothing,
as on a GPU, where the pipeline normalises on the device.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import torch

from ppl_model.categories import Backend
from ppl_model.inference.base import Prediction
from ppl_model.model_dir import ModelInfo


class EmulatedAccelerator:
    name = Backend.TORCH  # the interface it stands in for; the benchmark's report says it is emulated
    device = "meta"

    def __init__(self, info: ModelInfo, rate: float, latency_s: float, input_size: int = 224,
                 patch_size: int = 14):
        if rate <= 0 or latency_s < 0:
            raise ValueError("the emulated accelerator needs a positive rate and a latency ≥ 0")
        grid = input_size // patch_size
        self.info = dataclasses.replace(info, input_size=input_size, patch_size=patch_size, grid=[grid, grid])
        self.rate, self.latency_s = rate, latency_s
        self.busy_s = 0.0  # time spent "computing", for the busy fraction
        self._device_lock = threading.Lock()

    def predict(self, pixels: torch.Tensor) -> Prediction:
        count = len(pixels)
        with self._device_lock:
            seconds = self.latency_s + count / self.rate
            time.sleep(seconds)
            self.busy_s += seconds
        grid = self.info.grid
        return Prediction(np.full(count, 0.25, dtype=np.float32),
                          np.full((count, grid[0], grid[1]), 0.25, dtype=np.float32))
