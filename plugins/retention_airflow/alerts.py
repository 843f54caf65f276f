"""Alerts to the people on duty: every retention task that fails for good (after its last
retry, so one alert per failure, never one per try) notifies through Airflow notifiers,
each channel configured by an Airflow connection (any secrets backend, or an
`AIRFLOW_CONN_<ID>` variable):

| connection id | channel | fields |
|---|---|---|
| `retention_alerts_email` | e-mail, conn_type `smtp` | the SMTP provider's connection (host, port, login, password; extra `from_email`, `disable_ssl`, `disable_tls`, `timeout`), sent by its `SmtpNotifier`; extra `to` (required): comma-separated recipients |
| `retention_alerts_email` | e-mail, conn_type `sendgrid` | password = API key, host = API base URL (default SendGrid's), extra `from_email` and `to` (required), `from_name`: sent through the product's SendGrid channel |
| `retention_alerts_slack` | Slack | the Slack provider's incoming-webhook connection (conn_type `slackwebhook`, password = the webhook URL or its token), sent by its `SlackWebhookNotifier` |
| `retention_alerts_webhook` | any JSON endpoint | host = the URL (or host, port, `schema` = http/https, extra `endpoint` = path); password (required) = the HMAC key that signs each request |

Any mix of the three may be configured; none configured means alerts are off, which the
failing task's log says. A channel that cannot send is logged (its error type only: an
error's text may quote a webhook URL, which is a secret) and does not stop the others.

What an alert says: the kind (`task_failed`, `data_quality_failed`, `trigger_health`),
DAG, task, run, try (of how many), the task log's URL, the exception's type, and for the
two known kinds their details (`AlertedFailure`): failed expectations by table, column
and observed count, or the silent triggers' notes. Never an exception's message, a row
value or a connection field: those may hold customer data or secrets.

The generic webhook POSTs the alert as JSON with two headers, `X-Retention-Timestamp`
(Unix seconds) and `X-Retention-Signature: sha256=<hex HMAC-SHA256 of
"<timestamp>.<body>" keyed by the connection's password>`; `verify_signature` is the
receiver's check (constant-time, with a tolerance against replays).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from airflow.sdk import BaseNotifier
from airflow.sdk.exceptions import AirflowFailException

EMAIL_CONN_ID = "retention_alerts_email"
SLACK_CONN_ID = "retention_alerts_slack"
WEBHOOK_CONN_ID = "retention_alerts_webhook"
CONN_IDS = (EMAIL_CONN_ID, SLACK_CONN_ID, WEBHOOK_CONN_ID)

SIGNATURE_HEADER = "X-Retention-Signature"
TIMESTAMP_HEADER = "X-Retention-Timestamp"

TASK_FAILED = "task_failed"
DATA_QUALITY_FAILED = "data_quality_failed"
TRIGGER_HEALTH = "trigger_health"


class AlertedFailure(AirflowFailException):
    """A failure whose cause a retry cannot change (a failed data-quality checkpoint, a
    silent trigger): the task fails at once, without retries, and the alert carries
    `kind` and `details` (lines of names and counts, never row values)."""

    def __init__(self, message: str, *, kind: str, details: Iterable[str]) -> None:
        super().__init__(message)
        self.kind = kind
        self.details = list(details)


def quality_failure(report: Any) -> AlertedFailure:
    """The failure of a data-quality report (`retention.ingest.quality.QualityReport`)
    with critical failures: its message is the report's own, its details name each failed
    expectation by table, column and observed counts (no example values)."""
    details = []
    for r in report.errors:
        where = f"raw.{r.table}" + (f".{r.column}" if r.column else "")
        observed = r.observed or {}
        if "error" in observed:
            seen = "could not run"
        elif "unexpected_count" in observed:
            seen = f"{observed['unexpected_count']} unexpected of {observed.get('element_count')}"
        else:
            seen = f"observed {observed.get('observed_value')}"
        details.append(f"{where}: {r.expectation} ({seen})")
    message = (f"data quality checkpoint {report.run_key} (as_of {report.as_of.isoformat()}) "
               f"failed {len(details)} expectation(s):\n  " + "\n  ".join(details))
    return AlertedFailure(message, kind=DATA_QUALITY_FAILED, details=details)


def trigger_health_failure(notes: Mapping[str, str]) -> AlertedFailure:
    """The failure of a trigger-health check: `notes` maps each flagged trigger to its
    note (counts against the norm)."""
    details = [str(note) for note in notes.values()]
    return AlertedFailure("trigger health: " + "; ".join(details), kind=TRIGGER_HEALTH,
                          details=details)


def alert_from_context(context: Mapping[str, Any]) -> dict[str, Any]:
    """The alert of a failed task, from its Airflow context: JSON-ready, no secrets."""
    ti = context.get("ti") or context.get("task_instance")
    error = context.get("exception")
    kind = getattr(error, "kind", None) or TASK_FAILED
    try_number = getattr(ti, "try_number", None)
    max_tries = getattr(ti, "max_tries", None)
    try:
        log_url = getattr(ti, "log_url", None)
    except Exception:  # noqa: BLE001 - a URL the configuration cannot build is left out
        log_url = None
    dag_run = context.get("dag_run")
    logical = getattr(dag_run, "logical_date", None) or context.get("logical_date")
    return {
        "kind": kind,
        "dag_id": getattr(ti, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "map_index": getattr(ti, "map_index", -1),
        "run_id": getattr(ti, "run_id", None) or context.get("run_id"),
        "logical_date": logical.isoformat() if hasattr(logical, "isoformat") else None,
        "try_number": try_number,
        "tries": max_tries + 1 if isinstance(max_tries, int) else None,
        "log_url": log_url,
        "error_type": type(error).__name__ if isinstance(error, BaseException) else None,
        "details": list(getattr(error, "details", []) or []),
    }


_TITLES = {TASK_FAILED: "task failed", DATA_QUALITY_FAILED: "data-quality checkpoint failed",
           TRIGGER_HEALTH: "trigger health: triggers fell silent"}


def subject(alert: Mapping[str, Any]) -> str:
    return (f"[retention] {_TITLES.get(alert['kind'], alert['kind'])}: "
            f"{alert['dag_id']}.{alert['task_id']}")


def _mapped(alert: Mapping[str, Any]) -> bool:
    index = alert.get("map_index")
    return isinstance(index, int) and index >= 0


def text_lines(alert: Mapping[str, Any]) -> list[str]:
    tries = f" of {alert['tries']}" if alert.get("tries") else ""
    lines = [subject(alert),
             f"DAG: {alert['dag_id']}", f"task: {alert['task_id']}"
             + (f"[{alert['map_index']}]" if _mapped(alert) else ""),
             f"run: {alert['run_id']}", f"try: {alert['try_number']}{tries}"]
    if alert.get("error_type"):
        lines.append(f"error: {alert['error_type']} (the message is in the task log)")
    if alert.get("details"):
        lines.append("details:")
        lines += [f"  - {d}" for d in alert["details"]]
    if alert.get("log_url"):
        lines.append(f"log: {alert['log_url']}")
    return lines


def html_body(alert: Mapping[str, Any]) -> str:
    lines = text_lines(alert)
    body = "<br>\n".join(html.escape(line) for line in lines[1:])
    if alert.get("log_url"):
        url = html.escape(alert["log_url"], quote=True)
        body += f'<br>\n<a href="{url}">Open the task log</a>'
    return f"<p><b>{html.escape(lines[0])}</b></p>\n<p>{body}</p>"


def sign(key: str, timestamp: str, body: bytes) -> str:
    """The `X-Retention-Signature` value of a webhook request."""
    digest = hmac.new(key.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def verify_signature(key: str, timestamp: str | None, body: bytes, signature: str | None,
                     *, now: float | None = None, tolerance: float = 300.0) -> bool:
    """A receiver's check of a webhook request: the signature matches (constant time) and
    the timestamp is within `tolerance` seconds of `now` (default: this machine's clock)."""
    if not timestamp or not signature:
        return False
    try:
        sent = float(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent) > tolerance:
        return False
    return hmac.compare_digest(sign(key, timestamp, body), signature)


def _connection(conn_id: str):
    """The connection, or None when it is not configured anywhere."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None


def _recipients(conn, conn_id: str) -> list[str]:
    to = (conn.extra_dejson or {}).get("to")
    if isinstance(to, str):
        to = [a.strip() for a in to.split(",")]
    to = [a for a in (to or []) if a]
    if not to:
        raise ValueError(f"connection {conn_id}: needs extra.to (the recipients)")
    return to


class RetentionAlertNotifier(BaseNotifier):
    """The failure notifier every retention DAG's tasks get (`retention_dag`)."""

    def __init__(self, email_conn_id: str = EMAIL_CONN_ID, slack_conn_id: str = SLACK_CONN_ID,
                 webhook_conn_id: str = WEBHOOK_CONN_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.email_conn_id = email_conn_id
        self.slack_conn_id = slack_conn_id
        self.webhook_conn_id = webhook_conn_id

    def notify(self, context) -> None:
        alert = alert_from_context(context)
        senders = {"email": (self.email_conn_id, self._email),
                   "slack": (self.slack_conn_id, self._slack),
                   "webhook": (self.webhook_conn_id, self._webhook)}
        configured = {name: (conn_id, conn, send) for name, (conn_id, send) in senders.items()
                      if (conn := _connection(conn_id)) is not None}
        if not configured:
            self.log.warning("alerts are off: no %s connection is configured; this failure "
                             "notified no one",
                             ", ".join(conn_id for conn_id, _ in senders.values()))
            return
        for name, (conn_id, conn, send) in configured.items():
            try:
                send(alert, conn, conn_id, context)
            except Exception as exc:  # noqa: BLE001 - one channel must not stop the others
                self.log.error("alert via %s (connection %s) failed: %s", name, conn_id,
                               type(exc).__name__)
            else:
                self.log.info("alert sent via %s (connection %s): %s", name, conn_id,
                              subject(alert))

    def _email(self, alert, conn, conn_id: str, context) -> None:
        to = _recipients(conn, conn_id)
        if conn.conn_type == "smtp":
            from airflow.providers.smtp.notifications.smtp import SmtpNotifier

            SmtpNotifier(to=to, from_email=(conn.extra_dejson or {}).get("from_email"),
                         subject=subject(alert), html_content=html_body(alert),
                         smtp_conn_id=conn_id).notify(context)
            return
        if conn.conn_type != "sendgrid":
            raise ValueError(f"connection {conn_id}: conn_type must be smtp or sendgrid")
        from retention.channels.base import OutboundMessage
        from retention.channels.sendgrid import SendGridChannel

        extra = conn.extra_dejson or {}
        if not conn.password or not extra.get("from_email"):
            raise ValueError(f"connection {conn_id}: needs password (API key) and extra.from_email")
        host = conn.host or "https://api.sendgrid.com"
        if "://" not in host:
            host = f"{conn.schema or 'https'}://{host}" + (f":{conn.port}" if conn.port else "")
        channel = SendGridChannel(conn.password, extra["from_email"], base_url=host,
                                  from_name=extra.get("from_name"),
                                  timeout=float(extra.get("timeout", 30)))
        key = f"{alert['dag_id']}|{alert['task_id']}|{alert['map_index']}|{alert['run_id']}"
        message_id = "alert_" + hashlib.sha256(key.encode()).hexdigest()[:24]
        messages = [OutboundMessage(
            message_id=message_id, customer_id=f"on-duty:{address}", channel="email",
            address=address, subject=subject(alert), body_text="\n".join(text_lines(alert)),
            body_html=html_body(alert), data={"message_id": message_id, "kind": "alert"},
            unsubscribe_url=None) for address in to]
        failed = [r for r in channel.send_batch(messages) if r.status != "sent"]
        if failed:
            raise RuntimeError(f"SendGrid did not take {len(failed)} of {len(messages)} alert(s)")

    def _slack(self, alert, conn, conn_id: str, context) -> None:
        from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

        lines = text_lines(alert)
        text = f"*{lines[0]}*\n" + "\n".join(lines[1:])
        SlackWebhookNotifier(slack_webhook_conn_id=conn_id, text=text,
                             unfurl_links=False).notify(context)

    def _webhook(self, alert, conn, conn_id: str, context) -> None:
        import requests

        if not conn.password:
            raise ValueError(f"connection {conn_id}: needs password (the HMAC key); "
                             "unsigned alerts are not sent")
        extra = conn.extra_dejson or {}
        url = conn.host or ""
        if "://" not in url:
            url = (f"{conn.schema or 'https'}://{url}" + (f":{conn.port}" if conn.port else "")
                   + "/" + str(extra.get("endpoint", "")).lstrip("/"))
        body = json.dumps(alert, sort_keys=True).encode()
        stamp = str(int(time.time()))
        response = requests.post(url, data=body, timeout=float(extra.get("timeout", 30)),
                                 headers={"Content-Type": "application/json",
                                          TIMESTAMP_HEADER: stamp,
                                          SIGNATURE_HEADER: sign(conn.password, stamp, body)})
        if response.status_code >= 300:
            raise RuntimeError(f"HTTP {response.status_code}")


def on_failure() -> RetentionAlertNotifier:
    """The `on_failure_callback` of every retention task."""
    return RetentionAlertNotifier()
