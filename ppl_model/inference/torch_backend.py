"""The torch backend: CPU or CUDA, fp32 or bf16/fp16 autocast on CUDA, optional CUDA graphs.

CUDA graphs remove the per-kernel launch cost that dominates small batches: one graph is captured per
batch-size bucket (powers of two up to ``max_batch``), and a batch is padded up to its bucket.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ppl_model.categories import Backend, Precision, choices
from ppl_model.inference.base import BackendError, Prediction, predict_in_chunks
from ppl_model.model_dir import load_model_dir

PRECISIONS: dict[Precision, torch.dtype | None] = {Precision.FP32: None, Precision.BF16: torch.bfloat16,
                                                   Precision.FP16: torch.float16}


def bucket_sizes(max_batch: int) -> list[int]:
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]


class TorchBackend:
    name = Backend.TORCH

    def __init__(self, model_dir: str | Path, device: str = "cpu", precision: Precision = Precision.FP32,
                 cuda_graphs: bool = False, max_batch: int = 256):
        if precision not in PRECISIONS:  # a plain string from an untyped caller is fine when it is a member's value
            raise BackendError(f"precision must be {choices(Precision)}, not {precision!r}")
        precision = Precision(precision)
        self.device = str(torch.device(device))
        on_cuda = self.device.startswith("cuda")
        if on_cuda and not torch.cuda.is_available():
            raise BackendError(f"device {device} asked for, but CUDA is not available")
        if (precision != Precision.FP32 or cuda_graphs) and not on_cuda:
            raise BackendError("bf16/fp16 and CUDA graphs need a CUDA device")
        self.detector, self.info = load_model_dir(model_dir, device=self.device)
        self.dtype = PRECISIONS[precision]
        self.max_batch = max_batch
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        # The autocast weight-cast cache must be off for CUDA-graph capture (a cached cast would be baked in).
        return torch.autocast("cuda", dtype=self.dtype, cache_enabled=False)

    def _forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(), self._autocast():
            out = self.detector(pixels)
        return out.image_logit, out.patch_logits

    def _graph_forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = pixels.shape[0]
        bucket = next(size for size in bucket_sizes(self.max_batch) if size >= rows)
        if bucket not in self._graphs:
            static_in = torch.zeros((bucket, *pixels.shape[1:]), device=self.device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph, as capture requires
                for _ in range(2):
                    self._forward(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward(static_in)
            self._graphs[bucket] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[bucket]
        static_in[:rows].copy_(pixels)
        graph.replay()
        return static_out[0][:rows].clone(), static_out[1][:rows].clone()

    def predict(self, pixels: torch.Tensor) -> Prediction:
        forward = self._graph_forward if self.cuda_graphs else self._forward
        return predict_in_chunks(lambda chunk: forward(chunk.to(self.device, non_blocking=True)), pixels,
                                 self.max_batch)
