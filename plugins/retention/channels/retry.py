"""Retries and rate limits shared by the channels.

Only failures that mean "the provider did not take the request" are retried
(`TransientError`): HTTP 429 and 5xx answers, and a connection that could not be made
(refused, DNS, a connect timeout). A 429 or 503 that names a wait (`Retry-After`,
Telegram's `retry_after`) is honoured exactly up to `RetryPolicy.max_retry_after`; a
longer wait ends the retries (`RetryAfterTooLong`), so a worker never sits for hours
holding its claim. Otherwise the wait grows exponentially with seeded jitter.

A failure after the request's bytes went out (a read timeout, the connection closed or
reset before the answer) is `OutcomeUnknown`: the provider may have accepted the request,
so it is never retried blindly; `classify_transport_error` tells the two kinds apart.
Anything else (400, 401, 403, 404...) is a `PermanentError`: the affected messages fail
with the provider's reason, without a retry.

The retrying itself is tenacity's (`RetryPolicy.retrying()`): retry on `TransientError`,
stop after the attempts or at a too-long Retry-After, wait Retry-After or the backoff.
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

import tenacity

T = TypeVar("T")


class TransientError(Exception):
    """A retryable failure. `label` names it in reasons ("503", "429", "timeout")."""

    def __init__(self, label: str, retry_after: float | None = None) -> None:
        super().__init__(label)
        self.label = label
        self.retry_after = retry_after


class OutcomeUnknown(Exception):
    """The request may have reached the provider (read timeout, connection lost before the
    answer): not retried, since a retry could deliver it twice."""

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.label = label

    @property
    def reason(self) -> str:
        return f"outcome unknown: {self.label}"


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


class RetryAfterTooLong(RetriesExhausted):
    """The provider asked for a longer wait than the policy allows: the messages are left
    for a later pass instead of parking the worker."""

    def __init__(self, label: str, attempts: int, retry_after: float) -> None:
        super().__init__(label, attempts)
        self.retry_after = retry_after

    @property
    def reason(self) -> str:
        return f"{self.label}: Retry-After {self.retry_after:.0f} s"


class _stop_on_long_retry_after(tenacity.stop.stop_base):
    """Stop when the provider asked for a longer wait than `limit` seconds."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        after = getattr(retry_state.outcome.exception(), "retry_after", None)
        return after is not None and after > self.limit


class _wait_retry_after_or_backoff(tenacity.wait.wait_base):
    """The failure's Retry-After if it named one, else the policy's jittered backoff."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        after = getattr(retry_state.outcome.exception(), "retry_after", None)
        return self.policy.delay(retry_state.attempt_number, after)


@dataclass
class RetryPolicy:
    """Up to `max_attempts` tries in all. Wait before retry n (1-based): the provider's
    Retry-After if it gave one, else `min(max_delay, base_delay * 2**(n-1))` (tenacity's
    `wait_exponential`) reduced by up to `jitter` (a fraction) drawn from
    `random.Random(seed)`. A Retry-After over `max_retry_after` seconds ends the retries
    (`RetryAfterTooLong`). `retrying()` is the policy as a `tenacity.Retrying`."""

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    jitter: float = 0.5
    seed: int | None = None
    max_retry_after: float = 120.0
    sleep: Callable[[float], None] = time.sleep
    _random: random.Random = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)
    _exponential: tenacity.wait.wait_exponential = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be a fraction between 0 and 1")
        self._random = random.Random(self.seed)
        self._exponential = tenacity.wait_exponential(multiplier=self.base_delay,
                                                      max=self.max_delay)

    def delay(self, retry_number: int, retry_after: float | None = None) -> float:
        """The wait before retry `retry_number` (1-based)."""
        if retry_after is not None and retry_after >= 0:
            return float(retry_after)
        state = tenacity.RetryCallState(None, None, (), {})
        state.attempt_number = retry_number
        ceiling = self._exponential(state)
        with self._lock:
            r = self._random.random()
        return ceiling * (1 - self.jitter * r)

    def retrying(self, on_retry: Callable[[TransientError], None] | None = None
                 ) -> tenacity.Retrying:
        """A `tenacity.Retrying` that retries `TransientError` only, waits `delay()`,
        stops after `max_attempts` or at a Retry-After over `max_retry_after`, and then
        raises `RetryAfterTooLong` or `RetriesExhausted` naming the last failure. Every
        other exception passes through at once. `on_retry(error)` runs before each wait.
        One per call: a `Retrying` keeps per-call state."""

        def give_up(state: tenacity.RetryCallState) -> Any:
            exc = state.outcome.exception()
            if exc.retry_after is not None and exc.retry_after > self.max_retry_after:
                raise RetryAfterTooLong(exc.label, state.attempt_number, exc.retry_after) from exc
            raise RetriesExhausted(exc.label, state.attempt_number) from exc

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if on_retry:
                on_retry(state.outcome.exception())

        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientError),
            stop=(tenacity.stop_after_attempt(self.max_attempts)
                  | _stop_on_long_retry_after(self.max_retry_after)),
            wait=_wait_retry_after_or_backoff(self),
            sleep=lambda seconds: self.sleep(float(seconds)),
            before_sleep=before_sleep,
            retry_error_callback=give_up)

    def call(self, attempt: Callable[[], T],
             on_retry: Callable[[TransientError], None] | None = None) -> T:
        """Run `attempt` until it returns, raises a non-transient error, or the attempts
        are used up (`RetriesExhausted` naming the last failure)."""
        return self.retrying(on_retry)(attempt)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and everything it wraps: causes, contexts, `reason`/`cause`
    attributes (urllib's URLError, urllib3's MaxRetryError, firebase-admin's errors) and
    exception arguments."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen) or len(seen) > 20:
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None),
                 getattr(e, "cause", None)]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        todo = [t for t in todo if isinstance(t, BaseException)]
    return seen


def classify_transport_error(exc: BaseException) -> str:
    """"not_sent" when the request cannot have reached the provider (the connection was
    never made: refused, DNS, connect timeout, or the client says it closed before
    writing), else "unknown" (a read timeout, a reset or close after the request)."""
    import socket
    import urllib.error

    import requests
    import urllib3

    try:
        import httpx
    except ImportError:  # pragma: no cover - firebase-admin brings it
        httpx = None
    chain = _chain(exc)
    for e in chain:
        sent = getattr(e, "request_sent", None)
        if sent is not None:  # our own FCM client knows
            return "unknown" if sent else "not_sent"
    not_sent: tuple[type, ...] = (
        urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError,
        urllib3.exceptions.NameResolutionError, requests.ConnectTimeout,
        ConnectionRefusedError, socket.gaierror, urllib.error.URLError)
    if httpx is not None:
        not_sent += (httpx.ConnectTimeout, httpx.ConnectError)
    if any(isinstance(e, not_sent) and not isinstance(e, urllib.error.HTTPError) for e in chain):
        return "not_sent"
    return "unknown"


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
