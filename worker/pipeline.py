"""One micro-batch of ``detect_image`` jobs, from task arguments to committed rows.

validate arguments → fetch + decode + preprocess (thread pool) → answer already-judged content from the
database → one inference call for the new content → one transaction: verdict upsert + failure upsert + one
submission row per answered job → re-send transient failures with a delay. Jobs the task layer refused before
they got here (a malformed message, an expired or revoked job) arrive with their reason and are recorded in
the same transaction. The Celery task (``worker.tasks``) acknowledges the batch's
messages only after ``process`` returns, so a batch that dies anywhere before the commit is redelivered.

Nothing here imports Celery: the processor is tested with plain job lists.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from ppl_model.inference.preprocess import aggregate, normalise
from ppl_model.inference.verdict import make_verdicts
from ppl_model.provenance import decide
from ppl_model.reasons import Reason
from worker import db, metrics
from worker.loading import CropSpec, Decoded, Fetched, Loader, joined_crops, make_loader
from worker.model import ServedModel, load_model
from worker.settings import Settings
from worker.sources import SourceError

log = logging.getLogger(__name__)

TASK_KWARGS = frozenset({"source", "external_id", "metadata"})
MAX_EXTERNAL_ID = 256
MAX_SOURCE_CHARS = 4096
T = TypeVar("T")


class InvalidJob(ValueError):
    """Task arguments that no retry can fix."""


class DatabaseUnavailable(RuntimeError):
    """The database stayed unreachable for PPL_DATABASE_RETRY_S: the batch goes back to the queue."""


@dataclass(frozen=True)
class Refusal:
    """Why the task layer will not run a delivered job (``worker.tasks``): a stable reason code and a detail."""

    reason: Reason
    detail: str


@dataclass(frozen=True)
class JobRequest:
    """One delivered message, as the task receives it (arguments not yet checked). ``refused``: the job is only
    recorded, with that reason, never run."""

    task_id: str | None
    args: Sequence[Any] = ()
    kwargs: Any = field(default_factory=dict)
    retries: int = 0
    refused: Refusal | None = None


@dataclass(frozen=True)
class Job:
    task_id: str | None
    source: str
    external_id: str | None
    metadata: dict[str, Any] | None
    retries: int

    def submission(self, received_at: datetime, *, verdict: tuple[str, str] | None = None,
                   failure: db.FailureRow | None = None) -> db.SubmissionRow:
        """This job's submission row; ``received_at`` is when the worker began the job's batch."""
        return db.SubmissionRow(self.task_id, self.external_id, self.source, self.metadata, received_at,
                                verdict=verdict, failure=failure)


@dataclass
class BatchReport:
    batch_id: str
    jobs: int = 0
    inferred: int = 0  # images the model judged in this batch (after de-duplication)
    cached: int = 0  # jobs answered from a stored verdict or from a duplicate in the batch
    inserted: int = 0  # verdict rows new in the database
    failed: dict[Reason, int] = field(default_factory=dict)  # reason → jobs recorded in detection_failures
    retried: int = 0  # jobs sent back with a delay
    seconds: dict[str, float] = field(default_factory=dict)


def parse_job(request: JobRequest, settings: Settings) -> Job:
    """The job's arguments, checked against the task's contract (docs/ARCHITECTURE.md, "Contracts")."""
    if request.args:
        raise InvalidJob(f"detect_image takes keyword arguments only, got {len(request.args)} positional")
    kwargs = request.kwargs
    if not isinstance(kwargs, dict):
        raise InvalidJob(f"keyword arguments must be an object, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - TASK_KWARGS)
    if unknown:
        raise InvalidJob(f"unknown keyword argument(s): {', '.join(map(str, unknown))[:200]}")
    source = kwargs.get("source")
    if not isinstance(source, str) or not source.strip():
        raise InvalidJob(f"source must be a non-empty string, got {type(source).__name__}")
    if len(source) > MAX_SOURCE_CHARS:
        raise InvalidJob(f"source is {len(source)} characters long; the limit is {MAX_SOURCE_CHARS}")
    external_id = kwargs.get("external_id")
    if external_id is not None and (not isinstance(external_id, str) or len(external_id) > MAX_EXTERNAL_ID):
        raise InvalidJob(f"external_id must be a string of at most {MAX_EXTERNAL_ID} characters")
    metadata = kwargs.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise InvalidJob(f"metadata must be a JSON object, got {type(metadata).__name__}")
        try:  # strict JSON: PostgreSQL's jsonb has no NaN or Infinity, which Python's json lets through
            size = len(json.dumps(metadata, separators=(",", ":"), allow_nan=False).encode())
        except (ValueError, RecursionError) as exc:
            raise InvalidJob(f"metadata is not storable JSON: {exc}"[:200]) from None
        if size > settings.max_metadata_bytes:
            raise InvalidJob(f"metadata is {size} bytes of JSON; the limit is {settings.max_metadata_bytes}")
    for name, value in (("source", source), ("external_id", external_id), ("metadata", metadata)):
        if not _storable(value):
            raise InvalidJob(f"{name} holds a NUL character or an unpaired surrogate, which the database cannot store")
    return Job(request.task_id, source, external_id, metadata, max(0, int(request.retries or 0)))


def _storable(value: Any) -> bool:
    """Whether every string in ``value`` (a JSON value; object keys included) fits PostgreSQL's text and jsonb:
    no NUL character and valid UTF-8 (JSON's \\uXXXX escapes can carry both). Iterative, so depth cannot hurt."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item or not _utf8(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refused_job(request: JobRequest) -> Job:
    """What to record of a job that will not run (invalid arguments, a malformed message, expired, revoked):
    whatever can be shown of its source, external id and metadata."""
    kwargs = request.kwargs if isinstance(request.kwargs, dict) else {}
    source = kwargs.get("source")
    shown = source if isinstance(source, str) and source else f"<task {request.task_id or 'without id'}>"
    external_id = kwargs.get("external_id")
    metadata = kwargs.get("metadata")
    if not isinstance(metadata, dict) or not _storable(metadata) or not _json_storable(metadata):
        metadata = None
    return Job(request.task_id, shown[:MAX_SOURCE_CHARS], external_id if isinstance(external_id, str) else None,
               metadata, 0)


def _json_storable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


@dataclass
class _Loaded:
    """A job after fetch (and decode, when its content was new): its crops and what the verdict row records,
    or its error. The decoded picture itself is never kept, only the crops the model sees."""

    job: Job
    fetched: Fetched
    decoded: Decoded | None = None  # None: answered from a stored verdict or a duplicate in the batch

    @property
    def sha256(self) -> str:
        return self.fetched.sha256

    @property
    def error(self) -> SourceError | None:
        return self.fetched.error or (self.decoded.error if self.decoded else None)


Resend = Callable[[Job, float], None]  # (job, countdown seconds): re-enqueue with a delay


class BatchProcessor:
    """Turns a batch of job requests into committed rows; one per worker process (holds a thread pool)."""

    def __init__(self, settings: Settings, engine: Engine, resend: Resend,
                 model_loader: Callable[[Settings], ServedModel] = load_model,
                 sleep: Callable[[float], None] = time.sleep, loader: Loader | None = None):
        self.settings = settings
        self.engine = engine
        self.resend = resend
        self.model_loader = model_loader
        self.sleep = sleep
        self.loader = loader or make_loader(settings)
        # Batches run in several threads at once (PPL_BATCHES_IN_FLIGHT), their stages overlapping; the
        # accelerator takes one batch at a time.
        self._infer_lock = threading.Lock()
        self._registered: set[str] = set()

    def close(self) -> None:
        self.loader.close()

    def process(self, requests: Sequence[JobRequest]) -> BatchReport:
        report = BatchReport(batch_id=uuid.uuid4().hex[:12], jobs=len(requests))
        metrics.BATCH_SIZE.observe(len(requests))
        started_at = datetime.now(UTC)
        failures: list[db.FailureRow] = []
        answered: list[db.SubmissionRow] = []
        jobs: list[Job] = []
        for request in requests:
            refusal = request.refused
            if refusal is None:
                try:
                    jobs.append(parse_job(request, self.settings))
                    continue
                except InvalidJob as exc:
                    refusal = Refusal(Reason.INVALID_ARGUMENTS, str(exc))
            job = _refused_job(request)
            failure = db.FailureRow(job.source, job.external_id, refusal.reason, refusal.detail)
            failures.append(failure)
            answered.append(job.submission(started_at, failure=failure))
            log.warning("job refused", extra={"batch_id": report.batch_id, "task_id": request.task_id,
                                              "reason": refusal.reason, "detail": refusal.detail[:500]})
        if not jobs:  # nothing to judge: no model needed (a batch of refusals must not wait for one)
            self._commit(report, [], failures, answered, [])
            return report

        model = self.model_loader(self.settings)
        self._with_database(lambda: self._register(model))
        loaded = self._load(jobs, model, report)

        retry: list[tuple[Job, SourceError]] = []
        good: list[_Loaded] = []
        for item in loaded:
            error = item.error
            if error is None:
                good.append(item)
            elif error.transient and item.job.retries < self.settings.max_retries:
                retry.append((item.job, error))
            else:
                failure = db.FailureRow(item.job.source, item.job.external_id, error.reason, error.detail)
                failures.append(failure)
                answered.append(item.job.submission(started_at, failure=failure))
                log.warning("job failed", extra={"batch_id": report.batch_id, "task_id": item.job.task_id,
                                                 "reason": error.reason, "source": item.job.source[:200]})

        rows = self._judge([item for item in good if item.decoded is not None], model, report)
        # Every loaded job is answered by the verdict of its content: new, a duplicate's in this batch, or stored.
        answered += [item.job.submission(started_at, verdict=(item.sha256, model.version_id)) for item in good]
        self._commit(report, rows, failures, answered, retry)
        return report

    def _commit(self, report: BatchReport, rows: list[db.VerdictRow], failures: list[db.FailureRow],
                answered: list[db.SubmissionRow], retry: list[tuple[Job, SourceError]]) -> None:
        started = time.perf_counter()
        try:
            report.inserted = self._with_database(lambda: self._write(rows, failures, answered))
        except DBAPIError as exc:  # the database refused the batch (not an outage): find the row it refuses
            log.error("batch write refused (%s); writing its rows one by one", type(exc.orig or exc).__name__,
                      extra={"batch_id": report.batch_id})
            report.inserted = self._write_one_by_one(rows, failures, answered)
        report.seconds["database"] = report.seconds.get("database", 0.0) + time.perf_counter() - started
        metrics.STAGE_SECONDS.labels("database").observe(report.seconds["database"])

        for job, error in retry:  # after the commit, before the acknowledgement: nothing is lost either way
            delay = self.settings.retry_backoff_s * 2**job.retries
            self.resend(job, delay)
            metrics.RETRIES.labels(error.reason).inc()
        report.retried = len(retry)
        for failure in failures:
            report.failed[failure.reason] = report.failed.get(failure.reason, 0) + 1
            metrics.FAILURES.labels(failure.reason).inc()
        log.info("batch done", extra={"batch_id": report.batch_id, "task_ids": [s.task_id for s in answered],
                                      "report": asdict(report)})

    # -- stages ---------------------------------------------------------------------------------------

    def _load(self, jobs: list[Job], model: ServedModel, report: BatchReport) -> list[_Loaded]:
        """Fetch and hash every job; decode only content that this model version has not judged (stored, or
        earlier in this batch): a duplicate costs a hash, never a decode. A job whose duplicate failed to
        decode gets the same error (the same bytes)."""
        started = time.perf_counter()
        fetched = self.loader.fetch([job.source for job in jobs])
        items = [_Loaded(job, f) for job, f in zip(jobs, fetched, strict=True)]
        try:
            report.seconds["fetch"] = time.perf_counter() - started
            digests = {item.sha256 for item in items if item.fetched.error is None}
            started = time.perf_counter()
            known = self._with_database(lambda: self._known(model.version_id, digests)) if digests else set()
            report.seconds["database"] = time.perf_counter() - started
            first: dict[str, _Loaded] = {}
            for item in items:
                if item.fetched.error is None and item.sha256 not in known:
                    first.setdefault(item.sha256, item)
            started = time.perf_counter()
            prep = model.preprocessing
            spec = CropSpec(prep.input_size, prep.tiles, prep.mean)
            decoded = self.loader.decode([item.fetched.handle for item in first.values()], spec)
            report.seconds["decode"] = time.perf_counter() - started
        finally:
            self.loader.release(f.handle for f in fetched)
        for item, result in zip(first.values(), decoded, strict=True):
            item.decoded = result
        for item in items:  # duplicates of a first that failed fail with it
            origin = first.get(item.sha256)
            if origin is not None and origin is not item and origin.decoded and origin.decoded.error:
                item.decoded = origin.decoded
        report.cached = sum(1 for item in items if item.fetched.error is None and item.decoded is None)
        metrics.IMAGES.labels("cached").inc(report.cached)
        fetch_seconds, decode_seconds = metrics.STAGE_SECONDS.labels("fetch"), metrics.STAGE_SECONDS.labels("decode")
        for item in items:
            fetch_seconds.observe(item.fetched.fetch_ms / 1000)
            if item.decoded is not None:
                decode_seconds.observe(item.decoded.decode_ms / 1000)
        return items

    def _judge(self, items: list[_Loaded], model: ServedModel, report: BatchReport) -> list[db.VerdictRow]:
        """Verdict rows for the new content of the batch (decoded, one item per digest): one inference call."""
        if not items:
            return []
        version = model.version_id
        started = time.perf_counter()
        crops = [item.decoded.crops for item in items if item.decoded is not None and item.decoded.crops is not None]
        if len(crops) != len(items):
            raise RuntimeError("an item reached inference without crops")
        prep, backend = model.preprocessing, model.backend
        with self._infer_lock:
            waited = time.perf_counter() - started
            pixels = normalise(joined_crops(crops), prep.mean, prep.std, backend.device)
            predictions = aggregate(backend.predict(pixels), [len(c) for c in crops])
        infer_s = time.perf_counter() - started
        report.seconds["infer"] = infer_s
        report.seconds["infer_wait"] = waited
        report.inferred = len(items)
        metrics.STAGE_SECONDS.labels("infer").observe(infer_s)
        metrics.IMAGES.labels("inferred").inc(len(items))
        rows = []
        grids = np.concatenate([prediction.patch_prob for prediction in predictions])
        verdicts = make_verdicts(np.concatenate([prediction.image_prob for prediction in predictions]), grids,
                                 model.threshold)
        for item, verdict, grid in zip(items, verdicts, db.quantise_patch_grids(grids), strict=True):
            decoded = item.decoded
            assert decoded is not None
            # The label follows the provenance where it decides (a validating C2PA manifest declaring
            # trained-algorithmic media; unsigned metadata only when trusted); the model's score is kept as is.
            ruling = decide(decoded.provenance, verdict.label,
                            trust_unsigned_metadata=self.settings.trust_unsigned_metadata)
            rows.append(db.VerdictRow.of(
                verdict, grid, sha256=item.sha256, model_version=version, source=item.job.source,
                external_id=item.job.external_id, metadata=item.job.metadata, width=decoded.width,
                height=decoded.height, format=decoded.format, ruling=ruling, provenance=decoded.provenance,
                frames=decoded.frames,
                timings_ms={"fetch": round(item.fetched.fetch_ms, 2), "decode": round(decoded.decode_ms, 2),
                            "provenance": round(decoded.provenance_ms, 2), "infer": round(1000 * infer_s, 2),
                            "batch_images": len(items)}))
        return rows

    # -- database -------------------------------------------------------------------------------------

    def _register(self, model: ServedModel) -> None:
        if model.version_id in self._registered:
            return
        info = model.info
        with self.engine.begin() as conn:
            db.register_model_version(conn, info.version_id, info.architecture(), info.threshold,
                                      info.training.get("validation") or {}, activate=True)
        self._registered.add(model.version_id)

    def _known(self, version: str, digests: set[str]) -> set[str]:
        with self.engine.connect() as conn:
            return db.judged_contents(conn, digests, version)

    def _write(self, rows: list[db.VerdictRow], failures: list[db.FailureRow],
               answered: list[db.SubmissionRow]) -> int:
        """Verdicts, failures, then the submissions that point at them, in one transaction."""
        if not rows and not failures and not answered:
            return 0
        with self.engine.begin() as conn:
            inserted = db.upsert_verdicts(conn, rows) if rows else 0
            if failures:
                db.record_failures(conn, failures)
            if answered:
                db.record_submissions(conn, answered)
        return inserted

    def _write_one_by_one(self, rows: list[db.VerdictRow], failures: list[db.FailureRow],
                          answered: list[db.SubmissionRow]) -> int:
        """The slow path after the database refused a whole batch: each row in its own transaction, so one row
        that cannot be stored neither blocks the others nor sends the batch back to the queue for ever. A
        refused verdict becomes an ``unstorable`` failure row (and its jobs' submissions point at that); a
        refused failure or submission row (already escaped by ``db``) is logged with everything known about
        the job and dropped."""
        inserted = 0
        refused: dict[tuple[str, str], db.FailureRow] = {}
        for row in rows:
            try:
                inserted += self._with_database(functools.partial(self._write, [row], [], []))
            except DBAPIError as exc:
                failure = db.FailureRow(row.source, row.external_id, Reason.UNSTORABLE,
                                        f"{type(exc.orig or exc).__name__}: {exc.orig or exc}"[:500])
                failures.append(failure)
                refused[(row.sha256, row.model_version)] = failure
        answered = [replace(s, verdict=None, failure=refused[s.verdict]) if s.verdict in refused else s
                    for s in answered]
        dropped: set[int] = set()
        for failure in list(failures):
            try:
                self._with_database(functools.partial(self._write, [], [failure], []))
            except DBAPIError as exc:
                failures.remove(failure)
                dropped.add(id(failure))
                log.error("failure row refused by the database; job dropped", extra={
                    "source": failure.source[:200], "external_id": failure.external_id, "reason": failure.reason,
                    "detail": failure.detail[:500], "error": str(exc.orig or exc)[:500]})
        for submission in answered:
            if submission.failure is not None and id(submission.failure) in dropped:
                continue
            try:
                self._with_database(functools.partial(self._write, [], [], [submission]))
            except DBAPIError as exc:
                log.error("submission row refused by the database; its answer is stored without it", extra={
                    "task_id": submission.task_id, "source": submission.source[:200],
                    "error": str(exc.orig or exc)[:500]})
        return inserted

    def _with_database(self, action: Callable[[], T]) -> T:
        """Run ``action``, retrying with back-off while the database is unreachable (PPL_DATABASE_RETRY_S)."""
        deadline = time.monotonic() + self.settings.database_retry_s
        delay = 0.25
        while True:
            try:
                return action()
            except (OperationalError, DBAPIError) as exc:
                if isinstance(exc, DBAPIError) and not (exc.connection_invalidated
                                                        or isinstance(exc, OperationalError)):
                    raise  # a real SQL error, not an outage: retrying would not help
                if time.monotonic() + delay > deadline:
                    raise DatabaseUnavailable(f"database unreachable for {self.settings.database_retry_s:.0f} s: "
                                              f"{exc.orig or exc}") from exc
                log.warning("database unreachable (%s); retrying in %.1f s", type(exc.orig or exc).__name__, delay)
                self.sleep(delay)
                delay = min(2 * delay, 5.0)
