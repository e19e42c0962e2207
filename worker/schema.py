"""The worker's tables as SQLAlchemy models: what ``alembic check`` compares with the migrations, and what the
queries in ``worker.db`` are written against.

The models describe the schema for readers and tools; the schema itself is created only by the hand-written
Alembic revisions under ``migrations/`` (``worker.database.migrate``), never by ``metadata.create_all``.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Final, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ppl_model.categories import C2paState, Decision, Label, ProvenanceKind

LABELS: Final = tuple(Label)
LABEL_FOLLOWS_DECISION: Final = ("label = CASE WHEN decision <> 'model' THEN 'fake' "
                                 "WHEN score >= threshold THEN 'fake' ELSE 'real' END")
RESCAN_STATUSES: Final = ("running", "paused", "done", "failed")


def _hex64(column: str) -> str:
    """64 lower-case hex digits. Not ``~ '^[0-9a-f]{64}$'``: PostgreSQL runs that bounded repetition at 10-14 µs
    a row, a length test and a negated class in under 1 (revision 0003)."""
    return f"length({column}) = 64 AND {column} !~ '[^0-9a-f]'"


def _one_of(column: str, enum: type[StrEnum]) -> str:
    """``column IN (...)`` of an enum's values (NULL passes, as in every CHECK)."""
    return f"{column} IN ({', '.join(repr(member.value) for member in enum)})"


class Base(DeclarativeBase):
    pass


class ModelVersionRecord(Base):
    """A model the worker has judged with. The id is the model directory's version id (a content hash)."""

    __tablename__ = "model_versions"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    architecture: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    threshold: Mapped[float] = mapped_column(Double, nullable=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))

    __table_args__ = (
        CheckConstraint("threshold >= 0 AND threshold <= 1", name="ck_model_versions_threshold"),
        # At most one active version: a unique index over the rows WHERE active, all of which hold `true`.
        Index("uq_model_versions_one_active", "active", unique=True, postgresql_where=text("active")),
    )


class VerdictRecord(Base):
    """One judgement of one image content by one model version, with its patch summary and patch grid."""

    __tablename__ = "verdicts"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    sha256: Mapped[str] = mapped_column(Text, nullable=False)  # of the image bytes, not of the source
    # Must name a model_versions row: checked once per statement by a trigger (revision 0003), not by a foreign
    # key, whose per-row check and row lock on the one model version cost more than the rest of a row's write.
    model_version: Mapped[str] = mapped_column(Text, nullable=False)
    score: Mapped[float] = mapped_column(Double, nullable=False)
    label: Mapped[str] = mapped_column(Text, nullable=False)
    threshold: Mapped[float] = mapped_column(Double, nullable=False)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    external_id: Mapped[str | None] = mapped_column(Text)
    # `metadata` is reserved on declarative classes, hence the attribute name; the column is "metadata".
    # none_as_null: Python None is SQL NULL, not the JSON value null.
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB(none_as_null=True))
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    format: Mapped[str] = mapped_column(Text, nullable=False)
    # double, not real: a cached answer must round-trip to exactly what was computed (16 bytes a row).
    patch_mean: Mapped[float] = mapped_column(Double, nullable=False)
    patch_max: Mapped[float] = mapped_column(Double, nullable=False)
    patch_p90: Mapped[float] = mapped_column(Double, nullable=False)
    patch_frac_above: Mapped[float] = mapped_column(Double, nullable=False)
    top_patch_row: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    top_patch_col: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    patch_grid: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)  # row-major uint8, round(p * 255)
    grid_rows: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    grid_cols: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    timings_ms: Mapped[dict[str, float]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    # Provenance (revision 0004): the document ppl_model.provenance.Provenance.to_json() wrote (NULL: not read,
    # rows from before), what decided the label, and the few fields analysts filter on, copied out of it.
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    decision: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'model'"))
    provenance_kind: Mapped[str | None] = mapped_column(Text)  # the strongest signal; 'none' when none was found
    declared_generator: Mapped[str | None] = mapped_column(Text)
    c2pa_state: Mapped[str | None] = mapped_column(Text)  # NULL: no C2PA manifest
    c2pa_signer: Mapped[str | None] = mapped_column(Text)
    frames: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        # Idempotency key of every write, and the index behind per-image lookups (sha256 leads).
        UniqueConstraint("sha256", "model_version", name="uq_verdicts_sha256_model_version"),
        CheckConstraint(_hex64("sha256"), name="ck_verdicts_sha256"),
        CheckConstraint("label IN ('real', 'fake')", name="ck_verdicts_label"),
        CheckConstraint("score >= 0 AND score <= 1", name="ck_verdicts_score"),  # also rejects NaN
        # The label is the model's (a function of score and threshold: ppl_model.inference.verdict.make_verdict)
        # where the model decided, and fake where provenance did (ppl_model.provenance.decide; revision 0004).
        CheckConstraint(LABEL_FOLLOWS_DECISION, name="ck_verdicts_label_follows_decision"),
        CheckConstraint(_one_of("decision", Decision), name="ck_verdicts_decision"),
        CheckConstraint(_one_of("provenance_kind", ProvenanceKind), name="ck_verdicts_provenance_kind"),
        CheckConstraint(_one_of("c2pa_state", C2paState), name="ck_verdicts_c2pa_state"),
        # Only a manifest that validates decides (an invalid one is recorded, never trusted).
        CheckConstraint("decision <> 'c2pa' OR c2pa_state IN ('valid', 'trusted')", name="ck_verdicts_c2pa_decision"),
        CheckConstraint("frames >= 1", name="ck_verdicts_frames"),
        CheckConstraint("width > 0 AND height > 0", name="ck_verdicts_size"),
        CheckConstraint("grid_rows > 0 AND grid_cols > 0 AND octet_length(patch_grid) = grid_rows * grid_cols",
                        name="ck_verdicts_patch_grid"),
        Index("ix_verdicts_created_at", "created_at", "id"),
        Index("ix_verdicts_flagged_created_at", "created_at", "id", postgresql_where=text("label = 'fake'")),
        Index("ix_verdicts_external_id", "external_id", postgresql_where=text("external_id IS NOT NULL")),
        # Lookups by URL (`submit --wait`, analysts); hash, because a btree entry cannot hold a very long URL.
        Index("ix_verdicts_source", "source", postgresql_using="hash"),
        # Analysts' provenance queries (docs/queries.md) and `ppl-worker verdicts` filters. Partial: provenance
        # is rare, so the rows the model decided, with no signal, cost a predicate test and no index entry.
        Index("ix_verdicts_decision_created_at", "decision", "created_at",
              postgresql_where=text("decision <> 'model'")),
        Index("ix_verdicts_provenance_kind_created_at", "provenance_kind", "created_at",
              postgresql_where=text("provenance_kind <> 'none'")),
        Index("ix_verdicts_declared_generator_created_at", "declared_generator", "created_at",
              postgresql_where=text("declared_generator IS NOT NULL")),
    )


class DetectionFailureRecord(Base):
    """A source that could not be judged, once per (source, reason), counting how often it was seen."""

    __tablename__ = "detection_failures"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    # URLs can be longer than a btree entry allows (~2.7 kB), so the unique key is on their hash.
    source_sha256: Mapped[str] = mapped_column(Text, nullable=False)
    external_id: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    detail: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("''"))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("1"))
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())

    __table_args__ = (
        UniqueConstraint("source_sha256", "reason", name="uq_detection_failures_source_sha256_reason"),
        CheckConstraint(_hex64("source_sha256"), name="ck_detection_failures_source_sha256"),
        CheckConstraint("attempts >= 1", name="ck_detection_failures_attempts"),
        Index("ix_detection_failures_reason_last_seen", "reason", "last_seen"),
    )


class SubmissionRecord(Base):
    """One answered job: its task id, external id, metadata and source, and the verdict or failure it resolved
    to. A job for content already judged gets its own row pointing at the stored verdict."""

    __tablename__ = "submissions"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    task_id: Mapped[str | None] = mapped_column(Text)  # NULL only for rows migrated from before revision 0002
    external_id: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB(none_as_null=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    answered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    outcome: Mapped[str] = mapped_column(Text, nullable=False)
    verdict_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("verdicts.id", name="fk_submissions_verdict_id", ondelete="CASCADE"))
    failure_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("detection_failures.id", name="fk_submissions_failure_id", ondelete="CASCADE"))

    __table_args__ = (
        CheckConstraint("outcome IN ('verdict', 'failure')", name="ck_submissions_outcome"),
        CheckConstraint("(outcome = 'verdict' AND verdict_id IS NOT NULL AND failure_id IS NULL) OR "
                        "(outcome = 'failure' AND failure_id IS NOT NULL AND verdict_id IS NULL)",
                        name="ck_submissions_one_answer"),
        Index("uq_submissions_task_id", "task_id", unique=True, postgresql_where=text("task_id IS NOT NULL")),
        Index("ix_submissions_external_id", "external_id", postgresql_where=text("external_id IS NOT NULL")),
        Index("ix_submissions_answered_at", "answered_at", postgresql_using="brin"),  # grows with the table
        Index("ix_submissions_verdict_id", "verdict_id", postgresql_where=text("verdict_id IS NOT NULL")),
        Index("ix_submissions_failure_id", "failure_id", postgresql_where=text("failure_id IS NOT NULL")),
    )


class RescanRunRecord(Base):
    """Progress of one bulk rescan, so an interrupted one resumes from its keyset cursor."""

    __tablename__ = "rescan_runs"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    filters: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    target_model_version: Mapped[str] = mapped_column(
        Text, ForeignKey("model_versions.id", name="fk_rescan_runs_target_model_version"), nullable=False)
    cursor: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    # Verdicts written after the run started (ids above this) are not its candidates: many are its own output.
    max_verdict_id: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    enqueued: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    total: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'running'"))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("status IN ('running', 'paused', 'done', 'failed')", name="ck_rescan_runs_status"),
    )


metadata = Base.metadata
model_versions = cast(Table, ModelVersionRecord.__table__)
verdicts = cast(Table, VerdictRecord.__table__)
detection_failures = cast(Table, DetectionFailureRecord.__table__)
rescan_runs = cast(Table, RescanRunRecord.__table__)
submissions = cast(Table, SubmissionRecord.__table__)
