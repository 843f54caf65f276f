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

# one after another on one pytest-xdist worker: a real Airflow scheduler deployment
pytestmark = pytest.mark.xdist_group("serial")

ROOT = Path(__file__).resolve().parents[1]
SHOP_END = datetime(2026, 10, 31, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def built_shop(make_database, tmp_path_factory):
    from retention.warehouse.build import build
    from retention_dev.generate import generate_shop
    from retention.ingest.load import load_folder

    url = make_database("cascade")
    folder = tmp_path_factory.mktemp("shop")
    generate_shop(folder, customers=400, seed=11, end=SHOP_END)
    load_folder(folder, url, loaded_at=SHOP_END)
    build(as_of=SHOP_END, url=url, select="selector:lifetime")
    return url


@pytest.fixture()
def cascade_env(built_shop, monkeypatch):
    from retention_dev.stack import local_provider_stack

    monkeypatch.setenv("RETENTION_DATABASE_URL", built_shop)
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "cascade-test-secret")
    monkeypatch.setenv("RETENTION_WAIT_SCALE", "0.0001")  # a day's wait becomes 8.6 s
    monkeypatch.setenv("RETENTION_USE_POOLS", "false")
    with local_provider_stack() as (handle, env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield built_shop, handle, env


@pytest.mark.unit
def test_send_is_mapped_over_the_shard_setting(monkeypatch):
    """RETENTION_SEND_SHARDS dispatchers per step, in the provider's pool, with the send
    retry delay; deferred delivery and the next step wait for every shard."""
    from retention_airflow.campaign_dag import campaign_dag

    monkeypatch.setenv("RETENTION_SEND_SHARDS", "3")
    monkeypatch.setenv("RETENTION_SEND_RETRY_DELAY_SECONDS", "7")
    monkeypatch.setenv("RETENTION_USE_POOLS", "true")
    dag = campaign_dag("weekly_promo", dag_id="shards_check")
    send = dag.get_task("send_email")
    assert type(send).__name__.endswith("MappedOperator")
    assert send.op_kwargs_expand_input.value == {"shard": [0, 1, 2]}
    assert send.pool == "sendgrid" and send.retry_delay.total_seconds() == 7
    assert dag.get_task("send_mobile_push").pool == "fcm"
    assert set(send.downstream_task_ids) == {"deliver_deferred_email", "wait_mobile_push"}
    assert dag.get_task("plan_email").retry_delay.total_seconds() == 120


def _rows(holdouts: tuple[int, int], **steps: tuple[int, int]) -> dict:
    """Ledger rows per (step, status, reason): the campaign and global holdouts' rows on
    the first step, and per step (sent, suppressed for no consent); zero counts left out."""
    rows = {("email", "holdout", "campaign holdout"): holdouts[0],
            ("email", "holdout", "global holdout"): holdouts[1]}
    for step, (sent, no_consent) in steps.items():
        rows[(step, "sent", None)] = sent
        rows[(step, "suppressed", "no consent")] = no_consent
    return {key: n for key, n in rows.items() if n}


def _check_run(url: str, handle, run_id: str, audience: dict[str, int]) -> Counter:
    """The run's frozen audience is `audience` (members per arm: variants A, B and the
    campaign and global holdouts); every planned message went out, and what the provider
    stand-ins accepted is exactly the ledger's sent rows, each once. Returns the rows per
    (step, status, reason)."""
    with db.connect(url) as conn:
        size, holdout = conn.execute("select audience_size, holdout_size from ops.campaign_runs "
                                     "where run_id = %s", (run_id,)).fetchone()
        arms = dict(conn.execute("select coalesce(holdout_kind, variant), count(*) "
                                 "from ops.audience_members where run_id = %s group by 1",
                                 (run_id,)).fetchall())
        rows = conn.execute("select message_id, step, channel, status, reason, address, "
                            "customer_id from ops.messages where run_id = %s",
                            (run_id,)).fetchall()
    assert arms == audience, arms
    assert size == sum(audience.values()) and holdout == audience["campaign"] + audience["global"]
    accepted: Counter = Counter()
    for r in handle.providers["sendgrid"].accepted:
        if r.path.endswith("/mail/send"):
            accepted.update(p["custom_args"]["message_id"] for p in r.body["personalizations"])
    for r in handle.providers["fcm"].accepted:
        if r.path.endswith(":send"):
            accepted[r.body["message"]["data"]["message_id"]] += 1
    sent = {r[0] for r in rows if r[3] == "sent" and r[2] in ("email", "mobile_push", "web_push")}
    assert accepted == Counter(sent), (len(accepted), len(sent))  # each sent message once
    chats = Counter(str(r.body["chat_id"]) for r in handle.providers["telegram"].accepted
                    if r.path.endswith("/sendMessage"))
    assert chats == Counter(r[5] for r in rows if r[3] == "sent" and r[2] == "telegram")
    # the stand-ins accept everything: nothing is left waiting, failed or of unknown outcome
    assert {r[3] for r in rows} <= {"sent", "suppressed", "holdout"}, Counter(r[3] for r in rows)
    # holdout members have their one row on the first step and receive nothing
    holdouts = {r[6] for r in rows if r[3] == "holdout"}
    assert len(holdouts) == holdout and {r[1] for r in rows if r[3] == "holdout"} == {"email"}
    assert not holdouts & {r[6] for r in rows if r[3] == "sent"}
    return Counter((r[1], r[3], r[4]) for r in rows)


def test_cascade_dag_runs_every_wave(cascade_env, airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    url, handle, _ = cascade_env
    dag = DagBag(dag_folder=str(ROOT / "dags" / "weekly_promo_cascade.py")).dags["weekly_promo_cascade"]
    as_of = datetime(2026, 10, 26, 7, tzinfo=timezone.utc)  # a Monday inside the data
    run = dag.test(logical_date=as_of)
    tis = run.get_task_instances()
    states = {ti.task_id: ti.state for ti in tis}
    assert set(states.values()) == {"success"}, states
    # each step's send is mapped over RETENTION_SEND_SHARDS (default 2) dispatchers
    shards = Counter(ti.task_id for ti in tis if ti.task_id.startswith("send_"))
    assert shards == dict.fromkeys(("send_email", "send_mobile_push", "send_web_push",
                                    "send_telegram"), 2), shards
    assert {ti.map_index for ti in tis if ti.task_id == "send_email"} == {0, 1}
    assert {"wait_mobile_push", "send_telegram", "deliver_deferred_email"} <= set(states)
    steps = _check_run(url, handle, f"weekly_promo@{as_of.isoformat().replace('+00:00', 'Z')}",
                       {"A": 94, "B": 94, "campaign": 22, "global": 15})
    # the shop is generated from a seed and the arms are hashes: the same rows on every run
    assert steps == _rows(holdouts=(22, 15), email=(115, 12), mobile_push=(53, 9),
                          web_push=(27, 10), telegram=(13, 1)), steps


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
    steps = _check_run(url, handle, f"weekly_promo@{as_of.isoformat().replace('+00:00', 'Z')}",
                       {"A": 92, "B": 90, "campaign": 21, "global": 14})
    # the run a week later (test_cascade_dag_runs_every_wave, when it ran first in this
    # database) counts against the frequency cap of this run's last waves: each of their
    # reachable members is either sent or capped
    capped = {step: steps.pop((step, "suppressed", "frequency cap: global"), 0)
              for step in ("web_push", "telegram")}
    assert steps[("web_push", "sent", None)] + capped["web_push"] == 27, (steps, capped)
    assert steps[("telegram", "sent", None)] + capped["telegram"] == 14, (steps, capped)
    assert steps == _rows(holdouts=(21, 14), email=(115, 10), mobile_push=(53, 8),
                          web_push=(27 - capped["web_push"], 11),
                          telegram=(14 - capped["telegram"], 0)), (steps, capped)
