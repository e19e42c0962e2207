"""The onnxruntime backend (CPU): serves ``model.onnx`` without torch doing the compute."""

from __future__ import annotations

from pathlib import Path

import torch

from ppl_model.categories import Backend
from ppl_model.inference.base import BackendError, Prediction, predict_in_chunks
from ppl_model.inference.export import INPUT_NAME, ONNX_FILE, OUTPUT_NAMES, onnx_version_id
from ppl_model.model_dir import read_model_info


class OnnxRuntimeBackend:
    name = Backend.ONNXRUNTIME
    device = "cpu"

    def __init__(self, model_dir: str | Path, threads: int = 0, max_batch: int = 256):
        import onnxruntime as ort

        model_dir = Path(model_dir)
        self.info = read_model_info(model_dir)
        path = model_dir / ONNX_FILE
        if not path.is_file():
            raise BackendError(f"{path} is missing: run `ppl export --model {model_dir}` first")
        if onnx_version_id(path) != self.info.version_id:
            raise BackendError(f"{path} was exported from another version of the model than model.json "
                               f"({self.info.version_id}): run `ppl export --model {model_dir}` again")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per core
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.max_batch = max_batch

    def predict(self, pixels: torch.Tensor) -> Prediction:
        return predict_in_chunks(self._run, pixels, self.max_batch)

    def _run(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit, patch_logit = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: chunk.cpu().numpy()})
        return torch.from_numpy(logit), torch.from_numpy(patch_logit)
