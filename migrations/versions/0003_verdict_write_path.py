"""Verdict write path at fleet rate: the per-row costs of writing a batch cut where nothing reads them.

Measured on a batch write (verdicts + submissions, one transaction; ``benchmarks/storage_bench.py``), what a
row cost on the server besides its heap tuple and its index entries:

* ``ck_verdicts_sha256`` (and ``ck_detection_failures_source_sha256``) tested ``~ '^[0-9a-f]{64}$'``: PostgreSQL
  expands the bounded repetition into a large automaton, 10-14 µs a row. The same condition as a length test
  and a negated class (``length(x) = 64 AND x !~ '[^0-9a-f]'``) costs under 1 µs.
* ``fk_verdicts_model_version`` checked every verdict row with its own query, locking the model's row FOR KEY
  SHARE (10-15 µs a row, and every worker's transaction locking the same ``model_versions`` row). A
  statement-level trigger does the same check once per INSERT or UPDATE statement over its new rows
  (``verdicts_model_version_exists``), and a row trigger on ``model_versions`` refuses to delete a version, or
  change its id, while verdicts name it (``model_versions_referenced``). Unlike the foreign key it takes no row
  lock: deleting a model version while a worker is writing its verdicts is not guarded (nothing deletes model
  versions; an operator doing so should stop the workers of that version first).
* ``ix_verdicts_model_version_id`` served no query of the worker or of docs/queries.md (per-version analyses
  read every row of the version anyway); dropped.
* ``submissions``: ``ix_submissions_verdict_id`` and ``ix_submissions_failure_id`` indexed the NULL half of
  every row too; now partial (``WHERE ... IS NOT NULL``), which the cascades' ``= id`` lookups still use.
  ``ix_submissions_answered_at`` becomes a BRIN index: answered_at grows with the table, so a time-range scan
  needs only block ranges, at a fraction of a btree's write cost and size.

The downgrade restores revision 0002's constraints and indexes exactly.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_HEX64 = "'^[0-9a-f]{64}$'"

CHECK_VERDICT_MODEL_VERSIONS = """
CREATE FUNCTION ppl_verdicts_model_version_exists() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  missing text;
BEGIN
  SELECT n.model_version INTO missing
  FROM (SELECT DISTINCT model_version FROM new_verdicts) AS n
  WHERE NOT EXISTS (SELECT 1 FROM model_versions AS m WHERE m.id = n.model_version)
  LIMIT 1;
  IF FOUND THEN
    RAISE foreign_key_violation USING
      MESSAGE = format('insert or update on table "verdicts" violates foreign key constraint '
                       '"fk_verdicts_model_version"'),
      DETAIL = format('Key (model_version)=(%s) is not present in table "model_versions".', missing);
  END IF;
  RETURN NULL;
END
$$;
CREATE TRIGGER verdicts_model_version_exists_insert AFTER INSERT ON verdicts
  REFERENCING NEW TABLE AS new_verdicts FOR EACH STATEMENT EXECUTE FUNCTION ppl_verdicts_model_version_exists();
CREATE TRIGGER verdicts_model_version_exists_update AFTER UPDATE ON verdicts
  REFERENCING NEW TABLE AS new_verdicts FOR EACH STATEMENT EXECUTE FUNCTION ppl_verdicts_model_version_exists();

CREATE FUNCTION ppl_model_versions_referenced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF (TG_OP = 'DELETE' OR NEW.id IS DISTINCT FROM OLD.id)
     AND EXISTS (SELECT 1 FROM verdicts WHERE model_version = OLD.id) THEN
    RAISE foreign_key_violation USING
      MESSAGE = format('update or delete on table "model_versions" violates foreign key constraint '
                       '"fk_verdicts_model_version" on table "verdicts"'),
      DETAIL = format('Key (id)=(%s) is still referenced from table "verdicts".', OLD.id);
  END IF;
  RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END
$$;
CREATE TRIGGER model_versions_referenced BEFORE DELETE OR UPDATE OF id ON model_versions
  FOR EACH ROW EXECUTE FUNCTION ppl_model_versions_referenced();
"""

DROP_TRIGGERS = """
DROP TRIGGER model_versions_referenced ON model_versions;
DROP FUNCTION ppl_model_versions_referenced();
DROP TRIGGER verdicts_model_version_exists_update ON verdicts;
DROP TRIGGER verdicts_model_version_exists_insert ON verdicts;
DROP FUNCTION ppl_verdicts_model_version_exists();
"""


def _hex64(column: str) -> str:
    return f"length({column}) = 64 AND {column} !~ '[^0-9a-f]'"


def upgrade() -> None:
    # NOT VALID + VALIDATE: the new check is proven on existing rows by a scan, as ADD CONSTRAINT would do.
    for table, column, name in (("verdicts", "sha256", "ck_verdicts_sha256"),
                                ("detection_failures", "source_sha256", "ck_detection_failures_source_sha256")):
        op.drop_constraint(name, table, type_="check")
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({_hex64(column)}) NOT VALID")
        op.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}")

    op.drop_constraint("fk_verdicts_model_version", "verdicts", type_="foreignkey")
    op.execute(CHECK_VERDICT_MODEL_VERSIONS)
    op.drop_index("ix_verdicts_model_version_id", table_name="verdicts")

    op.drop_index("ix_submissions_verdict_id", table_name="submissions")
    op.create_index("ix_submissions_verdict_id", "submissions", ["verdict_id"],
                    postgresql_where=sa.text("verdict_id IS NOT NULL"))
    op.drop_index("ix_submissions_failure_id", table_name="submissions")
    op.create_index("ix_submissions_failure_id", "submissions", ["failure_id"],
                    postgresql_where=sa.text("failure_id IS NOT NULL"))
    op.drop_index("ix_submissions_answered_at", table_name="submissions")
    op.create_index("ix_submissions_answered_at", "submissions", ["answered_at"], postgresql_using="brin")


def downgrade() -> None:
    op.drop_index("ix_submissions_answered_at", table_name="submissions")
    op.create_index("ix_submissions_answered_at", "submissions", ["answered_at"])
    op.drop_index("ix_submissions_failure_id", table_name="submissions")
    op.create_index("ix_submissions_failure_id", "submissions", ["failure_id"])
    op.drop_index("ix_submissions_verdict_id", table_name="submissions")
    op.create_index("ix_submissions_verdict_id", "submissions", ["verdict_id"])

    op.create_index("ix_verdicts_model_version_id", "verdicts", ["model_version", "id"])
    op.execute(DROP_TRIGGERS)
    op.create_foreign_key("fk_verdicts_model_version", "verdicts", "model_versions", ["model_version"], ["id"])

    for table, column, name in (("verdicts", "sha256", "ck_verdicts_sha256"),
                                ("detection_failures", "source_sha256", "ck_detection_failures_source_sha256")):
        op.drop_constraint(name, table, type_="check")
        op.create_check_constraint(name, table, f"{column} ~ {OLD_HEX64}")
