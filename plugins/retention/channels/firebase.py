"""Mobile and web push through Firebase Cloud Messaging (HTTP v1).

Each `send_batch` goes to FCM in calls of up to 500 messages, each message its own HTTP
request (`POST /v1/projects/<project>/messages:send`), all of a call in flight at once,
so one call is about one round trip long. The requests go through `FcmClient`
(fcm_transport.py: libcurl's multi interface through pycurl, driven by a thread of the
channel's own, keep-alive connections, at most `pool_size`).

firebase-admin is used through its public API for the service account:
`credentials.Certificate` checks the JSON and gives the google-auth credential (with the
firebase.messaging scope) whose OAuth2 access token authorises the requests. The request
body is the documented v1 `message` object, built here (`build_message`): the SDK's
`messaging.Message` is turned into that JSON only by private SDK functions, and the
channel needs a handful of fields (token, data, notification, android priority and ttl,
webpush headers and notification). FCM's answers are read from the documented v1 error
format (`error.status`, `error.message`, the `FcmError` detail's `errorCode`, the
`BadRequest` detail's field violations).

Per-message answers map to results:

* 2xx -> sent, provider_message_id = FCM's `projects/<p>/messages/<id>`;
* `UNREGISTERED` (404), `SENDER_ID_MISMATCH`, or `INVALID_ARGUMENT` on `message.token`
  -> failed with `deactivate_address=True` (Firebase's advice: drop the token);
* 429, 500, 503 (any 5xx) and connections that could not be made -> those messages alone
  are sent again after a backoff (Retry-After honoured up to the policy's limit; a longer
  one defers them), up to the policy's attempts, then failed `retries exhausted: <status>`;
* a read timeout or a connection lost after the request went out -> `unknown`: FCM may
  have delivered it and has no idempotency key, so it is never sent again;
* anything else (401 after a token refresh, 403, other 400s) -> failed with FCM's status
  and message.

The environment's proxy (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY) and CA bundle
(REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE) for the FCM host are resolved once, when the channel
is built (`proxies_from_env=True`), not on every push. The OAuth2 token endpoint is
reached by google-auth's requests transport, which reads the environment itself.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import certifi
import google.auth.exceptions
import requests
from firebase_admin import credentials

from retention.channels.base import ChannelStats, OutboundMessage, SendResult
from retention.channels.fcm_transport import FcmAnswer, FcmClient
from retention.channels.retry import OutcomeUnknown, RetryPolicy, retry_after_seconds

FCM_BASE_URL = "https://fcm.googleapis.com"
MAX_SEND_EACH = 500

# google.rpc.Code names for statuses whose answer carries none (as firebase-admin names them)
_STATUS_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                 404: "NOT_FOUND", 409: "CONFLICT", 412: "FAILED_PRECONDITION",
                 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (after NO_PROXY), as requests picks it."""
    return requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))


def ca_bundle(from_env: bool = True) -> str:
    """The CA file to verify against: REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (with
    `from_env`), else certifi's bundle."""
    bundle = (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
              if from_env else None)
    return bundle or certifi.where()


def fcm_error(answer: FcmAnswer) -> tuple[str, str, bool]:
    """(FCM errorCode or status name, FCM's message, the token field was refused) of a
    non-2xx answer."""
    status = answer.status
    error = answer.body.get("error") if isinstance(answer.body, dict) else None
    if not isinstance(error, dict):
        error = {}
    code = str(error.get("status") or _STATUS_CODES.get(status, "UNKNOWN"))
    message = str(error.get("message") or f"unexpected HTTP {status} answer")
    token_refused = False
    for detail in error.get("details") or []:
        if not isinstance(detail, dict):
            continue
        if str(detail.get("@type", "")).endswith("FcmError") and detail.get("errorCode"):
            code = str(detail["errorCode"])
        for violation in detail.get("fieldViolations") or []:
            token_refused = token_refused or (isinstance(violation, dict)
                                              and violation.get("field") == "message.token")
    return code, message, token_refused


def _duration(seconds: float) -> str:
    """A protobuf Duration in JSON: "3600s", "1.500000000s"."""
    whole = int(math.floor(seconds))
    nanos = int(round((seconds - whole) * 1e9))
    return f"{whole}.{nanos:09d}s" if nanos else f"{whole}s"


def _without_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


class FirebaseChannel:
    """Push through FCM; `kind` is the channel name, `mobile_push` or `web_push`.
    `timeout` is the seconds to connect, and for a whole request and its answer."""

    max_batch = MAX_SEND_EACH

    def __init__(self, credentials_info: dict[str, Any], project_id: str | None = None, *,
                 base_url: str | None = None,
                 kind: Literal["mobile_push", "web_push"] = "mobile_push",
                 retry: RetryPolicy | None = None, timeout: float = 30.0,
                 pool_size: int = MAX_SEND_EACH, ttl_seconds: int | None = None,
                 proxies_from_env: bool = True) -> None:
        if kind not in ("mobile_push", "web_push"):
            raise ValueError(f"kind must be mobile_push or web_push, not {kind!r}")
        self.name = kind
        self.retry = retry or RetryPolicy()
        self.ttl_seconds = ttl_seconds
        self.stats = ChannelStats()
        certificate = credentials.Certificate(credentials_info)
        project = project_id or certificate.project_id
        if not project:
            raise ValueError("FCM needs a project id: pass project_id or use a service "
                             "account with project_id")
        base = (base_url or FCM_BASE_URL).rstrip("/")
        self.proxy = environment_proxy(base + "/") if proxies_from_env else None
        self._client = FcmClient(
            base, project, certificate.get_credential(), pool_size=pool_size, timeout=timeout,
            proxy=self.proxy,
            ca_bundle=ca_bundle(proxies_from_env) if base.startswith("https:") else None,
            name=f"fcm-{kind}-{uuid.uuid4().hex[:8]}")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FirebaseChannel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def build_message(self, m: OutboundMessage) -> dict[str, Any]:
        """The v1 `message` object for `m` (fields left out when None)."""
        data = {**{str(k): str(v) for k, v in m.data.items()}, "message_id": m.message_id}
        notification = _without_none({"title": m.subject, "body": m.body_text})
        if self.name == "web_push":
            headers = {"Urgency": "normal"}
            if self.ttl_seconds is not None:
                headers["TTL"] = str(int(self.ttl_seconds))
            return {"token": m.address, "data": data,
                    "webpush": {"headers": headers, "notification": notification}}
        android: dict[str, Any] = {"priority": "normal"}
        if self.ttl_seconds is not None:
            android["ttl"] = _duration(self.ttl_seconds)
        return {"token": m.address, "data": data, "notification": notification,
                "android": android}

    def send_batch(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        results: list[SendResult] = []
        for start in range(0, len(messages), MAX_SEND_EACH):
            results += self._send_each(list(messages[start:start + MAX_SEND_EACH]))
        return results

    def _send_each(self, batch: list[OutboundMessage]) -> list[SendResult]:
        results: list[SendResult | None] = [None] * len(batch)
        built: list[dict[str, Any]] = []
        pending: list[int] = []
        for i, m in enumerate(batch):
            if not isinstance(m.address, str) or not m.address:
                results[i] = SendResult.failed(m.message_id, "no FCM registration token")
            else:
                pending.append(i)
            built.append(self.build_message(m) if results[i] is None else {})
        attempt = 1
        while pending:
            self.stats.count(requests=len(pending))
            retry: list[int] = []
            labels: dict[int, str] = {}
            wait: float | None = None
            try:
                answers = self._client.send_all([built[i] for i in pending])
            except google.auth.exceptions.GoogleAuthError as exc:
                # no OAuth2 token: google-auth says whether that is worth retrying
                label = type(exc).__name__
                if not getattr(exc, "retryable", False):
                    detail = exc.args[0] if exc.args and isinstance(exc.args[0], str) else label
                    for i in pending:
                        results[i] = SendResult.failed(batch[i].message_id,
                                                       f"fcm auth: {detail}"[:500])
                    break
                retry = list(pending)
                labels = {i: label for i in pending}
                answers = []
            for i, answer in zip(pending, answers):
                mid = batch[i].message_id
                if answer.ok:
                    name = answer.body.get("name") if isinstance(answer.body, dict) else None
                    results[i] = SendResult.sent(mid, name)
                    continue
                if answer.status is None:
                    if answer.failure == "unknown":
                        # no answer after the request went out: FCM may have delivered it
                        results[i] = SendResult.unknown(mid, OutcomeUnknown(answer.label).reason)
                    else:
                        retry.append(i)
                        labels[i] = answer.label
                    continue
                status = answer.status
                if status == 429 or status >= 500:
                    after = retry_after_seconds(answer.headers)
                    if after is not None and after > self.retry.max_retry_after:
                        results[i] = SendResult.deferred(mid, f"{status}: Retry-After {after:.0f} s")
                        continue
                    if after is not None:
                        wait = max(wait or 0.0, after)
                    retry.append(i)
                    labels[i] = str(status)
                    continue
                code, message, token_refused = fcm_error(answer)
                dead = code in ("UNREGISTERED", "SENDER_ID_MISMATCH") or (
                    code == "INVALID_ARGUMENT" and token_refused)
                results[i] = SendResult.failed(mid, f"{status} {code}: {message}"[:500], dead)
            if not retry:
                break
            if attempt >= self.retry.max_attempts:
                for i in retry:
                    results[i] = SendResult.failed(batch[i].message_id,
                                                   f"retries exhausted: {labels[i]}")
                break
            self.retry.sleep(self.retry.delay(attempt, wait))
            self.stats.count(retries=len(retry))
            pending = retry
            attempt += 1
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]
