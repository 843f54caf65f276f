"""The tables the pipeline owns outside dbt, kept at the head of its Alembic migrations.

Schemas `raw` (the contract's input), `ops` (the pipeline's own state) and the two tables
of `marts` that `retention.warehouse.predict` writes are created and changed only by the
revisions under `migrations/versions/`. Alembic records the revision in
`ops.alembic_version`.

* `upgrade(url)` runs `alembic upgrade head` (`retention db upgrade`); the Airflow init
  container runs it before any task.
* `ensure_schemas(conn)` is what the product's entry points call before they read or
  write: one query when the database is at head, else the upgrade (on a connection of
  its own, to the same database).

Concurrent upgrades of one database are serialised by an advisory lock taken in env.py,
so parallel tasks that each find the database behind head upgrade it once.

A new revision: `retention.db.schema.revision("what it changes")` writes the file under
`migrations/versions/`; fill in its upgrade() and downgrade().
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import sqlalchemy as sa
from psycopg.conninfo import make_conninfo
from sqlalchemy.pool import NullPool

from retention import db

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported where it is used: modules that import this one (the loaders, the
# DAG files through them) do not pay for it unless the database needs migrating.

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
VERSION_SCHEMA = "ops"
VERSION_TABLE = "alembic_version"

#: Alembic's `context` and `op` are module-wide proxies: one command at a time per process
#: (the advisory lock in env.py orders processes)
_COMMAND_LOCK = threading.Lock()


def alembic_config(engine: sa.Engine | None = None) -> Config:
    """The Alembic configuration of the package (no alembic.ini): env.py migrates through
    `engine`. The engine travels in `attributes`, never in an option: options are
    interpolated, and URLs hold `%` escapes."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


@functools.cache
def _scripts() -> tuple[str, frozenset[str]]:
    from alembic.script import ScriptDirectory

    with _COMMAND_LOCK:
        script = ScriptDirectory.from_config(alembic_config())
        heads = script.get_heads()
        known = frozenset(r.revision for r in script.walk_revisions())
    if len(heads) != 1:
        raise RuntimeError(f"the migrations under {MIGRATIONS} have {len(heads)} heads "
                           f"({', '.join(heads)}); merge them into one")
    return heads[0], known


def head() -> str:
    """The head revision of the migrations shipped with this package."""
    return _scripts()[0]


class UnknownRevision(RuntimeError):
    """The database is at a revision these migrations do not have (a newer release)."""


def _check_known(revision: str | None) -> None:
    if revision is not None and not set(revision.split(",")) <= _scripts()[1]:
        raise UnknownRevision(
            f"the database is at revision {revision}, which this release of the pipeline "
            f"does not have (its head is {head()}): a newer release migrated it; run that "
            "release's code against it")


def _engine(url: str | None) -> sa.Engine:
    return sa.create_engine(db.sqlalchemy_url(url), poolclass=NullPool)


def _engine_like(conn: psycopg.Connection) -> sa.Engine:
    """An engine whose connections go where `conn` goes (same server, user, database)."""
    info = conn.info
    conninfo = make_conninfo(**info.get_parameters(), password=info.password or None)
    return sa.create_engine("postgresql+psycopg://", poolclass=NullPool,
                            creator=lambda: psycopg.connect(conninfo))


def _run(engine: sa.Engine, revision: str) -> None:
    from alembic import command

    try:
        with _COMMAND_LOCK:
            command.upgrade(alembic_config(engine), revision)
    finally:
        engine.dispose()


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """`alembic upgrade <revision>` on the database at `url` (None: the configured one)."""
    _check_known(current(url))
    _run(_engine(url), revision)


def downgrade(url: str | None, revision: str) -> None:
    """`alembic downgrade <revision>`: reverts the revisions after `revision`."""
    from alembic import command

    engine = _engine(url)
    try:
        with _COMMAND_LOCK:
            command.downgrade(alembic_config(engine), revision)
    finally:
        engine.dispose()


def current_of(conn: psycopg.Connection) -> str | None:
    """The revision the database of `conn` is at; None for a database never migrated."""
    present = conn.execute("select to_regclass(%s) is not null",
                           (f"{VERSION_SCHEMA}.{VERSION_TABLE}",)).fetchone()[0]
    if not present:
        return None
    rows = conn.execute(f"select version_num from {VERSION_SCHEMA}.{VERSION_TABLE}").fetchall()
    return ",".join(sorted(r[0] for r in rows)) or None


def current(url: str | None = None) -> str | None:
    """The revision the database at `url` is at; None for a database never migrated."""
    with db.connect(url) as conn:
        return current_of(conn)


def ensure_schemas(conn: psycopg.Connection) -> None:
    """Bring the database of `conn` to head if it is not there. Safe to call on every
    command: at head it is one query on `conn`, and it leaves `conn`'s transaction open
    (the caller commits or rolls back as before)."""
    revision = current_of(conn)
    if revision == head():
        return
    _check_known(revision)
    _run(_engine_like(conn), "head")


def revision(message: str) -> None:
    """Write a new, empty revision file after the head (for developers)."""
    from alembic import command

    with _COMMAND_LOCK:
        command.revision(alembic_config(), message=message)
