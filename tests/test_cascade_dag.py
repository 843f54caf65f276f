"""The weekly promo cascade DAG, end to end on a generated shop: dag.test() and the real
scheduler (api-server, scheduler, dag-processor, LocalExecutor, PostgreSQL metadata).

The shop is generated, loaded and built once for the module; each run uses its own
as_of, so each has its own frozen audience and ledger rows.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from retention import db

ROOT = Path(__file__).resolve().parents[1]
SHOP_END = datetime(2026, 10, 31, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def built_shop(make_database, tmp_path_factory):
    from retention.build import build
    from retention.generate import generate_shop
    from retention.load import load_folder

    url = make_database("cascade")
    folder = tmp_path_factory.mktemp("shop")
    generate_shop(folder, customers=400, seed=11, end=SHOP_END)
    load_folder(folder, url, loaded_at=SHOP_END)
    build(as_of=SHOP_END, url=url, select="selector:lifetime")
    return url


@pytest.fixture()
def cascade_env(built_shop, monkeypatch):
    from retention.providers.stack import local_provider_stack

    monkeypatch.setenv("RETENTION_DATABASE_URL", built_shop)
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "cascade-test-secret")
    monkeypatch.setenv("RETENTION_WAIT_SCALE", "0.0001")  # a day's wait becomes 8.6 s
    monkeypatch.setenv("RETENTION_USE_POOLS", "false")
    with local_provider_stack() as (handle, env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield built_shop, handle, env


def _check_run(url: str, handle, run_id: str) -> dict:
    with db.connect(url) as conn:
        rows = conn.execute("select message_id, step, channel, status, reason from ops.messages "
                            "where run_id = %s", (run_id,)).fetchall()
    assert rows, "the cascade wrote no ledger rows"
    accepted: Counter = Counter()
    for r in handle.providers["sendgrid"].accepted:
        if r.path.endswith("/mail/send"):
            accepted.update(p["custom_args"]["message_id"] for p in r.body["personalizations"])
    for r in handle.providers["fcm"].accepted:
        if r.path.endswith(":send"):
            accepted[r.body["message"]["data"]["message_id"]] += 1
    sent = {r[0] for r in rows if r[3] == "sent" and r[2] in ("email", "mobile_push", "web_push")}
    ours = {k: v for k, v in accepted.items() if k in {r[0] for r in rows}}
    assert set(ours) == sent and (not ours or max(ours.values()) == 1)
    steps = Counter((r[1], r[3]) for r in rows)
    assert steps[("email", "sent")] > 0 and steps[("email", "holdout")] > 0
    return steps


def test_cascade_dag_runs_every_wave(cascade_env, airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    url, handle, _ = cascade_env
    dag = DagBag(dag_folder=str(ROOT / "dags" / "weekly_promo_cascade.py")).dags["weekly_promo_cascade"]
    as_of = datetime(2026, 10, 26, 7, tzinfo=timezone.utc)  # a Monday inside the data
    run = dag.test(logical_date=as_of)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert set(states.values()) == {"success"}, states
    assert {"wait_mobile_push", "send_telegram", "deliver_deferred_email"} <= set(states)
    steps = _check_run(url, handle, f"weekly_promo@{as_of.isoformat().replace('+00:00', 'Z')}")
    assert steps[("mobile_push", "sent")] > 0


@pytest.mark.scheduler
def test_cascade_dag_through_the_real_scheduler(cascade_env, make_database, tmp_path):
    from airflow_deployment import AirflowDeployment

    url, handle, env = cascade_env
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "weekly_promo_cascade.py").write_text(
        (ROOT / "dags" / "weekly_promo_cascade.py").read_text())
    deployment_env = {k: v for k, v in os.environ.items()
                      if k.startswith(("RETENTION_", "AIRFLOW_CONN_RETENTION_"))}
    deployment_env["RETENTION_USE_POOLS"] = "true"
    pools = {"sendgrid": 2, "fcm": 2, "telegram": 1, "sms_gateway": 1, "viber_gateway": 1}
    as_of = datetime(2026, 10, 19, 7, tzinfo=timezone.utc)
    with AirflowDeployment(dags, make_database("airflow_meta"), deployment_env, pools=pools) as af:
        run_id = af.trigger("weekly_promo_cascade", logical_date=as_of)
        state = af.wait("weekly_promo_cascade", run_id, timeout=600)
        states = af.task_states("weekly_promo_cascade", run_id)
    assert state == "success", states
    assert set(states.values()) == {"success"}, states
    steps = _check_run(url, handle, f"weekly_promo@{as_of.isoformat().replace('+00:00', 'Z')}")
    assert steps[("mobile_push", "sent")] > 0
