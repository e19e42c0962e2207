"""Provenance in every verdict: the document, what decided the label, and the columns analysts filter on.

``verdicts`` gains (issue 14; ``ppl_model.provenance``):

* ``provenance`` JSONB: ``Provenance.to_json()`` of the image (C2PA manifest, IPTC source types, generator
  metadata, and the ``provenance_error`` entries of what could not be read). NULL for rows written before this
  revision: nothing was read for them.
* ``decision`` text NOT NULL, ``'model'`` by default (so every existing row migrates to ``'model'``, which is what
  decided it): ``c2pa``, ``metadata`` or ``model`` (``ppl_model.categories.Decision``).
* Copied out of the document for filtering: ``provenance_kind`` (the strongest signal: ``c2pa``, ``iptc``,
  ``generator_metadata`` or ``none``), ``declared_generator``, ``c2pa_state`` (``invalid``/``valid``/``trusted``),
  ``c2pa_signer`` (the signing certificate's issuer) and ``frames`` (the file's frame count). All NULL on old rows.

Constraints: each enumerated column holds its enum's values; the label check becomes "the model's label where the
model decided, ``fake`` where provenance did" (``ck_verdicts_label_follows_decision`` replaces
``ck_verdicts_label_matches_score``); a ``c2pa`` decision needs a manifest that validates. Added ``NOT VALID`` and
then validated, as revision 0003 does (each scan proves them on existing rows).

Indexes: three partial btrees for the queries of ``docs/queries.md`` and the filters of ``ppl-worker verdicts``,
each over the rare rows only (``decision <> 'model'``, ``provenance_kind <> 'none'``, ``declared_generator IS NOT
NULL``): a row the model decided, with no provenance, costs each a predicate test and no index entry, so the write
path keeps its cost (``benchmarks/storage_bench.py``; docs/PERFORMANCE.md).

``latest_verdicts`` is recreated with the new columns (after ``created_at``, in table order).

Downgrade: the view, indexes, constraints and columns of revision 0003 exactly. A row whose label provenance decided
gets the model's label back (``fake`` when ``score >= threshold``): revision 0003's check demands it, and the
columns that justified the other label are dropped.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-15 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every verdict column in table order, as revision 0001's view lists them.
VERDICT_COLUMNS_0003 = """id, sha256, model_version, score, label, threshold, source, external_id, metadata, width,
       height, format, patch_mean, patch_max, patch_p90, patch_frac_above, top_patch_row, top_patch_col,
       patch_grid, grid_rows, grid_cols, timings_ms, created_at"""
NEW_COLUMNS = "provenance, decision, provenance_kind, declared_generator, c2pa_state, c2pa_signer, frames"


def _latest_verdicts(columns: str) -> str:
    # One row per image content: its verdict with the greatest (created_at, id), with every verdict column.
    return f"""
CREATE VIEW latest_verdicts AS
SELECT DISTINCT ON (sha256)
       {columns}
FROM verdicts
ORDER BY sha256, created_at DESC, id DESC
"""


# The values of ppl_model.categories' enums, as of this revision (a later change to an enum needs its own revision).
DECISIONS = ("c2pa", "metadata", "model")
PROVENANCE_KINDS = ("c2pa", "iptc", "generator_metadata", "none")
C2PA_STATES = ("invalid", "valid", "trusted")


def _one_of(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(value) for value in values)})"


LABEL_MATCHES_SCORE = "label = CASE WHEN score >= threshold THEN 'fake' ELSE 'real' END"
LABEL_FOLLOWS_DECISION = ("label = CASE WHEN decision <> 'model' THEN 'fake' "
                          "WHEN score >= threshold THEN 'fake' ELSE 'real' END")
CHECKS = {
    "ck_verdicts_label_follows_decision": LABEL_FOLLOWS_DECISION,
    "ck_verdicts_decision": _one_of("decision", DECISIONS),
    "ck_verdicts_provenance_kind": _one_of("provenance_kind", PROVENANCE_KINDS),
    "ck_verdicts_c2pa_state": _one_of("c2pa_state", C2PA_STATES),
    "ck_verdicts_c2pa_decision": "decision <> 'c2pa' OR c2pa_state IN ('valid', 'trusted')",
    "ck_verdicts_frames": "frames >= 1",
}
INDEXES = {  # name: (columns, predicate)
    "ix_verdicts_decision_created_at": (["decision", "created_at"], "decision <> 'model'"),
    "ix_verdicts_provenance_kind_created_at": (["provenance_kind", "created_at"], "provenance_kind <> 'none'"),
    "ix_verdicts_declared_generator_created_at": (["declared_generator", "created_at"],
                                                  "declared_generator IS NOT NULL"),
}


def upgrade() -> None:
    op.execute("DROP VIEW latest_verdicts")
    # Nullable columns and a constant default: PostgreSQL adds them without rewriting the table.
    op.add_column("verdicts", sa.Column("provenance", postgresql.JSONB(none_as_null=True), nullable=True))
    op.add_column("verdicts", sa.Column("decision", sa.Text(), server_default=sa.text("'model'"), nullable=False))
    for name in ("provenance_kind", "declared_generator", "c2pa_state", "c2pa_signer"):
        op.add_column("verdicts", sa.Column(name, sa.Text(), nullable=True))
    op.add_column("verdicts", sa.Column("frames", sa.Integer(), nullable=True))

    op.drop_constraint("ck_verdicts_label_matches_score", "verdicts", type_="check")
    for name, condition in CHECKS.items():
        op.execute(f"ALTER TABLE verdicts ADD CONSTRAINT {name} CHECK ({condition}) NOT VALID")
        op.execute(f"ALTER TABLE verdicts VALIDATE CONSTRAINT {name}")

    for name, (columns, predicate) in INDEXES.items():
        op.create_index(name, "verdicts", columns, postgresql_where=sa.text(predicate))

    op.execute(_latest_verdicts(f"{VERDICT_COLUMNS_0003},\n       {NEW_COLUMNS}"))


def downgrade() -> None:
    op.execute("DROP VIEW latest_verdicts")
    for name in INDEXES:
        op.drop_index(name, table_name="verdicts")
    for name in CHECKS:
        op.drop_constraint(name, "verdicts", type_="check")
    op.execute(f"UPDATE verdicts SET label = CASE WHEN score >= threshold THEN 'fake' ELSE 'real' END "
               f"WHERE decision <> 'model' AND NOT ({LABEL_MATCHES_SCORE})")
    op.create_check_constraint("ck_verdicts_label_matches_score", "verdicts", LABEL_MATCHES_SCORE)
    for name in ("frames", "c2pa_signer", "c2pa_state", "declared_generator", "provenance_kind", "decision",
                 "provenance"):
        op.drop_column("verdicts", name)
    op.execute(_latest_verdicts(VERDICT_COLUMNS_0003))
