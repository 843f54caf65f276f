"""`retention airflow up|status|down`: the local Airflow a newcomer starts, run as the
command line runs it (a subprocess), checked through its REST API and its processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
DAG_FILES = {p.name for p in (ROOT / "dags").glob("*.py")}
COMPONENTS = ["api-server", "scheduler", "dag-processor", "triggerer"]


def test_every_pool_a_dag_task_uses_is_created(airflow_db, monkeypatch):
    """The pools `up` creates cover every pool a task of dags/ names: a missing pool would
    leave that task unscheduled forever."""
    from airflow.dag_processing.dagbag import DagBag

    from retention_airflow.local import provider_pools

    monkeypatch.setenv("RETENTION_USE_POOLS", "true")
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}, bag.import_errors
    used = {t.pool for dag in bag.dags.values() for t in dag.tasks} - {"default_pool"}
    assert {"sendgrid", "fcm"} <= used, used  # the cascade's email and push steps
    assert used <= set(provider_pools()), sorted(used - set(provider_pools()))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(env: dict, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retention.cli", "airflow", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _pids(run_dir: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text().split()[0]) for p in run_dir.glob("*.pid")}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _deployment(make_database, database_url, tmp_path) -> tuple[Path, int, str, dict]:
    """A home, a free port, a metadata database of its own and an environment with no
    AIRFLOW_*/RETENTION_* but those two, for one local deployment."""
    home = tmp_path / "home"
    metadata_db = sa.engine.make_url(make_database("airflow")).database
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "RETENTION_"))}
    env.update({"RETENTION_HOME": str(home), "RETENTION_DATABASE_URL": database_url})
    return home, _free_port(), metadata_db, env


@pytest.mark.scheduler
@pytest.mark.xdist_group("serial")  # one after another: a real Airflow deployment
def test_up_status_down(make_database, database_url, tmp_path):
    home, port, metadata_db, env = _deployment(make_database, database_url, tmp_path)
    airflow_home = home / "airflow"

    up = _cli(env, "up", "--port", str(port), "--metadata-database", metadata_db)
    started: dict[str, int] = _pids(airflow_home / "run")
    descendants: list[int] = []
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"Airflow is up at http://127.0.0.1:{port}" in up.stdout
        assert sorted(started) == sorted(COMPONENTS)
        password_file = airflow_home / "simple_auth_manager_passwords.json"
        assert str(password_file) in up.stdout
        assert password_file.stat().st_mode & 0o077 == 0
        password = json.loads(password_file.read_text())["admin"]

        base = f"http://127.0.0.1:{port}"
        http = requests.Session()
        http.trust_env = False
        health = http.get(f"{base}/api/v2/monitor/health", timeout=30).json()
        assert {k: health[k]["status"] for k in
                ("metadatabase", "scheduler", "dag_processor", "triggerer")} == dict.fromkeys(
            ("metadatabase", "scheduler", "dag_processor", "triggerer"), "healthy"), health
        token = http.post(f"{base}/auth/token", json={"username": "admin", "password": password},
                          timeout=30)
        assert token.status_code in (200, 201), token.text
        http.headers["Authorization"] = f"Bearer {token.json()['access_token']}"

        # every DAG file of dags/ parsed, without import errors
        assert http.get(f"{base}/api/v2/importErrors", timeout=30).json()["import_errors"] == []
        dags = http.get(f"{base}/api/v2/dags", params={"limit": 1000}, timeout=30).json()["dags"]
        assert {Path(d["fileloc"]).name for d in dags} == DAG_FILES
        assert "weekly_promo_cascade" in {d["dag_id"] for d in dags}

        # the pools exist, and every task's pool is one of them
        pools = {p["name"] for p in http.get(f"{base}/api/v2/pools", timeout=30).json()["pools"]}
        used = set()
        for dag in dags:
            tasks = http.get(f"{base}/api/v2/dags/{dag['dag_id']}/tasks", timeout=30).json()["tasks"]
            used |= {t["pool"] for t in tasks}
        assert "sendgrid" in used
        assert used <= pools, sorted(used - pools)

        # the password never reaches the command's output or a component log
        logs = "".join(p.read_text(errors="replace")
                       for p in (airflow_home / "logs").glob("*.log"))
        assert password not in up.stdout + up.stderr + logs

        # a second `up` sees it running and leaves it alone
        again = _cli(env, "up", "--port", str(port), "--metadata-database", metadata_db)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "already running" in again.stdout
        assert _pids(airflow_home / "run") == started
        assert all(psutil.pid_exists(pid) for pid in started.values())

        status = _cli(env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "scheduler healthy" in status.stdout

        for pid in started.values():
            descendants += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    finally:
        down = _cli(env, "down", timeout=120)
        left = [pid for pid in [*started.values(), *descendants] if not _gone(pid)]
        for pid in left:  # never leave a server behind, even when `down` failed
            psutil.Process(pid).kill()
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped" in down.stdout
    assert list((airflow_home / "run").glob("*.pid")) == []
    assert descendants, "the components had no child processes: the check below proves nothing"
    assert left == [], "`retention airflow down` left these processes running"
    status = _cli(env, "status")
    assert status.returncode == 3
    assert "running" not in status.stdout


@pytest.mark.scheduler
@pytest.mark.xdist_group("serial")
def test_dev_up_points_the_connections_at_the_stand_ins(make_database, database_url, tmp_path):
    """`retention-dev airflow up`: the stand-ins in a background process, Airflow started
    with their connections; `retention-dev airflow down` stops both."""
    home, port, metadata_db, env = _deployment(make_database, database_url, tmp_path)
    airflow_home = home / "airflow"
    dev = [sys.executable, "-m", "retention_dev.cli", "airflow"]

    up = subprocess.run([*dev, "up", "--port", str(port), "--metadata-database", metadata_db],
                        env=env, capture_output=True, text=True, timeout=420, cwd=ROOT)
    pids = _pids(airflow_home / "run")
    providers_file = airflow_home / "dev-providers.pid"
    providers = int(providers_file.read_text()) if providers_file.exists() else None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert providers and psutil.pid_exists(providers)
        assert sorted(pids) == sorted(COMPONENTS)
        # every channel connection reached the components' environment
        assert ("connections from the environment: retention_fcm, retention_sendgrid, "
                "retention_sms, retention_telegram, retention_viber") in up.stdout, up.stdout
        scheduler_env = psutil.Process(pids["scheduler"]).environ()
        sendgrid = json.loads(scheduler_env["AIRFLOW_CONN_RETENTION_SENDGRID"])
        # the stand-in answers where the connection points
        answer = requests.get(sendgrid["host"], timeout=10, proxies={"http": "", "https": ""})
        assert answer.status_code < 500
        # the connection secrets never reach the command's output or the logs
        logs = "".join(p.read_text(errors="replace") for p in (airflow_home / "logs").glob("*.log"))
        assert sendgrid["password"] not in up.stdout + up.stderr + logs
    finally:
        down = subprocess.run([*dev, "down"], env=env, capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
        left = [pid for pid in [*pids.values(), *([providers] if providers else [])]
                if not _gone(pid)]
        for pid in left:
            psutil.Process(pid).kill()
    assert down.returncode == 0, down.stdout + down.stderr
    assert "local provider servers stopped" in down.stdout
    assert left == [], "`retention-dev airflow down` left these processes running"
    assert not providers_file.exists()
