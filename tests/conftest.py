"""Shared fixtures: a fresh PostgreSQL database per test (never a mock).

The server is RETENTION_TEST_DATABASE_URL, else RETENTION_DATABASE_URL, else an embedded
pgserver of the tests' own (.retention/test-pgdata, beside the quick start's, with
`db.SCRATCH_SETTINGS`: no fsync, so checkpoints and commits do not wait for the disk),
started on first use by a test that asks for a database (never at import or
collection). Every database a session creates gets a unique name and is dropped at the
end, so tests never touch a developer's data and pytest-xdist workers never share one.

Tests marked `unit` need no database, no server and no Airflow (`bin/test -m unit`). The
hooks below hold them to it: a unit test that asks for a database or Airflow fixture fails
before any fixture is set up, and while a unit test runs the database settings point at a
socket that does not exist, so reaching PostgreSQL any other way fails too. A collection
that imported pgserver (the embedded server) is refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from unittest import mock

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
from retention.db.schema import upgrade as upgrade_schemas  # noqa: E402

#: sample data the tests read, shipped in the repository (docs/CONTRACT.md section 6)
DATA = ROOT / "tests" / "data"
#: the data directory of the tests' embedded server (when no server is named)
TEST_PGDATA = ROOT / ".retention" / "test-pgdata"

#: fixtures that reach PostgreSQL or Airflow; a test marked `unit` may use none of them
NOT_UNIT_FIXTURES = frozenset({"server_url", "make_database", "database_url", "airflow_db",
                               "airflow_deployment"})
#: the database a unit test sees: a socket directory that does not exist, named for the rule
UNIT_DATABASE_URL = "postgresql://unit@/unit?host=/unit-tests-use-no-database"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a pytest-xdist worker under --dist loadgroup: a test's xdist_group goes into its node
    id (`...::test@group`), which is what the controller schedules by. pytest-xdist 3.8 sets
    it through `Item._nodeid`, which pytest 9 no longer reads, so the groups would be
    ignored; this sets the node id itself."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        names = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                        for mark in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid.rsplit("]", 1)[-1]:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


def pytest_collection_finish(session: pytest.Session) -> None:
    if "pgserver" in sys.modules:
        raise pytest.UsageError(
            "collecting the tests imported pgserver: a test module starts the embedded "
            "PostgreSQL at import; ask for a database fixture instead")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("unit") is None:
        return
    used = sorted(NOT_UNIT_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if used:
        pytest.fail(f"{item.nodeid} is marked unit but uses {', '.join(used)}: a unit test "
                    "needs no database, no server and no Airflow", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    if item.get_closest_marker("unit") is None:
        return (yield)
    with mock.patch.dict(os.environ, {"RETENTION_TEST_DATABASE_URL": UNIT_DATABASE_URL,
                                      "RETENTION_DATABASE_URL": UNIT_DATABASE_URL}):
        os.environ.pop("DATABASE_URL", None)  # restored with the rest on leaving
        return (yield)


def _server_url() -> str:
    explicit = os.environ.get("RETENTION_TEST_DATABASE_URL") or os.environ.get(
        "RETENTION_DATABASE_URL"
    )
    if explicit:
        return explicit
    return db.embedded_url(TEST_PGDATA, scratch=True)


def _with_database(url: str, name: str) -> str:
    return sa.engine.make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def server_url() -> str:
    return _server_url()


@pytest.fixture(scope="session")
def make_database(server_url):
    """Factory: a new empty database on the test server, uniquely named (also across
    pytest-xdist workers); all dropped at session end."""
    created: list[str] = []
    admin = _with_database(server_url, "postgres")

    def factory(prefix: str = "rt", template: str | None = None) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(db.libpq_dsn(admin), autocommit=True) as conn:
            conn.execute(f'create database "{name}"'
                         + (f' template "{template}"' if template else ""))
        created.append(name)
        return _with_database(server_url, name)

    yield factory
    with psycopg.connect(db.libpq_dsn(admin), autocommit=True) as conn:
        for name in created:
            conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="session")
def migrated_template(make_database) -> str:
    """The name of a database at the head of the migrations, which `database_url` clones
    (`create database ... template`): a clone costs a fraction of migrating a new one."""
    url = make_database("tpl")
    upgrade_schemas(url)
    return sa.engine.make_url(url).database


@pytest.fixture()
def database_url(make_database, migrated_template, monkeypatch) -> str:
    """A fresh database at the head of the migrations (raw, ops and the prediction tables
    of marts); RETENTION_DATABASE_URL points at it."""
    url = make_database(template=migrated_template)
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
