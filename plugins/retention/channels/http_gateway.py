"""SMS and Viber through a shop's own HTTP gateway, described by configuration alone.

Local SMS and Viber providers differ in every detail, so the channel is data: the
endpoint, method, headers (the secret comes in with the config, e.g. from an Airflow
connection), a payload template, and where the answer keeps the provider's id and
verdict. Example (a JSON config, as a connection's extra could hold it):

    {"channel": "sms", "url": "https://sms.example/api/v2/send", "method": "POST",
     "headers": {"Authorization": "Bearer <secret>"},
     "payload_template": {"to": "{address}", "text": "{text}", "client_ref": "{message_id}",
                          "sender": "SHOP"},
     "message_id_path": "$.message.id", "success_path": "status",
     "success_values": ["accepted", "queued"], "error_path": "error",
     "max_per_second": 50}

Placeholders: `{address}`, `{text}`, `{message_id}`, `{customer_id}`, `{channel}`,
`{subject}`, `{unsubscribe_url}`, `{data.<key>}`; `{{` and `}}` are literal braces. They
are replaced inside the parsed template's strings, so a value can never break the JSON;
a string that is exactly one placeholder takes the value as is (None -> null).

Paths are dotted (`message.id`, `messages.0.id`, also `$.messages[0].id`). One request
per message, from `workers` threads under an optional rate limit; 429, 5xx and
connections that could not be made are retried; a read timeout or a connection lost
after the request went out is `unknown` (never resent); other non-2xx fail with the status and the start of the body, and a 2xx
whose `success_path` value is not one of `success_values` fails as
`rejected: <error_path value>`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import requests

from retention.channels.base import (ChannelStats, OutboundMessage, SendResult, gave_up,
                                     send_each)
from retention.channels.retry import (OutcomeUnknown, PermanentError, RetriesExhausted,
                                      RetryPolicy, TokenBucket,
                                      TransientError, classify_transport_error,
                                      retry_after_seconds)

PLACEHOLDERS = ("address", "text", "message_id", "customer_id", "channel", "subject",
                "unsubscribe_url")
_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][\w.-]*)\}")


@dataclass(frozen=True)
class HttpGatewayConfig:
    channel: str
    url: str
    payload_template: Any
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict)
    body_format: Literal["json", "form"] = "json"
    message_id_path: str | None = None
    success_path: str | None = None
    success_values: tuple[Any, ...] = (True, "ok", "OK", "accepted", "queued", "sent", "success")
    error_path: str | None = None
    max_per_second: float | None = None
    workers: int = 4
    timeout: float = 10.0
    max_batch: int = 100

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HttpGatewayConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown gateway setting(s) {sorted(unknown)}; known: {sorted(known)}")
        values = dict(values)
        if "success_values" in values:
            values["success_values"] = tuple(values["success_values"])
        return cls(**values)


def _placeholders(template: Any) -> set[str]:
    if isinstance(template, str):
        return {m.group(1) for m in _TOKEN.finditer(template) if m.group(1)}
    if isinstance(template, Mapping):
        return set().union(*(_placeholders(v) for v in template.values())) if template else set()
    if isinstance(template, (list, tuple)):
        return set().union(*(_placeholders(v) for v in template)) if template else set()
    return set()


def render_payload(template: Any, values: Mapping[str, Any]) -> Any:
    """Fill the template's string leaves (keys are left alone)."""
    if isinstance(template, str):
        whole = _TOKEN.fullmatch(template)
        if whole and whole.group(1):
            return values[whole.group(1)]

        def one(m: re.Match) -> str:
            if m.group(0) == "{{":
                return "{"
            if m.group(0) == "}}":
                return "}"
            value = values[m.group(1)]
            return "" if value is None else str(value)
        return _TOKEN.sub(one, template)
    if isinstance(template, Mapping):
        return {k: render_payload(v, values) for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        return [render_payload(v, values) for v in template]
    return template


def dig(value: Any, path: str) -> Any:
    """`a.b.0.c`, `$.a.b[0].c` -> the value there, or None."""
    path = re.sub(r"\[(\d+)\]", r".\1", path.strip())
    if path.startswith("$"):
        path = path[1:]
    for part in (p for p in path.split(".") if p):
        if isinstance(value, list) and part.isdigit():
            value = value[int(part)] if int(part) < len(value) else None
        elif isinstance(value, Mapping):
            value = value.get(part)
        else:
            return None
    return value


class HttpGatewayChannel:
    def __init__(self, config: HttpGatewayConfig | Mapping[str, Any], *,
                 retry: RetryPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] | None = None) -> None:
        self.config = config if isinstance(config, HttpGatewayConfig) \
            else HttpGatewayConfig.from_dict(config)
        self.name = self.config.channel
        self.max_batch = self.config.max_batch
        unknown = {p for p in _placeholders(self.config.payload_template)
                   if p not in PLACEHOLDERS and not p.startswith("data.")}
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)} in the payload template; "
                             f"known: {', '.join(PLACEHOLDERS)}, data.<key>")
        self.retry = retry or RetryPolicy()
        self.limiter = TokenBucket(self.config.max_per_second, clock=clock,
                                   sleep=sleep or self.retry.sleep) \
            if self.config.max_per_second else None
        self.stats = ChannelStats()
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(1, self.config.workers),
                                                max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def build_payload(self, m: OutboundMessage) -> Any:
        values: dict[str, Any] = {"address": m.address, "text": m.body_text,
                                  "message_id": m.message_id, "customer_id": m.customer_id,
                                  "channel": m.channel, "subject": m.subject,
                                  "unsubscribe_url": m.unsubscribe_url}
        values.update({f"data.{k}": v for k, v in m.data.items()})
        for name in _placeholders(self.config.payload_template):
            values.setdefault(name, None)  # a data key this message lacks
        return render_payload(self.config.payload_template, values)

    def send_batch(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        return send_each(messages, self._send_one, self.config.workers, self.name)

    def _send_one(self, m: OutboundMessage) -> SendResult:
        payload = self.build_payload(m)
        try:
            body = self.retry.call(lambda: self._request(payload),
                                   on_retry=lambda _: self.stats.count(retries=1))
        except (RetriesExhausted, OutcomeUnknown, PermanentError) as exc:
            return gave_up(m.message_id, exc)
        cfg = self.config
        if cfg.success_path is not None:
            verdict = dig(body, cfg.success_path)
            if verdict not in cfg.success_values:
                error = dig(body, cfg.error_path) if cfg.error_path else None
                return SendResult.failed(m.message_id, f"rejected: {error if error is not None else verdict}")
        provider_id = dig(body, cfg.message_id_path) if cfg.message_id_path else None
        return SendResult.sent(m.message_id, None if provider_id is None else str(provider_id))

    def _request(self, payload: Any) -> Any:
        cfg = self.config
        if self.limiter:
            self.limiter.acquire()
        self.stats.count(requests=1)
        kwargs: dict[str, Any] = {"json": payload} if cfg.body_format == "json" else {"data": payload}
        try:
            response = self._session.request(cfg.method, cfg.url, headers=dict(cfg.headers),
                                             timeout=cfg.timeout, **kwargs)
        except (requests.Timeout, requests.ConnectionError) as exc:
            if classify_transport_error(exc) == "not_sent":
                raise TransientError("connection error") from None
            # the request went out: the provider may have taken it
            raise OutcomeUnknown("timeout" if isinstance(exc, requests.Timeout)
                                 else "connection lost before the answer") from None
        status = response.status_code
        if status == 429 or status >= 500:
            after = retry_after_seconds(response.headers)
            if status == 429 and after and self.limiter:
                self.limiter.hold(after)
            raise TransientError(str(status), after)
        if not 200 <= status < 300:
            raise PermanentError(f"{status}: {response.text[:200]}", status)
        try:
            return response.json()
        except ValueError:
            return {}
