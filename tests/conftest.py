"""Shared fixtures: a fresh PostgreSQL database per test session (never a mock).

The server is RETENTION_TEST_DATABASE_URL, else RETENTION_DATABASE_URL, else the embedded
pgserver the quick start uses. Each session creates its own database on it and drops it
at the end, so tests never touch a developer's data.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

# Airflow reads its configuration at import: point it at a private home with a SQLite
# metadata database before any test imports it.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="retention-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME}/airflow.db"
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
# a killed dispatcher's claims are settled once their lease ran out: seconds, not a minute
os.environ.setdefault("RETENTION_CLAIM_LEASE_SECONDS", "2")

from retention import db  # noqa: E402
from retention.db.schema import ensure_schemas  # noqa: E402

#: sample data the tests read, shipped in the repository (docs/CONTRACT.md section 6)
DATA = ROOT / "tests" / "data"


def _server_url() -> str:
    explicit = os.environ.get("RETENTION_TEST_DATABASE_URL") or os.environ.get(
        "RETENTION_DATABASE_URL"
    )
    if explicit:
        return explicit
    return db.database_url()


def _with_database(url: str, name: str) -> str:
    return sa.engine.make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def server_url() -> str:
    return _server_url()


@pytest.fixture(scope="session")
def make_database(server_url):
    """Factory: a new empty database on the test server; all dropped at session end."""
    created: list[str] = []
    admin = _with_database(server_url, "postgres")

    def factory(prefix: str = "rt") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(db.libpq_dsn(admin), autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        created.append(name)
        return _with_database(server_url, name)

    yield factory
    with psycopg.connect(db.libpq_dsn(admin), autocommit=True) as conn:
        for name in created:
            conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture()
def database_url(make_database, monkeypatch) -> str:
    """A fresh database with raw and ops created; RETENTION_DATABASE_URL points at it."""
    url = make_database()
    with db.connect(url) as conn:
        ensure_schemas(conn)
    monkeypatch.setenv("RETENTION_DATABASE_URL", url)
    return url


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return DATA


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database (SQLite) for dag.test() runs."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True,
                   capture_output=True, env=os.environ.copy())
    return _AIRFLOW_HOME
