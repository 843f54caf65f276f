"""The contract between the campaign dispatcher and a channel.

The dispatcher renders a batch of planned ledger rows into `OutboundMessage`s, hands
them to `Channel.send_batch` and records one `SendResult` per message in ops.messages.
A channel never raises for a message the provider refused: it answers `failed` with the
provider's reason, so one bad address cannot hold back a wave. It raises only for a
programming error (a message the channel cannot even express).

Four outcomes: `sent` (the provider accepted it), `failed` (it did not, and will not on a
retry), `unknown` (the request went out and no answer came: it may have been accepted;
the dispatcher never resends it blindly) and `deferred` (not accepted yet: the provider
asked for a longer pause than the retry policy allows; the row goes back to `planned`
for a later pass).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from retention.channels.retry import OutcomeUnknown, RetryAfterTooLong


@dataclass(frozen=True)
class Attachment:
    """A file sent with an e-mail; with a `content_id` it is inline, shown where the HTML
    refers to `cid:<content_id>` (the weekly report's charts)."""

    filename: str
    content: bytes
    mime_type: str
    content_id: str | None = None


@dataclass(frozen=True)
class OutboundMessage:
    message_id: str
    customer_id: str
    channel: str
    address: str  # e-mail, device token, chat id or phone
    subject: str | None  # e-mail subject, push title
    body_text: str
    body_html: str | None  # e-mail HTML, Telegram's HTML subset
    data: dict[str, str]
    unsubscribe_url: str | None
    #: e-mail only (SendGridChannel); the campaign dispatcher sends none
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True)
class SendResult:
    message_id: str
    status: Literal["sent", "failed", "unknown", "deferred"]
    provider_message_id: str | None
    reason: str | None
    #: the provider says the address is dead (push token unregistered, bot blocked):
    #: the dispatcher records it in ops.deactivated_addresses.
    deactivate_address: bool = False

    @staticmethod
    def sent(message_id: str, provider_message_id: str | None) -> SendResult:
        return SendResult(message_id, "sent", provider_message_id, None)

    @staticmethod
    def failed(message_id: str, reason: str, deactivate_address: bool = False) -> SendResult:
        return SendResult(message_id, "failed", None, reason, deactivate_address)

    @staticmethod
    def unknown(message_id: str, reason: str) -> SendResult:
        return SendResult(message_id, "unknown", None, reason)

    @staticmethod
    def deferred(message_id: str, reason: str) -> SendResult:
        return SendResult(message_id, "deferred", None, reason)


def gave_up(message_id: str, exc: Exception, deactivate_address: bool = False) -> SendResult:
    """The result of a message whose request did not succeed (`exc`: what the retry
    policy raised): deferred when the provider asked for a longer pause than the policy
    allows, unknown when the request went out and no answer came, failed otherwise
    (retries exhausted, a refusal)."""
    if isinstance(exc, RetryAfterTooLong):
        return SendResult.deferred(message_id, exc.reason)
    if isinstance(exc, OutcomeUnknown):
        return SendResult.unknown(message_id, exc.reason)
    return SendResult.failed(message_id, exc.reason, deactivate_address)


def send_each(messages: Sequence[OutboundMessage],
              send_one: Callable[[OutboundMessage], SendResult], workers: int,
              thread_name_prefix: str) -> list[SendResult]:
    """`send_one` for each message, from up to `workers` threads (a channel with one
    request per message); the results in the order given."""
    workers = max(1, min(workers, len(messages)))
    if workers == 1:
        return [send_one(m) for m in messages]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_name_prefix) as pool:
        return list(pool.map(send_one, messages))


@runtime_checkable
class Channel(Protocol):
    name: str
    #: the most messages one `send_batch` call should carry (one provider request's
    #: worth where the provider batches): the dispatcher claims this many rows at a time.
    max_batch: int

    def send_batch(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        """One result per message, in the order given."""
        ...


@dataclass
class ChannelStats:
    """Counters a channel keeps (thread-safe): provider requests made and retries."""
    requests: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, requests: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.retries += retries
