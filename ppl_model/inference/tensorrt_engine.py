"""``ppl build-engine`` and the TensorRT backend: a serialized plan built from ``model.onnx`` for one GPU.

A TensorRT plan only runs under the TensorRT version and on the GPU kind it was built for, and it silently
computes an older model if the directory's weights were replaced. So every plan has a JSON sidecar naming
the TensorRT version, GPU, compute capability, batch profile and model version id, and the backend refuses a
plan whose sidecar disagrees with the running process, with one message naming every mismatch. TensorRT is
imported only inside functions: the rest of the package (and this module's pure-Python checks) works without it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ppl_model.categories import Backend, Precision
from ppl_model.inference.base import BackendError, Prediction, predict_in_chunks
from ppl_model.inference.export import FP16_ONNX_FILE, INPUT_NAME, ONNX_FILE, OUTPUT_NAMES, onnx_version_id
from ppl_model.model_dir import ModelDirError, ModelInfo, atomic_write_bytes, read_model_info

ENGINE_FILE = "model.plan"
SIDECAR_FILE = "model.plan.json"
TIMING_CACHE_FILE = "timing.cache"
PRECISIONS = (Precision.FP32, Precision.FP16, Precision.BF16)


def _import_tensorrt() -> Any:
    """TensorRT is an optional extra; say how to get it instead of failing with a bare ImportError."""
    try:
        import tensorrt
    except ImportError:
        raise BackendError('TensorRT is not installed: pip install "ppl-detector[tensorrt]" '
                           "(or use NVIDIA's TensorRT container)") from None
    if int(str(tensorrt.__version__).split(".")[0]) < 10:
        raise BackendError(f"TensorRT {tensorrt.__version__} is too old: the engine code needs TensorRT 10 or newer")
    return tensorrt


@dataclass(frozen=True)
class EngineSidecar:
    """What a plan was built for: the facts that must match the process that loads it."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    precision: Precision
    min_batch: int
    opt_batch: int
    max_batch: int
    input_size: int
    model_version_id: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, path: str | Path) -> EngineSidecar:
        """Read a sidecar, refusing a missing, unparsable or incomplete one (unknown keys are ignored)."""
        path = Path(path)
        if not path.is_file():
            raise BackendError(f"engine sidecar {path} is missing: rebuild with `ppl build-engine --model "
                               f"{path.parent}`")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BackendError(f"engine sidecar {path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise BackendError(f"engine sidecar {path} must hold a JSON object")
        values: dict[str, Any] = {}
        problems = []
        for f in fields(cls):
            kind = int if f.type == "int" else str
            value = raw.get(f.name)
            if value is None:
                problems.append(f"{f.name} is missing")
            elif type(value) is not kind:  # bool is no int here, and "128" is no batch size
                problems.append(f"{f.name} must be {kind.__name__}, not {type(value).__name__}")
            values[f.name] = value
        if isinstance(values["precision"], str) and values["precision"] not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, not {values['precision']!r}")
        if problems:
            raise BackendError(f"engine sidecar {path} is invalid: {'; '.join(problems)}")
        values["precision"] = Precision(values["precision"])
        return cls(**values)


def check_sidecar(sidecar: EngineSidecar, *, tensorrt_version: str, gpu_name: str, compute_capability: str,
                  model_version_id: str, model_dir: str | Path = "DIR") -> None:
    """Refuse a plan built for another TensorRT, GPU or model, naming every mismatch at once."""
    pairs = [("TensorRT version", sidecar.tensorrt_version, tensorrt_version),
             ("GPU", sidecar.gpu_name, gpu_name),
             ("compute capability", sidecar.compute_capability, compute_capability),
             ("model version", sidecar.model_version_id, model_version_id)]
    mismatches = [f"{what} {built!r} != {now!r}" for what, built, now in pairs if built != now]
    if mismatches:
        raise BackendError(
            f"engine was built for TensorRT {sidecar.tensorrt_version} on {sidecar.gpu_name} "
            f"(sm {sidecar.compute_capability}) for model {sidecar.model_version_id}; this process has TensorRT "
            f"{tensorrt_version} on {gpu_name} (sm {compute_capability}) for model {model_version_id} "
            f"(mismatched: {', '.join(mismatches)}): rebuild with `ppl build-engine --model {model_dir}`")


def _model_info(model_dir: Path) -> ModelInfo:
    try:
        return read_model_info(model_dir)
    except ModelDirError as exc:
        raise BackendError(str(exc)) from None


def _cuda_device(device: str | torch.device = "cuda") -> torch.device:
    """The CUDA device with an explicit index; TensorRT engines exist only on CUDA GPUs."""
    if not torch.cuda.is_available():
        raise BackendError("TensorRT needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is False)")
    dev = torch.device(device)
    if dev.type != "cuda":
        raise BackendError(f"the TensorRT backend runs on a CUDA device, not {str(dev)!r}")
    return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)


def _gpu_facts(dev: torch.device) -> tuple[str, str]:
    major, minor = torch.cuda.get_device_capability(dev)
    return torch.cuda.get_device_name(dev), f"{major}.{minor}"


def _check_onnx(onnx_path: Path, info: ModelInfo, model_dir: Path) -> None:
    """A model.onnx exported from other weights would give a plan whose sidecar claims the wrong model."""
    if not onnx_path.is_file():
        raise BackendError(f"{onnx_path} is missing: run `ppl export --model {model_dir}` first")
    try:
        exported = onnx_version_id(onnx_path)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors share no narrower base
        raise BackendError(f"cannot read {onnx_path}: {exc}; re-run `ppl export --model {model_dir}`") from None
    if exported != info.version_id:
        raise BackendError(f"{onnx_path} was exported from model version {exported or 'unknown'!r}, but model.json "
                           f"says {info.version_id!r}: re-run `ppl export --model {model_dir}`")


def build_engine(model_dir: str | Path, *, precision: Precision | str = Precision.FP16, min_batch: int = 1,
                 opt_batch: int = 32, max_batch: int = 128, workspace_gib: float = 8.0) -> EngineSidecar:
    """Build ``model.plan`` (+ sidecar) from ``model.onnx`` for the current GPU, reusing ``timing.cache``.
    ``precision``: a member, or its value as ``ppl build-engine`` gives it."""
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    precision = Precision(precision)
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise BackendError(f"the batch profile needs 1 <= min <= opt <= max, got min {min_batch}, opt {opt_batch}, "
                           f"max {max_batch}")
    if not workspace_gib > 0:
        raise BackendError(f"workspace_gib must be positive, got {workspace_gib}")
    model_dir = Path(model_dir)
    info = _model_info(model_dir)
    onnx_path = model_dir / ONNX_FILE
    _check_onnx(onnx_path, info, model_dir)
    trt = _import_tensorrt()
    dev = _cuda_device()
    gpu_name, capability = _gpu_facts(dev)
    low_flag = {Precision.FP16: "FP16", Precision.BF16: "BF16"}.get(precision)
    if precision is Precision.BF16 and torch.cuda.get_device_capability(dev) < (8, 0):
        raise BackendError(f"bf16 needs compute capability 8.0 or newer; {gpu_name} has {capability}")
    # TensorRT 11 dropped the FP16/BF16 builder flags: every network is strongly typed and takes its precision
    # from the ONNX types, so an fp16 engine is built from the float16 export instead.
    flags_removed = low_flag is not None and not hasattr(trt.BuilderFlag, low_flag)
    if flags_removed and precision is Precision.BF16:
        raise BackendError(f"TensorRT {trt.__version__} takes precision from the ONNX types and this project "
                           "exports float32 and float16 only: build with --fp16 or fp32")
    if flags_removed:
        onnx_path = model_dir / FP16_ONNX_FILE
        if not onnx_path.is_file():
            raise BackendError(f"{onnx_path} is missing: TensorRT {trt.__version__} builds fp16 engines from the "
                               f"float16 export, made by `ppl export --model {model_dir} --fp16`")
        _check_onnx(onnx_path, info, model_dir)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # fp32, and fp16 from the float16 export: a strongly typed network keeps every tensor in the ONNX types.
    # fp16/bf16 under TensorRT 10: a strongly typed network would ignore the FP16/BF16 builder flags and stay
    # float32, so those use a weakly typed network, where the flags let TensorRT choose reduced-precision
    # kernels layer by layer while the I/O tensors stay float32.
    use_flag = low_flag is not None and not flags_removed
    strongly_typed = not use_flag and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(f"TensorRT could not parse {onnx_path}: " + ("; ".join(errors) or "no error recorded"))
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != [INPUT_NAME]:
        raise BackendError(f"{onnx_path} has inputs {inputs}, expected [{INPUT_NAME!r}]: re-run `ppl export`")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if use_flag and low_flag is not None:  # (use_flag implies a flag name; said again for the type checker)
        config.set_flag(getattr(trt.BuilderFlag, low_flag))
    size = info.input_size
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (min_batch, 3, size, size), (opt_batch, 3, size, size), (max_batch, 3, size, size))
    config.add_optimization_profile(profile)
    cache_path = model_dir / TIMING_CACHE_FILE
    previous = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(previous) if previous else None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):  # unreadable or from another
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)  # TensorRT/GPU: start afresh

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT could not build an engine from {onnx_path} (precision {precision}, batch "
                           f"{min_batch}/{opt_batch}/{max_batch}); the TensorRT log above says why")
    atomic_write_bytes(model_dir / ENGINE_FILE, memoryview(serialized))
    atomic_write_bytes(cache_path, memoryview(config.get_timing_cache().serialize()))
    sidecar = EngineSidecar(tensorrt_version=str(trt.__version__), gpu_name=gpu_name, compute_capability=capability,
                            precision=precision, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                            input_size=size, model_version_id=info.version_id)
    atomic_write_bytes(model_dir / SIDECAR_FILE, sidecar.to_json().encode())
    return sidecar


class TensorRTBackend:
    """Runs a model directory's plan on one GPU with torch CUDA tensors as TensorRT's I/O buffers."""

    name = Backend.TENSORRT

    def __init__(self, model_dir: str | Path, device: str = "cuda:0") -> None:
        model_dir = Path(model_dir)
        plan_path = model_dir / ENGINE_FILE
        if not plan_path.is_file():
            raise BackendError(f"{plan_path} is missing: run `ppl build-engine --model {model_dir}` first")
        self.sidecar = EngineSidecar.from_json(model_dir / SIDECAR_FILE)
        self.info = info = _model_info(model_dir)
        trt = _import_tensorrt()
        self._device = _cuda_device(device)
        self.device = str(self._device)
        gpu_name, capability = _gpu_facts(self._device)
        check_sidecar(self.sidecar, tensorrt_version=str(trt.__version__), gpu_name=gpu_name,
                      compute_capability=capability, model_version_id=info.version_id, model_dir=model_dir)
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        if hasattr(trt.DataType, "BF16"):
            dtypes[trt.DataType.BF16] = torch.bfloat16
        with torch.cuda.device(self._device):
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if self._engine is None:
                raise BackendError(f"TensorRT could not load {plan_path} (see its log above): rebuild with "
                                   f"`ppl build-engine --model {model_dir}`")
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise BackendError(f"TensorRT could not create an execution context for {plan_path}")
            self._stream = torch.cuda.Stream(self._device)
        names = {self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)}
        if names != {INPUT_NAME, *OUTPUT_NAMES}:
            raise BackendError(f"{plan_path} has tensors {sorted(names)}, expected {[INPUT_NAME, *OUTPUT_NAMES]}")
        self._dtypes: dict[str, torch.dtype] = {}
        for tensor in (INPUT_NAME, *OUTPUT_NAMES):
            trt_dtype = self._engine.get_tensor_dtype(tensor)
            if trt_dtype not in dtypes:
                raise BackendError(f"{plan_path}: tensor {tensor} has unsupported type {trt_dtype}")
            self._dtypes[tensor] = dtypes[trt_dtype]

    def predict(self, pixels: torch.Tensor) -> Prediction:
        """Split into chunks of at most max_batch rows, pad chunks below min_batch, and drop the padding again."""
        size, side = self.sidecar.input_size, self.sidecar
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size) or pixels.shape[0] < 1:
            raise ValueError(f"expected a batch of shape (N >= 1, 3, {size}, {size}), got {tuple(pixels.shape)}")
        def run_chunk(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            rows = chunk.shape[0]
            x = chunk.to(self._device, self._dtypes[INPUT_NAME]).contiguous()
            if rows < side.min_batch:
                x = torch.cat([x, x.new_zeros((side.min_batch - rows, *x.shape[1:]))])
            image, patch = self._run(x)
            return image[:rows], patch[:rows]

        current = torch.cuda.current_stream(self._device)
        self._stream.wait_stream(current)  # inputs made on the caller's stream must be ready
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            prediction = predict_in_chunks(run_chunk, pixels, side.max_batch)
        current.wait_stream(self._stream)
        return prediction

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One enqueue on the backend's stream; synchronised so the buffers can be reused or freed afterwards."""
        if not self._context.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise BackendError(f"TensorRT refused input shape {tuple(x.shape)} (engine batch profile "
                               f"{self.sidecar.min_batch}..{self.sidecar.max_batch})")
        self._context.set_tensor_address(INPUT_NAME, x.data_ptr())
        outputs = []
        for tensor in OUTPUT_NAMES:
            shape = tuple(self._context.get_tensor_shape(tensor))
            if any(dim < 0 for dim in shape):
                raise BackendError(f"TensorRT left output {tensor} with unresolved shape {shape}")
            out = torch.empty(shape, dtype=self._dtypes[tensor], device=self._device)
            self._context.set_tensor_address(tensor, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(self._device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise BackendError("TensorRT failed to run the engine (see its log above)")
        stream.synchronize()
        return outputs[0], outputs[1]
