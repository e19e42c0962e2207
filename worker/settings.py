"""Every setting of the worker side, read once from ``PPL_*`` environment variables into one typed object.

``Settings.from_env()`` is the only place that reads the environment; everything else takes a
``Settings``. The README's settings table lists the same names (a test checks they agree).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

from ppl_model.categories import Backend, Precision, choices
from worker.errors import WorkerError

if TYPE_CHECKING:
    from ppl_model.provenance import ProvenancePolicy

PREFIX = "PPL_"


class SettingsError(WorkerError, ValueError):
    """An environment variable that cannot be parsed into its setting."""


@dataclass(frozen=True)
class Settings:
    # Services
    broker_url: str = "redis://localhost:6379/0"
    database_url: str = "postgresql+psycopg://localhost/ppl"

    # Model: a model directory (see ppl_model.model_dir); the backend is chosen by name or "auto"
    model_dir: Path | None = None
    backend: Backend = Backend.AUTO  # auto | tensorrt | torch | onnxruntime
    precision: Precision = Precision.FP32  # torch on CUDA: fp32 | bf16 | fp16
    device: str | None = None  # e.g. "cuda:0"; None = the backend's choice
    tiles: int = 1  # crops judged per image (1 = the centre crop; more cover large images, max-aggregated)

    # Micro-batching: up to batch_size jobs or batch_timeout_ms, whichever comes first
    batch_size: int = 32
    batch_timeout_ms: int = 200
    # Batches a worker process has in flight at once (Celery's thread concurrency): while one infers, the next
    # is fetched and decoded and the previous one commits. Each holds at most batch_size jobs' crops.
    batches_in_flight: int = 3
    decode_threads: int = 8
    # Fetch and decode in this many processes (worker.loading); 0 = in decode_threads threads of the worker
    decode_processes: int = 0
    # Redis redelivers an unacknowledged job after this long. It must exceed the worst time a job
    # waits in a worker: prefetch buffer + one batch's fetch, inference and database write (README).
    visibility_timeout_s: int = 3600

    # Sources
    file_roots: tuple[Path, ...] = ()  # file:// sources must resolve inside one of these
    url_allowlist: tuple[str, ...] = ()  # hosts or CIDRs that the SSRF guard lets through
    fetch_connect_timeout_s: float = 5.0
    fetch_read_timeout_s: float = 15.0
    max_download_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 3
    max_pixels: int = 64_000_000  # decompression-bomb cap
    # Decoding memory, estimated from the header before any pixel is decoded (ppl_model.imageio.decoded_bytes):
    # one image's decode and conversion to RGB at most, and all decode threads of the process together
    max_decode_bytes: int = 1 << 30
    decode_memory_bytes: int = 3 << 29  # 1.5 GiB
    max_metadata_bytes: int = 4096

    # Provenance (ppl_model.provenance): the PEM file of the root certificates whose C2PA signing chains are
    # trusted (none: a manifest is at best "valid"), and whether unsigned metadata (XMP source type, generator
    # chunks) may decide a label: off, because anyone can write it (docs/OPERATIONS.md, "Provenance")
    c2pa_trust_anchors: Path | None = None
    trust_unsigned_metadata: bool = False

    # Retries of transient failures (HTTP 5xx, database down), with exponential back-off
    max_retries: int = 5
    retry_backoff_s: float = 2.0
    # A batch whose database write fails keeps retrying this long before it hands its jobs back to the
    # queue unacknowledged (so an outage shorter than this loses and re-runs nothing)
    database_retry_s: float = 120.0

    # Rescans
    rescan_interval_s: int = 0  # celery beat runs a stale-model rescan this often; 0 = never
    rescan_chunk: int = 1000  # jobs enqueued per chunk
    rescan_max_queue: int = 20_000  # pause enqueueing while the detect queue is longer

    # Messages that are not a runnable job: the newest this many are kept whole (ppl-worker dead-letters)
    dead_letter_max: int = 10_000

    # Observability
    metrics_port: int = 9100  # Prometheus endpoint of each worker process; 0 = off
    log_level: str = "INFO"
    # Touched whenever the worker hears from the broker; `ppl-worker health` fails when it grows stale
    heartbeat_file: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, overridden by ``PPL_<NAME>`` variables, overridden by keyword arguments."""
        environ = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None:
                values[f.name] = _parse(f.name, raw, hints[f.name])
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        positive = ("batch_size", "batch_timeout_ms", "batches_in_flight", "decode_threads", "visibility_timeout_s",
                    "max_download_bytes", "max_pixels", "max_decode_bytes", "decode_memory_bytes",
                    "max_metadata_bytes", "rescan_chunk", "rescan_max_queue", "tiles", "dead_letter_max")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{env_name(name)} must be positive, got {getattr(self, name)}")
        # The environment and keyword overrides give plain strings: each becomes its enum's member here.
        for name, enum in (("backend", Backend), ("precision", Precision)):
            value = getattr(self, name)
            if value not in tuple(enum):
                raise SettingsError(f"{env_name(name)} must be {choices(enum)}, got {value!r}")
            object.__setattr__(self, name, enum(value))  # frozen: the documented way to normalise a field
        if not isinstance(self.trust_unsigned_metadata, bool):  # a keyword override given as a string
            raise SettingsError(f"PPL_TRUST_UNSIGNED_METADATA must be a boolean, got {self.trust_unsigned_metadata!r}")
        if self.decode_processes < 0:
            raise SettingsError(f"PPL_DECODE_PROCESSES must be 0 (decode in threads) or more, "
                                f"got {self.decode_processes}")

    @property
    def prefetch_multiplier(self) -> int:
        """Celery prefetches this many messages per unit of concurrency (``batches_in_flight``): with the
        batches in flight, enough to fill the next one, and no more, so a crashed worker holds few jobs
        hostage until redelivery: (batches_in_flight + 1) × batch_size in all, rounded up."""
        return -(-(self.batches_in_flight + 1) * self.batch_size // self.batches_in_flight)

    @property
    def prefetch_count(self) -> int:
        """Messages a worker process holds unacknowledged at most (Celery: multiplier × concurrency)."""
        return self.prefetch_multiplier * self.batches_in_flight

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON-friendly values, with passwords in URLs hidden (for logs and `doctor`)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [str(v) for v in value]
            elif isinstance(value, Path):
                value = str(value)
            if f.name.endswith("_url") and isinstance(value, str):
                value = _hide_password(value)
            out[f.name] = value
        return out


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def env_names() -> list[str]:
    return [env_name(f.name) for f in dataclasses.fields(Settings)]


def _split_list(raw: str, separators: str = ",") -> list[str]:
    # Comma-separated; os.pathsep also accepted for the path lists (PPL_FILE_ROOTS=/a:/b), and only there:
    # the other lists hold IPv6 addresses and CIDRs (PPL_URL_ALLOWLIST=fd00::/8), whose colons are no separator.
    for separator in separators[1:]:
        raw = raw.replace(separator, separators[0])
    return [p.strip() for p in raw.split(separators[0]) if p.strip()]


_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _parse(name: str, raw: str, hint: Any) -> Any:
    text = raw.strip()
    if hint is bool:
        flag = _BOOLEANS.get(text.lower())
        if flag is None:
            raise SettingsError(f"{env_name(name)}={raw!r} is not a boolean: use 1/0, true/false or yes/no")
        return flag
    try:
        if hint in (int,):
            return int(text)
        if hint in (float,):
            return float(text)
        if hint == Path | None:
            return Path(text) if text else None
        if hint == str | None:
            return text or None
        if hint == tuple[Path, ...]:
            return tuple(Path(p) for p in _split_list(text, "," + os.pathsep))
        if hint == tuple[str, ...]:
            return tuple(_split_list(text))
        return text
    except ValueError:
        raise SettingsError(f"{env_name(name)}={raw!r} is not a valid {getattr(hint, '__name__', hint)}") from None


def provenance_policy(settings: Settings) -> ProvenancePolicy:
    """The provenance policy these settings describe, built once per process (the trust anchors are read and
    checked by c2pa on the first call; a file that is missing or holds no usable certificate is a
    ``SettingsError`` naming ``PPL_C2PA_TRUST_ANCHORS``)."""
    return _provenance_policy(settings.c2pa_trust_anchors, settings.trust_unsigned_metadata)


@functools.cache
def _provenance_policy(trust_anchors: Path | None, trust_unsigned_metadata: bool) -> ProvenancePolicy:
    from ppl_model.provenance import ProvenanceConfigError, ProvenancePolicy

    try:
        return ProvenancePolicy.from_files(trust_anchors, trust_unsigned_metadata=trust_unsigned_metadata)
    except ProvenanceConfigError as exc:
        raise SettingsError(f"{env_name('c2pa_trust_anchors')}: {exc}") from None


def _hide_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url

