"""The one interface every inference backend implements.

A backend takes a batch of preprocessed crops, ``(N, 3, S, S)`` float32 normalised as the model directory
says (``ppl_model.inference.preprocess``), and returns the fake probability of each crop and the fake
probability of each patch on the ViT grid. Backends split batches larger than they accept themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import numpy as np
import torch

from ppl_model.categories import Backend
from ppl_model.errors import PPLError
from ppl_model.model_dir import ModelInfo


class BackendError(PPLError, RuntimeError):
    """A backend that cannot be built or used here (missing library, device, file, or a mismatch)."""


class Prediction(NamedTuple):
    image_prob: np.ndarray  # (N,) float32, probability that the crop is generated
    patch_prob: np.ndarray  # (N, G, G) float32, per-patch probability


class InferenceBackend(Protocol):
    name: Backend  # never AUTO: the backend that was chosen
    device: str  # where inputs should be prepared ("cpu" or "cuda:0")
    info: ModelInfo  # the model directory's description (threshold, input size, version id)

    def predict(self, pixels: torch.Tensor) -> Prediction:
        """Probabilities for a batch of any size ≥ 1 (split internally where the backend has a maximum)."""
        ...


def logits_to_prediction(image_logit: torch.Tensor, patch_logits: torch.Tensor) -> Prediction:
    """Sigmoid in float32 on the host: the one place logits become the probabilities every backend returns."""
    return Prediction(torch.sigmoid(image_logit.float()).cpu().numpy(),
                      torch.sigmoid(patch_logits.float()).cpu().numpy())


def predict_in_chunks(run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], pixels: torch.Tensor,
                      max_batch: int) -> Prediction:
    """Run ``run`` (crops → image logits, patch logits) on chunks of at most ``max_batch`` rows and join the
    results: how every backend takes a batch larger than it accepts at once."""
    logits = [run(chunk) for chunk in pixels.split(max_batch)]
    return logits_to_prediction(torch.cat([image for image, _ in logits]), torch.cat([patch for _, patch in logits]))
