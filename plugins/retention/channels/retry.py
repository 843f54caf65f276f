"""Retries and rate limits shared by the channels.

Only the provider's retryable answers are retried: HTTP 429, 5xx, a connection failure
or a timeout (`TransientError`). A 429 or 503 that names a wait (`Retry-After`, Telegram's
`retry_after`) is honoured exactly; otherwise the wait grows exponentially with seeded
jitter. Anything else (400, 401, 403, 404...) is a `PermanentError`: the affected
messages fail with the provider's reason, without a retry.

Sleep and clock are injectable so tests count waits instead of sleeping.
"""

from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

T = TypeVar("T")


class TransientError(Exception):
    """A retryable failure. `label` names it in reasons ("503", "429", "timeout")."""

    def __init__(self, label: str, retry_after: float | None = None) -> None:
        super().__init__(label)
        self.label = label
        self.retry_after = retry_after


class PermanentError(Exception):
    """A refusal that a retry would not change; `reason` goes to the ledger."""

    def __init__(self, reason: str, status: int | None = None, details: Any = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.details = details


class RetriesExhausted(Exception):
    def __init__(self, label: str, attempts: int) -> None:
        super().__init__(f"retries exhausted: {label}")
        self.label = label
        self.attempts = attempts

    @property
    def reason(self) -> str:
        return f"retries exhausted: {self.label}"


@dataclass
class RetryPolicy:
    """Up to `max_attempts` tries in all. Wait before retry n (1-based): the provider's
    Retry-After if it gave one, else `min(max_delay, base_delay * 2**(n-1))` reduced by
    up to `jitter` (a fraction) drawn from `random.Random(seed)`."""

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    jitter: float = 0.5
    seed: int | None = None
    sleep: Callable[[float], None] = time.sleep
    _random: random.Random = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._random = random.Random(self.seed)

    def delay(self, retry_number: int, retry_after: float | None = None) -> float:
        if retry_after is not None and retry_after >= 0:
            return float(retry_after)
        ceiling = min(self.max_delay, self.base_delay * 2 ** (retry_number - 1))
        with self._lock:
            r = self._random.random()
        return ceiling * (1 - self.jitter * r)

    def call(self, attempt: Callable[[], T],
             on_retry: Callable[[TransientError], None] | None = None) -> T:
        """Run `attempt` until it returns, raises a non-transient error, or the attempts
        are used up (`RetriesExhausted` naming the last failure)."""
        tries = 1
        while True:
            try:
                return attempt()
            except TransientError as exc:
                if tries >= self.max_attempts:
                    raise RetriesExhausted(exc.label, tries) from exc
                self.sleep(self.delay(tries, exc.retry_after))
                if on_retry:
                    on_retry(exc)
                tries += 1


def retry_after_seconds(headers: Mapping[str, str] | Any | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date (RFC 9110)."""
    if headers is None:
        return None
    value = headers.get("Retry-After") or headers.get("retry-after")
    if value is None:
        return None
    value = str(value).strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        at = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (at - datetime.now(timezone.utc)).total_seconds())


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; `acquire()` blocks for one.

    With `burst=1` sends are evenly spaced, so no window of one second holds more than
    `rate` of them (Telegram's 30 messages a second per bot). `hold(seconds)` stops
    everyone for a while, e.g. after a 429 that said how long.
    """

    def __init__(self, rate: float, burst: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._updated = clock()
        self._held_until = -math.inf

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def acquire(self) -> float:
        """Take one token; returns the clock reading at which it was granted."""
        while True:
            with self._lock:
                now = self._clock()
                self._refill(now)
                if now >= self._held_until and self._tokens >= 1 - 1e-9:
                    self._tokens -= 1
                    return now
                wait = max(self._held_until - now, (1 - self._tokens) / self.rate)
            self._sleep(wait)

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._held_until = max(self._held_until, self._clock() + seconds)
