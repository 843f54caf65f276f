"""Mobile and web push through Firebase Cloud Messaging (HTTP v1), with firebase-admin.

Each `send_batch` goes to FCM in calls of up to 500 messages, each message its own HTTP
request, all of a call in flight at once, so one call is about one round trip long. The
calls are firebase-admin's own (it builds and encodes each message, maps FCM's answers to
its exceptions); the channel's transport decides how the bytes move:

* `"async"` (the default): `messaging.send_each_async` on the channel's event loop (one
  thread per channel, uvloop when installed), with `LeanAsyncFcmClient`
  (fcm_transport.py: keep-alive HTTP/1.1 connections, at most `pool_size`) in place of
  the SDK's httpx client;
* `"lean"`: `messaging.send_each` (a thread per message: firebase-admin 7.x starts a
  `ThreadPoolExecutor(max_workers=len(messages))` per call) on `LeanFcmSession` (urllib3
  without requests on top);
* `"requests"`: `send_each` on the SDK's own AuthorizedSession. Used whatever the choice
  when the environment puts a proxy in front of the FCM host or .netrc names it.

Per-message answers are mapped alike on every transport:

* success -> sent, provider_message_id = FCM's `projects/<p>/messages/<id>`;
* `UNREGISTERED` (404), `SENDER_ID_MISMATCH`, or `INVALID_ARGUMENT` on `message.token`
  -> failed with `deactivate_address=True` (Firebase's advice: drop the token);
* 429 `QUOTA_EXCEEDED`, 500, 503 and connections that could not be made -> those
  messages alone are sent again after a backoff (Retry-After honoured up to the policy's
  limit), up to the policy's attempts, then failed `retries exhausted: <status>`;
* a read timeout or a connection lost after the request went out -> `unknown`: FCM may
  have delivered it and has no idempotency key, so it is never sent again;
* anything else (401, 403, other 400s) -> failed with FCM's status and message.

firebase-admin has no setting for another FCM host (no emulator variable for messaging);
`configure_fcm_endpoint` points one app's messaging service at a base URL and replaces
the SDK's own retries with none, so every retry is this module's: counted, injectable,
honouring Retry-After.

Why `"async"` is the default: with threads the limit is the client's CPU, not the
network. Each push runs a blocking HTTP stack in a thread of its own, the GIL handed
among up to 500 threads, so more threads do not help. On the event loop a push is one
asyncio task (send_each_async's gather), one write and one read on a kept-alive
connection, and the largest share of its CPU is uvloop's and asyncio's C code. The SDK's
own async client is the most expensive of all (its connection pool rescans the queue of
waiting requests on every assignment, and its auth flow builds a requests.Session per
request), which is why `LeanAsyncFcmClient` replaces it. The transports' client CPU and
throughput per push, side by side, are measured in bench/RESULTS.md, sections
"dispatch: ... async FCM transport" and "Figures moved from docstrings".

The environment's proxy settings (`proxies_from_env=True`) are looked up once, when the
channel is built, rather than by `requests` on every push: its `trust_env` reads the
proxy variables, .netrc and the CA bundle variables per request, a noticeable share of a
push's CPU on the requests transport. Same proxies, same CA bundle; a .netrc entry for
the FCM host keeps the per-request lookup, since requests would apply its credentials.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import firebase_admin
import google.auth.exceptions
import google.auth.transport.requests
import requests
from firebase_admin import _http_client, credentials, exceptions, messaging
from urllib3.util.retry import Retry

from retention.channels.base import ChannelStats, OutboundMessage, SendResult
from retention.channels.fcm_transport import (LeanAsyncFcmClient, LeanFcmSession, LoopThread,
                                              lean_transport_applies)
from retention.channels.retry import RetryPolicy, classify_transport_error, retry_after_seconds

FCM_BASE_URL = "https://fcm.googleapis.com"
MAX_SEND_EACH = 500
TRANSPORTS = ("async", "lean", "requests")
Transport = Literal["async", "lean", "requests"]
_TRANSIENT = (exceptions.ResourceExhaustedError, exceptions.UnavailableError,
              exceptions.InternalError, exceptions.DeadlineExceededError, messaging.QuotaExceededError)


def configure_fcm_endpoint(app: firebase_admin.App, base_url: str = FCM_BASE_URL, *,
                           pool_size: int = MAX_SEND_EACH, proxies_from_env: bool = True,
                           transport: Transport = "async") -> Transport:
    """Send `app`'s FCM requests to `base_url` (e.g. a local server) through a connection
    pool of `pool_size` with no SDK-level retries.

    firebase-admin 7.x builds the FCM URL once per app, in `_MessagingService.__init__`,
    from the class constant `FCM_URL`, and exposes no option for it. Rather than change
    that constant for every app in the process, this sets the one app's service
    attributes. It touches private names, so it fails loudly if the SDK changes them.

    `proxies_from_env=True` applies the environment's proxies and CA bundle, resolved
    once here (see `_environment_once`) instead of on every request, where requests'
    lookup is a noticeable share of a push's CPU; `False` ignores the environment (hosts
    that need no proxy).

    When no proxy or .netrc entry applies to the host: `transport="async"` (the default)
    puts `LeanAsyncFcmClient` (fcm_transport.py: asyncio HTTP/1.1) in place of the SDK's
    httpx client, for `messaging.send_each_async`; `"lean"` puts `LeanFcmSession`
    (urllib3 without requests on top) under the SDK's JSON client, for `send_each`.
    `"requests"`, or a proxy or .netrc entry for the host, keeps the SDK's
    AuthorizedSession. Returns the transport in effect.
    """
    service = messaging._get_messaging_service(app)  # noqa: SLF001 - see docstring
    base = base_url.rstrip("/")
    try:
        project = service._project_id  # noqa: SLF001
        service._fcm_url = f"{base}/v1/projects/{project}/messages:send"  # noqa: SLF001
        session = service._client.session  # noqa: SLF001
    except AttributeError as exc:  # pragma: no cover - only on an SDK upgrade
        raise RuntimeError(f"firebase-admin {firebase_admin.__version__} changed its messaging "
                           "internals; update retention.channels.firebase.configure_fcm_endpoint"
                           ) from exc
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
    if transport != "requests" and proxies_from_env and not lean_transport_applies(base + "/"):
        transport = "requests"
    if transport != "requests":
        try:
            if transport == "async":
                service._async_client = LeanAsyncFcmClient(  # noqa: SLF001
                    base, service._credential, pool_size=pool_size,  # noqa: SLF001
                    timeout=service._async_client.timeout,  # noqa: SLF001
                    headers=_http_client.METRICS_HEADERS)
            else:
                service._client._session = LeanFcmSession(  # noqa: SLF001
                    base, service._credential, maxsize=pool_size)  # noqa: SLF001
                session.close()
        except AttributeError as exc:  # pragma: no cover - only on an SDK upgrade
            raise RuntimeError(f"firebase-admin {firebase_admin.__version__} changed its "
                               "HTTP clients; update configure_fcm_endpoint") from exc
        if transport == "lean":
            return transport
    # the SDK's requests session: every FCM call with "requests", the synchronous ones
    # (send, send_each) with "async"
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size,
                                            max_retries=Retry(total=0, connect=0, read=0, status=0,
                                                              raise_on_status=False))
    session.mount(base + "/", adapter)
    if proxies_from_env:
        _environment_once(session, service._fcm_url)  # noqa: SLF001
    else:
        session.trust_env = False
    return transport


def _environment_once(session: requests.Session, url: str) -> None:
    """Resolve for `url`, now, what `trust_env` makes requests resolve on every request
    (`Session.merge_environment_settings`, `prepare_request`): the proxies from the
    environment (after no_proxy) and REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE; then stop the
    per-request lookups. Left as it is when .netrc has credentials for the host."""
    if requests.utils.get_netrc_auth(url) is not None:
        return
    session.proxies.update(requests.utils.get_environ_proxies(url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False


def _fcm_code(exc: exceptions.FirebaseError) -> tuple[int | None, str, bool]:
    """(HTTP status, FCM errorCode or status name, the token field was refused)."""
    response = exc.http_response
    status = response.status_code if response is not None else None
    code = str(exc.code)
    token_refused = False
    if response is not None:
        try:
            error = response.json().get("error", {})
        except ValueError:
            error = {}
        for detail in error.get("details") or []:
            if str(detail.get("@type", "")).endswith("FcmError") and detail.get("errorCode"):
                code = detail["errorCode"]
            for violation in detail.get("fieldViolations") or []:
                token_refused = token_refused or violation.get("field") == "message.token"
    return status, code, token_refused


class FirebaseChannel:
    """Push through FCM; `kind` is the channel name, `mobile_push` or `web_push`."""

    max_batch = MAX_SEND_EACH

    def __init__(self, credentials_info: dict[str, Any], project_id: str | None = None, *,
                 base_url: str | None = None,
                 kind: Literal["mobile_push", "web_push"] = "mobile_push",
                 retry: RetryPolicy | None = None, timeout: float = 30.0,
                 pool_size: int = MAX_SEND_EACH, ttl_seconds: int | None = None,
                 app_name: str | None = None, proxies_from_env: bool = True,
                 transport: Transport = "async") -> None:
        if kind not in ("mobile_push", "web_push"):
            raise ValueError(f"kind must be mobile_push or web_push, not {kind!r}")
        self.name = kind
        self.retry = retry or RetryPolicy()
        self.ttl_seconds = ttl_seconds
        self.stats = ChannelStats()
        project = project_id or credentials_info.get("project_id")
        self._app = firebase_admin.initialize_app(
            credentials.Certificate(credentials_info),
            {"projectId": project, "httpTimeout": timeout},
            name=app_name or f"retention-{kind}-{uuid.uuid4().hex[:12]}")
        self._loop: LoopThread | None = None
        try:
            #: the transport in effect: "requests" where a proxy or .netrc applies
            self.transport = configure_fcm_endpoint(
                self._app, base_url or FCM_BASE_URL, pool_size=pool_size,
                proxies_from_env=proxies_from_env, transport=transport)
            if self.transport == "async":
                self._loop = LoopThread(name=f"fcm-{self._app.name}")
        except BaseException:
            firebase_admin.delete_app(self._app)
            raise
        self._token_lock = threading.Lock()

    def _ensure_token(self) -> None:
        """Fetch the OAuth2 access token once, before the batch's requests start: each of
        send_each's threads would otherwise find no token and ask for one itself (the
        async client would fetch it once, but in a thread of the loop's executor)."""
        credential = self._app.credential.get_credential()
        with self._token_lock:
            if not credential.valid:
                credential.refresh(google.auth.transport.requests.Request())

    def close(self) -> None:
        if self._loop is not None:
            loop, self._loop = self._loop, None
            client = messaging._get_messaging_service(self._app)._async_client  # noqa: SLF001
            try:
                loop.run(client.aclose())
            finally:
                loop.stop()
        firebase_admin.delete_app(self._app)  # closes the SDK's clients (ours: already)

    def _send_each_call(self, messages: list[messaging.Message]) -> messaging.BatchResponse:
        """One firebase-admin call for up to 500 messages: send_each_async on the channel's
        event loop (transport "async"), else send_each (a thread per message)."""
        if self._loop is not None:
            return self._loop.run(messaging.send_each_async(messages, app=self._app))
        return messaging.send_each(messages, app=self._app)

    def __enter__(self) -> FirebaseChannel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def build_message(self, m: OutboundMessage) -> messaging.Message:
        data = {**{k: str(v) for k, v in m.data.items()}, "message_id": m.message_id}
        if self.name == "web_push":
            headers = {"Urgency": "normal"}
            if self.ttl_seconds is not None:
                headers["TTL"] = str(self.ttl_seconds)
            return messaging.Message(
                token=m.address, data=data,
                webpush=messaging.WebpushConfig(
                    headers=headers,
                    notification=messaging.WebpushNotification(title=m.subject, body=m.body_text)))
        return messaging.Message(
            token=m.address, data=data,
            notification=messaging.Notification(title=m.subject, body=m.body_text),
            android=messaging.AndroidConfig(priority="normal", ttl=self.ttl_seconds))

    def send_batch(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        results: list[SendResult] = []
        for start in range(0, len(messages), MAX_SEND_EACH):
            results += self._send_each(list(messages[start:start + MAX_SEND_EACH]))
        return results

    def _send_each(self, batch: list[OutboundMessage]) -> list[SendResult]:
        built = [self.build_message(m) for m in batch]
        results: list[SendResult | None] = [None] * len(batch)
        pending = list(range(len(batch)))
        attempt = 1
        while pending:
            self.stats.count(requests=len(pending))
            try:
                self._ensure_token()
                answers = self._send_each_call([built[i] for i in pending]).responses
            except google.auth.exceptions.GoogleAuthError as exc:
                label = type(exc).__name__
                if not getattr(exc, "retryable", False):
                    detail = exc.args[0] if exc.args and isinstance(exc.args[0], str) else label
                    for i in pending:
                        results[i] = SendResult.failed(batch[i].message_id,
                                                       f"fcm auth: {detail}"[:500])
                    break
                answers = []
            except exceptions.FirebaseError as exc:
                # the whole call failed: the OAuth2 token could not be had (google-auth
                # says whether that is worth retrying) or the SDK broke
                cause = getattr(exc, "cause", None)
                label = f"{type(cause or exc).__name__}"
                if not getattr(cause, "retryable", False):
                    for i in pending:
                        results[i] = SendResult.failed(batch[i].message_id, f"fcm: {label}")
                    break
                answers = []
            retry: list[int] = []
            labels: dict[int, str] = {}
            wait: float | None = None
            if not answers:
                retry = list(pending)
                labels = {i: label for i in pending}
            for i, answer in zip(pending, answers):
                mid = batch[i].message_id
                if answer.success:
                    results[i] = SendResult.sent(mid, answer.message_id)
                    continue
                exc = answer.exception
                status, code, token_refused = _fcm_code(exc)
                if status is None and isinstance(exc, _TRANSIENT) \
                        and classify_transport_error(exc) == "unknown":
                    # no answer after the request went out: FCM may have delivered it
                    results[i] = SendResult.unknown(
                        mid, "outcome unknown: " + (
                            "timeout" if isinstance(exc, exceptions.DeadlineExceededError)
                            else "connection lost before the answer"))
                    continue
                if isinstance(exc, _TRANSIENT) or (status is not None and status >= 500):
                    retry.append(i)
                    labels[i] = str(status) if status is not None else (
                        "timeout" if isinstance(exc, exceptions.DeadlineExceededError)
                        else "connection error")
                    after = retry_after_seconds(exc.http_response.headers) \
                        if exc.http_response is not None else None
                    if after is not None and after > self.retry.max_retry_after:
                        results[i] = SendResult.deferred(
                            mid, f"{status}: Retry-After {after:.0f} s")
                        retry.pop()
                        continue
                    if after is not None:
                        wait = max(wait or 0.0, after)
                    continue
                dead = code in ("UNREGISTERED", "SENDER_ID_MISMATCH") or (
                    code == "INVALID_ARGUMENT" and token_refused)
                results[i] = SendResult.failed(
                    mid, f"{status} {code}: {exc}" if status else f"{code}: {exc}", dead)
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
