"""The database's lifecycle: engines, Alembic migrations, and creating and dropping databases.

Every worker may call ``migrate`` at start-up: an advisory lock (``MIGRATION_LOCK_ID``, taken in
``migrations/env.py``) serialises them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url

if TYPE_CHECKING:
    from alembic.config import Config

Bind = Engine | Connection

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
ALEMBIC_INI: Final = REPO_ROOT / "alembic.ini"
MIGRATIONS_DIR: Final = REPO_ROOT / "migrations"

# Key of the transaction-scoped advisory lock that serialises `migrate` when several workers start at once
# (an arbitrary constant, unique within this database; worker.db has the others).
MIGRATION_LOCK_ID: Final = 0x70706C_0001


def normalise_url(url: str) -> str:
    """Pin the psycopg 3 driver: a bare ``postgresql://`` (or Heroku-style ``postgres://``) URL would make
    SQLAlchemy look for psycopg2, which is not installed."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, *, connect_timeout: float | None = None) -> Engine:
    """An engine whose pool checks connections before use, so a database restart costs one reconnect instead
    of one failed batch. ``connect_timeout`` (seconds) bounds a connection attempt to a dead host (``doctor``).
    Create the engine after the worker process forks: pooled connections must not cross a fork.

    Each new connection creates its session's staging tables (``worker.db.create_staging_tables``), which the
    batch writes fill by COPY."""
    connect_args: dict[str, Any] = {}
    if connect_timeout is not None:
        connect_args["connect_timeout"] = max(1, math.ceil(connect_timeout))  # libpq takes whole seconds
    engine = create_engine(normalise_url(url), pool_pre_ping=True, connect_args=connect_args)
    from worker.db import create_staging_tables  # worker.db imports this module

    event.listen(engine, "connect", create_staging_tables)
    return engine


@contextmanager
def transaction(bind: Bind) -> Iterator[Connection]:
    """A connection in a transaction: a new committed one for an Engine, the caller's for a Connection."""
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            yield conn
    else:
        yield bind


def alembic_config(url: str | None = None) -> Config:
    """The repository's Alembic configuration, usable from any working directory.

    The URL travels as a config attribute rather than ``sqlalchemy.url`` because the ini parser would treat
    a ``%`` in a URL-encoded password as interpolation. Logging is left alone: ``fileConfig`` in env.py would
    otherwise replace the calling application's logging setup.
    """
    from alembic.config import Config

    if not MIGRATIONS_DIR.is_dir():
        raise RuntimeError(f"the Alembic migrations are not next to the worker package ({MIGRATIONS_DIR}); "
                           "install the repository (pip install -e .) rather than a built wheel")
    config = Config(str(ALEMBIC_INI) if ALEMBIC_INI.is_file() else None)
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["configure_logging"] = False
    if url is not None:
        config.attributes["database_url"] = normalise_url(url)
    return config


def migrate(url: str, revision: str = "head") -> None:
    """``alembic upgrade head`` on ``url``. Safe to run from several processes at once (advisory lock)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def create_database_if_missing(url: str, *, drop_first: bool = False) -> bool:
    """CREATE DATABASE for the URL's database when there is none (``ppl-worker migrate --create-database``,
    for the demo and development; production databases are made by their owners). ``drop_first`` drops it
    first, rows and all (``--recreate-database``). True if it was created."""
    from sqlalchemy.pool import NullPool

    target = make_url(normalise_url(url))
    if not target.database:
        raise ValueError("the database URL names no database to create")
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            name = conn.dialect.identifier_preparer.quote(target.database)
            if drop_first:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :name"),
                            {"name": target.database}).scalar():
                return False
            conn.execute(text(f"CREATE DATABASE {name}"))
            return True
    finally:
        admin.dispose()


@contextmanager
def temporary_database(server_url: str, *, prefix: str, migrated: bool = True,
                       connect_timeout: float = 10) -> Iterator[str]:
    """A new database ``<prefix><hex>`` on the server of ``server_url``, migrated unless asked not to; dropped
    afterwards even on error (FORCE: pooled connections of workers that used it do not keep it alive). For
    the tests and ``ppl-worker bench``."""
    import secrets

    from sqlalchemy.pool import NullPool

    name = f"{prefix}{secrets.token_hex(6)}"
    server = make_url(normalise_url(server_url))
    admin = create_engine(server, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                          connect_args={"connect_timeout": max(1, math.ceil(connect_timeout))})
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = server.set(database=name).render_as_string(hide_password=False)
            if migrated:
                migrate(url)
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def head_revision() -> str:
    """The newest revision shipped with this code."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no Alembic revisions found under {MIGRATIONS_DIR}")
    return head


def schema_revision(conn: Connection) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()
