"""worker.db against a real PostgreSQL: migrations, idempotent writes, failures, model versions, rescans."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, insert, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from ppl_model.categories import C2paState, Decision, Label, ProvenanceKind
from ppl_model.inference.verdict import make_verdict
from ppl_model.provenance import C2paManifest, Provenance, Ruling, Signal
from tests.helpers import run_concurrently
from worker import db
from worker.db import FailureRow, RescanFilters, VerdictRow

OLD, OLDER, NEW = "0a0a0a0a0a0a0a0a", "0b0b0b0b0b0b0b0b", "1c1c1c1c1c1c1c1c"
TABLES = {"model_versions", "verdicts", "detection_failures", "rescan_runs", "submissions"}
T0 = datetime(2025, 3, 1, tzinfo=UTC)
MakeRow = Callable[..., VerdictRow]


def sha_of(name: str) -> str:
    """The content hash the ``verdict_row`` fixture gives image ``name``."""
    return hashlib.sha256(name.encode()).hexdigest()


def register(engine: Engine, *versions: str) -> None:
    for version in versions:
        db.register_model_version(engine, version, {"arch": "clip", "size": "large"}, 0.5, {"ap": 0.97},
                                  activate=False)


def set_created_at(engine: Engine, times: dict[tuple[str, str], datetime]) -> None:
    """Back-date verdicts: {(image name, model version): created_at}."""
    with engine.begin() as conn:
        for (name, version), when in times.items():
            conn.execute(text("UPDATE verdicts SET created_at = :t WHERE sha256 = :s AND model_version = :v"),
                         {"t": when, "s": sha_of(name), "v": version})


# The verdict columns before revision 0004 (provenance): what the code of revisions 0001-0003 wrote.
PROVENANCE_FIELDS = ("provenance", "decision", "provenance_kind", "declared_generator", "c2pa_state", "c2pa_signer",
                     "frames")
FIELDS_BEFORE_0004 = tuple(name for name in VerdictRow.__dataclass_fields__ if name not in PROVENANCE_FIELDS)


def write_as_before_0004(engine: Engine, rows: list[VerdictRow]) -> None:
    """Insert verdicts naming only the columns revisions 0001-0003 have (the worker's own write names them all)."""
    with engine.begin() as conn:
        conn.execute(insert(db.verdicts), [{name: str(value) if name == "label" else value
                                            for name in FIELDS_BEFORE_0004
                                            for value in (getattr(row, name),)} for row in rows])


def count_statements(engine: Engine) -> tuple[list[str], Callable[[], None]]:
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    return statements, lambda: event.remove(engine, "before_cursor_execute", record)


# ------------------------------------------------------------------------------------------ migrations


def test_migrations_go_up_down_and_up_again(empty_database_url: str) -> None:
    engine = db.make_engine(empty_database_url)
    try:
        with engine.connect() as conn:
            assert db.schema_revision(conn) is None
        db.migrate(empty_database_url)
        with engine.connect() as conn:
            assert db.schema_revision(conn) == db.head_revision()
            assert set(inspect(conn).get_table_names()) >= TABLES
            assert inspect(conn).get_view_names() == ["latest_verdicts"]

        command.downgrade(db.alembic_config(empty_database_url), "base")
        with engine.connect() as conn:
            assert db.schema_revision(conn) is None
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}  # Alembic's own, left empty
            assert inspect(conn).get_view_names() == []
            assert conn.execute(text("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                     "WHERE n.nspname = 'public' AND c.relname <> 'alembic_version' "
                                     "AND c.relname NOT LIKE 'alembic_version%'")).scalar_one() == 0

        db.migrate(empty_database_url)
        with engine.connect() as conn:
            assert db.schema_revision(conn) == db.head_revision()
            assert set(inspect(conn).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_models_match_the_hand_written_migration(engine: Engine) -> None:
    """What `alembic check` does: the models in worker/db.py and revision 0001 describe the same schema."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(context, db.metadata) == []


def test_migrate_is_safe_from_concurrent_processes(empty_database_url: str) -> None:
    """Every worker may migrate at start-up; the advisory lock makes the later ones no-ops, not errors.
    (Processes, not threads: Alembic's `context` is process-global.)"""
    code = "import sys; from worker.db import migrate; migrate(sys.argv[1])"
    processes = [subprocess.Popen([sys.executable, "-c", code, empty_database_url], stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], errors
    engine = db.make_engine(empty_database_url)
    try:
        with engine.connect() as conn:
            assert db.schema_revision(conn) == db.head_revision()
    finally:
        engine.dispose()


def test_revision_0002_gives_existing_verdicts_and_failures_a_submission_and_downgrades_cleanly(
        empty_database_url: str, verdict_row: MakeRow) -> None:
    config = db.alembic_config(empty_database_url)
    command.upgrade(config, "0001")
    engine = db.make_engine(empty_database_url)
    try:
        register(engine, NEW)
        rows = [verdict_row(f"old{i}", NEW) for i in range(3)]
        write_as_before_0004(engine, rows)
        with engine.begin() as conn:  # revision 0001's detection_failures, written as that code did
            conn.execute(text("INSERT INTO detection_failures (source, source_sha256, external_id, reason, detail) "
                              "VALUES ('file:///gone.png', :h, 'post-9', 'missing', '')"),
                         {"h": db.source_sha256("file:///gone.png")})
        command.upgrade(config, "0002")
        with engine.connect() as conn:
            migrated = conn.execute(text(
                "SELECT s.outcome, s.external_id, s.source, v.sha256, f.reason FROM submissions s "
                "LEFT JOIN verdicts v ON v.id = s.verdict_id LEFT JOIN detection_failures f ON f.id = s.failure_id "
                "ORDER BY s.id")).all()
        assert [tuple(r) for r in migrated] == [
            ("verdict", row.external_id, row.source, row.sha256, None) for row in rows] + [
            ("failure", "post-9", "file:///gone.png", None, "missing")]
        command.downgrade(config, "0001")
        with engine.connect() as conn:
            assert "submissions" not in inspect(conn).get_table_names()
            assert conn.execute(text("SELECT count(*) FROM verdicts")).scalar_one() == 3
    finally:
        engine.dispose()


def _schema_facts(engine: Engine) -> dict[str, Any]:
    """What revision 0003 changes: the verdicts' foreign keys and triggers, the check constraints' text and the
    indexes of verdicts and submissions with their definitions."""
    with engine.connect() as conn:
        checks = dict(conn.execute(text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conname IN ('ck_verdicts_sha256', 'ck_detection_failures_source_sha256')")).all())
        indexes = dict(conn.execute(text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('verdicts', 'submissions')")).all())
        triggers = set(conn.execute(text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")).scalars())
        foreign_keys = {fk["name"] for fk in inspect(conn).get_foreign_keys("verdicts")}
    return {"checks": checks, "indexes": indexes, "triggers": triggers, "foreign_keys": foreign_keys}


def test_revision_0003_keeps_the_data_and_its_rules_and_downgrades_to_0002_exactly(
        empty_database_url: str, verdict_row: MakeRow) -> None:
    config = db.alembic_config(empty_database_url)
    command.upgrade(config, "0002")
    engine = db.make_engine(empty_database_url)
    try:
        before = _schema_facts(engine)
        register(engine, NEW)
        rows = [verdict_row(f"keep{i}", NEW) for i in range(3)]
        write_as_before_0004(engine, rows)
        command.upgrade(config, "0003")
        after = _schema_facts(engine)
        assert after["foreign_keys"] == set() and before["foreign_keys"] == {"fk_verdicts_model_version"}
        assert {"verdicts_model_version_exists_insert", "verdicts_model_version_exists_update",
                "model_versions_referenced"} <= after["triggers"]
        assert "{64}" not in after["checks"]["ck_verdicts_sha256"] and "{64}" in before["checks"]["ck_verdicts_sha256"]
        assert "ix_verdicts_model_version_id" not in after["indexes"]
        assert "brin" in after["indexes"]["ix_submissions_answered_at"]
        assert "WHERE (verdict_id IS NOT NULL)" in after["indexes"]["ix_submissions_verdict_id"]
        assert db.count_rows(engine)["verdicts"] == 3
        _the_model_version_rule_holds(engine, verdict_row)

        command.downgrade(config, "0002")
        assert _schema_facts(engine) == before
        _the_model_version_rule_holds(engine, verdict_row)
        command.upgrade(config, "0003")
        assert _schema_facts(engine) == after
        assert db.count_rows(engine)["verdicts"] == 3
    finally:
        engine.dispose()


def _verdict_shape(engine: Engine) -> dict[str, Any]:
    """What revision 0004 changes: the columns of verdicts and of the view, the verdicts' checks and indexes."""
    with engine.connect() as conn:
        checks = dict(conn.execute(text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'verdicts'::regclass AND contype = 'c'")).all())
        indexes = dict(conn.execute(text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'verdicts'")).all())
        return {"columns": [c["name"] for c in inspect(conn).get_columns("verdicts")],
                "view": [c["name"] for c in inspect(conn).get_columns("latest_verdicts")],
                "checks": checks, "indexes": indexes}


def _provenance(**c2pa: Any) -> Provenance:
    """A provenance with a C2PA manifest declaring trained-algorithmic media (``c2pa`` overrides its fields)."""
    manifest = C2paManifest(**({"state": C2paState.TRUSTED, "claim_generator": "Image Maker 2.1",
                                "signer": "Example AI Labs", "signer_name": "Example signing key",
                                "source_types": (TRAINED,), "generator": "Image Maker"} | c2pa))
    return Provenance(c2pa=manifest)


TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def test_revision_0004_migrates_old_verdicts_to_the_model_decision_and_downgrades_to_0003_exactly(
        empty_database_url: str, verdict_row: MakeRow) -> None:
    config = db.alembic_config(empty_database_url)
    command.upgrade(config, "0003")
    engine = db.make_engine(empty_database_url)
    try:
        before = _verdict_shape(engine)
        register(engine, NEW)
        write_as_before_0004(engine, [verdict_row("judged-before", NEW, score=0.3),
                                      verdict_row("flagged-before", NEW, score=0.8)])
        command.upgrade(config, "0004")
        after = _verdict_shape(engine)
        assert after["columns"] == before["columns"] + list(PROVENANCE_FIELDS)
        assert after["view"] == after["columns"]
        assert "ck_verdicts_label_matches_score" not in after["checks"]
        assert {"ck_verdicts_label_follows_decision", "ck_verdicts_decision", "ck_verdicts_c2pa_decision"} <= set(
            after["checks"])
        assert "WHERE (decision <> 'model'::text)" in after["indexes"]["ix_verdicts_decision_created_at"]
        with engine.connect() as conn:
            migrated = conn.execute(text(f"SELECT label, {', '.join(PROVENANCE_FIELDS)} FROM latest_verdicts "
                                         "ORDER BY score")).all()
        assert [tuple(r) for r in migrated] == [("real", None, "model", None, None, None, None, None),
                                                ("fake", None, "model", None, None, None, None, None)]

        # A verdict the C2PA manifest decided (the model scored it real), written by the code of this revision.
        grid = np.full((4, 4), 0.1, np.float32)
        decided = VerdictRow.of(make_verdict(0.1, grid, 0.5), grid, sha256=sha_of("signed"), model_version=NEW,
                                source="file:///signed.jpg", external_id=None, metadata=None, width=8, height=8,
                                format="JPEG", timings_ms={}, ruling=Ruling(Label.FAKE, Decision.C2PA),
                                provenance=_provenance(), frames=1)
        assert db.upsert_verdicts(engine, [decided]) == 1
        with engine.connect() as conn:
            row = conn.execute(text("SELECT label, score, decision, c2pa_state, c2pa_signer, declared_generator, "
                                    "provenance_kind, frames, provenance->'c2pa'->>'claim_generator' AS claim "
                                    "FROM latest_verdicts WHERE decision = 'c2pa'")).one()
        assert tuple(row) == ("fake", pytest.approx(0.1), "c2pa", "trusted", "Example AI Labs", "Image Maker", "c2pa",
                              1, "Image Maker 2.1")

        command.downgrade(config, "0003")
        assert _verdict_shape(engine) == before
        with engine.connect() as conn:
            labels = dict(conn.execute(text("SELECT sha256, label FROM verdicts")).all())
        # The provenance-decided label goes back to the model's (0003's check holds again); the others are kept.
        assert labels == {sha_of("judged-before"): "real", sha_of("flagged-before"): "fake", decided.sha256: "real"}
        _the_model_version_rule_holds(engine, verdict_row)
        command.upgrade(config, "head")
        assert _verdict_shape(engine) == after
        assert db.count_rows(engine)["verdicts"] == 3
    finally:
        engine.dispose()


def test_the_database_holds_labels_to_what_decided_them(verdict_row: MakeRow, engine: Engine) -> None:
    register(engine, NEW)
    grid = np.full((4, 4), 0.2, np.float32)
    low = make_verdict(0.2, grid, 0.5)

    def row(name: str, ruling: Ruling, provenance: Provenance | None) -> VerdictRow:
        return VerdictRow.of(low, grid, sha256=sha_of(name), model_version=NEW, source=f"file:///{name}.jpg",
                             external_id=None, metadata=None, width=8, height=8, format="JPEG", timings_ms={},
                             ruling=ruling, provenance=provenance, frames=1)

    assert db.upsert_verdicts(engine, [row("c2pa", Ruling(Label.FAKE, Decision.C2PA), _provenance()),
                                       row("metadata", Ruling(Label.FAKE, Decision.METADATA), Provenance())]) == 2
    refused = [
        row("model-says-fake", Ruling(Label.FAKE, Decision.MODEL), None),  # the model scored it 0.2
        row("provenance-says-real", Ruling(Label.REAL, Decision.C2PA), _provenance()),  # provenance only makes fake
        row("invalid-decides", Ruling(Label.FAKE, Decision.C2PA), _provenance(state=C2paState.INVALID)),
        dataclasses.replace(row("unknown", Ruling(Label.REAL, Decision.MODEL), None), decision="oracle"),
        dataclasses.replace(row("no-frames", Ruling(Label.REAL, Decision.MODEL), None), frames=0),
    ]
    for bad in refused:
        with pytest.raises(IntegrityError, match="ck_verdicts_"):
            db.upsert_verdicts(engine, [bad])
    assert db.count_rows(engine)["verdicts"] == 2


def test_provenance_text_from_a_hostile_file_is_stored_escaped(verdict_row: MakeRow, engine: Engine) -> None:
    """NUL characters and unpaired surrogates in a file's metadata would make PostgreSQL refuse the row (and the
    verdict would be lost): they are escaped, in the document and the columns alike."""
    register(engine, NEW)
    hostile = _provenance(signer="Evil\x00Corp\ud800", generator="Gen\x00")
    hostile = dataclasses.replace(hostile, signals=(Signal(ProvenanceKind.GENERATOR_METADATA, "exif:Software",
                                                           "Gen\x00", True, "detail \x00 \udfff"),))
    base = verdict_row("hostile", NEW)
    stored = VerdictRow.of(make_verdict(0.3, np.full((4, 4), 0.3, np.float32), 0.5), np.full((4, 4), 0.3, np.float32),
                           sha256=base.sha256, model_version=NEW, source=base.source, external_id=None,
                           metadata=None, width=8, height=8, format="PNG", timings_ms={}, provenance=hostile)
    assert db.upsert_verdicts(engine, [stored]) == 1
    found = db.find_verdicts(engine, [base.sha256], NEW)[base.sha256]
    assert found.c2pa_signer == "Evil\\x00Corp\\ud800"
    assert found.provenance is not None and found.provenance["signals"][0]["detail"] == "detail \\x00 \\udfff"
    assert found.decision == "model" and found.label == "real"


def _the_model_version_rule_holds(engine: Engine, verdict_row: MakeRow) -> None:
    """A verdict must name a registered model version, and a version that verdicts name cannot be deleted or
    renamed: by the foreign key (revision 0002) or by the triggers that replace it (0003), the same errors."""
    with pytest.raises(IntegrityError, match="fk_verdicts_model_version"):
        write_as_before_0004(engine, [verdict_row("orphan", "unregistered")])
    with engine.begin() as conn, pytest.raises(IntegrityError, match="fk_verdicts_model_version"):
        conn.execute(text("UPDATE verdicts SET model_version = 'unregistered'"))
    for statement in ("DELETE FROM model_versions WHERE id = :v",
                      "UPDATE model_versions SET id = 'renamed' WHERE id = :v"):
        with engine.begin() as conn, pytest.raises(IntegrityError, match="fk_verdicts_model_version"):
            conn.execute(text(statement), {"v": NEW})
    register(engine, OLDER)
    with engine.begin() as conn:  # a version no verdict names can go
        conn.execute(text("UPDATE model_versions SET metrics = '{}' WHERE id = :v"), {"v": NEW})
        conn.execute(text("DELETE FROM model_versions WHERE id = :v"), {"v": OLDER})
    assert db.count_rows(engine)["model_versions"] == 1


def test_submissions_point_at_their_answer_and_a_redelivery_adds_none(verdict_row: MakeRow, engine: Engine) -> None:
    register(engine, NEW)
    row = verdict_row("shared", NEW)
    failure = FailureRow("https://x.example/broken.jpg", "post-3", "corrupt", "truncated")
    now = datetime.now(UTC)
    jobs = [db.SubmissionRow("t1", "post-1", row.source, {"k": 1}, now, verdict=(row.sha256, NEW)),
            db.SubmissionRow("t2", "post-2", "https://x.example/copy.jpg", None, now, verdict=(row.sha256, NEW)),
            db.SubmissionRow("t3", "post-3", failure.source, None, now, failure=failure)]
    with engine.begin() as conn:
        db.upsert_verdicts(conn, [row])
        db.record_failures(conn, [failure])
        assert db.record_submissions(conn, jobs) == 3
    assert db.record_submissions(engine, jobs[:1]) == 0  # the same task again
    found = db.find_submissions(engine, external_ids=["post-1", "post-2", "post-3"])
    by_task = {r["task_id"]: r for r in found}
    assert all(list(r) == list(db.SubmissionAnswer.__annotations__) for r in found)  # the declared row type
    assert by_task["t1"]["sha256"] == by_task["t2"]["sha256"] == row.sha256 and by_task["t2"]["label"] == row.label
    assert by_task["t1"]["metadata"] == {"k": 1}
    assert (by_task["t3"]["outcome"], by_task["t3"]["reason"], by_task["t3"]["label"]) == ("failure", "corrupt", None)
    assert [r["task_id"] for r in db.find_submissions(engine, task_ids=["t2"])] == ["t2"]
    # A submission whose answer is not in the database is refused, not stored half-linked.
    with pytest.raises(IntegrityError):
        db.record_submissions(engine, [db.SubmissionRow("t4", None, "s", None, now, verdict=("0" * 64, NEW))])
    with pytest.raises(ValueError, match="exactly one"):
        db.SubmissionRow("t5", None, "s", None, now)


def test_migrate_accepts_a_plain_postgresql_url(database_url: str) -> None:
    plain = database_url.replace("postgresql+psycopg://", "postgresql://")
    db.migrate(plain)  # already at head: nothing to do, and no psycopg2 needed
    assert db.normalise_url(plain) == database_url


# ------------------------------------------------------------------------------------------- verdicts


def test_a_thousand_rows_go_in_one_statement_and_a_repeat_inserts_nothing(verdict_row: MakeRow, engine: Engine) -> None:
    register(engine, NEW)
    rows = [verdict_row(f"img{i}", NEW, score=(i % 100) / 100) for i in range(1000)]
    statements, stop = count_statements(engine)
    try:
        # New rows travel by COPY straight into verdicts (not a SQLAlchemy statement): no INSERT at all.
        assert db.upsert_verdicts(engine, rows) == 1000
        assert not [s for s in statements if "INSERT INTO VERDICTS" in s.upper()]
        # A repeat meets stored rows: its COPY is rolled back to the savepoint, and the rows go by the session's
        # staging table and one INSERT ... ON CONFLICT DO NOTHING.
        assert db.upsert_verdicts(engine, rows) == 0
    finally:
        stop()
    inserts = [s for s in statements if "INSERT INTO VERDICTS" in s.upper()]
    assert len(inserts) == 1 and "ON CONFLICT" in inserts[0].upper()
    assert db.count_rows(engine)["verdicts"] == 1000


def test_two_writes_in_one_transaction_each_insert_only_their_own_rows(verdict_row: MakeRow, engine: Engine) -> None:
    """The staging tables are emptied by the statement that reads them, so a second call in the same
    transaction does not write the first call's rows again."""
    register(engine, NEW)
    now = datetime.now(UTC)
    first, second = verdict_row("one", NEW), verdict_row("two", NEW)
    with engine.begin() as conn:
        assert db.upsert_verdicts(conn, [first]) == 1
        assert db.upsert_verdicts(conn, [second, first]) == 1
        for task, row in (("t1", first), ("t2", second)):
            answered = db.SubmissionRow(task, None, f"s-{task}", None, now, verdict=(row.sha256, NEW))
            assert db.record_submissions(conn, [answered]) == 1
    assert db.count_rows(engine)["verdicts"] == db.count_rows(engine)["submissions"] == 2


def test_a_value_the_database_refuses_is_a_dbapi_error_and_the_connection_stays_usable(
        verdict_row: MakeRow, engine: Engine) -> None:
    """A row COPY cannot store (a NUL character) fails the write as an ``execute`` would, with SQLAlchemy's
    DBAPIError (the worker then writes the batch row by row); the pooled connection goes on working."""
    from sqlalchemy.exc import DBAPIError

    register(engine, NEW)
    for bad in (verdict_row("nul", NEW, external_id="bad\x00id"), verdict_row("surrogate", NEW, source="x\ud800")):
        with pytest.raises(DBAPIError):
            db.upsert_verdicts(engine, [verdict_row("fine", NEW), bad])
    assert db.count_rows(engine)["verdicts"] == 0
    assert db.upsert_verdicts(engine, [verdict_row("fine", NEW)]) == 1


def test_an_engine_not_made_by_make_engine_still_writes(verdict_row: MakeRow, database_url: str) -> None:
    from sqlalchemy import create_engine

    plain = create_engine(database_url)
    try:
        register(plain, NEW)
        for name in ("a", "b"):  # each transaction creates the staging tables it needs
            assert db.upsert_verdicts(plain, [verdict_row(name, NEW)]) == 1
    finally:
        plain.dispose()


def test_concurrent_overlapping_batches_do_not_deadlock(verdict_row: MakeRow, engine: Engine) -> None:
    """Writers given the same keys in different orders insert them in key order: each key is stored once,
    and no transaction is chosen as a deadlock victim."""
    register(engine, NEW)
    rows = [verdict_row(f"race{i}", NEW) for i in range(200)]
    inserted: list[int] = []

    def write(seed: int) -> None:
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        for start in range(0, len(shuffled), 50):
            inserted.append(db.upsert_verdicts(engine, shuffled[start:start + 100]))

    errors = run_concurrently(write, range(4), timeout=120)
    assert errors == [] and sum(inserted) == 200 and db.count_rows(engine)["verdicts"] == 200


def test_duplicates_inside_one_call_are_written_once(verdict_row: MakeRow, engine: Engine) -> None:
    register(engine, NEW)
    first = verdict_row("a", NEW, score=0.75, source="https://x.example/first.jpg")
    again = verdict_row("a", NEW, score=0.75, source="https://x.example/second.jpg")
    other = verdict_row("b", NEW)
    assert db.upsert_verdicts(engine, [first, other, again, first]) == 2
    assert db.find_verdicts(engine, [sha_of("a")], NEW)[sha_of("a")].source == "https://x.example/first.jpg"
    assert db.upsert_verdicts(engine, []) == 0


# --------------------------------------------------------------- direct COPY, and the staging path as fallback


def stored_verdicts(engine: Engine, version: str) -> dict[str, dict[str, Any]]:
    """Every column of the version's verdicts but id, model_version and created_at, by sha256."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM verdicts WHERE model_version = :v"), {"v": version}).mappings()
        return {row["sha256"]: {k: v for k, v in row.items() if k not in ("id", "model_version", "created_at")}
                for row in rows}


def count_commits(engine: Engine) -> tuple[list[int], Callable[[], None]]:
    commits: list[int] = []

    def record(conn: Any) -> None:
        commits.append(1)

    event.listen(engine, "commit", record)
    return commits, lambda: event.remove(engine, "commit", record)


def test_the_direct_copy_stores_what_the_staging_path_stores_with_ids_in_key_order(
        verdict_row: MakeRow, engine: Engine) -> None:
    register(engine, NEW, OLD)
    provenance = _provenance(signer="Signer", generator="Gen")
    rows = [verdict_row(f"d{i}", NEW, score=i / 5, metadata={"post": i, "tags": ["a", "é"]} if i % 2 else None)
            for i in range(5)]
    rows.append(dataclasses.replace(verdict_row("prov", NEW), provenance=provenance.to_json(), frames=3,
                                    provenance_kind=provenance.strongest, declared_generator="Gen",
                                    c2pa_state=C2paState.VALID, c2pa_signer="Signer"))
    statements, stop = count_statements(engine)
    try:
        assert db.upsert_verdicts(engine, rows) == 6  # straight into verdicts: no INSERT statement at all
    finally:
        stop()
    assert not [s for s in statements if "INSERT" in s.upper()]
    # The same rows under another version by the staging path: one of them stored first makes the COPY fall back.
    old = [dataclasses.replace(row, model_version=OLD) for row in rows]
    assert db.upsert_verdicts(engine, old[:1]) == 1
    assert db.upsert_verdicts(engine, old) == 5
    assert stored_verdicts(engine, NEW) == stored_verdicts(engine, OLD)
    with engine.connect() as conn:
        ids = conn.execute(text("SELECT id FROM verdicts WHERE model_version = :v ORDER BY sha256"), {"v": NEW})
        assert (found := [row.id for row in ids]) == sorted(found)  # drawn in one go, given in key order


def test_a_batch_that_meets_a_stored_verdict_is_written_by_the_staging_path_in_the_same_transaction(
        verdict_row: MakeRow, engine: Engine) -> None:
    """The COPY is rolled back to its savepoint, the transaction goes on: the batch's other rows, and the
    submissions answered by them and by the stored verdict, are written in it and committed once."""
    register(engine, NEW)
    stored = verdict_row("stored", NEW, source="https://x.example/first.jpg")
    assert db.upsert_verdicts(engine, [stored]) == 1
    again = dataclasses.replace(stored, source="https://x.example/second.jpg")
    fresh = [verdict_row(f"fresh{i}", NEW) for i in range(3)]
    now = datetime.now(UTC)
    jobs = [db.SubmissionRow(f"t{i}", None, row.source, None, now, verdict=(row.sha256, NEW))
            for i, row in enumerate([again, *fresh])]
    statements, stop = count_statements(engine)
    commits, stop_commits = count_commits(engine)
    try:
        with engine.begin() as conn:
            assert db.upsert_verdicts(conn, [fresh[0], again, *fresh[1:]]) == 3
            assert db.record_submissions(conn, jobs) == 4
    finally:
        stop()
        stop_commits()
    assert len([s for s in statements if "INSERT INTO VERDICTS" in s.upper()]) == 1  # the fallback
    assert not [s for s in statements if "INSERT INTO SUBMISSIONS" in s.upper()]  # COPY: nothing conflicts there
    assert len(commits) == 1
    assert db.count_rows(engine)["verdicts"] == 4
    assert db.find_verdicts(engine, [stored.sha256], NEW)[stored.sha256].source == "https://x.example/first.jpg"
    found = {r["task_id"]: r["sha256"] for r in db.find_submissions(engine, task_ids=[j.task_id for j in jobs
                                                                                     if j.task_id])}
    assert found == {job.task_id: job.verdict[0] for job in jobs if job.verdict}


def test_submissions_of_a_redelivered_job_fall_back_and_the_first_row_of_a_task_id_wins(
        verdict_row: MakeRow, engine: Engine) -> None:
    register(engine, NEW)
    row = verdict_row("r", NEW)
    now = datetime.now(UTC)

    def job(task_id: str | None, source: str) -> db.SubmissionRow:
        return db.SubmissionRow(task_id, None, source, None, now, verdict=(row.sha256, NEW))

    with engine.begin() as conn:
        assert db.upsert_verdicts(conn, [row]) == 1
        # Within one call the first row of a task id wins; rows without one (from before revision 0002) all go.
        assert db.record_submissions(conn, [job("a", "first"), job("b", "b"), job("a", "second"), job(None, "x"),
                                            job(None, "y")]) == 4
    with engine.begin() as conn:  # redelivered: b again, with a new job c; the COPY meets b and falls back
        assert db.upsert_verdicts(conn, [row]) == 0
        assert db.record_submissions(conn, [job("c", "c"), job("b", "b again")]) == 1
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT task_id, source FROM submissions ORDER BY id")).all()
    assert [tuple(s) for s in stored] == [("a", "first"), ("b", "b"), (None, "x"), (None, "y"), ("c", "c")]


def test_answers_the_transaction_did_not_write_are_looked_up_by_key(verdict_row: MakeRow, engine: Engine) -> None:
    """A job answered by a verdict stored earlier (or a failure recorded earlier) names it by its key: looked
    up in the savepoint's round trip, whatever the key holds (quotes, braces, backslashes)."""
    odd = "v'1\"{x},\\y"
    register(engine, NEW, odd)
    earlier = verdict_row("earlier", odd)
    failure = FailureRow("https://x.example/it's {broken}", None, "corrupt", "truncated")
    db.upsert_verdicts(engine, [earlier])
    db.record_failures(engine, [failure])
    new = verdict_row("new", NEW)
    new_failure = FailureRow("https://x.example/other", None, "not_an_image", "HTML")
    now = datetime.now(UTC)
    jobs = [db.SubmissionRow("a", None, earlier.source, None, now, verdict=(earlier.sha256, odd)),
            db.SubmissionRow("b", None, new.source, None, now, verdict=(new.sha256, NEW)),
            db.SubmissionRow("c", None, failure.source, None, now, failure=failure),
            db.SubmissionRow("d", None, new_failure.source, None, now, failure=new_failure)]
    statements, stop = count_statements(engine)
    try:
        with engine.begin() as conn:
            db.upsert_verdicts(conn, [new])
            db.record_failures(conn, [new_failure])
            assert db.record_submissions(conn, jobs) == 4
    finally:
        stop()
    assert not [s for s in statements if "INSERT INTO SUBMISSIONS" in s.upper()]
    by_task = {r["task_id"]: r for r in db.find_submissions(engine, task_ids=["a", "b", "c", "d"])}
    assert (by_task["a"]["sha256"], by_task["a"]["model_version"]) == (earlier.sha256, odd)
    assert by_task["b"]["sha256"] == new.sha256
    assert (by_task["c"]["reason"], by_task["d"]["reason"]) == ("corrupt", "not_an_image")


def test_the_direct_copy_is_held_to_the_model_version_check_and_the_foreign_keys(
        verdict_row: MakeRow, engine: Engine) -> None:
    """COPY fires revision 0003's statement trigger and the submissions' foreign keys as INSERT does."""
    register(engine, NEW)
    with pytest.raises(IntegrityError, match="fk_verdicts_model_version"):
        db.upsert_verdicts(engine, [verdict_row("a", NEW), verdict_row("b", "never-registered")])
    assert db.count_rows(engine)["verdicts"] == 0
    # An answer this transaction wrote and then rolled back (the caller's nested transaction): its id, which the
    # submissions' COPY would use, is gone, so the foreign key fails that COPY; the staging path then looks the
    # answer up by its key, finds nothing and refuses the job, as it always has.
    now = datetime.now(UTC)
    row = verdict_row("gone", NEW)
    failure = FailureRow("https://x.example/gone", None, "corrupt", "x")
    for answer in ({"verdict": (row.sha256, NEW)}, {"failure": failure}):
        with engine.begin() as conn:
            nested = conn.begin_nested()
            db.upsert_verdicts(conn, [row])
            db.record_failures(conn, [failure])
            nested.rollback()
            with pytest.raises(IntegrityError, match="ck_submissions_one_answer"):
                db.record_submissions(conn, [db.SubmissionRow("t", None, "s", None, now, **answer)])
    assert db.count_rows(engine) == {"verdicts": 0, "failures": 0, "model_versions": 1, "rescan_runs": 0,
                                     "submissions": 0}
    # The COPY itself, given ids that name no row: each foreign key fails it, its savepoint is rolled back, and
    # the transaction goes on.
    db.upsert_verdicts(engine, [row])
    db.record_failures(engine, [failure])
    with engine.begin() as conn:
        written = db._written_ids(conn)
        written.verdicts[(row.sha256, NEW)] = written.failures[(db.source_sha256(failure.source), "corrupt")] = -1
        for answer in ({"verdict": (row.sha256, NEW)}, {"failure": failure}):
            job = db.SubmissionRow("t", None, "s", None, now, **answer)
            assert db._copy_submissions_direct(conn, [job], written) is None
        assert conn.execute(text("SELECT count(*) FROM submissions")).scalar() == 0


def test_values_binary_copy_would_not_carry_take_the_staging_path(verdict_row: MakeRow, engine: Engine) -> None:
    """psycopg's binary COPY would wrap an integer too large for its column, and has no timestamptz for a naive
    datetime: such a batch goes by the staging path's text COPY, where the server judges it as it always has."""
    from sqlalchemy.exc import DBAPIError

    register(engine, NEW)
    with pytest.raises(DBAPIError, match="out of range"):
        db.upsert_verdicts(engine, [verdict_row("fine", NEW), verdict_row("huge", NEW, frames=2**31)])
    assert db.count_rows(engine)["verdicts"] == 0
    row = verdict_row("naive", NEW)
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL TIME ZONE 'UTC'"))
        db.upsert_verdicts(conn, [row])
        naive = datetime(2025, 1, 2, 3, 4, 5)
        assert db.record_submissions(conn, [db.SubmissionRow("n", None, "s", None, naive,
                                                             verdict=(row.sha256, NEW))]) == 1
    [found] = db.find_submissions(engine, task_ids=["n"])
    assert found["received_at"] == naive.replace(tzinfo=UTC)


def test_a_role_that_cannot_draw_verdict_ids_still_writes(verdict_row: MakeRow, engine: Engine,
                                                          database_url: str) -> None:
    """docs/OPERATIONS.md gives the workers' role USAGE on the sequences; one without it cannot draw the ids the
    direct COPY needs, and writes by the staging path (identity defaults need no USAGE) instead of failing."""
    from sqlalchemy.engine import make_url

    register(engine, NEW)
    role = f"ppl_test_role_{random.getrandbits(32):08x}"
    database = make_url(database_url).database
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        conn.execute(text(f'GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO "{role}"'))
        conn.execute(text(f'GRANT TEMPORARY ON DATABASE "{database}" TO "{role}"'))
    limited = db.make_engine(make_url(database_url).set(username=role).render_as_string(hide_password=False))
    try:
        row = verdict_row("limited", NEW)
        with limited.begin() as conn:
            assert db.upsert_verdicts(conn, [row]) == 1
            assert db.record_submissions(conn, [db.SubmissionRow("t", None, row.source, None, datetime.now(UTC),
                                                                 verdict=(row.sha256, NEW))]) == 1
    finally:
        limited.dispose()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP OWNED BY "{role}"'))
            conn.execute(text(f'DROP ROLE "{role}"'))
    assert db.count_rows(engine)["verdicts"] == db.count_rows(engine)["submissions"] == 1


def test_hostile_submission_text_is_stored_escaped(verdict_row: MakeRow, engine: Engine) -> None:
    register(engine, NEW)
    row = verdict_row("r", NEW)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        db.upsert_verdicts(conn, [row])
        assert db.record_submissions(conn, [db.SubmissionRow("t\x00", "e\ud800", "s\x00\udfff", None, now,
                                                             verdict=(row.sha256, NEW))]) == 1
    [found] = db.find_submissions(engine, task_ids=["t\\x00"])
    assert (found["external_id"], found["source"]) == ("e\\ud800", "s\\x00\\udfff")


def test_concurrent_overlapping_batch_writes_store_each_verdict_and_job_once(
        verdict_row: MakeRow, engine: Engine) -> None:
    """Workers writing overlapping batches (the same jobs, redelivered, in another order): verdicts then
    submissions in one transaction each. Each verdict and each job is stored once, and no batch fails."""
    register(engine, NEW)
    rows = [verdict_row(f"race{i}", NEW) for i in range(120)]
    now = datetime.now(UTC)
    jobs = {row.sha256: db.SubmissionRow(f"task-{i}", None, row.source, None, now, verdict=(row.sha256, NEW))
            for i, row in enumerate(rows)}
    inserted: list[int] = []
    recorded: list[int] = []

    def write(seed: int) -> None:
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        for start in range(0, len(shuffled), 40):
            batch = shuffled[start:start + 60]
            with engine.begin() as conn:
                inserted.append(db.upsert_verdicts(conn, batch))
                recorded.append(db.record_submissions(conn, [jobs[row.sha256] for row in batch]))

    errors = run_concurrently(write, range(4), timeout=120)
    assert errors == [] and sum(inserted) == 120 and sum(recorded) == 120
    assert db.count_rows(engine)["verdicts"] == db.count_rows(engine)["submissions"] == 120


def test_writes_join_the_callers_transaction(verdict_row: MakeRow, engine: Engine) -> None:
    register(engine, NEW)
    with engine.connect() as conn:
        assert db.upsert_verdicts(conn, [verdict_row("a", NEW)]) == 1
        db.record_failures(conn, [FailureRow("https://x.example/broken", None, "not_an_image", "HTML")])
        conn.rollback()
    assert db.count_rows(engine) == {"verdicts": 0, "failures": 0, "model_versions": 1, "rescan_runs": 0,
                                     "submissions": 0}


def test_find_verdicts_returns_the_stored_rows_of_one_version(verdict_row: MakeRow, engine: Engine) -> None:
    register(engine, OLD, NEW)
    rows = [verdict_row("a", NEW, score=0.9), verdict_row("b", NEW, external_id=None, metadata=None),
            verdict_row("a", OLD, score=0.1)]
    db.upsert_verdicts(engine, rows)
    found = db.find_verdicts(engine, {sha_of("a"), sha_of("b"), sha_of("unknown")}, NEW)
    assert found == {sha_of("a"): rows[0], sha_of("b"): rows[1]}
    assert db.find_verdicts(engine, [sha_of("a")], OLD) == {sha_of("a"): rows[2]}
    assert db.find_verdicts(engine, [], NEW) == {}
    # the worker's key-only lookup agrees with the rows
    assert db.judged_contents(engine, {sha_of("a"), sha_of("b"), sha_of("unknown")}, NEW) == {sha_of("a"), sha_of("b")}
    assert db.judged_contents(engine, [sha_of("b"), sha_of("b")], OLD) == set()
    assert db.judged_contents(engine, [], NEW) == set()
    with engine.connect() as conn:  # None is SQL NULL, not the JSON value null
        assert conn.execute(text("SELECT metadata IS NULL FROM verdicts WHERE sha256 = :s"),
                            {"s": sha_of("b")}).scalar_one()


def test_patch_grid_round_trip_is_within_half_a_quantisation_step(verdict_row: MakeRow, engine: Engine) -> None:
    register(engine, NEW)
    rng = np.random.default_rng(0)
    grids = {"square": rng.random((16, 16)).astype(np.float32), "wide": rng.random((3, 5)).astype(np.float32),
             "edges": np.array([[0.0, 1.0], [1 / 510, 0.5]], dtype=np.float32)}
    db.upsert_verdicts(engine, [verdict_row(name, NEW, grid=grid) for name, grid in grids.items()])
    found = db.find_verdicts(engine, [sha_of(name) for name in grids], NEW)
    for name, grid in grids.items():
        row = found[sha_of(name)]
        assert (row.grid_rows, row.grid_cols) == grid.shape
        assert len(row.patch_grid) == grid.size
        restored = db.dequantise_patch_grid(row.patch_grid, row.grid_rows, row.grid_cols)
        assert restored.shape == grid.shape and restored.dtype == np.float32
        assert np.abs(restored - grid).max() <= 1 / 510 + 1e-6
    assert np.frombuffer(found[sha_of("edges")].patch_grid, np.uint8).tolist() == [0, 255, 1, 128]


@pytest.mark.parametrize("grid", [np.zeros(16), np.zeros((0, 4)), np.array([[0.5, np.nan]]), np.array([[1.5]]),
                                  np.array([[-0.1]])])
def test_quantise_rejects_what_is_not_a_probability_grid(grid: np.ndarray) -> None:
    with pytest.raises(ValueError):
        db.quantise_patch_grid(grid)


def test_a_batch_of_grids_quantises_as_each_grid_does() -> None:
    grids = np.random.default_rng(1).random((5, 3, 4)).astype(np.float32)
    grids[0, 0, 0], grids[1, 2, 3] = 0.0, 1.0
    assert db.quantise_patch_grids(grids) == [db.quantise_patch_grid(grid) for grid in grids]
    bad = grids.copy()
    bad[3, 1, 1] = np.nan  # one bad grid fails the batch, as it would fail its own row
    with pytest.raises(ValueError):
        db.quantise_patch_grids(bad)
    with pytest.raises(ValueError):
        db.quantise_patch_grids(grids[0])


def test_dequantise_rejects_a_wrong_size() -> None:
    with pytest.raises(ValueError, match="needs 16 bytes"):
        db.dequantise_patch_grid(bytes(15), 4, 4)


@pytest.mark.parametrize("overrides", [
    {"label": "maybe", "score": 0.9},  # not a label
    {"label": "real", "score": 0.9},  # disagrees with score >= threshold
    {"sha256": "ABC"},  # not a lowercase hex sha256
    {"score": 1.5, "label": "fake"},
    {"score": float("nan"), "label": "real"},
    {"patch_grid": bytes(15)},  # 4×4 grid needs 16 bytes
    {"model_version": "never-registered"},  # foreign key
])
def test_constraints_reject_bad_rows(verdict_row: MakeRow, engine: Engine, overrides: dict[str, Any]) -> None:
    register(engine, NEW)
    values = {"score": 0.25, "grid": np.zeros((4, 4), np.float32)} | overrides
    with pytest.raises(IntegrityError):
        db.upsert_verdicts(engine, [verdict_row("bad", values.pop("model_version", NEW), **values)])
    assert db.count_rows(engine)["verdicts"] == 0


def test_check_constraint_rejects_a_bad_label_written_by_hand(verdict_row: MakeRow, engine: Engine) -> None:
    register(engine, NEW)
    db.upsert_verdicts(engine, [verdict_row("a", NEW)])
    with pytest.raises(IntegrityError, match="ck_verdicts_label"), engine.begin() as conn:
        conn.execute(text("UPDATE verdicts SET label = 'unsure'"))


# ------------------------------------------------------------------------------------------- failures


def test_record_failures_counts_attempts_per_source_and_reason(engine: Engine) -> None:
    long_url = "https://x.example/" + "p" * 10_000  # longer than a btree entry may be
    db.record_failures(engine, [FailureRow(long_url, "e1", "not_an_image", "got text/html"),
                                FailureRow(long_url, None, "not_an_image", "got text/plain"),
                                FailureRow(long_url, "e1", "too_large", "40 MB")])
    db.record_failures(engine, [FailureRow(long_url, None, "not_an_image", "got image/svg+xml" + "!" * 5000)])
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT reason, attempts, detail, external_id, source, source_sha256, "
                                 "last_seen >= first_seen AS ordered FROM detection_failures ORDER BY reason")).all()
    assert [(r.reason, r.attempts) for r in rows] == [("not_an_image", 3), ("too_large", 1)]
    not_an_image = rows[0]
    assert not_an_image.detail.startswith("got image/svg+xml")
    assert len(not_an_image.detail) == db.MAX_FAILURE_DETAIL_CHARS
    assert not_an_image.external_id == "e1"  # kept when a later report lacks it
    assert not_an_image.source == long_url and not_an_image.source_sha256 == db.source_sha256(long_url)
    assert all(r.ordered for r in rows)
    assert db.count_rows(engine)["failures"] == 2
    db.record_failures(engine, [])


def test_answered_sources_covers_verdicts_and_failures(verdict_row: MakeRow, engine: Engine) -> None:
    register(engine, OLD, NEW)
    db.upsert_verdicts(engine, [verdict_row("a", NEW), verdict_row("b", OLD)])
    db.record_failures(engine, [FailureRow("https://x.example/broken", None, "not_an_image", "")])
    asked = [verdict_row("a", NEW).source, verdict_row("b", NEW).source, "https://x.example/broken",
             "https://x.example/pending"]
    assert db.answered_sources(engine, asked, NEW) == {asked[0], asked[2]}
    assert db.answered_sources(engine, [], NEW) == set()


# ------------------------------------------------------------------------------------- model versions


def test_one_model_version_is_active(engine: Engine) -> None:
    assert db.active_model_version(engine) is None
    db.register_model_version(engine, OLD, {"arch": "clip"}, 0.5, {"ap": 0.9})
    db.register_model_version(engine, NEW, {"arch": "dinov2"}, 0.6, {"ap": 0.95})
    assert db.active_model_version(engine) == NEW
    db.register_model_version(engine, OLDER, {"arch": "clip"}, 0.5, None, activate=False)
    assert db.active_model_version(engine) == NEW
    db.register_model_version(engine, NEW, {"arch": "dinov2"}, 0.55, {"ap": 0.96}, activate=False)  # recalibrated
    assert db.active_model_version(engine) == NEW
    db.register_model_version(engine, OLD, {"arch": "clip"}, 0.5, {"ap": 0.9})
    assert db.active_model_version(engine) == OLD
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(text("SELECT * FROM model_versions"))}
        assert [v for v, r in rows.items() if r.active] == [OLD]
        assert rows[NEW].threshold == 0.55 and rows[NEW].metrics == {"ap": 0.96}
        assert rows[OLDER].metrics == {}
    with pytest.raises(IntegrityError, match="uq_model_versions_one_active"), engine.begin() as conn:
        conn.execute(text("UPDATE model_versions SET active = true"))


def test_concurrent_activations_leave_exactly_one_active(engine: Engine) -> None:
    versions = [f"{i:016x}" for i in range(6)]
    errors = run_concurrently(lambda version: db.register_model_version(engine, version, {"arch": "clip"}, 0.5, {}),
                              versions)
    assert errors == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM model_versions WHERE active")).scalar_one() == 1


# -------------------------------------------------------------------------------------------- rescans

# The hand-built case: which images a rescan to NEW must re-judge.
#   a: judged by OLD only                -> stale
#   b: judged by OLD and NEW             -> not stale
#   c: judged by NEW only                -> not stale
#   d: judged by OLD, later by OLDER     -> stale, once, through its latest (OLDER) verdict
#   e: judged by OLDER, later by OLD and NEW -> not stale
#   f: judged by OLD, fake               -> stale
HAND_BUILT = {
    ("a", OLD): (0.2, T0), ("b", OLD): (0.3, T0), ("b", NEW): (0.4, T0 + timedelta(days=2)),
    ("c", NEW): (0.9, T0 + timedelta(days=1)), ("d", OLD): (0.8, T0), ("d", OLDER): (0.7, T0 + timedelta(days=1)),
    ("e", OLDER): (0.6, T0), ("e", OLD): (0.5, T0 + timedelta(hours=1)), ("e", NEW): (0.4, T0 + timedelta(hours=2)),
    ("f", OLD): (0.95, T0 + timedelta(hours=5)),
}


def load(engine: Engine, verdict_row: MakeRow, dataset: dict[tuple[str, str], tuple[float, datetime]],
         shuffle_seed: int = 0) -> None:
    """Insert in a shuffled order, so ids and created_at disagree the way they can in production."""
    register(engine, OLD, OLDER, NEW)
    keys = list(dataset)
    random.Random(shuffle_seed).shuffle(keys)
    for start in range(0, len(keys), 50):
        db.upsert_verdicts(engine, [verdict_row(name, version, score=dataset[name, version][0])
                                    for name, version in keys[start:start + 50]])
    set_created_at(engine, {key: when for key, (_, when) in dataset.items()})


def all_candidates(engine: Engine, filters: RescanFilters, limit: int, target: str = NEW,
                   up_to_id: int | None = None) -> list[tuple[int, str, str | None, dict | None]]:
    """Every page of ``db.RescanPages``, each row as (verdict id, source, external_id, metadata), read back from
    the keyword arguments the database rendered for its message."""
    pages = db.RescanPages(filters, target, up_to_id=up_to_id)
    out: list[tuple[int, str, str | None, dict | None]] = []
    after = 0
    while page := pages.page(engine, after, limit):
        assert len(page) <= limit
        for row_id, kwargs_json in page:
            kwargs = json.loads(kwargs_json)
            assert set(kwargs) <= {"source", "external_id", "metadata"}
            out.append((row_id, kwargs["source"], kwargs.get("external_id"), kwargs.get("metadata")))
        after = page[-1][0]
    return out



def expected_candidates(engine: Engine, dataset: dict[tuple[str, str], tuple[float, datetime]],
                        filters: RescanFilters, target: str = NEW) -> list[int]:
    """The same selection, computed the slow obvious way in Python."""
    with engine.connect() as conn:
        ids = {(r.sha256, r.model_version): r.id for r in conn.execute(text("SELECT id, sha256, model_version "
                                                                            "FROM verdicts"))}
    by_image: dict[str, list[tuple[str, float, datetime, int]]] = {}
    for (name, version), (score, when) in dataset.items():
        by_image.setdefault(name, []).append((version, score, when, ids[sha_of(name), version]))
    chosen = []
    for judged in by_image.values():
        if filters.stale_only and any(version == target for version, *_ in judged):
            continue
        version, score, when, row_id = max(judged, key=lambda j: (j[2], j[3]))
        label = "fake" if score >= 0.5 else "real"
        if ((filters.since is None or when >= filters.since) and (filters.until is None or when < filters.until)
                and (filters.label is None or label == filters.label)
                and (filters.min_score is None or score >= filters.min_score)
                and (filters.max_score is None or score <= filters.max_score)):
            chosen.append(row_id)
    return sorted(chosen)


def test_rescan_candidates_are_exactly_the_stale_images(verdict_row: MakeRow, engine: Engine) -> None:
    load(engine, verdict_row, HAND_BUILT)
    found = all_candidates(engine, RescanFilters(), limit=10)
    sources = sorted(source for _, source, _, _ in found)
    assert sources == sorted(verdict_row(n, OLD).source for n in ("a", "d", "f"))
    latest_d = db.find_verdicts(engine, [sha_of("d")], OLDER)[sha_of("d")]
    assert any(external_id == latest_d.external_id and metadata == {"name": "d"} for _, _, external_id, metadata
               in found)
    with engine.connect() as conn:
        d_ids = conn.execute(text("SELECT id FROM verdicts WHERE sha256 = :s AND model_version = :v"),
                             {"s": sha_of("d"), "v": OLDER}).scalar_one()
    assert d_ids in [row_id for row_id, *_ in found]
    assert [row_id for row_id, *_ in found] == expected_candidates(engine, HAND_BUILT, RescanFilters())
    assert db.count_rescan_candidates(engine, RescanFilters(), NEW) == 3


def _jit(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.exec_driver_sql("SHOW jit").scalar_one())


def test_a_rescan_page_reader_reads_the_same_pages_and_hands_its_connection_back_as_it_came(
        verdict_row: MakeRow, engine: Engine) -> None:
    load(engine, verdict_row, random_dataset(120, seed=3))
    pages = db.RescanPages(RescanFilters(), NEW)
    default_jit = _jit(engine)
    with pages.reader(engine) as read:
        by_reader, after = [], 0
        while page := read(after, 7):
            by_reader += page
            after = page[-1][0]
        with pytest.raises(ValueError):
            read(after, 0)
    assert by_reader and by_reader == pages.page(engine, 0, 10_000)
    assert engine.pool.checkedout() == 0 and _jit(engine) == default_jit  # the session's JIT setting undone

    with pytest.raises(RuntimeError), pages.reader(engine) as read:  # a run that fails mid-way
        read(0, 5)
        raise RuntimeError("broker gone")
    assert engine.pool.checkedout() == 0 and _jit(engine) == default_jit  # that connection was closed instead


def random_dataset(images: int, seed: int) -> dict[tuple[str, str], tuple[float, datetime]]:
    rng = random.Random(seed)
    dataset = {}
    for i in range(images):
        versions = [v for v in (OLDER, OLD, NEW) if rng.random() < 0.55] or [OLD]
        for version in versions:
            dataset[f"r{i}", version] = (round(rng.random(), 3), T0 + timedelta(hours=rng.randrange(0, 24 * 10)))
    return dataset


FILTERS = [
    RescanFilters(),
    RescanFilters(label="fake"),
    RescanFilters(label="real", max_score=0.3),
    RescanFilters(min_score=0.25, max_score=0.75),
    RescanFilters(since=T0 + timedelta(days=3)),
    RescanFilters(since=T0 + timedelta(days=2), until=T0 + timedelta(days=6), label="fake"),
    RescanFilters(stale_only=False),
    RescanFilters(stale_only=False, label="real", until=T0 + timedelta(days=5)),
]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: repr(f.to_json()))
def test_rescan_pages_match_a_brute_force_selection_without_gaps_or_repeats(verdict_row: MakeRow, engine: Engine,
                                                                            filters: RescanFilters) -> None:
    dataset = random_dataset(300, seed=1)
    load(engine, verdict_row, dataset, shuffle_seed=2)
    expected = expected_candidates(engine, dataset, filters)
    assert expected  # the dataset exercises every filter
    for limit in (1, 7, 64, 10_000):
        ids = [row_id for row_id, *_ in all_candidates(engine, filters, limit)]
        assert ids == expected, f"limit {limit}"
    assert db.count_rescan_candidates(engine, filters, NEW) == len(expected)
    middle = expected[len(expected) // 2]
    assert db.count_rescan_candidates(engine, filters, NEW, after_id=middle) == len([i for i in expected if i > middle])


def test_a_run_ignores_verdicts_written_after_it_started(verdict_row: MakeRow, engine: Engine) -> None:
    load(engine, verdict_row, HAND_BUILT)
    run = db.create_rescan_run(engine, RescanFilters(stale_only=False), NEW)
    before = [row_id for row_id, *_ in all_candidates(engine, RescanFilters(stale_only=False), 2,
                                                      up_to_id=run.max_verdict_id)]
    assert len(before) == 6  # every image once
    # The rescan's own output: new verdicts for a and f. They are not candidates of this run, and a and f drop
    # out (their latest verdict is now one the run does not cover), which is right: they have been re-judged.
    db.upsert_verdicts(engine, [verdict_row("a", NEW), verdict_row("f", NEW, score=0.97)])
    after = [row_id for row_id, *_ in all_candidates(engine, RescanFilters(stale_only=False), 2,
                                                     up_to_id=run.max_verdict_id)]
    assert set(after) < set(before) and len(after) == 4
    unbounded = all_candidates(engine, RescanFilters(stale_only=False), 2)
    assert len(unbounded) == 6 and max(row_id for row_id, *_ in unbounded) > run.max_verdict_id


def test_rescan_filters_validate_and_round_trip_through_json() -> None:
    filters = RescanFilters(stale_only=False, since=datetime(2025, 1, 1, 12, tzinfo=UTC),
                            until=datetime(2025, 1, 2, 9, tzinfo=UTC) + timedelta(hours=5), label="fake",
                            min_score=0.2, max_score=0.9)
    assert RescanFilters.from_json(filters.to_json()) == filters
    for bad in ({"since": datetime(2025, 1, 1)}, {"label": "unsure"}, {"min_score": 1.5},
                {"min_score": 0.8, "max_score": 0.2}, {"since": T0, "until": T0}):
        with pytest.raises(ValueError):
            RescanFilters(**bad)
    with pytest.raises(ValueError):
        db.RescanPages(RescanFilters(), NEW).page(None, 0, 0)  # type: ignore[arg-type]


def test_rescan_runs_record_progress_and_resume(verdict_row: MakeRow, engine: Engine) -> None:
    load(engine, verdict_row, HAND_BUILT)
    filters = RescanFilters(label="fake", since=T0)
    assert db.latest_unfinished_rescan_run(engine, NEW, filters) is None
    run = db.create_rescan_run(engine, filters, NEW, total=2)
    assert (run.cursor, run.enqueued, run.total, run.status, run.finished_at) == (0, 0, 2, "running", None)
    assert run.filters == filters and run.target_model_version == NEW
    assert run.max_verdict_id == db.count_rows(engine)["verdicts"]  # ids from 1, none deleted

    db.update_rescan_run(engine, run.id, cursor=5, enqueued=1, status="paused")
    # Same filters written another way (another time zone) find the same run.
    same = RescanFilters(label="fake", since=T0.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Paris")))
    resumed = db.latest_unfinished_rescan_run(engine, NEW, same)
    assert resumed is not None and (resumed.id, resumed.cursor, resumed.enqueued, resumed.status) == (
        run.id, 5, 1, "paused")
    assert resumed.updated_at >= run.updated_at
    assert db.latest_unfinished_rescan_run(engine, NEW, RescanFilters(label="fake")) is None
    assert db.latest_unfinished_rescan_run(engine, OLD, filters) is None

    db.update_rescan_run(engine, run.id, cursor=9, enqueued=2, status="done", total=2)
    finished = db.get_rescan_run(engine, run.id)
    assert finished is not None and finished.status == "done" and finished.finished_at is not None
    assert db.latest_unfinished_rescan_run(engine, NEW, filters) is None
    assert db.get_rescan_run(engine, run.id + 100) is None
    with pytest.raises(ValueError):
        db.update_rescan_run(engine, run.id, cursor=9, enqueued=2, status="finished")
    with pytest.raises(LookupError):
        db.update_rescan_run(engine, run.id + 100, cursor=9, enqueued=2, status="done")


# ------------------------------------------------------------------------------ view, listings, counts


def test_latest_verdicts_view_has_each_images_newest_verdict(verdict_row: MakeRow, engine: Engine) -> None:
    dataset = random_dataset(120, seed=3) | HAND_BUILT
    load(engine, verdict_row, dataset, shuffle_seed=4)
    with engine.connect() as conn:
        view = {r.sha256: r for r in conn.execute(text("SELECT * FROM latest_verdicts"))}
        table_columns = [c["name"] for c in inspect(conn).get_columns("verdicts")]
        view_columns = [c["name"] for c in inspect(conn).get_columns("latest_verdicts")]
    images = {name for name, _ in dataset}
    assert set(view) == {sha_of(name) for name in images}
    for name in images:
        newest = max(((v, when) for (n, v), (_, when) in dataset.items() if n == name), key=lambda x: x[1])
        assert view[sha_of(name)].model_version == newest[0], name
    assert view_columns == table_columns
    assert view[sha_of("d")].model_version == OLDER and view[sha_of("e")].model_version == NEW


def test_query_verdicts_lists_latest_verdicts_newest_first(verdict_row: MakeRow, engine: Engine) -> None:
    load(engine, verdict_row, HAND_BUILT)
    rows = db.query_verdicts(engine, flagged_only=False, since=None, limit=100)
    assert len(rows) == 6 and "patch_grid" not in rows[0]
    assert list(rows[0]) == list(db.VerdictListing.__annotations__) == [c.name for c in db.verdicts.c
                                                                        if c.name != "patch_grid"]
    with engine.connect() as conn:
        expected = conn.execute(text("SELECT id FROM latest_verdicts ORDER BY created_at DESC, id DESC")).scalars()
        assert [r["id"] for r in rows] == list(expected)
    flagged = db.query_verdicts(engine, flagged_only=True, since=None, limit=100)
    # c (NEW 0.9), d (latest OLDER 0.7) and f (0.95) are flagged; d's older fake OLD verdict is not listed.
    assert {(r["sha256"], r["model_version"]) for r in flagged} == {(sha_of("c"), NEW), (sha_of("d"), OLDER),
                                                                   (sha_of("f"), OLD)}
    assert all(r["label"] == "fake" for r in flagged)
    recent = db.query_verdicts(engine, flagged_only=False, since=T0 + timedelta(days=1), limit=100)
    assert {r["sha256"] for r in recent} == {sha_of("b"), sha_of("c"), sha_of("d")}
    assert len(db.query_verdicts(engine, flagged_only=False, since=None, limit=2)) == 2
    with pytest.raises(ValueError, match="time zone"):
        db.query_verdicts(engine, flagged_only=False, since=datetime(2025, 3, 1), limit=2)
    assert rows[0]["timings_ms"] == verdict_row("x", NEW).timings_ms


def test_count_rows(verdict_row: MakeRow, engine: Engine) -> None:
    assert db.count_rows(engine) == {"verdicts": 0, "failures": 0, "model_versions": 0, "rescan_runs": 0,
                                     "submissions": 0}
    load(engine, verdict_row, HAND_BUILT)
    db.record_failures(engine, [FailureRow("file:///x", None, "missing", "")])
    assert db.count_rows(engine) == {"verdicts": len(HAND_BUILT), "failures": 1, "model_versions": 3,
                                     "rescan_runs": 0, "submissions": 0}


def test_verdict_row_has_every_column_but_id_and_created_at(verdict_row: MakeRow, engine: Engine) -> None:
    with engine.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("verdicts")}
    assert {f for f in VerdictRow.__dataclass_fields__} == columns - {"id", "created_at"}


def test_create_database_if_missing_creates_once(pg_server_url):
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"ppl_test_create_{uuid.uuid4().hex[:8]}"
    url = make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
    try:
        assert db.create_database_if_missing(url) is True
        assert db.create_database_if_missing(url) is False
        db.migrate(url)
        engine = db.make_engine(url)
        db.register_model_version(engine, "m1", {}, 0.5, {})
        engine.dispose()
        assert db.create_database_if_missing(url, drop_first=True) is True
        db.migrate(url)
        engine = db.make_engine(url)
        assert db.count_rows(engine)["model_versions"] == 0  # dropped with everything in it
        engine.dispose()
    finally:
        admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
