"""Failure alerts on a real Airflow (api-server, scheduler, dag-processor, LocalExecutor),
received by local servers: an SMTP server (aiosmtpd), the SendGrid stand-in, and an HTTP
receiver for the Slack incoming webhook and the signed JSON webhook.

One deployment serves every case of this module (starting one costs 20-30 s); the
`retention_alerts_*` connections are set through the REST API per case, as an operator
would set them in the UI. Counts are taken at the receivers, never from our logs.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest

from airflow_deployment import AirflowDeployment, free_port
from retention import db

pytestmark = [pytest.mark.scheduler, pytest.mark.xdist_group("serial")]

ROOT = Path(__file__).resolve().parents[1]
UTC = timezone.utc
FAILING_DAG = "alerts_test_failing"
PII = "customer-7731@example.com"

FAILING_DAG_FILE = f'''
from datetime import timedelta

from airflow.sdk import task

from retention_airflow.dags import retention_dag


@retention_dag("{FAILING_DAG}", schedule=None, retry_delay=timedelta(seconds=1), tags=["test"],
               doc_md=None)
def {FAILING_DAG}():
    @task
    def fails():
        raise ValueError("row of {PII} broke it")  # the alert must not carry this text

    fails()


{FAILING_DAG}()
'''


class HttpReceiver:
    """Records every POST (path, headers, raw body) and answers 200 "ok" (Slack's answer)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()},
                                          body))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def on(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for p, h, b in self.requests if p == path]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Inbox:
    """aiosmtpd handler: keeps each message's envelope and text."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], str]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.content.decode("utf-8", "replace")))
        return "250 Message accepted for delivery"


class World:
    def __init__(self, af: AirflowDeployment, url: str, landing: Path, http: HttpReceiver,
                 inbox: Inbox, smtp_port: int, sendgrid, sendgrid_url: str) -> None:
        self.af, self.url, self.landing, self.http, self.inbox = af, url, landing, http, inbox
        self.smtp_port, self.sendgrid, self.sendgrid_url = smtp_port, sendgrid, sendgrid_url
        # generated per session, never committed
        self.webhook_key = secrets.token_hex(16)
        self.slack_path = f"/services/T0/B0/{secrets.token_hex(12)}"
        self.sendgrid_key = f"SG.{secrets.token_hex(12)}"

    def connection(self, conn_id: str, **fields) -> None:
        self.af.api("DELETE", f"/connections/{conn_id}", ok=(204, 404))
        if fields:
            if "extra" in fields:
                fields["extra"] = json.dumps(fields["extra"])
            self.af.api("POST", "/connections", json={"connection_id": conn_id, **fields})

    def all_channels(self, email: str = "smtp") -> None:
        if email == "smtp":
            self.connection("retention_alerts_email", conn_type="smtp", host="127.0.0.1",
                            port=self.smtp_port, extra={
                                "from_email": "airflow@shop.example", "disable_ssl": True,
                                "disable_tls": True, "retry_limit": 0,
                                "to": "oncall@shop.example, data@shop.example"})
        else:
            self.connection("retention_alerts_email", conn_type="sendgrid",
                            host=self.sendgrid_url, password=self.sendgrid_key,
                            extra={"from_email": "airflow@shop.example",
                                   "to": "oncall@shop.example"})
        self.connection("retention_alerts_slack", conn_type="slackwebhook",
                        password=self.http.url + self.slack_path)
        self.connection("retention_alerts_webhook", conn_type="http",
                        host=self.http.url + "/alerts", password=self.webhook_key)

    def reset(self) -> None:
        self.http.requests.clear()
        self.inbox.messages.clear()
        self.sendgrid.clear()

    def received(self) -> dict[str, int]:
        return {"smtp": len(self.inbox.messages), "sendgrid": len(self.sendgrid.accepted),
                "slack": len(self.http.on(self.slack_path)), "webhook": len(self.http.on("/alerts"))}

    def wait_received(self, expected: dict[str, int], timeout: float = 90.0) -> dict[str, int]:
        """Poll the receivers until they hold `expected` (the callback runs after the task
        reported its state, so the run may look failed a moment before the alert leaves)."""
        deadline = time.monotonic() + timeout
        while (got := self.received()) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        return got

    def task_log(self, dag_id: str, run_id: str, task_id: str) -> str:
        """Every attempt's log of the task, oldest first."""
        root = self.af.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        files = sorted(root.glob("**/*.log"), key=lambda p: p.stat().st_mtime)
        return "".join(p.read_text(errors="replace") for p in files)

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in (self.af.home / "logs").glob("**/*.log"))

    def webhook_alert(self) -> dict:
        from retention_airflow.alerts import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature

        (headers, body), = self.http.on("/alerts")
        assert verify_signature(self.webhook_key, headers.get(TIMESTAMP_HEADER.lower()), body,
                                headers.get(SIGNATURE_HEADER.lower()))
        assert not verify_signature("another-key", headers.get(TIMESTAMP_HEADER.lower()), body,
                                    headers.get(SIGNATURE_HEADER.lower()))
        assert not verify_signature(self.webhook_key, headers.get(TIMESTAMP_HEADER.lower()),
                                    body.replace(b"}", b" }", 1),
                                    headers.get(SIGNATURE_HEADER.lower()))
        stamp = headers.get(TIMESTAMP_HEADER.lower())
        assert not verify_signature(self.webhook_key, stamp, body,  # a replay, 10 min later
                                    headers.get(SIGNATURE_HEADER.lower()), now=float(stamp) + 600)
        return json.loads(body)

    def slack_text(self) -> str:
        (_, body), = self.http.on(self.slack_path)
        return json.loads(body)["text"]


@pytest.fixture(scope="module")
def world(make_database, migrated_template, tmp_path_factory):
    from aiosmtpd.controller import Controller

    from retention_dev.servers import start

    tmp = tmp_path_factory.mktemp("alerts")
    dags = tmp / "dags"
    dags.mkdir()
    for name in ("retention_ingest.py", "retention_triggers.py"):
        shutil.copy(ROOT / "dags" / name, dags)
    (dags / f"{FAILING_DAG}.py").write_text(FAILING_DAG_FILE)
    url = make_database(template=migrated_template)
    landing = tmp / "landing"

    http = HttpReceiver()
    inbox = Inbox()
    smtp_port = free_port()
    smtp = Controller(inbox, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    sendgrid_url = sendgrid = None
    af = None
    try:
        world = World(None, url, landing, http, inbox, smtp_port, None, "")  # type: ignore[arg-type]
        sendgrid_url, sendgrid = start("sendgrid", api_keys={world.sendgrid_key})
        world.sendgrid, world.sendgrid_url = sendgrid, sendgrid_url
        af = AirflowDeployment(dags, make_database("airflow"), env={
            "RETENTION_DATABASE_URL": url,
            "RETENTION_HOME": str(tmp / "home"),
            "RETENTION_LANDING_DIR": str(landing),
            "RETENTION_CURRENCY": "UAH",
            "RETENTION_TRIGGERS_SEND": "false",
        }, dag_ids=[FAILING_DAG, "retention_ingest", "retention_triggers"], home=tmp / "airflow")
        af.start()
        world.af = af
        yield world
    finally:
        if af is not None:
            af.stop()
        if sendgrid is not None:
            sendgrid.stop()
        smtp.stop()
        http.stop()


def _run(world: World, dag_id: str, logical_date: datetime) -> str:
    run_id = world.af.trigger(dag_id, logical_date=logical_date)
    state = world.af.wait(dag_id, run_id, timeout=300)
    assert state == "failed", world.af.report(dag_id, run_id)
    return run_id


def test_a_failing_task_alerts_once_per_failure_not_per_retry(world):
    world.reset()
    world.all_channels(email="smtp")
    run_id = _run(world, FAILING_DAG, datetime(2026, 11, 2, tzinfo=UTC))
    tis = world.af.task_instances(FAILING_DAG, run_id)
    assert [(ti["state"], ti["try_number"]) for ti in tis] == [("failed", 3)], tis

    got = world.wait_received({"smtp": 1, "sendgrid": 0, "slack": 1, "webhook": 1})
    log = world.task_log(FAILING_DAG, run_id, "fails")
    # the third try's process logged each send after it: nothing more is on its way
    assert sorted(re.findall(r"alert sent via (\w+)", log)) == ["email", "slack", "webhook"], \
        log[-3000:]
    assert got == {"smtp": 1, "sendgrid": 0, "slack": 1, "webhook": 1}, log[-3000:]

    alert = world.webhook_alert()
    assert alert["kind"] == "task_failed"
    assert (alert["dag_id"], alert["task_id"], alert["run_id"]) == (FAILING_DAG, "fails", run_id)
    assert (alert["try_number"], alert["tries"], alert["error_type"]) == (3, 3, "ValueError")
    assert alert["log_url"] == (f"{world.af.base_url}/dags/{FAILING_DAG}/runs/{quote(run_id)}"
                                f"/tasks/fails?try_number=3")

    sender, rcpts, mail = world.inbox.messages[0]
    assert sender == "airflow@shop.example"
    assert sorted(rcpts) == ["data@shop.example", "oncall@shop.example"]
    assert f"[retention] task failed: {FAILING_DAG}.fails" in mail
    slack = world.slack_text()
    assert run_id in slack and "try: 3 of 3" in slack and alert["log_url"] in slack
    for text in (mail, slack, json.dumps(alert)):
        assert PII not in text  # the exception's message stays in the task log
    assert PII in log
    logs = world.all_logs()
    assert world.webhook_key not in logs and world.slack_path not in logs


def test_a_failed_checkpoint_alerts_with_its_failed_checks(world):
    world.reset()
    world.all_channels(email="sendgrid")
    drop = world.landing / "incoming" / "2026-10-31T00"
    drop.mkdir(parents=True)
    (drop / "customers.csv").write_text(
        f"customer_id,email,created_at\nc1,{PII},2026-09-01T00:00:00Z\n")
    (drop / "orders.csv").write_text(  # a month old at the run's time: stale
        "order_id,customer_id,ordered_at,status,total_amount,currency\n"
        "o1,c1,2026-10-01T10:00:00Z,paid,10,UAH\n")
    (drop / "_SUCCESS").write_text("")
    run_id = _run(world, "retention_ingest", datetime(2026, 10, 31, tzinfo=UTC))
    states = {ti["task_id"]: (ti["state"], ti["try_number"])
              for ti in world.af.task_instances("retention_ingest", run_id)}
    # failed at once: a retry would check the same rows
    assert states["check_quality"] == ("failed", 1), states
    assert states["load_drops"] == ("success", 1), states

    got = world.wait_received({"smtp": 0, "sendgrid": 1, "slack": 1, "webhook": 1})
    assert got == {"smtp": 0, "sendgrid": 1, "slack": 1, "webhook": 1}, \
        world.task_log("retention_ingest", run_id, "check_quality")[-3000:]
    alert = world.webhook_alert()
    assert alert["kind"] == "data_quality_failed" and alert["task_id"] == "check_quality"
    assert len(alert["details"]) == 1, alert
    assert alert["details"][0].startswith(
        "raw.orders.ordered_at: expect_column_max_to_be_between (observed 2026-10-01"), alert
    mail = world.sendgrid.accepted[0].body
    assert [p["to"][0]["email"] for p in mail["personalizations"]] == ["oncall@shop.example"]
    assert mail["subject"] == ("[retention] data-quality checkpoint failed: "
                               "retention_ingest.check_quality")
    html = next(c["value"] for c in mail["content"] if c["type"] == "text/html")
    assert "expect_column_max_to_be_between" in html and run_id in html
    assert "expect_column_max_to_be_between" in world.slack_text()
    for text in (json.dumps(mail), world.slack_text(), json.dumps(alert)):
        assert PII not in text
    assert world.sendgrid_key not in world.all_logs()


def test_an_unhealthy_trigger_alerts(world):
    world.reset()
    world.all_channels(email="smtp")
    # a week of 15-minute runs at 10:xx that started about 20 cart chains each; the run
    # below (10:00-10:15 or 10:15-10:30 on 2 November) starts none
    with db.connect(world.url) as conn:
        for d in range(1, 8):
            for minute in (0, 15, 30, 45):
                end = datetime(2026, 11, 2, 10, minute, tzinfo=UTC) - timedelta(days=d)
                conn.execute("insert into ops.trigger_health (trigger, interval_start, "
                             "interval_end, source_rows, started, extended, history_runs, "
                             "flagged) values ('abandoned_cart', %s, %s, 90, 20, 0, 0, false)",
                             (end - timedelta(minutes=15), end))
        conn.commit()
    run_id = _run(world, "retention_triggers", datetime(2026, 11, 2, 10, 15, tzinfo=UTC))
    states = {ti["task_id"]: (ti["state"], ti["try_number"])
              for ti in world.af.task_instances("retention_triggers", run_id)}
    assert states == {"run_triggers": ("success", 1), "check_health": ("failed", 1)}, \
        world.af.report("retention_triggers", run_id)

    got = world.wait_received({"smtp": 1, "sendgrid": 0, "slack": 1, "webhook": 1})
    assert got == {"smtp": 1, "sendgrid": 0, "slack": 1, "webhook": 1}
    alert = world.webhook_alert()
    assert alert["kind"] == "trigger_health" and alert["task_id"] == "check_health"
    assert [d.split(" started ")[0] for d in alert["details"]] == ["abandoned_cart"], alert
    assert "suggest 20.0" in alert["details"][0]
    assert "[retention] trigger health: triggers fell silent: retention_triggers.check_health" \
        in world.inbox.messages[0][2]


def test_without_connections_alerts_are_off_and_say_so(world):
    world.reset()
    for conn_id in ("retention_alerts_email", "retention_alerts_slack",
                    "retention_alerts_webhook"):
        world.connection(conn_id)
    run_id = _run(world, FAILING_DAG, datetime(2026, 11, 3, tzinfo=UTC))
    deadline = time.monotonic() + 90
    while "alerts are off" not in (log := world.task_log(FAILING_DAG, run_id, "fails")) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "alerts are off: no retention_alerts_email, retention_alerts_slack, " \
           "retention_alerts_webhook connection is configured" in log, log[-3000:]
    assert log.count("alerts are off") == 1  # the last try only
    assert world.received() == {"smtp": 0, "sendgrid": 0, "slack": 0, "webhook": 0}
