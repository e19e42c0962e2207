"""Every query of the moderation worker (the tables are in ``worker.schema``, engines and migrations in
``worker.database``; their names are importable from here too).

Keeping the SQL in one module means one place to review for index use, idempotency and locking. Functions
take an ``Engine`` (they open and commit their own transaction) or a ``Connection`` (they run inside the
caller's transaction, which the caller commits), so a worker can write a batch's verdicts and failures
atomically:

    with engine.begin() as conn:
        upsert_verdicts(conn, verdict_rows)
        record_failures(conn, failure_rows)

Two invariants the rest of the system relies on (docs/ARCHITECTURE.md):

* ``verdicts`` holds at most one row per (image content sha256, model version), and a write of a row already
  stored is skipped (a COPY that meets one is rolled back to its savepoint and its rows written with
  ``INSERT ... ON CONFLICT DO NOTHING``), so a redelivered job never makes a second row or fails its batch.
* The "latest verdict" of an image is its row with the greatest (created_at, id). The ``latest_verdicts``
  view and the queries here (written as ``NOT EXISTS (newer row)`` so they can use indexes) agree on it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, TypedDict, cast

import numpy as np
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    exists,
    func,
    literal,
    literal_column,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine, Transaction
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.selectable import NamedFromClause

from ppl_model.categories import C2paState, Decision, Label, ProvenanceKind
from ppl_model.inference.verdict import Verdict
from ppl_model.provenance import Provenance, Ruling
from ppl_model.reasons import Reason

# The lifecycle and the tables live in their own modules; these names stay importable from here, where the
# rest of the worker and the tests look for them.
from worker.database import MIGRATION_LOCK_ID as MIGRATION_LOCK_ID
from worker.database import REPO_ROOT as REPO_ROOT
from worker.database import Bind as Bind
from worker.database import alembic_config as alembic_config
from worker.database import create_database_if_missing as create_database_if_missing
from worker.database import head_revision as head_revision
from worker.database import make_engine as make_engine
from worker.database import migrate as migrate
from worker.database import normalise_url as normalise_url
from worker.database import schema_revision as schema_revision
from worker.database import temporary_database as temporary_database
from worker.database import transaction
from worker.schema import LABELS as LABELS
from worker.schema import RESCAN_STATUSES as RESCAN_STATUSES
from worker.schema import detection_failures as detection_failures
from worker.schema import metadata as metadata
from worker.schema import model_versions as model_versions
from worker.schema import rescan_runs as rescan_runs
from worker.schema import submissions as submissions
from worker.schema import verdicts as verdicts

UNFINISHED_STATUSES: Final = ("running", "paused")
FINISHED_STATUSES: Final = ("done", "failed")
# Key of the transaction-scoped advisory lock that serialises model-version activations (one active version).
MODEL_VERSION_LOCK_ID: Final = 0x70706C_0002
MAX_FAILURE_DETAIL_CHARS: Final = 2000  # an exception text can be huge (a whole HTML error page)
# psycopg sends at most 65535 bind parameters per statement; a multi-row VALUES uses one per cell.
MAX_BIND_PARAMS: Final = 65535


# ------------------------------------------------------------------------------------------ verdicts


class PackedGrid(NamedTuple):
    """A patch grid as ``verdicts`` stores it: ``quantise_patch_grid``'s bytes and the grid's shape."""

    data: bytes
    rows: int
    cols: int


def quantise_patch_grid(grid: np.ndarray) -> PackedGrid:
    """Patch probabilities as row-major uint8 ``round(p * 255)`` bytes (256 bytes for a 16×16 grid instead of
    1 kB of float32): the error is at most 1/510, far below anything a moderator or analyst reads into it."""
    array = np.asarray(grid, dtype=np.float64)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"a patch grid must be a non-empty 2-D array, got shape {array.shape}")
    return quantise_patch_grids(array[None])[0]


def quantise_patch_grids(grids: np.ndarray) -> list[PackedGrid]:
    """``quantise_patch_grid`` for a batch, ``(N, rows, cols)``, checked and rounded in one pass."""
    array = np.asarray(grids, dtype=np.float64)
    if array.ndim != 3 or array.shape[1] == 0 or array.shape[2] == 0:
        raise ValueError(f"patch grids must be a non-empty (N, rows, cols) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("the patch grid holds NaN or infinite values")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise ValueError(f"patch probabilities must lie in [0, 1], got [{array.min()}, {array.max()}]")
    rows, cols = int(array.shape[1]), int(array.shape[2])
    packed = np.rint(array * 255.0).astype(np.uint8).tobytes(order="C")
    size = rows * cols
    return [PackedGrid(packed[i * size:(i + 1) * size], rows, cols) for i in range(len(array))]


def dequantise_patch_grid(data: bytes, rows: int, cols: int) -> np.ndarray:
    """The float32 ``rows × cols`` probabilities stored by ``quantise_patch_grid``."""
    raw = np.frombuffer(bytes(data), dtype=np.uint8)
    if raw.size != rows * cols:
        raise ValueError(f"a {rows}×{cols} patch grid needs {rows * cols} bytes, got {raw.size}")
    return (raw.astype(np.float32) / np.float32(255.0)).reshape(rows, cols)


@dataclass(frozen=True)
class VerdictRow:
    """Every column of ``verdicts`` but the database-assigned id and created_at."""

    sha256: str
    model_version: str
    score: float
    label: Label
    threshold: float
    source: str
    external_id: str | None
    metadata: dict[str, Any] | None
    width: int
    height: int
    format: str
    patch_mean: float
    patch_max: float
    patch_p90: float
    patch_frac_above: float
    top_patch_row: int
    top_patch_col: int
    patch_grid: bytes
    grid_rows: int
    grid_cols: int
    timings_ms: dict[str, float]
    # What the image's own bytes say about its origin (revision 0004), and what decided the label. None where
    # nothing was read (rows written before 0004); provenance_kind "none" where it was and nothing was found.
    provenance: dict[str, Any] | None = None  # ppl_model.provenance.Provenance.to_json()
    decision: Decision = Decision.MODEL
    provenance_kind: ProvenanceKind | None = None  # the strongest signal
    declared_generator: str | None = None
    c2pa_state: C2paState | None = None
    c2pa_signer: str | None = None  # the C2PA signing certificate's issuer
    frames: int | None = None  # frames the file holds; the first is judged

    @classmethod
    def of(cls, verdict: Verdict, grid: np.ndarray | PackedGrid, *, sha256: str, model_version: str, source: str,
           external_id: str | None, metadata: dict[str, Any] | None, width: int, height: int, format: str,
           timings_ms: dict[str, float], ruling: Ruling | None = None, provenance: Provenance | None = None,
           frames: int | None = None) -> VerdictRow:
        """The row for a verdict (``make_verdict``) on ``grid`` (the per-patch probabilities): the one place
        a verdict becomes a row, for the worker, its benchmarks and the tests alike. ``ruling`` (``decide``)
        gives the label and what decided it (default: the model's label); the score is the model's either way.
        The provenance's strings come from the file, so they are made storable here (NUL characters and
        unpaired surrogates escaped, as ``storable_text`` does): a hostile file must not cost its verdict.
        ``grid`` may come quantised already (``quantise_patch_grids``, a batch at once)."""
        packed, grid_rows, grid_cols = grid if isinstance(grid, PackedGrid) else quantise_patch_grid(grid)
        manifest = provenance.c2pa if provenance is not None else None
        return cls(sha256=sha256, model_version=model_version, score=verdict.score,
                   label=ruling.label if ruling is not None else verdict.label,
                   threshold=verdict.threshold, source=source, external_id=external_id, metadata=metadata,
                   width=width, height=height, format=format, patch_mean=verdict.patch_mean,
                   patch_max=verdict.patch_max, patch_p90=verdict.patch_p90,
                   patch_frac_above=verdict.patch_frac_above, top_patch_row=verdict.top_patch_row,
                   top_patch_col=verdict.top_patch_col, patch_grid=packed, grid_rows=grid_rows, grid_cols=grid_cols,
                   timings_ms=timings_ms,
                   provenance=provenance_document(provenance) if provenance is not None else None,
                   decision=ruling.decision if ruling is not None else Decision.MODEL,
                   provenance_kind=provenance.strongest if provenance is not None else None,
                   declared_generator=_storable_or_none(provenance.declared_generator if provenance else ""),
                   c2pa_state=manifest.state if manifest is not None else None,
                   c2pa_signer=_storable_or_none(manifest.signer if manifest is not None else ""),
                   frames=frames)


@functools.lru_cache(maxsize=1024)
def provenance_document(provenance: Provenance) -> dict[str, Any]:
    """The ``provenance`` column's document: ``to_json`` with every string storable. Cached, as most images carry
    the same few (nothing found, one common generator's marks); rows share it, so it is never modified."""
    return cast(dict[str, Any], _storable_json(provenance.to_json()))


def _storable_or_none(value: str) -> str | None:
    """A text column's value: None for "" (so that analysts filter on IS NOT NULL), else ``storable_text``."""
    return storable_text(value) if value else None


def _storable_json(value: Any) -> Any:
    """A JSON value with every string (object keys too) made ``storable_text``: jsonb refuses ``\\u0000``."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {storable_text(str(key)): _storable_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_storable_json(item) for item in value]
    return value


_VERDICT_ROW_FIELDS: Final = tuple(f.name for f in fields(VerdictRow))


def _rows_per_statement(columns: int) -> int:
    return max(1, MAX_BIND_PARAMS // columns)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ------------------------------------------------------------------------------------ staging by COPY
#
# The batch writes (verdicts, submissions) send their rows with COPY into a temporary staging table of the
# session, then move them with one INSERT ... SELECT ... ON CONFLICT DO NOTHING. COPY's rows are formatted by
# psycopg's C code (about 10 µs a verdict row); the array parameters of an ``unnest`` insert went through
# psycopg's Python array dumper instead (30 µs a row, most of a batch write's client time; docs/PERFORMANCE.md).
# The staging tables are the session's own (no other connection sees them), emptied by the INSERT that reads
# them and again at every commit (ON COMMIT DELETE ROWS), so a rolled-back batch leaves nothing behind.

STAGE_VERDICTS: Final = "ppl_stage_verdicts"
STAGE_SUBMISSIONS: Final = "ppl_stage_submissions"
_STAGED: Final = "ppl_staging_tables"  # key in a pooled connection's info: its staging tables exist


def _column_type(table: Table, name: str) -> str:
    from sqlalchemy.dialects import postgresql

    return str(table.c[name].type.compile(dialect=postgresql.dialect()))


_SUBMISSION_COLUMNS: Final = ("task_id", "external_id", "source", "metadata", "received_at", "outcome", "sha256",
                              "model_version", "failure_key", "failure_reason")
_SUBMISSION_STAGE_TYPES: Final = {"task_id": "TEXT", "external_id": "TEXT", "source": "TEXT", "metadata": "JSONB",
                                  "received_at": "TIMESTAMP WITH TIME ZONE", "outcome": "TEXT", "sha256": "TEXT",
                                  "model_version": "TEXT", "failure_key": "TEXT", "failure_reason": "TEXT"}


def _stage_ddl() -> str:
    verdict_columns = ", ".join(f"{name} {_column_type(verdicts, name)}" for name in _VERDICT_ROW_FIELDS)
    submission_columns = ", ".join(f"{name} {kind}" for name, kind in _SUBMISSION_STAGE_TYPES.items())
    return (f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGE_VERDICTS} (ord INTEGER NOT NULL, {verdict_columns}) "
            f"ON COMMIT DELETE ROWS; "
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGE_SUBMISSIONS} (ord INTEGER NOT NULL, {submission_columns}) "
            f"ON COMMIT DELETE ROWS")


_STAGE_DDL: Final = _stage_ddl()


def create_staging_tables(dbapi_connection: Any, connection_record: Any) -> None:
    """SQLAlchemy ``connect`` listener (``make_engine`` installs it): the session's staging tables, created
    once per database connection and committed, so that a batch does not pay a round trip for them."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET client_min_messages = warning")  # IF NOT EXISTS would send a notice otherwise
        cursor.execute(_STAGE_DDL)
        cursor.execute("RESET client_min_messages")
    dbapi_connection.commit()
    connection_record.info[_STAGED] = True


def _ensure_staging(conn: Connection) -> None:
    """Connections of an engine that ``make_engine`` did not make create the tables in the current
    transaction (each time: a rolled-back transaction takes them away again)."""
    if not conn.connection.info.get(_STAGED):
        conn.exec_driver_sql(_STAGE_DDL)


def _copy_rows(conn: Connection, statement: str, rows: Iterable[Sequence[Any]]) -> None:
    """COPY ``rows`` into a staging table on the connection's own database session, inside its transaction.
    The driver's errors come out as SQLAlchemy's (``DBAPIError`` and its subclasses), as from ``execute``: a
    value the database refuses (a NUL character) is a ``DataError``, a lost connection an ``OperationalError``
    that invalidates the connection."""
    import psycopg

    raw = conn.connection.driver_connection
    assert raw is not None
    try:
        with raw.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
    except (psycopg.Error, UnicodeEncodeError) as exc:
        raise _dbapi_error(conn, statement, exc) from exc


def _dbapi_error(conn: Connection, statement: str, exc: Exception) -> Exception:
    """A driver error (or the ``UnicodeEncodeError`` of text psycopg could not encode, as a ``DataError``) as
    SQLAlchemy's ``execute`` raises it: a ``DBAPIError``, the connection invalidated if it was lost."""
    import psycopg

    orig = exc if isinstance(exc, psycopg.Error) else psycopg.DataError(f"unstorable text: {exc}")
    invalidated = conn.dialect.is_disconnect(cast(Any, orig), conn.connection.dbapi_connection, None)
    if invalidated:
        conn.invalidate(orig)
    return DBAPIError.instance(statement, None, orig, psycopg.Error, connection_invalidated=invalidated,
                               dialect=conn.dialect)


def _json(value: Any) -> str | None:
    """JSON text for a JSONB column; None stays SQL NULL (not the JSON value null)."""
    return None if value is None else json.dumps(value)


_VERDICT_COLUMNS: Final = ", ".join(_VERDICT_ROW_FIELDS)
_COPY_VERDICTS: Final = f"COPY {STAGE_VERDICTS} (ord, {_VERDICT_COLUMNS}) FROM STDIN"
# DELETE ... RETURNING empties the staging table as it reads it, so a second call in one transaction starts
# from an empty one; the rows go in in staging order (key order), and the rows returned are the rows new.
_INSERT_VERDICTS: Final = text(
    f"WITH batch AS (DELETE FROM {STAGE_VERDICTS} RETURNING *) "
    f"INSERT INTO verdicts ({_VERDICT_COLUMNS}) SELECT {_VERDICT_COLUMNS} FROM batch ORDER BY ord "
    f"ON CONFLICT (sha256, model_version) DO NOTHING RETURNING id, sha256, model_version")
_JSON_FIELDS: Final = tuple(name for name in _VERDICT_ROW_FIELDS if isinstance(verdicts.c[name].type, JSONB))


def _text_or_none(value: str | None) -> str | None:
    return None if value is None else str(value)  # an enum member as its value


def verdict_copy_values(row: VerdictRow) -> tuple[Any, ...]:
    """Every field of ``VerdictRow``, in its order (``_VERDICT_COLUMNS``), as ``COPY`` writes it: JSON as text,
    enums as their values."""
    return (row.sha256, row.model_version, row.score, str(row.label), row.threshold, row.source,
            row.external_id, _json(row.metadata), row.width, row.height, row.format, row.patch_mean, row.patch_max,
            row.patch_p90, row.patch_frac_above, row.top_patch_row, row.top_patch_col, row.patch_grid,
            row.grid_rows, row.grid_cols, _json(row.timings_ms), _json(row.provenance), str(row.decision),
            _text_or_none(row.provenance_kind), row.declared_generator, _text_or_none(row.c2pa_state),
            row.c2pa_signer, row.frames)


def _verdict_record(ord_: int, row: VerdictRow) -> tuple[Any, ...]:
    """The staging row of a verdict: ``ord``, then ``verdict_copy_values``."""
    return (ord_, *verdict_copy_values(row))


# ------------------------------------------------------------------------- direct COPY, staging as fallback
#
# A batch's verdicts, then its submissions, go by binary COPY straight into their tables, each COPY in a
# savepoint: one pass over the rows, where staging them and moving them by INSERT ... SELECT took two (most of a
# batch write's time; benchmarks/storage_bench.py). COPY checks what INSERT checks: unique indexes, CHECK
# constraints, foreign keys, and the statement triggers (revision 0003's model-version check) fire as for INSERT.
#
# A row already stored (a redelivered job, a rescan racing a submit, two workers writing the same content) fails
# the COPY with a unique violation. That is rare, since the pipeline answers content judged before from its
# stored verdict without decoding it again; the savepoint is then rolled back, leaving the transaction as it was,
# and the same rows take the staging path above (INSERT ... ON CONFLICT DO NOTHING). Rows go in key order either
# way, and a COPY that meets another transaction's uncommitted row waits for it as an INSERT would. Binary COPY
# does not carry every value as the text COPY of the staging path does (psycopg wraps an integer too large for a
# smallint or integer column; a naive datetime has no binary timestamptz): such a batch takes the staging path
# too, where the server judges the value as before.
#
# Verdict ids are drawn from the identity sequence before the COPY (COPY writes the ids it is given, to a
# GENERATED ALWAYS column too), so that the transaction's submissions name their verdicts without looking them
# up (``_written_ids``). Ids drawn for a COPY that is rolled back are never used: gaps, as a rolled-back INSERT
# leaves.

_SAVEPOINT: Final = "ppl_direct_copy"
_WRITTEN: Final = "ppl_written_ids"  # key in a pooled connection's info: ids written by its transaction
# One round trip: the savepoint, and the ids (the sequence looked up once, not for each row).
_NEXT_VERDICT_IDS: Final = (f"SAVEPOINT {_SAVEPOINT}; "
                            "SELECT nextval((SELECT pg_get_serial_sequence('verdicts', 'id')::regclass)) "
                            "FROM generate_series(1, {count:d})")
_DIRECT_VERDICT_COLUMNS: Final = ("id", *_VERDICT_ROW_FIELDS)
_DIRECT_COPY_VERDICTS: Final = f"COPY verdicts ({', '.join(_DIRECT_VERDICT_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
_DIRECT_VERDICT_TYPES: Final = tuple(_column_type(verdicts, name).lower() for name in _DIRECT_VERDICT_COLUMNS)
# psycopg's binary dumpers wrap an int too large for a smallint or integer column, where the server refuses it.
_INT_BOUNDS: Final = {"smallint": 2**15, "integer": 2**31}
_DIRECT_VERDICT_INTS: Final = tuple((index, _INT_BOUNDS[kind]) for index, kind in enumerate(_DIRECT_VERDICT_TYPES)
                                    if kind in _INT_BOUNDS)


@dataclass
class _WrittenIds:
    """The ids of the verdicts and failures one transaction wrote, by natural key."""

    transaction: weakref.ref[Transaction]
    verdicts: dict[tuple[str, str], int]  # (sha256, model version) -> verdicts.id
    failures: dict[tuple[str, str], int]  # (source sha256, reason) -> detection_failures.id


def _written_ids(conn: Connection) -> _WrittenIds:
    """The ids the connection's current transaction has written, kept in the connection's info until another
    transaction asks. The transaction is begun here if it was not: the direct COPY goes past SQLAlchemy, which
    would otherwise neither know of it nor commit it. An id whose row a rolled-back savepoint took away makes its
    submissions' COPY fail a foreign key, and the staging path then looks the answer up by its key."""
    current = conn.get_transaction()
    if current is None:
        current = conn.begin()
    info = conn.connection.info
    written = info.get(_WRITTEN)
    if written is None or written.transaction() is not current:
        written = info[_WRITTEN] = _WrittenIds(weakref.ref(current), {}, {})
    return cast(_WrittenIds, written)


@functools.cache
def _jsonb_text_dumper() -> type:
    """A psycopg dumper of JSON text (``_json``'s, as the staging path sends it) as binary jsonb, used by the
    direct COPY (``Copy.set_types``): the format's version byte, then the text."""
    from psycopg import adapt, postgres, pq

    class JsonbTextBinaryDumper(adapt.Dumper):
        format = pq.Format.BINARY
        oid = postgres.types["jsonb"].oid

        def dump(self, obj: str) -> bytes:
            return b"\x01" + obj.encode()

    return JsonbTextBinaryDumper


def _copy_direct(conn: Connection, prologue: str, statement: str, types: Sequence[str],
                 records: Callable[[list[Any]], Iterable[Sequence[Any]]],
                 retry_on: tuple[type[Exception], ...]) -> bool:
    """In a savepoint, COPY (binary, ``statement`` of ``types``) ``records(rows)``, given the rows the
    ``prologue`` returns (it starts with the SAVEPOINT, in the same round trip); the savepoint is released.

    False when the savepoint was rolled back: the COPY met a ``retry_on`` error (a row already stored), or a value
    binary COPY does not carry as the staging path's text does (``records`` raises ValueError for one it knows).
    The transaction is then as before the call, and the caller writes the rows by the staging path. Any other
    error is raised as ``_copy_rows`` raises it (a ``DBAPIError``; the transaction is left failed)."""
    import psycopg

    raw = conn.connection.driver_connection
    assert raw is not None
    try:
        with raw.cursor() as cursor:
            cursor.execute(prologue)
            fetched: list[Any] = []
            if cursor.nextset():
                fetched = cursor.fetchall()
            cursor.adapters.register_dumper(None, _jsonb_text_dumper())
            with cursor.copy(statement) as copy:
                copy.set_types(list(types))
                for record in records(fetched):
                    copy.write_row(record)
            cursor.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")
        return True
    except psycopg.Error as exc:
        if not isinstance(exc, retry_on):
            raise _dbapi_error(conn, statement, exc) from exc
    except UnicodeEncodeError as exc:  # unstorable text: the staging path would refuse it as well
        raise _dbapi_error(conn, statement, exc) from exc
    except (TypeError, ValueError, OverflowError):
        pass  # a value binary COPY does not carry as text COPY does: the staging path lets the server judge it
    try:
        raw.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}; RELEASE SAVEPOINT {_SAVEPOINT}")
    except psycopg.Error as exc:
        raise _dbapi_error(conn, f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}", exc) from exc
    return False


def _direct_verdict_record(id_: int, row: VerdictRow) -> tuple[Any, ...]:
    """The direct COPY's row of a verdict: its id, then ``verdict_copy_values``. ValueError for an integer its
    column cannot hold (the server refuses it on the staging path; binary COPY would store it wrapped)."""
    record = (id_, *verdict_copy_values(row))
    for index, bound in _DIRECT_VERDICT_INTS:
        value = record[index]
        if value is not None and not -bound <= value < bound:
            raise ValueError(f"{_DIRECT_VERDICT_COLUMNS[index]} {value} is out of its column's range")
    return record


def _copy_verdicts_direct(conn: Connection, keys: Sequence[tuple[str, str]],
                          unique: Mapping[tuple[str, str], VerdictRow]) -> list[int] | None:
    """The verdicts of ``keys`` (in that order) by direct COPY, with ids drawn from the sequence: their ids,
    or None when the savepoint was rolled back (``_copy_direct``)."""
    from psycopg.errors import InsufficientPrivilege, UniqueViolation

    ids: list[int] = []

    def records(fetched: list[Any]) -> Iterator[tuple[Any, ...]]:
        ids.extend(row[0] for row in fetched)
        for id_, key in zip(ids, keys, strict=True):
            yield _direct_verdict_record(id_, unique[key])

    # A role without USAGE on the sequence (docs/OPERATIONS.md asks for it) cannot draw ids: it still writes, by
    # the staging path, rather than failing every batch.
    written = _copy_direct(conn, _NEXT_VERDICT_IDS.format(count=len(keys)), _DIRECT_COPY_VERDICTS,
                           _DIRECT_VERDICT_TYPES, records, (UniqueViolation, InsufficientPrivilege))
    return ids if written else None


def upsert_verdicts(bind: Bind, rows: Sequence[VerdictRow]) -> int:
    """Insert verdicts, skipping those already stored: by direct COPY, or where a row is already stored (a
    redelivered job, a rescan racing a submit) by ``INSERT ... ON CONFLICT (sha256, model_version) DO NOTHING``
    from the staging table (see above); never an error for a stored row. Returns how many rows were new. Within
    one call the first row of a key wins.

    Rows go in key order: two workers inserting overlapping batches then take the unique-index entries in the
    same order, so one waits for the other instead of both deadlocking.
    """
    unique: dict[tuple[str, str], VerdictRow] = {}
    for row in rows:
        unique.setdefault((row.sha256, row.model_version), row)
    if not unique:
        return 0
    keys = sorted(unique)
    with transaction(bind) as conn:
        written = _written_ids(conn)
        ids = _copy_verdicts_direct(conn, keys, unique)
        if ids is not None:
            written.verdicts.update(zip(keys, ids, strict=True))
            return len(keys)
        _ensure_staging(conn)
        _copy_rows(conn, _COPY_VERDICTS, (_verdict_record(i, unique[key]) for i, key in enumerate(keys)))
        new = conn.execute(_INSERT_VERDICTS).all()
        written.verdicts.update(((row.sha256, row.model_version), row.id) for row in new)
        return len(new)


# The verdicts of some image contents (sha256s) by one model version: one probe each of the unique index.
_OF_CONTENTS: Final = (verdicts.c.model_version == bindparam("version"),
                       verdicts.c.sha256 == any_(bindparam("sha256s", type_=ARRAY(Text))))
_JUDGED_CONTENTS: Final = select(verdicts.c.sha256).where(*_OF_CONTENTS)
_STORED_VERDICTS: Final = select(*(verdicts.c[name] for name in _VERDICT_ROW_FIELDS)).where(*_OF_CONTENTS)


def judged_contents(bind: Bind, sha256s: Collection[str], model_version: str) -> set[str]:
    """Which of these image contents this model version has a stored verdict for: content judged before (under
    another URL, or by a redelivered job) is answered from it, never decoded again. Keys only: the worker
    needs no more."""
    if not sha256s:
        return set()
    with transaction(bind) as conn:
        return set(conn.execute(_JUDGED_CONTENTS, {"version": model_version,
                                                   "sha256s": sorted(set(sha256s))}).scalars())


def find_verdicts(bind: Bind, sha256s: Collection[str], model_version: str) -> dict[str, VerdictRow]:
    """The stored verdicts of these image contents by this model version, whole, keyed by sha256."""
    if not sha256s:
        return {}
    with transaction(bind) as conn:
        return {row.sha256: VerdictRow(**row._asdict())
                for row in conn.execute(_STORED_VERDICTS, {"version": model_version, "sha256s": sorted(set(sha256s))})}


# ------------------------------------------------------------------------------------------ failures


@dataclass(frozen=True)
class FailureRow:
    """A source that could not be judged: ``reason`` is a short code (e.g. ``not_an_image``), ``detail`` the
    human-readable cause."""

    source: str
    external_id: str | None
    reason: Reason
    detail: str


def storable_text(text: str) -> str:
    """``text`` as PostgreSQL's text type can hold it: NUL characters and unpaired surrogates (both can come
    in a hostile job or HTTP response, and either would fail the whole batch's write) are backslash-escaped."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def source_sha256(source: str) -> str:
    """The key ``detection_failures`` is unique on: sha256 of the source string's UTF-8 bytes."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def record_failures(bind: Bind, rows: Sequence[FailureRow]) -> None:
    """Record failures in one multi-row upsert on (source, reason): a repeat adds to ``attempts``, moves
    ``last_seen`` and keeps the newest detail and external id (an older one when the new one is missing).
    Repeats inside one call are merged first, their attempts summed; rows go in key order (see
    ``upsert_verdicts`` on deadlocks)."""
    merged: dict[tuple[str, str], tuple[FailureRow, int]] = {}
    for row in rows:
        row = FailureRow(storable_text(row.source), None if row.external_id is None else storable_text(row.external_id),
                         row.reason, storable_text(row.detail))
        key = (source_sha256(row.source), row.reason)
        previous = merged.get(key)
        if previous is None:
            merged[key] = (row, 1)
        else:
            external_id = row.external_id if row.external_id is not None else previous[0].external_id
            merged[key] = (FailureRow(row.source, external_id, row.reason, row.detail), previous[1] + 1)
    if not merged:
        return
    values = [{"source": row.source, "source_sha256": key[0], "external_id": row.external_id, "reason": row.reason,
               "detail": row.detail[:MAX_FAILURE_DETAIL_CHARS], "attempts": attempts}
              for key, (row, attempts) in sorted(merged.items())]
    with transaction(bind) as conn:
        written = _written_ids(conn).failures  # for the transaction's submissions (record_submissions)
        for chunk in _chunks(values, _rows_per_statement(len(values[0]))):
            statement = pg_insert(detection_failures).values(list(chunk))
            statement = statement.on_conflict_do_update(
                index_elements=["source_sha256", "reason"],
                set_={"attempts": detection_failures.c.attempts + statement.excluded.attempts,
                      "last_seen": func.now(),
                      "detail": statement.excluded.detail,
                      "external_id": func.coalesce(statement.excluded.external_id, detection_failures.c.external_id)})
            returning = statement.returning(detection_failures.c.id, detection_failures.c.source_sha256,
                                            detection_failures.c.reason)
            written.update(((row.source_sha256, row.reason), row.id) for row in conn.execute(returning))


# --------------------------------------------------------------------------------------- submissions


@dataclass(frozen=True)
class SubmissionRow:
    """One answered job. Exactly one of ``verdict`` (the (sha256, model version) key of the verdict that
    answers it, new or stored) and ``failure`` (the failure row recorded for it in the same transaction)."""

    task_id: str | None
    external_id: str | None
    source: str
    metadata: dict[str, Any] | None
    received_at: datetime
    verdict: tuple[str, str] | None = None
    failure: FailureRow | None = None

    def __post_init__(self) -> None:
        if (self.verdict is None) == (self.failure is None):
            raise ValueError("a submission is answered by exactly one verdict or one failure")


# The answer's id is looked up by its natural key in the same statement: the verdict by (sha256, model
# version), the failure by (source hash, reason), both written earlier in the caller's transaction. Scalar
# subqueries, so each is one probe of the unique index: the staging table has no statistics, and with joins
# the planner hashed the whole verdicts table for every batch.
_COPY_SUBMISSIONS: Final = f"COPY {STAGE_SUBMISSIONS} (ord, {', '.join(_SUBMISSION_COLUMNS)}) FROM STDIN"
_INSERT_SUBMISSIONS: Final = text(
    f"WITH t AS (DELETE FROM {STAGE_SUBMISSIONS} RETURNING *) "
    "INSERT INTO submissions (task_id, external_id, source, metadata, received_at, outcome, verdict_id, failure_id) "
    "SELECT t.task_id, t.external_id, t.source, t.metadata, t.received_at, t.outcome, "
    "(SELECT v.id FROM verdicts v WHERE v.sha256 = t.sha256 AND v.model_version = t.model_version), "
    "(SELECT f.id FROM detection_failures f WHERE f.source_sha256 = t.failure_key AND f.reason = t.failure_reason) "
    "FROM t ORDER BY t.ord "
    "ON CONFLICT (task_id) WHERE task_id IS NOT NULL DO NOTHING")


def _submission_values(row: SubmissionRow) -> tuple[Any, ...]:
    """task_id, external_id, source, metadata, received_at, outcome as both paths send them: text made
    storable, JSON as text."""
    return (None if row.task_id is None else storable_text(row.task_id),
            None if row.external_id is None else storable_text(row.external_id), storable_text(row.source),
            _json(row.metadata), row.received_at, "verdict" if row.failure is None else "failure")


def _answer_key(row: SubmissionRow) -> tuple[str, str]:
    """The key the answer was written under: the verdict's (sha256, model version), or the failure's (source
    hash, reason) as ``record_failures`` wrote it (its source escaped as stored)."""
    if row.failure is not None:
        return source_sha256(storable_text(row.failure.source)), str(row.failure.reason)
    assert row.verdict is not None
    sha256, model_version = row.verdict
    return sha256, model_version


def _submission_record(ord_: int, row: SubmissionRow) -> tuple[Any, ...]:
    """The staging row of a submission: ``ord``, ``_submission_values``, then the verdict's key and the
    failure's key (the other's None)."""
    key = _answer_key(row)
    return (ord_, *_submission_values(row), *((None, None, *key) if row.failure is not None else (*key, None, None)))


_DIRECT_SUBMISSION_COLUMNS: Final = ("task_id", "external_id", "source", "metadata", "received_at", "outcome",
                                     "verdict_id", "failure_id")
_DIRECT_COPY_SUBMISSIONS: Final = (f"COPY submissions ({', '.join(_DIRECT_SUBMISSION_COLUMNS)}) "
                                   "FROM STDIN (FORMAT BINARY)")
_DIRECT_SUBMISSION_TYPES: Final = tuple(_column_type(submissions, name).lower()
                                        for name in _DIRECT_SUBMISSION_COLUMNS)
# The ids of answers the transaction did not write itself (jobs answered by stored verdicts), in the savepoint's
# round trip: one unique-index probe each, as in _INSERT_SUBMISSIONS. The keys are inlined as quoted literals
# (the savepoint and the query go in one simple-protocol message, which takes no parameters).
_LOOKUP_ANSWERS: Final = (
    "SAVEPOINT " + _SAVEPOINT + "; "
    "SELECT CASE WHEN k.verdict "
    "THEN (SELECT v.id FROM verdicts v WHERE v.sha256 = k.a AND v.model_version = k.b) "
    "ELSE (SELECT f.id FROM detection_failures f WHERE f.source_sha256 = k.a AND f.reason = k.b) END "
    "FROM unnest({verdict}::boolean[], {a}::text[], {b}::text[]) WITH ORDINALITY AS k(verdict, a, b, ord) "
    "ORDER BY k.ord")


def _copy_submissions_direct(conn: Connection, rows: Sequence[SubmissionRow], written: _WrittenIds) -> int | None:
    """The submissions by direct COPY (within the call, the first row of a task id wins), their answers' ids
    from ``written`` or looked up by key: how many rows were written, or None when the savepoint was rolled back
    (``_copy_direct``: a task id already stored, an answer id no longer there, or an answer not in the database,
    which the staging path refuses as before)."""
    from psycopg import sql
    from psycopg.errors import ForeignKeyViolation, UniqueViolation

    stored: list[tuple[tuple[Any, ...], bool, tuple[str, str]]] = []
    task_ids: set[str] = set()
    for row in rows:
        values = _submission_values(row)
        if values[0] is not None:
            if values[0] in task_ids:
                continue
            task_ids.add(values[0])
        stored.append((values, row.failure is None, _answer_key(row)))
    missing = sorted({(is_verdict, key) for _, is_verdict, key in stored
                      if key not in (written.verdicts if is_verdict else written.failures)})
    prologue = f"SAVEPOINT {_SAVEPOINT}"
    if missing:
        raw = conn.connection.driver_connection
        assert raw is not None
        prologue = sql.SQL(_LOOKUP_ANSWERS).format(
            verdict=sql.Literal([is_verdict for is_verdict, _ in missing]),
            a=sql.Literal([key[0] for _, key in missing]),
            b=sql.Literal([key[1] for _, key in missing])).as_string(raw)

    def records(fetched: list[Any]) -> Iterator[tuple[Any, ...]]:
        found = {answer: row[0] for answer, row in zip(missing, fetched, strict=True)}
        for values, is_verdict, key in stored:
            answer_id = (written.verdicts if is_verdict else written.failures).get(key)
            if answer_id is None:
                answer_id = found[(is_verdict, key)]
            if answer_id is None:
                raise ValueError("a submission's answer is not in the database")
            yield (*values, answer_id, None) if is_verdict else (*values, None, answer_id)

    if _copy_direct(conn, prologue, _DIRECT_COPY_SUBMISSIONS, _DIRECT_SUBMISSION_TYPES, records,
                    (UniqueViolation, ForeignKeyViolation)):
        return len(stored)
    return None


def record_submissions(bind: Bind, rows: Sequence[SubmissionRow]) -> int:
    """Insert one submission per answered job, after its verdict or failure row is written (in the same
    transaction, so a job never has one without the other): by direct COPY, or where a task id is already
    stored by ``INSERT ... ON CONFLICT (task_id) DO NOTHING`` from the staging table, as ``upsert_verdicts``
    does. A redelivered job (same task id) is not recorded twice; within one call the first row of a task id
    wins. Returns how many rows were new."""
    if not rows:
        return 0
    with transaction(bind) as conn:
        written = _copy_submissions_direct(conn, rows, _written_ids(conn))
        if written is not None:
            return written
        _ensure_staging(conn)
        _copy_rows(conn, _COPY_SUBMISSIONS, (_submission_record(i, row) for i, row in enumerate(rows)))
        return int(conn.execute(_INSERT_SUBMISSIONS).rowcount)


class SubmissionAnswer(TypedDict):
    """A row of ``find_submissions``: the job, and the verdict or the failure that answered it (the other's
    columns are None). ``label`` and ``reason`` are as stored: the values of ``Label`` and ``Reason``."""

    submission_id: int
    task_id: str | None
    external_id: str | None
    source: str
    metadata: dict[str, Any] | None
    received_at: datetime
    answered_at: datetime
    outcome: str
    label: str | None
    score: float | None
    threshold: float | None
    model_version: str | None
    sha256: str | None
    patch_max: float | None
    patch_frac_above: float | None
    reason: str | None
    detail: str | None


def find_submissions(bind: Bind, *, task_ids: Collection[str] = (), external_ids: Collection[str] = (),
                     limit: int = 100) -> list[SubmissionAnswer]:
    """Jobs by task id or external id, newest first, each with the verdict or failure that answered it
    (``ppl-worker verdicts --task-id/--external-id``)."""
    if not task_ids and not external_ids:
        return []
    s, v, f = submissions.alias("s"), verdicts.alias("v"), detection_failures.alias("f")
    conditions = []
    if task_ids:
        conditions.append(s.c.task_id == any_(bindparam("task_ids", sorted(set(task_ids)), type_=ARRAY(Text))))
    if external_ids:
        conditions.append(s.c.external_id == any_(bindparam("external_ids", sorted(set(external_ids)),
                                                           type_=ARRAY(Text))))
    statement = (
        select(s.c.id.label("submission_id"), s.c.task_id, s.c.external_id, s.c.source, s.c.metadata,
               s.c.received_at, s.c.answered_at, s.c.outcome, v.c.label, v.c.score, v.c.threshold, v.c.model_version,
               v.c.sha256, v.c.patch_max, v.c.patch_frac_above, f.c.reason, f.c.detail)
        .select_from(s.outerjoin(v, v.c.id == s.c.verdict_id).outerjoin(f, f.c.id == s.c.failure_id))
        .where(or_(*conditions)).order_by(s.c.answered_at.desc(), s.c.id.desc()).limit(limit))
    with transaction(bind) as conn:  # the select above names exactly SubmissionAnswer's keys (a test checks)
        return [cast(SubmissionAnswer, dict(row._mapping)) for row in conn.execute(statement)]


# ------------------------------------------------------------------------------------ model versions


def register_model_version(bind: Bind, version_id: str, architecture: Mapping[str, Any], threshold: float,
                           metrics: Mapping[str, Any] | None = None, activate: bool = True) -> None:
    """Insert or refresh a model version (a recalibrated threshold keeps the version id). With ``activate`` it
    becomes the one active version and every other is deactivated in the same transaction; without, an
    existing row keeps its active flag and a new one starts inactive.

    An advisory lock serialises registrations, so two workers activating different versions at once end with
    the later one active instead of one of them failing on the one-active index.
    """
    with transaction(bind) as conn:
        conn.execute(select(func.pg_advisory_xact_lock(MODEL_VERSION_LOCK_ID)))
        if activate:
            conn.execute(update(model_versions)
                         .where(model_versions.c.active, model_versions.c.id != version_id)
                         .values(active=False))
        statement = pg_insert(model_versions).values(id=version_id, architecture=dict(architecture),
                                                     threshold=float(threshold), metrics=dict(metrics or {}),
                                                     active=activate)
        refreshed: dict[str, Any] = {"architecture": statement.excluded.architecture,
                                     "threshold": statement.excluded.threshold,
                                     "metrics": statement.excluded.metrics}
        if activate:
            refreshed["active"] = True
        conn.execute(statement.on_conflict_do_update(index_elements=["id"], set_=refreshed))


def active_model_version(bind: Bind) -> str | None:
    """The id of the active model version, None when none is."""
    with transaction(bind) as conn:
        return conn.execute(select(model_versions.c.id).where(model_versions.c.active)).scalar_one_or_none()


# ------------------------------------------------------------------------------------------- rescans


def _require_time_zone(what: str, value: datetime | None) -> None:
    """A naive time would be read in the database session's time zone, silently shifting the window."""
    if value is not None and value.utcoffset() is None:
        raise ValueError(f"{what}={value.isoformat()} needs a time zone (e.g. datetime(..., tzinfo=UTC))")


@dataclass(frozen=True)
class RescanFilters:
    """Which images a rescan re-judges; every filter applies to an image's latest verdict.

    stale_only: only images with no verdict yet from the target version (the usual rescan after an upgrade);
        False re-enqueues every image matching the other filters.
    since, until: the latest verdict's created_at in [since, until); timezone-aware.
    label: "real" or "fake". min_score, max_score: score in [min_score, max_score].
    """

    stale_only: bool = True
    since: datetime | None = None
    until: datetime | None = None
    label: Label | None = None
    min_score: float | None = None
    max_score: float | None = None

    def __post_init__(self) -> None:
        _require_time_zone("rescan filter since", self.since)
        _require_time_zone("rescan filter until", self.until)
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError(f"rescan filter since={self.since.isoformat()} is not before "
                             f"until={self.until.isoformat()}")
        if self.label is not None and self.label not in LABELS:
            raise ValueError(f"rescan filter label must be one of {', '.join(LABELS)}, got {self.label!r}")
        if self.label is not None:  # from JSON or a caller's string: the member, so to_json writes its value
            object.__setattr__(self, "label", Label(self.label))
        for name in ("min_score", "max_score"):
            value = getattr(self, name)
            if value is not None and not (0.0 <= value <= 1.0):
                raise ValueError(f"rescan filter {name} must lie in [0, 1], got {value}")
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise ValueError(f"rescan filter min_score={self.min_score} exceeds max_score={self.max_score}")

    def to_json(self) -> dict[str, Any]:
        """A canonical JSON object (times in UTC), so equal filters compare equal as JSONB."""
        return {"stale_only": self.stale_only,
                "since": self.since.astimezone(UTC).isoformat() if self.since else None,
                "until": self.until.astimezone(UTC).isoformat() if self.until else None,
                "label": self.label, "min_score": self.min_score, "max_score": self.max_score}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RescanFilters:
        def when(key: str) -> datetime | None:
            return datetime.fromisoformat(data[key]) if data.get(key) else None

        def score(key: str) -> float | None:
            return float(data[key]) if data.get(key) is not None else None

        return cls(stale_only=bool(data.get("stale_only", True)), since=when("since"), until=when("until"),
                   label=data.get("label"), min_score=score("min_score"), max_score=score("max_score"))


def _rescan_conditions(filters: RescanFilters, target_model_version: str, up_to_id: int | None,
                       candidate: NamedFromClause) -> list[ColumnElement[bool]]:
    """WHERE clauses selecting, per image, its latest verdict row when it matches the filters.

    Written as an anti-join so each candidate row costs one probe of the (sha256, model_version) unique index,
    and the caller's keyset on ``id`` walks the primary key: the work per page is proportional to the rows it
    reads, never to the table. Measured on 202,500 verdicts (125,000 images, 62,500 stale): a 1,000-row page in
    10-20 ms, all 63 pages in 1.2 s; selecting from the DISTINCT ON view instead sorts the whole table for every
    page (310 ms a page, spilling to disk), a ``max(id)`` subquery form misleads the planner's estimates into
    JIT compilation (120 ms a page).
    """
    v = candidate
    other = verdicts.alias("other")
    # A candidate is excluded by another verdict of the same image that is newer or, for a stale-only rescan,
    # by the target version: one test over the image's few index entries, so one probe (two separate tests
    # cost twice the index descents, half of a page's server time). The test is a correlated scalar subquery,
    # not NOT EXISTS: the planner turns NOT EXISTS into an anti-join whose inner side it may scan whole and
    # materialise for every page (it did, for a target version with no verdicts yet: a sequential scan of the
    # table per page).
    excluded = tuple_(other.c.created_at, other.c.id) > tuple_(v.c.created_at, v.c.id)
    conditions: list[ColumnElement[bool]] = []
    if filters.stale_only:
        excluded = or_(other.c.model_version == target_model_version, excluded)
        conditions.append(v.c.model_version != target_model_version)  # implied by the probe; cheap to test first
    conditions.append(select(literal(1)).where(other.c.sha256 == v.c.sha256, excluded)
                      .limit(1).scalar_subquery().is_(None))
    if up_to_id is not None:
        conditions.append(v.c.id <= up_to_id)
    if filters.since is not None:
        conditions.append(v.c.created_at >= filters.since)
    if filters.until is not None:
        conditions.append(v.c.created_at < filters.until)
    if filters.label is not None:
        conditions.append(v.c.label == filters.label)
    if filters.min_score is not None:
        conditions.append(v.c.score >= filters.min_score)
    if filters.max_score is not None:
        conditions.append(v.c.score <= filters.max_score)
    return conditions


def _no_jit(conn: Connection) -> None:
    """JIT off for the rest of this transaction: the planner cannot estimate the rescan conditions' subqueries
    and prices a page high enough to JIT-compile it, 160 ms of compilation for a 6 ms query."""
    conn.execute(text("SET LOCAL jit = off"))


# A candidate's detect_image keyword arguments as JSON text, keys in ``worker.app.detect_kwargs``'s order and
# the unset ones left out; ``metadata`` is the stored JSON's own text, so nothing is parsed and re-encoded.
_DETECT_KWARGS_JSON: Final = (
    "'{\"source\": ' || to_json(v.source)::text"
    " || CASE WHEN v.external_id IS NULL THEN '' ELSE ', \"external_id\": ' || to_json(v.external_id)::text END"
    " || CASE WHEN v.metadata IS NULL OR jsonb_typeof(v.metadata) = 'null' THEN ''"
    " ELSE ', \"metadata\": ' || v.metadata::text END || '}'")


def _check_page_size(limit: int) -> None:
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")


class RescanPages:
    """The pages of one rescan: the images to re-judge, each as its latest verdict's ``(id, keyword arguments as
    JSON)``, the part of its ``detect_image`` message that depends on the row, in id order, each page after the
    previous page's last id.

    Each image (sha256) appears once over all pages: only its latest verdict row qualifies. ``up_to_id``
    bounds the run to the verdicts that existed when it started (``RescanRun.max_verdict_id``); without it,
    a ``stale_only=False`` rescan would meet the verdicts it is itself producing.

    The server builds the keyword arguments' JSON from the row's columns, and the rescan adds the rest
    (``worker.rescan.DetectMessages``: kwargsrepr, base64 body, ids, fixed text): rendering the keyword
    arguments in Python (reading the row, JSON in and out) cost more than the page query and the push together,
    and the server does it while the rescan pushes the previous page. The rest is string work that C functions
    do faster in Python (base64 cost the server 3.6 µs a row, ``binascii`` a fraction of that). The statement
    is built once per run, with the page's start and size as parameters, so a page costs no query compilation
    in SQLAlchemy and, once the driver has prepared it, no planning on the server.
    """

    def __init__(self, filters: RescanFilters, target_model_version: str, up_to_id: int | None = None):
        v = verdicts.alias("v")
        self._statement = (select(v.c.id, literal_column(_DETECT_KWARGS_JSON, Text).label("kwargs_json"))
                           .where(v.c.id > bindparam("after_id", type_=BigInteger),
                                  *_rescan_conditions(filters, target_model_version, up_to_id, v))
                           .order_by(v.c.id)
                           .limit(bindparam("page_size", type_=Integer)))

    def page(self, bind: Bind, after_id: int, limit: int) -> list[tuple[int, str]]:
        """The next ``limit`` candidates after verdict id ``after_id``, in id order."""
        _check_page_size(limit)
        with transaction(bind) as conn:
            _no_jit(conn)
            return self._fetch(conn, after_id, limit)

    @contextmanager
    def reader(self, engine: Engine) -> Iterator[Callable[[int, int], list[tuple[int, str]]]]:
        """``page`` over one connection held for the whole rescan, each page a statement of its own in autocommit
        with JIT off for the session: one round trip a page, where ``page`` on an engine also pays the pool's
        check, BEGIN, ``SET LOCAL jit`` and the rollback. No snapshot is held between pages."""
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("SET jit = off")
            try:
                yield functools.partial(self._fetch, conn)
            except BaseException:
                conn.invalidate()  # closed, not pooled with the session's setting (nor reset over a broken link)
                raise
            conn.exec_driver_sql("RESET jit")  # the connection goes back to the pool as it came

    def _fetch(self, conn: Connection, after_id: int, limit: int) -> list[tuple[int, str]]:
        _check_page_size(limit)
        result = conn.execute(self._statement, {"after_id": after_id, "page_size": limit})
        return [tuple(row) for row in result.cursor.fetchall()]


def count_rescan_candidates(bind: Bind, filters: RescanFilters, target_model_version: str, after_id: int = 0,
                            up_to_id: int | None = None) -> int:
    """How many images ``RescanPages`` would return over all pages after ``after_id`` (a progress
    total; one pass over the table, so call it once per run, not per page)."""
    v = verdicts.alias("v")
    statement = (select(func.count())
                 .select_from(v)
                 .where(v.c.id > after_id, *_rescan_conditions(filters, target_model_version, up_to_id, v)))
    with transaction(bind) as conn:
        _no_jit(conn)
        return int(conn.execute(statement).scalar_one())


@dataclass(frozen=True)
class RescanRun:
    """One row of ``rescan_runs``, its filters parsed back."""

    id: int
    filters: RescanFilters
    target_model_version: str
    cursor: int  # id of the last verdict row enqueued; the next page starts after it
    max_verdict_id: int
    enqueued: int
    total: int | None
    status: str
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None


def _rescan_run(row: Any) -> RescanRun:
    values = row._asdict()
    values["filters"] = RescanFilters.from_json(values["filters"])
    return RescanRun(**values)


def create_rescan_run(bind: Bind, filters: RescanFilters, target_model_version: str,
                      total: int | None = None) -> RescanRun:
    """Start a rescan run at cursor 0, bounded to the verdicts that exist now (``max_verdict_id``)."""
    statement = (pg_insert(rescan_runs)
                 .values(filters=filters.to_json(), target_model_version=target_model_version, total=total,
                         status="running",
                         max_verdict_id=select(func.coalesce(func.max(verdicts.c.id), 0)).scalar_subquery())
                 .returning(*rescan_runs.c))
    with transaction(bind) as conn:
        return _rescan_run(conn.execute(statement).one())


def update_rescan_run(bind: Bind, run_id: int, cursor: int, enqueued: int, status: str, *,
                      total: int | None = None) -> None:
    """Record progress (``enqueued`` is the run's running total, not an increment, so a retried update is
    harmless); a ``done`` or ``failed`` status also stamps ``finished_at``."""
    if status not in RESCAN_STATUSES:
        raise ValueError(f"rescan status must be one of {', '.join(RESCAN_STATUSES)}, got {status!r}")
    values: dict[str, Any] = {"cursor": cursor, "enqueued": enqueued, "status": status, "updated_at": func.now(),
                              "finished_at": func.now() if status in FINISHED_STATUSES else None}
    if total is not None:
        values["total"] = total
    with transaction(bind) as conn:
        result = conn.execute(update(rescan_runs).where(rescan_runs.c.id == run_id).values(values))
        if result.rowcount != 1:
            raise LookupError(f"no rescan run with id {run_id}")


def get_rescan_run(bind: Bind, run_id: int) -> RescanRun | None:
    """The run with this id, None when there is none."""
    with transaction(bind) as conn:
        row = conn.execute(select(rescan_runs).where(rescan_runs.c.id == run_id)).one_or_none()
    return None if row is None else _rescan_run(row)


def latest_unfinished_rescan_run(bind: Bind, target_model_version: str, filters: RescanFilters) -> RescanRun | None:
    """The newest running or paused run with this target and these filters: the one to resume."""
    statement = (select(rescan_runs)
                 .where(rescan_runs.c.target_model_version == target_model_version,
                        rescan_runs.c.filters == bindparam("filters", filters.to_json(), type_=JSONB),
                        rescan_runs.c.status.in_(UNFINISHED_STATUSES))
                 .order_by(rescan_runs.c.id.desc())
                 .limit(1))
    with transaction(bind) as conn:
        row = conn.execute(statement).one_or_none()
    return None if row is None else _rescan_run(row)


# ------------------------------------------------------------------------------------ reading, checks


class VerdictListing(TypedDict):
    """A row of ``query_verdicts``: every ``verdicts`` column but the patch grid bytes."""

    id: int
    sha256: str
    model_version: str
    score: float
    label: str  # a Label value, as stored
    threshold: float
    source: str
    external_id: str | None
    metadata: dict[str, Any] | None
    width: int
    height: int
    format: str
    patch_mean: float
    patch_max: float
    patch_p90: float
    patch_frac_above: float
    top_patch_row: int
    top_patch_col: int
    grid_rows: int
    grid_cols: int
    timings_ms: dict[str, float]
    created_at: datetime
    provenance: dict[str, Any] | None
    decision: str  # a Decision value
    provenance_kind: str | None  # a ProvenanceKind value; None for rows written before revision 0004
    declared_generator: str | None
    c2pa_state: str | None  # a C2paState value
    c2pa_signer: str | None
    frames: int | None


def query_verdicts(bind: Bind, *, flagged_only: bool, since: datetime | None, limit: int,
                   decision: Decision | None = None, provenance_kind: ProvenanceKind | None = None,
                   generator: str | None = None) -> list[VerdictListing]:
    """Latest verdicts, newest first (what ``ppl-worker verdicts`` prints): every column but the patch grid
    bytes (see ``find_verdicts`` and ``dequantise_patch_grid`` for those). ``decision``, ``provenance_kind``
    and ``generator`` (the declared generator, exactly) keep the latest verdicts that match.

    Same rows as ``latest_verdicts``, but written as "no newer row for this image" so it walks the
    created_at index backwards and stops after ``limit`` rows; the view would sort the whole table first.
    """
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    _require_time_zone("since", since)
    v = verdicts.alias("v")
    newer = verdicts.alias("newer")
    conditions: list[ColumnElement[bool]] = [
        ~exists().where(newer.c.sha256 == v.c.sha256,
                        tuple_(newer.c.created_at, newer.c.id) > tuple_(v.c.created_at, v.c.id)),
    ]
    if flagged_only:
        conditions.append(v.c.label == Label.FAKE)
    if since is not None:
        conditions.append(v.c.created_at >= since)
    if decision is not None:
        conditions.append(v.c.decision == Decision(decision).value)
    if provenance_kind is not None:
        conditions.append(v.c.provenance_kind == ProvenanceKind(provenance_kind).value)
    if generator is not None:
        conditions.append(v.c.declared_generator == generator)
    columns = [v.c[name] for name in VerdictListing.__annotations__]
    statement = select(*columns).where(and_(*conditions)).order_by(v.c.created_at.desc(), v.c.id.desc()).limit(limit)
    with transaction(bind) as conn:
        return [cast(VerdictListing, dict(row._mapping)) for row in conn.execute(statement)]


def answered_sources(bind: Bind, sources: Collection[str], model_version: str) -> set[str]:
    """The sources that have a verdict from ``model_version`` or a recorded failure (``submit --wait``).

    A verdict row keeps the source that first brought its content, so a source whose content had already been
    judged under another name is not found here; ``find_verdicts`` by content hash answers for those.
    """
    if not sources:
        return set()
    unique = sorted(set(sources))
    judged = select(verdicts.c.source).where(
        verdicts.c.model_version == model_version,
        verdicts.c.source == any_(bindparam("sources", unique, type_=ARRAY(Text))))
    failed = select(detection_failures.c.source).where(
        detection_failures.c.source_sha256 == any_(bindparam("hashes", [source_sha256(s) for s in unique],
                                                              type_=ARRAY(Text))))
    with transaction(bind) as conn:
        return set(conn.execute(judged.union(failed)).scalars())


def count_rows(bind: Bind) -> dict[str, int]:
    """Row counts of the worker's tables (exact: a full scan of verdicts, meant for tests and `doctor`)."""
    counts = {"verdicts": verdicts, "failures": detection_failures, "model_versions": model_versions,
              "rescan_runs": rescan_runs, "submissions": submissions}
    statement = select(*(select(func.count()).select_from(table).scalar_subquery().label(name)
                         for name, table in counts.items()))
    with transaction(bind) as conn:
        return {name: int(value) for name, value in conn.execute(statement).one()._mapping.items()}
