"""All local provider servers on one port, with connections pointing at them.

    with local_provider_stack(latency_ms=20) as (handle, env):
        os.environ.update(env)   # AIRFLOW_CONN_RETENTION_* for every channel

Used by the quick start, the tests and the benchmarks. Keys and tokens are generated
per stack; nothing secret is stored.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from retention.connections import local_connections
from retention.providers.local_servers import PROVIDERS, ServerHandle, fake_service_account, serve


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
