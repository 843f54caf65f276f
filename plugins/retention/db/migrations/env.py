"""Alembic's environment: migrate the engine retention.db.schema passes in.

Runs every pending revision in one transaction, after taking an advisory lock, so two
processes upgrading one database at once run the revisions once: the second finds the
version table at head when it gets the lock.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from retention.db.schema import VERSION_SCHEMA, VERSION_TABLE

#: held for the upgrade's transaction; the key is the one `hashtext` gives in SQL
LOCK = "retention.db.migrations"
#: how long a statement of a migration may wait for a table lock once the advisory lock
#: is held: a clear error instead of waiting without end on a long transaction
LOCK_TIMEOUT = "60s"


def run_migrations_online() -> None:
    engine = context.config.attributes.get("engine")
    if engine is None:
        raise RuntimeError("run migrations through retention.db.schema (upgrade, "
                           "ensure_schemas): it passes the engine of the database")
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            version_table=VERSION_TABLE,
            version_table_schema=VERSION_SCHEMA,
            transaction_per_migration=False,
        )
        with context.begin_transaction():
            connection.execute(text("select pg_advisory_xact_lock(hashtext(:key))"),
                               {"key": LOCK})
            connection.execute(text("select set_config('lock_timeout', :t, true)"),
                               {"t": LOCK_TIMEOUT})
            connection.execute(text(f"create schema if not exists {VERSION_SCHEMA}"))
            context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported: run "
                       "`retention db upgrade` against the database")
run_migrations_online()
