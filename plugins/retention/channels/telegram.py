"""Telegram through the Bot API's `sendMessage`, with `requests`.

Telegram has no batch send: a batch is sent message by message from a few worker
threads, all drawing from one token bucket so the bot stays under Telegram's broadcast
limit (30 messages a second by default, evenly spaced). A 429 carries
`parameters.retry_after`: the message waits exactly that long before its retry and the
bucket is held for everyone meanwhile. 5xx answers and connections that could not be
made are retried with backoff; a read timeout or a connection lost after the request
went out is `unknown` (Telegram has no idempotency key: never resent).

Text goes in HTML parse mode (the templates render Telegram's HTML subset), link
previews off, and an inline "Unsubscribe" button carries the message's unsubscribe link.
A 403 (bot blocked by the user, user deactivated) or "chat not found" fails the message
with `deactivate_address=True`. provider_message_id is `<chat_id>:<message_id>` since
Telegram numbers messages per chat.

The bot token is part of every URL, so neither URLs nor exception texts reach reasons
or logs: reasons are built from Telegram's `description` or a label.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import requests

from retention.channels.base import (ChannelStats, OutboundMessage, SendResult, gave_up,
                                     send_each)
from retention.channels.retry import (OutcomeUnknown, PermanentError, RetriesExhausted,
                                      RetryPolicy, TokenBucket,
                                      TransientError, classify_transport_error,
                                      retry_after_seconds)

TELEGRAM_MAX_TEXT = 4096


class TelegramChannel:
    name = "telegram"
    max_batch = 100  # about three seconds of sending at 30/s

    def __init__(self, bot_token: str, *, base_url: str = "https://api.telegram.org",
                 max_per_second: float = 30.0, burst: float = 1.0, workers: int = 4,
                 retry: RetryPolicy | None = None, timeout: float = 10.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] | None = None,
                 unsubscribe_button: str | None = "Unsubscribe") -> None:
        self.retry = retry or RetryPolicy()
        self.limiter = TokenBucket(max_per_second, burst, clock=clock,
                                   sleep=sleep or self.retry.sleep)
        self.workers = max(1, workers)
        self.timeout = timeout
        self.unsubscribe_button = unsubscribe_button
        self.stats = ChannelStats()
        self._url = f"{base_url.rstrip('/')}/bot{bot_token}/sendMessage"
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=self.workers, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def build_payload(self, m: OutboundMessage) -> dict[str, Any]:
        payload: dict[str, Any] = {"chat_id": m.address}
        if m.body_html is not None:
            payload.update(text=m.body_html, parse_mode="HTML")
        else:
            payload["text"] = m.body_text
        payload["link_preview_options"] = {"is_disabled": True}
        if m.unsubscribe_url and self.unsubscribe_button:
            payload["reply_markup"] = {"inline_keyboard": [[{"text": self.unsubscribe_button,
                                                             "url": m.unsubscribe_url}]]}
        return payload

    def send_batch(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        return send_each(messages, self._send_one, self.workers, "telegram")

    def _send_one(self, m: OutboundMessage) -> SendResult:
        if len(m.body_html or m.body_text) > TELEGRAM_MAX_TEXT:
            return SendResult.failed(m.message_id, "message is too long for Telegram (4096)")
        payload = self.build_payload(m)
        try:
            result = self.retry.call(lambda: self._post(payload),
                                     on_retry=lambda _: self.stats.count(retries=1))
        except PermanentError as exc:
            dead = exc.status == 403 or "chat not found" in exc.reason
            return SendResult.failed(m.message_id, exc.reason, deactivate_address=dead)
        except (RetriesExhausted, OutcomeUnknown) as exc:
            return gave_up(m.message_id, exc)
        chat = (result.get("chat") or {}).get("id", m.address)
        return SendResult.sent(m.message_id, f"{chat}:{result.get('message_id')}")

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.limiter.acquire()
        self.stats.count(requests=1)
        try:
            response = self._session.post(self._url, json=payload, timeout=self.timeout)
        except (requests.Timeout, requests.ConnectionError) as exc:
            if classify_transport_error(exc) == "not_sent":
                raise TransientError("connection error") from None
            # the request went out: the provider may have taken it
            raise OutcomeUnknown("timeout" if isinstance(exc, requests.Timeout)
                                 else "connection lost before the answer") from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        status = response.status_code
        if 200 <= status < 300 and body.get("ok") is True:
            return body.get("result") or {}
        if status == 429 or status >= 500:
            after = (body.get("parameters") or {}).get("retry_after")
            after = float(after) if after is not None else retry_after_seconds(response.headers)
            if status == 429 and after:
                self.limiter.hold(after)
            raise TransientError(str(status), after)
        description = body.get("description") or response.reason or "error"
        raise PermanentError(f"{status}: {description}", status)
