"""All local provider servers on one port, with connections pointing at them.

    with local_provider_stack(latency_ms=20) as (handle, env):
        os.environ.update(env)   # AIRFLOW_CONN_RETENTION_* for every channel

Used by the quick start, the tests and the benchmarks. Keys and tokens are generated
per stack; nothing secret is stored.

`on_mail_accepted(body, x_message_id)` is called by the SendGrid stand-in for every Mail
Send request it accepts, before it answers (the quick start's simulated readers post
their webhook events there). `wire_counts(handle)` counts what the stand-ins accepted per
kind of channel, `accepted_message_ids(handle)` per message id; `serve_wire_counts(handle)` serves those counts as JSON on a local port
for another process (the quick start's driver, while the stand-ins run beside Airflow).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from retention_dev.servers import PROVIDERS, ServerHandle, fake_service_account, serve

#: `on_mail_accepted(body, x_message_id)`: the parsed Mail Send body and the X-Message-Id
MailAccepted = Callable[[dict, "str | None"], None]


class _NotifyingSendGrid(PROVIDERS["sendgrid"]):  # type: ignore[misc, valid-type]
    """The SendGrid stand-in, calling `on_mail_accepted` for every send it accepts before
    it answers (so whatever that does has happened once the client has its answer)."""

    on_mail_accepted: MailAccepted | None = None

    def mail_send(self, inc):  # noqa: ANN001 - servers.Incoming
        reply = super().mail_send(inc)
        if self.on_mail_accepted is not None and reply.status == 202:
            self.on_mail_accepted(inc.json(), reply.headers.get("X-Message-Id"))
        return reply


def local_connections(base_url: str, *, api_key: str, bot_token: str,
                      service_account: dict, activity_lag_seconds: float = 0.0,
                      timeout: float | None = None) -> dict[str, str]:
    """AIRFLOW_CONN_* values pointing every channel at the local provider servers
    (`activity_lag_seconds`: how late the local SendGrid's activity log shows a send;
    `timeout`: the clients' request timeout, default each channel's own)."""
    timeouts = {} if timeout is None else {"timeout": timeout}
    gateway = lambda ch: {  # noqa: E731
        "url": f"{base_url}/gateway/{ch}", "payload_template": {
            "to": "{address}", "text": "{text}", "client_ref": "{message_id}"},
        "message_id_path": "message.id", "success_path": "status",
        "headers": {"Authorization": "Bearer {password}"}, **timeouts}
    return {
        "AIRFLOW_CONN_RETENTION_SENDGRID": json.dumps({
            "conn_type": "http", "host": base_url, "password": api_key,
            "extra": {"from_email": "shop@example.com", "from_name": "Example Shop",
                      "activity_lag_seconds": activity_lag_seconds, **timeouts}}),
        "AIRFLOW_CONN_RETENTION_FCM": json.dumps({
            "conn_type": "http", "host": base_url,
            "extra": {"service_account": service_account,
                      "project_id": service_account["project_id"], **timeouts}}),
        "AIRFLOW_CONN_RETENTION_TELEGRAM": json.dumps({
            "conn_type": "http", "host": base_url, "password": bot_token,
            "extra": dict(timeouts)}),
        "AIRFLOW_CONN_RETENTION_SMS": json.dumps({
            "conn_type": "http", "password": api_key, "extra": gateway("sms")}),
        "AIRFLOW_CONN_RETENTION_VIBER": json.dumps({
            "conn_type": "http", "password": api_key, "extra": gateway("viber")}),
    }


@contextmanager
def local_provider_stack(port: int = 0, *, client_timeout: float | None = None,
                         on_mail_accepted: MailAccepted | None = None,
                         **options: Any) -> Iterator[tuple[ServerHandle, dict[str, str]]]:
    api_key = "SG." + secrets.token_urlsafe(16)
    bot_token = f"{secrets.randbelow(10**9)}:{secrets.token_urlsafe(24)}"
    sendgrid = PROVIDERS["sendgrid"](api_keys={api_key}, **options)
    if on_mail_accepted is not None:
        sendgrid = _NotifyingSendGrid(api_keys={api_key}, **options)
        sendgrid.on_mail_accepted = on_mail_accepted
    providers = [
        sendgrid,
        PROVIDERS["fcm"](**{k: v for k, v in options.items() if k != "activity_lag_seconds"}),
        PROVIDERS["telegram"](bot_tokens={bot_token},
                              **{k: v for k, v in options.items() if k != "activity_lag_seconds"}),
        PROVIDERS["gateway"](expected_headers={"Authorization": f"Bearer {api_key}"},
                             **{k: v for k, v in options.items() if k != "activity_lag_seconds"}),
    ]
    base_url, handle = serve(providers, port=port)
    try:
        info, public_pem = fake_service_account(f"{base_url}/token", "retention-local")
        handle.providers["fcm"].configure(public_keys=[public_pem])
        # the clients wait out the stand-in's activity lag, with a margin, before a lookup
        lag = float(options.get("activity_lag_seconds", 0.0))
        yield handle, local_connections(base_url, api_key=api_key, bot_token=bot_token,
                                        service_account=info,
                                        activity_lag_seconds=lag + 0.5 if lag else 0.0,
                                        timeout=client_timeout)
    finally:
        handle.stop()


def wire_counts(handle: ServerHandle) -> dict[str, int]:
    """What the stand-ins accepted for delivery: e-mails (Mail Send personalizations), push
    messages (FCM sends), Telegram messages and gateway (SMS/Viber) requests."""
    providers = handle.providers
    return {
        "email": sum(len(r.body["personalizations"]) for r in providers["sendgrid"].accepted
                     if r.path.endswith("/mail/send")),
        "push": sum(1 for r in providers["fcm"].accepted if r.path.endswith(":send")),
        "telegram": sum(1 for r in providers["telegram"].accepted
                        if r.path.endswith("/sendMessage")),
        "gateway": sum(1 for r in providers["gateway"].accepted),
    }


def accepted_message_ids(handle: ServerHandle) -> Counter:
    """How many times the stand-ins accepted each message id, from the wire: the
    custom_args of SendGrid's personalizations and the data of FCM's sends."""
    ids: Counter = Counter()
    for r in handle.providers["sendgrid"].accepted:
        if r.path.endswith("/mail/send"):
            for p in r.body["personalizations"]:
                ids[p["custom_args"]["message_id"]] += 1
    for r in handle.providers["fcm"].accepted:
        if r.path.endswith(":send"):
            ids[r.body["message"]["data"]["message_id"]] += 1
    return ids


@contextmanager
def serve_wire_counts(handle: ServerHandle) -> Iterator[str]:
    """`GET <url>/accepted` answers `wire_counts(handle)` as JSON, on 127.0.0.1 (a free
    port), until the block ends; yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path != "/accepted":
                self.send_error(404)
                return
            body = json.dumps(wire_counts(handle)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="wire-counts", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
