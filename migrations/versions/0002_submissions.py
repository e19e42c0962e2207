"""Submissions: one row per job, whatever answered it (a new verdict, a stored one, or a failure).

``verdicts`` holds one row per (content, model version) and ``detection_failures`` one per (source, reason),
so a second job for content already judged, or for a source that already failed, had no row of its own: its
task id, external id and metadata were stored nowhere. Each answered job now gets a ``submissions`` row,
written in the same transaction as the verdict or failure it resolved to.

Existing data migrates: every stored verdict and failure becomes one submission (task id unknown, NULL),
timed by the verdict's ``created_at`` or the failure's ``first_seen``/``last_seen``. The downgrade drops the
table; verdicts and failures are untouched either way.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OUTCOMES = "outcome IN ('verdict', 'failure')"
ONE_ANSWER = ("(outcome = 'verdict' AND verdict_id IS NOT NULL AND failure_id IS NULL) OR "
              "(outcome = 'failure' AND failure_id IS NOT NULL AND verdict_id IS NULL)")

BACKFILL = """
INSERT INTO submissions (task_id, external_id, source, metadata, received_at, answered_at, outcome, verdict_id)
SELECT NULL, external_id, source, metadata, created_at, created_at, 'verdict', id FROM verdicts ORDER BY id;
INSERT INTO submissions (task_id, external_id, source, metadata, received_at, answered_at, outcome, failure_id)
SELECT NULL, external_id, source, NULL, first_seen, last_seen, 'failure', id FROM detection_failures ORDER BY id;
"""


def upgrade() -> None:
    op.create_table(
        "submissions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("task_id", sa.Text(), nullable=True),
        sa.Column("external_id", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("metadata", postgresql.JSONB(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("verdict_id", sa.BigInteger(), nullable=True),
        sa.Column("failure_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="submissions_pkey"),
        # Retention deletes old verdicts and failures; the submissions they answered go with them.
        sa.ForeignKeyConstraint(["verdict_id"], ["verdicts.id"], name="fk_submissions_verdict_id",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["failure_id"], ["detection_failures.id"], name="fk_submissions_failure_id",
                                ondelete="CASCADE"),
        sa.CheckConstraint(OUTCOMES, name="ck_submissions_outcome"),
        sa.CheckConstraint(ONE_ANSWER, name="ck_submissions_one_answer"),
    )
    # A redelivered job is answered again; the task id keeps it to one row.
    op.create_index("uq_submissions_task_id", "submissions", ["task_id"], unique=True,
                    postgresql_where=sa.text("task_id IS NOT NULL"))
    op.create_index("ix_submissions_external_id", "submissions", ["external_id"],
                    postgresql_where=sa.text("external_id IS NOT NULL"))
    op.create_index("ix_submissions_answered_at", "submissions", ["answered_at"])
    # Foreign-key lookups (and the cascades of retention deletes) need these.
    op.create_index("ix_submissions_verdict_id", "submissions", ["verdict_id"])
    op.create_index("ix_submissions_failure_id", "submissions", ["failure_id"])
    op.execute(BACKFILL)


def downgrade() -> None:
    op.drop_index("ix_submissions_failure_id", table_name="submissions")
    op.drop_index("ix_submissions_verdict_id", table_name="submissions")
    op.drop_index("ix_submissions_answered_at", table_name="submissions")
    op.drop_index("ix_submissions_external_id", table_name="submissions")
    op.drop_index("uq_submissions_task_id", table_name="submissions")
    op.drop_table("submissions")
