"""Alembic environment for the worker's database.

The URL comes, first found wins, from ``worker.database.migrate()`` (config attribute ``database_url``), the
command line (``alembic -x url=...``), ``sqlalchemy.url`` in alembic.ini (unset in the repository), and
finally ``PPL_DATABASE_URL`` through ``Settings.from_env()``, the worker's one reader of the environment.

Revisions are hand-written and must not import worker code (a revision describes the schema as it was
then); only this file uses ``worker.schema.metadata``, for ``alembic check`` and autogenerate drafts.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool, text

from worker.database import MIGRATION_LOCK_ID, normalise_url
from worker.schema import metadata
from worker.settings import Settings

config = context.config

# Called from the command line, log like alembic does; called from an application (worker.database.migrate sets
# configure_logging False), leave its logging alone.
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata


def database_url() -> str:
    url = (config.attributes.get("database_url")
           or context.get_x_argument(as_dictionary=True).get("url")
           or config.get_main_option("sqlalchemy.url")
           or Settings.from_env().database_url)
    return normalise_url(url)


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: print the DDL for a DBA instead of running it."""
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the pending revisions in one transaction (PostgreSQL DDL is transactional: all or nothing).

    Every worker may call ``migrate`` at start-up; a transaction-scoped advisory lock taken before Alembic
    reads the current revision makes the second one wait, then find the schema at head and do nothing.
    """
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
            with context.begin_transaction():
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_ID})
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
