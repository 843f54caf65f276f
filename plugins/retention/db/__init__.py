"""Connections to the warehouse.

`database_url()` honours RETENTION_DATABASE_URL (then DATABASE_URL); with neither set it
starts, or reuses, an embedded PostgreSQL under RETENTION_HOME/pgdata so the quick start
needs no installed database. The embedded server keeps running between commands
(`retention db --stop` stops it).

A warehouse that cannot be reached (refused, unknown host, timed out, authentication
failed) raises `WarehouseUnreachable`, whose message is one line naming the server with
the password hidden: `cannot reach the warehouse at postgresql://user:***@host:5432/db:
connection refused`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import psycopg
import sqlalchemy as sa

from retention.config import paths, settings

_EMBEDDED_DB = "retention"


class WarehouseUnreachable(psycopg.OperationalError):
    """No connection to the warehouse could be made; the message names the server (the
    password hidden) and libpq's reason, on one line."""

    def __init__(self, url: str, error: BaseException) -> None:
        super().__init__(f"cannot reach the warehouse at {unquote(redacted_url(url))}: "
                         f"{_reason(error)}")


def _reason(error: BaseException) -> str:
    """libpq's reason, without its hints and the repeated server address:
    'connection to server at "h", port 5999 failed: Connection refused\n\tIs the server
    running...' -> 'connection refused'."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    reason = first.rsplit(" failed: ", 1)[-1].strip()
    reason = reason.removeprefix("FATAL:").strip()
    return (reason[:1].lower() + reason[1:]) if reason else type(error).__name__


def _embedded_server(pgdata):  # pragma: no cover - exercised by the quick start
    import warnings

    warnings.filterwarnings("ignore", module="platformdirs")
    import pgserver

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return pgserver.get_server(pgdata, cleanup_mode=None)


def _ensure_database(admin_url: str, name: str) -> None:
    with psycopg.connect(libpq_dsn(admin_url), autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'create database "{name}"')


#: server settings of a scratch server whose data need not survive a machine crash (the
#: test suite's): no fsync of WAL or data files and no full-page images. A killed server
#: process loses nothing with these (its writes are already in the kernel); only a crash
#: of the machine could.
SCRATCH_SETTINGS = {"fsync": "off", "full_page_writes": "off"}


def embedded_url(pgdata, *, scratch: bool = False) -> str:
    """The URL of the `retention` database of an embedded PostgreSQL whose data directory
    is `pgdata`, started (or created) on demand; `scratch` applies SCRATCH_SETTINGS."""
    # Processes that start together (pytest-xdist workers, parallel tasks) take turns:
    # pgserver creates the data directory outside its own lock, and two processes would
    # both try to create the database.
    from filelock import FileLock

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(pgdata.parent / f"{pgdata.name}.lock"):
        server = _embedded_server(pgdata)
        admin = server.get_uri("postgres")
        _ensure_database(admin, _EMBEDDED_DB)
        if scratch:
            with psycopg.connect(libpq_dsn(admin), autocommit=True) as conn:
                current = dict(conn.execute(
                    "select name, setting from pg_settings where name = any(%s)",
                    (list(SCRATCH_SETTINGS),)).fetchall())
                if current != SCRATCH_SETTINGS:
                    for name, value in SCRATCH_SETTINGS.items():
                        conn.execute(f"alter system set {name} = '{value}'")
                    conn.execute("select pg_reload_conf()")
    return server.get_uri(_EMBEDDED_DB)


def database_url() -> str:
    """The SQLAlchemy URL in use (credentials included; never log it, use `redacted_url`)."""
    explicit = settings().database_url or os.environ.get("DATABASE_URL")
    if explicit:
        return explicit
    return embedded_url(paths().pgdata)


def stop_embedded() -> bool:
    pgdata = paths().pgdata
    if not (pgdata / "postmaster.pid").exists():
        return False
    import subprocess

    from pgserver._commands import POSTGRES_BIN_PATH  # type: ignore[attr-defined]

    user = "pgserver" if os.geteuid() == 0 else None
    cmd = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), "-w", "stop"]
    if user:
        cmd = ["su", "-s", "/bin/sh", user, "-c", " ".join(cmd)]
    subprocess.run(cmd, check=True, capture_output=True)
    return True


def redacted_url(url: str | None = None) -> str:
    return sa.engine.make_url(url or database_url()).render_as_string(hide_password=True)


def sqlalchemy_url(url: str | None = None) -> sa.engine.URL:
    parsed = sa.engine.make_url(url or database_url())
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def libpq_dsn(url: str | None = None) -> str:
    """A libpq connection string (what psycopg and psql take) for the URL."""
    parsed = sa.engine.make_url(url or database_url())
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def connection_params(url: str | None = None) -> dict[str, str]:
    """host, port, user, password, dbname: for dbt profiles and Airflow connections."""
    raw = url or database_url()
    parts = urlsplit(raw.replace("postgresql+psycopg2://", "postgresql://").replace(
        "postgresql+psycopg://", "postgresql://"))
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "localhost"])[0]
    return {
        "host": host,
        "port": str(parts.port or 5432),
        "user": unquote(parts.username or "postgres"),
        "password": unquote(parts.password or ""),
        "dbname": (parts.path or "/postgres").lstrip("/") or "postgres",
    }


_engines: dict[str, sa.Engine] = {}


def engine(url: str | None = None) -> sa.Engine:
    key = url or database_url()
    if key not in _engines:
        _engines[key] = sa.create_engine(sqlalchemy_url(key), pool_pre_ping=True)
    return _engines[key]


@contextmanager
def connect(url: str | None = None, autocommit: bool = False) -> Iterator[psycopg.Connection]:
    """A psycopg 3 connection (COPY streaming, server-side work); `WarehouseUnreachable`
    when none can be made."""
    url = url or database_url()
    try:
        conn = psycopg.connect(libpq_dsn(url), autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise WarehouseUnreachable(url, exc) from None
    with conn:
        yield conn
