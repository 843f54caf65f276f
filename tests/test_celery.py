"""The production shape, run: the campaign DAG on Airflow's CeleryExecutor with two Celery
workers (`retention airflow up --executor celery --workers 2` in a private home, the
broker a Redis database of this test's own), a 100,000-recipient e-mail wave sent by the
step's mapped send shards on both workers at once, and one worker killed with SIGKILL
(its whole process tree, as a machine that dies) while its shard is mid-wave.

Mid-wave is decided from outside, by polling what the SendGrid stand-in (in this process,
1 s latency per request so the wave lasts) has accepted. Airflow notices the dead task by
its missing heartbeats (`[scheduler] task_instance_heartbeat_timeout` 20 s here) and
retries it on the surviving worker; the dead dispatcher's claims are settled by the
dispatcher's lease rules (a batch that went out is looked up in the stand-in's e-mail
activity, the rest is released and sent). The proof is the stand-in's count: every
recipient accepted exactly once, nothing lost.

The customers are bench/bench_dispatch.py's (populate: N customers with an e-mail address
each); the campaign is a one-step transactional file, as bench/bench_celery.py sends, and
the deployment is bench_celery's CeleryDeployment.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_celery  # noqa: E402
import bench_dispatch  # noqa: E402

pytestmark = [pytest.mark.scheduler, pytest.mark.xdist_group("serial")]

RECIPIENTS = 100_000
BROKER_URL = "redis://127.0.0.1:6379/11"  # this test's own index (the bench uses 12)
CAMPAIGN = "celery_wave"


def _redis_answers() -> None:
    import redis

    client = redis.Redis.from_url(BROKER_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"no Redis on 127.0.0.1:6379 ({type(exc).__name__}): .ci/run starts one; "
                    f"by hand: redis-server --daemonize yes --save '' --appendonly no")
    finally:
        client.close()


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _talks_to(procs: list[psutil.Process], port: int) -> bool:
    """One of `procs` has a TCP connection open to 127.0.0.1:`port`."""
    for proc in procs:
        try:
            if any(c.raddr and c.raddr.port == port for c in proc.net_connections("tcp")):
                return True
        except psutil.Error:
            pass
    return False


def _timeline(handle, duplicated: set[str], killed_at: float) -> str:
    """The stand-in's view of duplicated messages: each mail request carrying one (time
    from the kill, its claim, how many of the duplicates, status) and each activity lookup
    (time, claim, messages found)."""
    lines = []
    for rec in handle.received:
        at = f"{rec.processed_at - killed_at:+8.2f} s"
        if rec.path == "/v3/mail/send" and isinstance(rec.body, dict):
            args = [p.get("custom_args") or {} for p in rec.body.get("personalizations", [])]
            hit = sum(1 for a in args if a.get("message_id") in duplicated)
            if hit:
                claims = sorted({str(a.get("claim")) for a in args})
                lines.append(f"{at} send {len(args)} msgs, claim {claims}, {hit} duplicated, "
                             f"status {rec.status}")
        elif rec.path == "/v3/messages":
            found = len((rec.response or {}).get("messages", []))
            lines.append(f"{at} lookup {rec.query.get('query', '')}: {found} found")
    return "\n".join(lines[:200])


# A killed worker's shard may leave claims whose requests the provider takes late; the
# surviving dispatcher must look them up only after the client's timeout
# (tests/test_faults_dispatch.py proves that rule alone). A failure prints the stand-in's
# timeline of the duplicated messages.
def test_two_workers_send_a_wave_once_through_a_killed_worker(make_database, tmp_path,
                                                              monkeypatch):
    from retention import db
    from retention_dev.servers import start

    _redis_answers()
    url = make_database("celery_wave")
    bench_dispatch.populate(url, RECIPIENTS)
    campaigns, dags = tmp_path / "campaigns", tmp_path / "dags"
    campaigns.mkdir()
    bench_celery.write_dags(dags, [bench_celery.write_campaign(campaigns, CAMPAIGN, "email")])

    api_key = "SG." + secrets.token_urlsafe(16)
    base_url, handle = start("sendgrid", api_keys={api_key}, latency_ms=1000)
    port = int(base_url.rsplit(":", 1)[1])
    # the components get only what is given here (the test process's own Airflow and
    # RETENTION_* settings are for dag.test())
    for name in [k for k in list(os.environ)
                 if k.startswith(("AIRFLOW", "RETENTION_"))]:
        monkeypatch.delenv(name)
    env = {
        "RETENTION_DATABASE_URL": url,
        "RETENTION_HOME": str(tmp_path / "home"),
        "RETENTION_PROMO_SECRET": secrets.token_hex(16),
        "RETENTION_SEND_SHARDS": "2",
        "RETENTION_SEND_RETRY_DELAY_SECONDS": "2",
        "RETENTION_CLAIM_LEASE_SECONDS": "10",
        "RETENTION_DISPATCH_SETTLE_WAIT_SECONDS": "600",
        "AIRFLOW_CONN_RETENTION_SENDGRID": json.dumps({
            "conn_type": "http", "host": base_url, "password": api_key,
            "extra": {"from_email": "shop@example.com", "activity_lag_seconds": 1}}),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    }
    dag_id = f"campaign_{CAMPAIGN}"
    killed: list[psutil.Process] = []
    try:
        with bench_celery.CeleryDeployment(tmp_path / "airflow", dags,
                                           make_database("celery_meta"), env, workers=2,
                                           concurrency=1, broker_url=BROKER_URL) as dep:
            local = dep.local
            assert local.components()[-2:] == ("worker-1", "worker-2")
            workers = {name: local.process(name) for name in ("worker-1", "worker-2")}
            run_id = dep.trigger(dag_id, bench_dispatch.AS_OF)

            # mid-wave: the stand-in has accepted a fifth of the wave and a worker's
            # send shard is talking to it
            deadline = time.monotonic() + 600
            victim = None
            while victim is None:
                accepted = sum(handle.accepted_message_ids().values())
                if accepted >= RECIPIENTS // 5:
                    victim = next((n for n, p in workers.items() if _talks_to(_tree(p), port)),
                                  None)
                assert accepted < RECIPIENTS * 0.8, "the wave ended before a worker was killed"
                assert time.monotonic() < deadline, (
                    f"the wave did not get going: {accepted} accepted, "
                    f"{dep.task_instances(dag_id, run_id)}")
                time.sleep(0.2)
            killed = _tree(workers[victim])
            for proc in killed:  # the whole tree at once, as a machine that dies
                try:
                    proc.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            at_kill = sum(handle.accepted_message_ids().values())
            killed_at = time.monotonic()
            _, alive = psutil.wait_procs(killed, timeout=30)
            assert not alive, alive
            survivor = "worker-2" if victim == "worker-1" else "worker-1"
            state = dep.wait(dag_id, run_id, timeout=900)
            tis = dep.task_instances(dag_id, run_id)
            returned = [dep.xcom(dag_id, run_id, "send_wave", i) for i in (0, 1)]
            assert workers[survivor].is_running()
            survivor_log = (local.logs_dir / f"{survivor}.log").read_text(errors="replace")
    finally:
        handle.stop()

    shards = {ti["map_index"]: ti for ti in tis if ti["task_id"] == "send_wave"}
    assert state == "success", tis
    assert {ti["state"] for ti in tis} == {"success"}, tis
    assert sorted(shards) == [0, 1]
    # the killed worker's shard failed by heartbeat timeout and its retry succeeded; the
    # other shard ran once
    assert sorted(ti["try_number"] for ti in shards.values()) == [1, 2], shards
    retried = next(i for i, ti in shards.items() if ti["try_number"] == 2)
    # its second attempt is a workload the surviving worker executed
    assert (f"task_id=send_wave/map_index={retried}/attempt=2.log" in survivor_log), \
        survivor_log[-3000:]
    assert 0 < at_kill < RECIPIENTS, at_kill
    # the dead dispatcher's claims were settled by the lease rules: the batches that went
    # out looked up in the stand-in's activity (sent), the others released and sent again
    settled = Counter()
    for counts in returned:
        settled.update(counts["reconciled"])
    assert settled["reconciled_sent"] + settled["released"] > 0, returned
    assert settled["unknown"] == 0, returned

    # exactly once at the provider: every recipient, no duplicate, nothing lost
    by_id, by_address = handle.accepted_message_ids(), handle.accepted_recipients()
    duplicated = {mid for mid, n in by_id.items() if n > 1}
    assert len(by_id) == RECIPIENTS and not duplicated, (
        f"{Counter(by_id.values())}; the stand-in's timeline (from the kill):\n"
        + _timeline(handle, duplicated, killed_at))
    assert len(by_address) == RECIPIENTS and set(by_address.values()) == {1}
    assert by_address.keys() == {f"c{i:08d}@example.com" for i in range(1, RECIPIENTS + 1)}
    with db.connect(url) as conn:
        rows = dict(conn.execute("select message_id, status from ops.messages "
                                 "where campaign_id = %s", (CAMPAIGN,)).fetchall())
    assert by_id.keys() == rows.keys()
    assert set(rows.values()) == {"sent"}, Counter(rows.values())
