"""The ingest DAG on a real Airflow: api-server, scheduler and dag-processor (LocalExecutor,
PostgreSQL metadata), triggered and watched through the REST API v2.

`tests/test_dags.py` runs the same DAG with `dag.test()`, in-process; this test proves the
scheduler path: the DAG file parsed by the dag-processor, the run queued by the scheduler,
each task run in its own process by the Task SDK supervisor through the execution API with
only the environment the deployment passes, XComs between tasks, and Asset events.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest

from airflow_deployment import airflow_deployment  # noqa: F401  (pytest fixture)
from retention import db
from retention.ingest.contract import LOAD_ORDER
from test_dags import _drop

# one after another on one pytest-xdist worker: a real Airflow scheduler deployment
pytestmark = pytest.mark.xdist_group("serial")

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "retention_ingest"


@pytest.mark.scheduler
def test_scheduler_runs_ingest_dag(airflow_deployment, database_url, tmp_path):  # noqa: F811
    dags = tmp_path / "dags"
    dags.mkdir()
    shutil.copy(ROOT / "dags" / "retention_ingest.py", dags)
    landing = tmp_path / "landing"
    ready = _drop(landing, "2026-10-31T00")
    not_ready = _drop(landing, "2026-10-31T01", ready=False)

    af = airflow_deployment(
        dags,
        env={
            "RETENTION_DATABASE_URL": database_url,
            "RETENTION_LANDING_DIR": str(landing),
            "RETENTION_CURRENCY": "UAH",
            "RETENTION_HOME": str(tmp_path / "retention_home"),
        },
        dag_ids=[DAG_ID],
    )
    run_id = af.trigger(DAG_ID, logical_date=datetime(2026, 10, 31, tzinfo=timezone.utc))
    state = af.wait(DAG_ID, run_id, timeout=300)
    af.mark("run finished")
    print(f"seconds since start: {af.timings}")

    assert state == "success", af.report(DAG_ID, run_id)
    assert af.task_states(DAG_ID, run_id) == {
        "find_ready_drops": "success", "load_drops": "success", "check_quality": "success",
    }, af.report(DAG_ID, run_id)
    run = af.run(DAG_ID, run_id)
    assert run["run_type"] == "manual" and run["dag_versions"], run
    # Each task ran in its own process, queued by the scheduler: not in this test process.
    tis = af.task_instances(DAG_ID, run_id)
    pids = {ti["pid"] for ti in tis}
    assert len(pids) == 3 and os.getpid() not in pids and None not in pids, tis
    assert all(ti["queued_when"] for ti in tis), tis

    with db.connect(database_url) as conn:
        assert conn.execute("select order_id from raw.orders").fetchall() == [("o1",)]
        quarantined = conn.execute("select reason from ops.quarantine").fetchall()
        loaded_at, = conn.execute("select loaded_at from ops.loads").fetchone()
    assert quarantined == [("negative total_amount",)]
    # The load time is the data interval end the scheduler gave the run.
    assert loaded_at == datetime.fromisoformat(run["data_interval_end"].replace("Z", "+00:00"))
    assert not ready.exists() and (landing / "loaded" / ready.name / "orders.csv").exists()
    assert not_ready.exists(), "a drop without _SUCCESS must wait"

    # check_quality's outlets: one Asset event per raw table, from this run.
    events = af.api("GET", "/assets/events", params={
        "source_dag_id": DAG_ID, "source_run_id": run_id, "limit": 100}).json()["asset_events"]
    assert sorted(e["name"] for e in events) == sorted(f"raw.{t}" for t in LOAD_ORDER)
    assert {e["source_task_id"] for e in events} == {"check_quality"}
