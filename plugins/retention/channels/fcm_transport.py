"""FCM HTTP v1 `messages:send` over aiohttp: one POST per message, many in flight.

`FcmClient` owns an event loop in a thread of its own (`LoopThread`, uvloop when
installed) and, on it, one `aiohttp.ClientSession` for the one FCM origin. `send_all`
(callable from any thread) sends a list of v1 `message` objects at once, each as its own
request (asyncio.gather), and returns one `FcmAnswer` per message, in order. It never
raises for a single message's failure; it raises only when the OAuth2 token cannot be
had before the call (google-auth's exception, which says whether it is worth retrying).

* connections: aiohttp's `TCPConnector(limit=pool_size)`: at most `pool_size` open, kept
  alive and reused; a request waits (without a deadline) for one when all are busy; an
  answer with `Connection: close` closes its connection. aiohttp never sends a POST
  again by itself.
* timeouts: `timeout` seconds to open a connection (`sock_connect`) and, separately, for
  each read of the answer once the request is written (`sock_read`).
* token: the service account's google-auth credential, refreshed (in a worker thread,
  under a lock shared with `ensure_token`) when it is not valid; after a 401 it is
  refreshed once however many requests saw the stale token, and each such request is
  sent once more.
* proxy and CA bundle: given by the caller (FirebaseChannel resolves them from the
  environment once, when it is built); aiohttp's own per-request environment lookup
  (`trust_env`) is off.

A transport failure is answered, not raised: `FcmAnswer.failure` is "not_sent" (no
connection could be made: refused, DNS, proxy refused, connect timeout; safe to send
again) or "unknown" (a read timeout, or the connection broke after the request went out:
FCM may have delivered it, so it must not be sent again), with a short `label`.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl
from aiohttp.http import SERVER_SOFTWARE
import google.auth.exceptions
import google.auth.transport.requests

from retention.aio import new_event_loop
from retention.channels.retry import classify_transport_error

_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


@dataclass(slots=True)
class FcmAnswer:
    """FCM's answer to one message, or why there is none.

    `status`, `headers` and `body` (the decoded JSON, None if it was not JSON) when an
    answer came; otherwise `failure` ("not_sent" or "unknown") and `label` ("timeout",
    "connection error", "connection lost before the answer", "token refresh")."""

    status: int | None
    headers: Mapping[str, str] | None = None
    body: Any = None
    failure: str | None = None
    label: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class LoopThread:
    """An event loop run by a daemon thread; `run(coro)` waits for a coroutine from
    another thread."""

    def __init__(self, name: str = "fcm") -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self.loop.is_running()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


class FcmClient:
    """`messages:send` of one Firebase project at `base_url`, authorised by
    `credential` (a google-auth credential with the firebase.messaging scope)."""

    def __init__(self, base_url: str, project_id: str, credential: Any, *,
                 pool_size: int = 500, timeout: float | None = 30.0,
                 proxy: str | None = None, ssl_context: ssl.SSLContext | None = None,
                 name: str = "fcm") -> None:
        base = base_url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"FCM base URL must be http(s)://host[:port], not {base_url!r}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, not {pool_size}")
        self.url = f"{base}/v1/projects/{project_id}/messages:send"
        self._url = yarl.URL(self.url)  # parsed once, not per request
        self.pool_size = pool_size
        self.timeout = timeout
        self.proxy = proxy
        self._credential = credential
        self._token_lock = threading.Lock()
        self._headers: dict[str, str] = {}
        self._headers_token: str | None = None
        self.refreshes = 0  # tokens fetched after a 401
        thread = LoopThread(name=name)
        try:
            self._session, self._refresh_lock = thread.run(self._open(ssl_context))
        except BaseException:
            thread.stop()
            raise
        self._thread: LoopThread | None = thread
        # closes the session and the loop at close(), or when the client is collected or
        # the interpreter exits without close() (a task that never closed its channels)
        self._finalizer = weakref.finalize(self, _shut, thread, self._session)

    async def _open(self, ssl_context: ssl.SSLContext | None
                    ) -> tuple[aiohttp.ClientSession, asyncio.Lock]:
        connector = aiohttp.TCPConnector(limit=self.pool_size, limit_per_host=0,
                                         ssl=ssl_context if ssl_context is not None else True)
        session = aiohttp.ClientSession(
            connector=connector, trust_env=False, raise_for_status=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, connect=None,
                                          sock_connect=self.timeout, sock_read=self.timeout))
        return session, asyncio.Lock()

    # ------------------------------------------------------------------ token
    def ensure_token(self, stale: str | None = None) -> str:
        """The access token, fetched (blocking) when there is none valid or it is still
        `stale` (the one a 401 refused); google-auth's exceptions propagate."""
        credential = self._credential
        if credential.valid and stale is None:
            return credential.token
        with self._token_lock:
            if not credential.valid or (stale is not None and credential.token == stale):
                credential.refresh(google.auth.transport.requests.Request())
                if stale is not None:
                    self.refreshes += 1
            return credential.token

    async def _refreshed(self, stale: str) -> str:
        async with self._refresh_lock:  # one worker thread busy, however many saw a 401
            if self._credential.token != stale and self._credential.valid:
                return self._credential.token
            return await asyncio.get_running_loop().run_in_executor(
                None, self.ensure_token, stale)

    def _headers_for(self, token: str) -> dict[str, str]:
        """The request headers, built once per token: every header aiohttp would otherwise
        add per request (Accept, Accept-Encoding, User-Agent) is here already, and the
        answers (a few dozen bytes of JSON) are asked for uncompressed."""
        if token != self._headers_token:
            self._headers = {
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json; charset=UTF-8",
                "Accept": "application/json", "Accept-Encoding": "identity",
                "User-Agent": SERVER_SOFTWARE}
            self._headers_token = token
        return self._headers

    # ------------------------------------------------------------------ sending
    def send_all(self, messages: Sequence[Mapping[str, Any]]) -> list[FcmAnswer]:
        """Send each v1 `message` object as its own request, all at once; one answer
        per message, in order."""
        thread = self._thread
        if thread is None:
            raise RuntimeError("the FCM client is closed")
        self.ensure_token()
        return thread.run(self._send_all(messages))

    async def _send_all(self, messages: Sequence[Mapping[str, Any]]) -> list[FcmAnswer]:
        return await asyncio.gather(*(self._send(_ENCODE({"message": m}).encode("utf-8"))
                                      for m in messages))

    async def _send(self, body: bytes) -> FcmAnswer:
        token = self._credential.token
        answer = await self._post(body, token)
        if answer.status == 401:
            try:
                token = await self._refreshed(token)
            except google.auth.exceptions.GoogleAuthError as exc:
                if getattr(exc, "retryable", False):
                    return FcmAnswer(None, failure="not_sent", label="token refresh")
                return answer  # the 401 stands
            answer = await self._post(body, token)
        return answer

    async def _post(self, body: bytes, token: str) -> FcmAnswer:
        try:
            resp = await self._session.post(self._url, data=body, headers=self._headers_for(token),
                                            proxy=self.proxy, allow_redirects=False)
            try:
                content = await resp.read()  # the whole body; the connection goes back
            finally:
                resp.release()
            status, headers = resp.status, resp.headers
        except aiohttp.ConnectionTimeoutError:
            return FcmAnswer(None, failure="not_sent", label="timeout")
        except aiohttp.ClientConnectorError:  # refused, DNS, proxy, TLS handshake
            return FcmAnswer(None, failure="not_sent", label="connection error")
        except (aiohttp.SocketTimeoutError, asyncio.TimeoutError):
            return FcmAnswer(None, failure="unknown", label="timeout")
        except (aiohttp.ClientError, OSError) as exc:
            # the connection broke (closed, reset, not HTTP) or something else of the
            # transport's: whether the request can have gone out decides
            failure = classify_transport_error(exc)
            return FcmAnswer(None, failure=failure, label=(
                "connection lost before the answer" if failure == "unknown"
                else "connection error"))
        try:
            decoded = json.loads(content) if content else None
        except ValueError:
            decoded = None
        return FcmAnswer(status, headers, decoded)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the connections and stop the loop; safe to call again."""
        self._thread = None
        self._finalizer()


def _shut(thread: LoopThread, session: aiohttp.ClientSession) -> None:
    if not thread.running:
        return
    try:
        thread.run(session.close())
    finally:
        thread.stop()
