"""Channel clients from connections, one per provider.

The same connection serves Airflow and the command line: Airflow reads it with its own
secrets backends (see `retention_airflow.hooks`); the CLI reads the `AIRFLOW_CONN_<ID>`
environment variable in Airflow's JSON form. Secrets live only there.

| connection id | channels | fields |
|---|---|---|
| `retention_sendgrid` | email | password = API key; host = API base URL (default SendGrid's); extra: `from_email` (required), `from_name`, `sandbox` |
| `retention_fcm` | mobile_push, web_push | password or extra `service_account` = service-account JSON (or the path of an existing file holding it; any other value is refused, never echoed); extra `project_id`; host = FCM base URL (default Google's) |
| `retention_telegram` | telegram | password = bot token; host = Bot API base URL; extra `max_per_second` (default 30) |
| `retention_sms`, `retention_viber` | sms, viber | extra = the HTTP gateway config (see channels/http_gateway.py); `{password}` in its header values is replaced by the connection's password |
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from retention.channels.base import Channel

CONNECTION_FOR = {"email": "retention_sendgrid", "mobile_push": "retention_fcm",
                  "web_push": "retention_fcm", "telegram": "retention_telegram",
                  "sms": "retention_sms", "viber": "retention_viber"}


class ConnectionError_(RuntimeError):
    """A channel's connection is missing or incomplete; the message names it (never its secret)."""


def _json_object(conn_id: str, text: str, what: str, hint: str = "") -> dict:
    """`text` parsed as a JSON object; an error names the connection and the decode
    error's position only, never the text (it may hold a secret)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConnectionError_(f"connection {conn_id}: {what} is not valid JSON ({exc.msg} at "
                               f"line {exc.lineno} column {exc.colno}){hint}") from None
    if not isinstance(value, dict):
        raise ConnectionError_(f"connection {conn_id}: {what} must be a JSON object, "
                               f"not a JSON {type(value).__name__}")
    return value


def _extra(conn_id: str, conn: Mapping[str, Any]) -> dict:
    extra = conn.get("extra") or {}
    if not isinstance(extra, str):
        return dict(extra)
    return _json_object(conn_id, extra, "extra")


def _service_account(conn_id: str, source: Any) -> dict:
    """The service-account info from a dict, an inline JSON object, or the path of an
    existing JSON file. Any other text is refused without being echoed: a secret pasted
    where the JSON belongs is not a file name to open or to quote in an error."""
    expected = ("password or extra.service_account must be the service account's JSON object "
                "or the path of an existing JSON file")
    if isinstance(source, dict):
        return source
    if not isinstance(source, str):
        raise ConnectionError_(f"connection {conn_id}: {expected} (got a {type(source).__name__})")
    text, what = source.strip(), "the service account"
    if not text.startswith("{"):
        if not os.path.isfile(text):
            raise ConnectionError_(f"connection {conn_id}: {expected}; the value is neither "
                                   "(not shown)")
        what = "the service account file"
        try:
            with open(text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConnectionError_(f"connection {conn_id}: cannot read {what} ({reason})") from None
    return _json_object(conn_id, text, what, f"; {expected}")


def build_channel(channel: str, conn: Mapping[str, Any]) -> Channel:
    conn_id = CONNECTION_FOR[channel]
    extra = _extra(conn_id, conn)
    host = conn.get("host") or None
    if host and "://" not in host:
        schema = conn.get("schema") or "https"
        port = f":{conn['port']}" if conn.get("port") else ""
        host = f"{schema}://{host}{port}"
    try:
        if channel == "email":
            from retention.channels.sendgrid import SendGridChannel

            if not conn.get("password") or not extra.get("from_email"):
                raise ConnectionError_(f"connection {conn_id}: needs password (API key) and "
                                       "extra.from_email")
            return SendGridChannel(conn["password"], extra["from_email"],
                                   base_url=host or "https://api.sendgrid.com",
                                   from_name=extra.get("from_name"),
                                   sandbox=bool(extra.get("sandbox", False)),
                                   timeout=float(extra.get("timeout", 30)),
                                   activity_lag_seconds=float(
                                       extra.get("activity_lag_seconds", 600)))
        if channel in ("mobile_push", "web_push"):
            from retention.channels.firebase import FirebaseChannel

            source = extra.get("service_account") or conn.get("password")
            if not source:
                raise ConnectionError_(f"connection {conn_id}: needs the service account JSON in "
                                       "password or extra.service_account")
            info = _service_account(conn_id, source)
            return FirebaseChannel(info, extra.get("project_id"), base_url=host, kind=channel,
                                   timeout=float(extra.get("timeout", 30)))
        if channel == "telegram":
            from retention.channels.telegram import TelegramChannel

            if not conn.get("password"):
                raise ConnectionError_(f"connection {conn_id}: needs password (bot token)")
            return TelegramChannel(conn["password"], base_url=host or "https://api.telegram.org",
                                   max_per_second=float(extra.get("max_per_second", 30)),
                                   timeout=float(extra.get("timeout", 10)))
        if channel in ("sms", "viber"):
            from retention.channels.http_gateway import HttpGatewayChannel

            secret = conn.get("password") or ""
            config = dict(extra, channel=channel)
            config["headers"] = {k: str(v).replace("{password}", secret)
                                 for k, v in dict(config.get("headers") or {}).items()}
            return HttpGatewayChannel(config)
    except ConnectionError_:
        raise
    except OSError as exc:
        # strerror only: an OSError's text carries the file name it was given
        raise ConnectionError_(f"connection {conn_id}: invalid ({type(exc).__name__}: "
                               f"{exc.strerror})") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise ConnectionError_(f"connection {conn_id}: invalid ({type(exc).__name__}: "
                               f"{str(exc)[:200]})") from None
    raise ConnectionError_(f"unknown channel {channel!r}")


def connection_from_env(conn_id: str) -> dict | None:
    raw = os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}")
    if not raw:
        return None
    if raw.lstrip().startswith("{"):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConnectionError_(f"AIRFLOW_CONN_{conn_id.upper()}: not valid JSON ({exc.msg} at "
                                   f"line {exc.lineno} column {exc.colno})") from None
    from urllib.parse import parse_qsl, unquote, urlsplit

    parts = urlsplit(raw)
    return {"conn_type": parts.scheme, "host": parts.hostname, "port": parts.port,
            "login": unquote(parts.username or ""), "password": unquote(parts.password or ""),
            "schema": parts.path.lstrip("/"), "extra": dict(parse_qsl(parts.query))}


def channels_from_env(names: Iterable[str]) -> dict[str, Channel]:
    out: dict[str, Channel] = {}
    for name in names:
        conn = connection_from_env(CONNECTION_FOR[name])
        if conn is None:
            raise ConnectionError_(f"no connection {CONNECTION_FOR[name]} for channel {name}: set "
                                   f"AIRFLOW_CONN_{CONNECTION_FOR[name].upper()}")
        out[name] = build_channel(name, conn)
    return out
