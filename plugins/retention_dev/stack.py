"""All local provider servers on one port, with connections pointing at them.

    with local_provider_stack(latency_ms=20) as (handle, env):
        os.environ.update(env)   # AIRFLOW_CONN_RETENTION_* for every channel

Used by the quick start, the tests and the benchmarks. Keys and tokens are generated
per stack; nothing secret is stored.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from retention_dev.servers import PROVIDERS, ServerHandle, fake_service_account, serve


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
                         **options: Any) -> Iterator[tuple[ServerHandle, dict[str, str]]]:
    api_key = "SG." + secrets.token_urlsafe(16)
    bot_token = f"{secrets.randbelow(10**9)}:{secrets.token_urlsafe(24)}"
    providers = [
        PROVIDERS["sendgrid"](api_keys={api_key}, **options),
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
