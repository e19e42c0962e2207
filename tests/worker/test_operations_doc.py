"""The retention SQL of docs/OPERATIONS.md, run against real rows: it deletes exactly what the guide says."""

from __future__ import annotations

import re

from sqlalchemy import text

from tests.helpers import REPO
from tests.worker.conftest import sha_of
from worker import db

OPERATIONS = REPO / "docs" / "OPERATIONS.md"


def sql_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```sql\n(.*?)^```$", markdown, re.MULTILINE | re.DOTALL)


def test_operations_retention_sql_deletes_exactly_what_it_says(engine, verdict_row):
    blocks = sql_blocks(OPERATIONS.read_text())
    assert len(blocks) == 2, "update this test with the guide's SQL"
    versions = re.findall(r"'([0-9a-f]{16})'", blocks[0])
    old, new = versions[0], versions[1]

    with engine.begin() as conn:
        for version in (old, new):
            db.register_model_version(conn, version, {"arch": "test"}, 0.5, activate=version == new)
        db.upsert_verdicts(conn, [verdict_row("both", old), verdict_row("both", new), verdict_row("old-only", old),
                                  verdict_row("new-only", new), verdict_row("ancient", new)])
        conn.execute(text("UPDATE verdicts SET created_at = now() - interval '500 days' WHERE sha256 = :s"),
                     {"s": sha_of("ancient")})
        db.record_failures(conn, [db.FailureRow("https://a.example/x", None, "timeout", "slow"),
                                  db.FailureRow("https://a.example/y", None, "timeout", "slow")])
        conn.execute(text("UPDATE detection_failures SET last_seen = now() - interval '200 days' "
                          "WHERE source = 'https://a.example/x'"))

    def remaining() -> set[tuple[str, str]]:
        with engine.connect() as conn:
            found = conn.execute(text("SELECT sha256, model_version FROM verdicts")).all()
        names = {sha_of(n): n for n in ("both", "old-only", "new-only", "ancient")}
        return {(names[sha], version) for sha, version in found}

    with engine.begin() as conn:
        deleted = conn.execute(text(blocks[0])).rowcount
    assert deleted == 1
    assert remaining() == {("both", new), ("old-only", old), ("new-only", new), ("ancient", new)}, (
        "only superseded verdicts of images the new version has judged may go")
    with engine.begin() as conn:
        for statement in filter(str.strip, blocks[1].split(";")):
            conn.execute(text(statement))
    assert remaining() == {("both", new), ("old-only", old), ("new-only", new)}
    with engine.connect() as conn:
        sources = set(conn.execute(text("SELECT source FROM detection_failures")).scalars())
    assert sources == {"https://a.example/y"}
