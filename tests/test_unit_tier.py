"""The unit tier keeps its promise (a test marked `unit` reaches no database), and an
xdist_group keeps its tests on one pytest-xdist worker.

Each case runs pytest in a subprocess on a small test module written to a temporary
folder, with tests/conftest.py loaded as a plugin (`-p conftest`) and a database setting
that leads nowhere, so a broken guard shows up as the wrong failure, never as a started
server.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import UNIT_DATABASE_URL

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
#: where the inner run's database settings point: a socket folder that does not exist
ELSEWHERE = "postgresql://other@/other?host=/no-such-folder-either"


def _pytest(folder: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    (folder / "test_inner.py").write_text(textwrap.dedent(module))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST", "RETENTION_")) and k != "DATABASE_URL"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT / "plugins")]),
               RETENTION_HOME=str(folder / "home"), RETENTION_TEST_DATABASE_URL=ELSEWHERE,
               RETENTION_DATABASE_URL=ELSEWHERE, COLUMNS="400")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(folder), "-p", "conftest", "-p", "no:cacheprovider",
         "-rA", *args, str(folder)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_a_unit_test_asking_for_a_database_or_reaching_one_fails(tmp_path):
    run = _pytest(tmp_path, """
        import pytest

        from retention import db

        @pytest.mark.unit
        def test_asks_for_a_database(database_url):
            pass

        @pytest.mark.unit
        def test_asks_for_airflow(airflow_db):
            pass

        @pytest.mark.unit
        def test_connects_anyway():
            with db.connect():
                pass

        def test_not_unit_sees_the_configured_database():
            assert db.database_url() == %r
    """ % ELSEWHERE)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    # refused before any fixture is set up: reported as an error in setup
    assert ("ERROR test_inner.py::test_asks_for_a_database - Failed: test_inner.py::"
            "test_asks_for_a_database is marked unit but uses database_url, make_database, "
            "server_url: a unit test needs no database") in out
    assert ("ERROR test_inner.py::test_asks_for_airflow - Failed: test_inner.py::"
            "test_asks_for_airflow"
            " is marked unit but uses airflow_db") in out
    # the connection went to the unit tier's nowhere, not to the configured database
    socket_folder = UNIT_DATABASE_URL.split("host=")[1]
    assert ("FAILED test_inner.py::test_connects_anyway - retention.db.WarehouseUnreachable: "
            f"cannot reach the warehouse at postgresql://unit@/unit?host={socket_folder}: "
            "no such file or directory") in out
    assert "PASSED test_inner.py::test_not_unit_sees_the_configured_database" in out
    assert "1 failed, 1 passed, 2 errors" in out
    assert not (tmp_path / "home").exists()  # no embedded server was started


def test_a_module_that_starts_the_embedded_server_at_import_is_refused(tmp_path):
    run = _pytest(tmp_path, """
        import pgserver  # what retention.db imports to start the embedded server

        def test_anything():
            pass
    """)
    out = run.stdout + run.stderr
    assert run.returncode == 4, out  # usage error: nothing ran
    assert "collecting the tests imported pgserver" in out
    assert "test_anything" not in out.split("collecting the tests")[1]


def test_an_xdist_group_runs_on_one_worker(tmp_path):
    """Two modules in one xdist_group and one module without: under -n 2 the group's six
    tests all run on one worker, each after the other, while the rest may go anywhere."""
    grouped = """
        import pytest

        pytestmark = pytest.mark.xdist_group("serial")

        @pytest.mark.parametrize("i", range(3))
        def test_grouped(i):
            pass
    """
    (tmp_path / "test_other_grouped.py").write_text(textwrap.dedent(grouped))
    (tmp_path / "test_free.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("i", range(6))
        def test_free(i):
            pass
    """))
    run = _pytest(tmp_path, grouped, "-n", "2", "-v")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    ran = re.findall(r"^\[(gw\d)\] \[ *\d+%\] PASSED (\S+)", out, re.MULTILINE)
    grouped = [(worker, nodeid) for worker, nodeid in ran if "::test_grouped[" in nodeid]
    assert len(ran) == 12 and len(grouped) == 6, out
    assert all(nodeid.endswith("@serial") for _, nodeid in grouped), out
    assert len({worker for worker, _ in grouped}) == 1, out
