"""PPL: Panoptic Patch Learning detector of AI-generated images (model side).

``from ppl_model import Detector`` is the library API (``ppl_model.api``); it is imported on first use, so
that ``import ppl_model`` alone, as tools that only read a model's metadata do, loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ppl_model.api import Detection, Detector

__all__ = ["Detection", "Detector"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ppl_model import api

        return getattr(api, name)
    raise AttributeError(f"module 'ppl_model' has no attribute {name!r}")
