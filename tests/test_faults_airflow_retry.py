"""An Airflow retry while the first attempt still sends, on a real Airflow 3.3 (api-server,
scheduler, dag-processor, LocalExecutor, PostgreSQL metadata), judged at the provider.

The fault: the task's supervisor (the LocalExecutor worker that forked the task process
and heartbeats for it through the execution API) is frozen with SIGSTOP while the task
process keeps sending. With `[scheduler] task_instance_heartbeat_timeout` at 10 s the
scheduler finds the task instance without a heartbeat, fails it into `up_for_retry`
(retries=1, retry_delay=0) and runs attempt 2 in another worker, while attempt 1's
dispatcher is still alive, holds its claims and sends: the situation of a supervisor that
no longer reaches the api-server (a partition between worker and api-server, a stalled
supervisor) while the task process itself goes on.

The task does what a campaign DAG's send task does for a step
(`retention_airflow.campaign_dag`): the run's frozen audience (`start_run`), the channel
from its Airflow connection (`retention_airflow.hooks.channels_for`, the connection given
as an `AIRFLOW_CONN_*` variable), `dispatch_step` with RETENTION_DISPATCH_THREADS. The
campaign is the one-step `fault_email` of `faults.py`, planned by the test. Each attempt
appends what it did (start, every batch, result) to a JSON-lines file of its own.

The local SendGrid answers slowly (6 s a request) until both attempts' dispatchers hold
claims at the same time, seen in the ledger; then quickly, so the wave ends soon. The run
must end successful, both attempts must have sent, attempt 2 must not have settled any of
attempt 1's claims, and every recipient must have been accepted exactly once.
"""

from __future__ import annotations

import json
import signal
import textwrap
import time as clock
from pathlib import Path

import psutil
import pytest

from airflow_deployment import airflow_deployment  # noqa: F401  (pytest fixture)
from faults import make_shop, plan, tally
from retention import db
from retention_dev.stack import local_provider_stack

# one after another on one pytest-xdist worker: a real Airflow scheduler deployment
pytestmark = pytest.mark.xdist_group("serial")

TESTS = Path(__file__).resolve().parent
DAG_ID = "fault_airflow_retry"
N = 10_000                # recipients: ten SendGrid requests of 1000
SLOW_MS = 6_000           # per request until both attempts hold claims (client timeout: 30 s)
FAST_MS = 100             # afterwards
HEARTBEAT_TIMEOUT = 10    # seconds without a supervisor heartbeat before the scheduler acts

DAG_FILE = '''\
"""Written by tests/test_faults_airflow_retry.py: one `send` task, retried once at once,
that sends the `fault_email` campaign's step as a campaign DAG's send task does."""

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

TESTS = {tests!r}
RECORDS = {records!r}


@dag(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
     catchup=False, max_active_runs=1,
     default_args={{"retries": 1, "retry_delay": timedelta(seconds=0)}})
def fault_airflow_retry():
    @task(task_id="send")
    def send() -> dict:
        import json
        import os
        import sys
        import time

        from airflow.sdk import get_current_context

        sys.path.insert(0, TESTS)
        from faults import AS_OF, POLICY, campaign_yaml
        from retention.campaigns.dispatch import dispatch_step, dispatch_threads
        from retention.campaigns.engine import start_run
        from retention.campaigns.spec import parse_campaign
        from retention_airflow.hooks import channels_for

        attempt = get_current_context()["ti"].try_number
        path = os.path.join(RECORDS, f"attempt-{{attempt}}.jsonl")

        def record(**event):
            with open(path, "a") as fh:
                fh.write(json.dumps({{"t": time.time(), "pid": os.getpid(), **event}}) + "\\n")

        campaign = parse_campaign(campaign_yaml("email"), "fault.yaml")
        run = start_run(campaign, AS_OF, policy=POLICY)  # the frozen run the test planned
        channels = channels_for(campaign.step("wave").channels)
        record(event="start")
        result = dispatch_step(campaign, run, "wave", channels, workers=dispatch_threads(),
                               on_batch=lambda channel, n: record(event="batch", n=n))
        summary = {{"messages": result["timings"]["messages"], "sent": result["sent"],
                   "unknown": result["unknown"], "reconciled": result["reconciled"],
                   "claimed_elsewhere": result["claimed_elsewhere"]}}
        record(event="done", **summary)
        return summary

    send()


fault_airflow_retry()
'''


def _wait_for(condition, what: str, seconds: float, af=None, run_id: str | None = None):
    """Poll `condition` until it returns something truthy; fail after `seconds`."""
    deadline = clock.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if clock.monotonic() > deadline:
            report = af.report(DAG_ID, run_id) if af is not None else ""
            raise AssertionError(f"timed out after {seconds:.0f}s waiting for {what}\n{report}")
        clock.sleep(0.2)


def _events(records: Path, attempt: int) -> list[dict]:
    path = records / f"attempt-{attempt}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _event(records: Path, attempt: int, name: str) -> dict | None:
    return next((e for e in _events(records, attempt) if e["event"] == name), None)


def _live_claim_owners(url: str) -> int:
    """Dispatchers holding claims right now (distinct owners of live claims)."""
    with db.connect(url) as conn:
        return conn.execute("select count(distinct claim_owner) from ops.claims").fetchone()[0]


@pytest.mark.scheduler
@pytest.mark.slow
def test_airflow_retry_while_the_first_attempt_still_sends(
        airflow_deployment, database_url, tmp_path):  # noqa: F811
    started = clock.monotonic()
    make_shop(database_url, N)
    campaign, _ = plan(database_url, "email")
    records = tmp_path / "records"
    records.mkdir()
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / f"{DAG_ID}.py").write_text(DAG_FILE.format(tests=str(TESTS), records=str(records),
                                                       dag_id=DAG_ID))

    with local_provider_stack(latency_ms=SLOW_MS) as (handle, conn_env):
        sendgrid = handle.providers["sendgrid"]
        af = airflow_deployment(dags, env={
            "RETENTION_DATABASE_URL": database_url,
            "RETENTION_PROMO_SECRET": "airflow-retry-test-secret",
            "RETENTION_DISPATCH_THREADS": "1",
            # short leases: a live dispatcher's claims must hold by its session, not its lease
            "RETENTION_CLAIM_LEASE_SECONDS": "2",
            "RETENTION_DISPATCH_SETTLE_WAIT_SECONDS": "120",
            **conn_env,
            # the supervisor heartbeats every second; 10 s of silence and the scheduler
            # (checking every second) fails the attempt into up_for_retry
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "1",
        }, dag_ids=[DAG_ID])
        run_id = af.trigger(DAG_ID)

        # Attempt 1 is mid-wave: its first request answered, the next one on the wire.
        _wait_for(lambda: _event(records, 1, "batch"), "attempt 1's first batch", 180, af, run_id)
        af.mark("attempt 1 sent a batch")
        task_pid = _events(records, 1)[0]["pid"]
        task_process = psutil.Process(task_pid)
        supervisor = task_process.parent()
        title = " ".join(supervisor.cmdline())
        assert title.startswith("airflow worker -- LocalExecutor"), title
        tis = af.task_instances(DAG_ID, run_id)
        assert [(ti["try_number"], ti["state"], ti["pid"]) for ti in tis] == \
            [(1, "running", task_pid)], tis

        supervisor.suspend()  # SIGSTOP: no more heartbeats; the task process goes on
        try:
            # The scheduler gives up on attempt 1 and attempt 2 starts while attempt 1's
            # dispatcher is alive; both hold claims at the same moment.
            _wait_for(lambda: _event(records, 2, "start"), "attempt 2 to start", 120, af, run_id)
            af.mark("attempt 2 started")
            assert task_process.is_running() and task_process.status() != psutil.STATUS_ZOMBIE
            assert _event(records, 1, "done") is None, "attempt 1 finished before attempt 2 began"
            _wait_for(lambda: _live_claim_owners(database_url) >= 2,
                      "both attempts' dispatchers to hold claims at once", 60, af, run_id)
            af.mark("both attempts hold claims")
            sendgrid.configure(latency_ms=FAST_MS)

            state = af.wait(DAG_ID, run_id, timeout=180)
            af.mark("run finished")
            assert state == "success", af.report(DAG_ID, run_id)
            first = _wait_for(lambda: _event(records, 1, "done"), "attempt 1's dispatcher to end",
                              120, af, run_id)
            second = _event(records, 2, "done")
            assert supervisor.status() == psutil.STATUS_STOPPED  # frozen all along
        finally:
            try:
                supervisor.resume()  # SIGCONT: it finds its attempt superseded
            except psutil.NoSuchProcess:
                pass

        print(f"\nattempt 1: {first}\nattempt 2: {second}\nseconds since start: {af.timings}")
        tis = af.task_instances(DAG_ID, run_id)
        assert [(ti["try_number"], ti["state"]) for ti in tis] == [(2, "success")], tis
        tries = af.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/send/tries").json()
        assert [(t["try_number"], t["state"]) for t in tries["task_instances"]] == \
            [(1, "failed"), (2, "success")], tries
        # The two attempts overlapped: attempt 2 started before attempt 1's dispatcher ended,
        # both sent, together exactly the wave, and attempt 2 settled none of attempt 1's
        # claims (no lookup, release or unknown: it waited for them).
        assert _event(records, 2, "start")["t"] < first["t"]
        assert first["messages"] > 0 and second["messages"] > 0, (first, second)
        assert first["messages"] + second["messages"] == N, (first, second)
        nothing = {"reconciled_sent": 0, "released": 0, "unknown": 0}
        assert first["reconciled"] == nothing and second["reconciled"] == nothing, (first, second)
        assert second["claimed_elsewhere"] == 0 and second["sent"] == N, second

        t = tally(handle, database_url, campaign.id, "email")
        assert t["recipients"] == N and t["accepted_once"] == N, t
        assert t["accepted_twice"] == 0 and t["lost"] == 0 and t["ledger_disagrees"] == 0, t
        assert t["unknown"] == 0 and t["statuses"] == {"sent": N}, t
        print(f"test seconds: {clock.monotonic() - started:.0f}")
