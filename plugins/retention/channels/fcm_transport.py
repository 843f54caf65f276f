"""Lean HTTP transports for firebase-admin's FCM calls: `LeanAsyncFcmClient` (asyncio,
for `send_each_async`, FirebaseChannel's default) and `LeanFcmSession` (urllib3 without
requests on top, for `send_each`).

`LeanFcmSession`. firebase-admin sends each push as one HTTP request through
`_http_client.JsonHttpClient.request`, which calls `session.request(method, url,
headers=..., json=..., timeout=...)` on a `google.auth.transport.requests.AuthorizedSession`
and then `raise_for_status()`. Most of a push's client CPU on that path is requests
itself, not the network: `Session.prepare_request` (header, cookie and setting merges,
URL parsing), hooks, adapters, the cookie jar and the Response wrapper, none of which an
FCM call needs. `LeanFcmSession` stands in for that session with the same contract and
less work per request:

* one `urllib3.HTTPConnectionPool` (or HTTPS, verifying against certifi's bundle or
  REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE) for the one FCM host, `maxsize` keep-alive
  connections, blocking when all are busy, no urllib3 retries (the channel retries);
* the OAuth2 bearer token of the app's credential, refreshed under a lock when it is not
  valid, and once more after a 401 (what AuthorizedSession does);
* the body encoded with `json.dumps` exactly as requests would (`allow_nan=False`,
  UTF-8);
* the answer returned as a real `requests.Response` (status, headers, body, url, reason),
  and errors raised as the requests exceptions firebase-admin already maps:
  `ReadTimeout`/`ConnectTimeout` (-> DeadlineExceededError), `ConnectionError`
  (-> UnavailableError), `HTTPError` from `raise_for_status` (-> the FCM error of the
  status and body).

So message building, error mapping and `send_each`'s batching stay the SDK's; only the
bytes move differently. It is used when no proxy applies to the FCM host and no .netrc
entry names it (FirebaseChannel falls back to the SDK's own session otherwise).

`LeanAsyncFcmClient`. `send_each` starts a thread per message; firebase-admin's
`send_each_async` does `await self._async_client.request('post', url=..., headers=...,
json=data)` for each message of a call (asyncio.gather), maps an `httpx.HTTPError` with
`_handle_fcm_httpx_error` and reads `resp.json()` on success. Its `HttpxAsyncClient`
(httpx, HTTP/2 negotiation, a retry transport, an auth flow that builds a
requests.Session per request) costs several times the CPU per push of the threaded
transports. `LeanAsyncFcmClient` takes its place with the same contract: HTTP/1.1 on a
pool of keep-alive connections (asyncio Protocols, no streams), the same bearer token and
refresh after a 401 as above (one refresh in a thread however many requests saw the stale
token), non-2xx answers raised as `httpx.HTTPStatusError` with a real `httpx.Response`,
timeouts as `httpx.ConnectTimeout`/`ReadTimeout` and broken connections as
`httpx.ConnectError`, so firebase-admin's mapping (DeadlineExceededError,
UnavailableError, the FCM errors) is the one the other transports get. `LoopThread` runs
the channel's event loop (uvloop when installed). Why the async transport is the default:
firebase.py's docstring; the figures: bench/RESULTS.md, sections "dispatch: ... async FCM
transport" and "Figures moved from docstrings".
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import json as _json
import os
import ssl
import threading
from typing import Any
from urllib.parse import urlsplit

import google.auth.transport.requests
import httpx
import requests
import urllib3
from requests.structures import CaseInsensitiveDict

from retention.aio import new_event_loop

_REFRESH_STATUS = 401


def lean_transport_applies(url: str) -> bool:
    """True unless the environment routes `url` through a proxy or .netrc has
    credentials for its host: then requests' handling is kept."""
    return not requests.utils.get_environ_proxies(url) and \
        requests.utils.get_netrc_auth(url) is None


class LeanFcmSession:
    """What firebase-admin's JsonHttpClient needs of a session, on one urllib3 pool."""

    def __init__(self, base_url: str, credential: Any, *, maxsize: int = 500) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"FCM base URL must be http(s)://host[:port], not {base_url!r}")
        self._origin = f"{parts.scheme}://{parts.netloc}"
        kwargs: dict[str, Any] = {"maxsize": maxsize, "block": True, "retries": False}
        if parts.scheme == "https":
            import certifi

            kwargs["ca_certs"] = (os.environ.get("REQUESTS_CA_BUNDLE")
                                  or os.environ.get("CURL_CA_BUNDLE") or certifi.where())
            kwargs["cert_reqs"] = "CERT_REQUIRED"
            pool_cls = urllib3.HTTPSConnectionPool
        else:
            pool_cls = urllib3.HTTPConnectionPool
        self._pool = pool_cls(parts.hostname, parts.port, **kwargs)
        self._credential = credential
        self._lock = threading.Lock()
        self.headers: dict[str, str] = {}  # JsonHttpClient may update() it

    # ------------------------------------------------------------------ auth
    def _token(self, force: bool = False, stale: str | None = None) -> str:
        credential = self._credential
        if force or not credential.valid:
            with self._lock:
                # another thread may have refreshed it meanwhile
                if not credential.valid or (force and credential.token == stale):
                    credential.refresh(google.auth.transport.requests.Request())
        return credential.token

    # ------------------------------------------------------------------ requests API
    def request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                json: Any = None, data: bytes | str | None = None,
                timeout: float | tuple[float, float] | None = None, **_: Any) -> requests.Response:
        if not url.startswith(self._origin + "/"):
            raise ValueError(f"LeanFcmSession serves {self._origin}, not {url}")
        path = url[len(self._origin):]
        if json is not None:
            body: bytes | None = _json.dumps(json, allow_nan=False).encode("utf-8")
            content_type: str | None = "application/json"
        else:
            body = data.encode("utf-8") if isinstance(data, str) else data
            content_type = None
        out = {**self.headers, **(headers or {})}
        if content_type:
            out.setdefault("Content-Type", content_type)
        if isinstance(timeout, tuple):
            limit = urllib3.Timeout(connect=timeout[0], read=timeout[1])
        else:
            limit = urllib3.Timeout(connect=timeout, read=timeout)
        token = self._token()
        for attempt in (1, 2):
            out["Authorization"] = f"Bearer {token}"
            try:
                raw = self._pool.urlopen(method.upper(), path, body=body, headers=out,
                                         timeout=limit, retries=False, redirect=False,
                                         preload_content=True, assert_same_host=False)
            except urllib3.exceptions.NewConnectionError as exc:  # a ConnectTimeoutError too
                raise requests.exceptions.ConnectionError(exc) from exc
            except urllib3.exceptions.ConnectTimeoutError as exc:
                raise requests.exceptions.ConnectTimeout(exc) from exc
            except urllib3.exceptions.ReadTimeoutError as exc:
                raise requests.exceptions.ReadTimeout(exc) from exc
            except urllib3.exceptions.SSLError as exc:
                raise requests.exceptions.SSLError(exc) from exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise requests.exceptions.ConnectionError(exc) from exc
            if raw.status == _REFRESH_STATUS and attempt == 1:
                token = self._token(force=True, stale=token)
                continue
            break
        return _response(raw, url)

    def close(self) -> None:
        self._pool.close()

    # AuthorizedSession/requests.Session methods firebase-admin may touch
    def mount(self, *_: Any) -> None:
        pass


def _response(raw: urllib3.BaseHTTPResponse, url: str) -> requests.Response:
    resp = requests.Response()
    resp.status_code = raw.status
    resp.headers = CaseInsensitiveDict(raw.headers)
    resp._content = raw.data  # noqa: SLF001 - the documented way to fill a Response
    resp.encoding = "utf-8"
    resp.reason = raw.reason or ""
    resp.url = url
    return resp


# --------------------------------------------------------------------------- asyncio

class ConnectionLost(httpx.ConnectError):
    """The connection broke (closed, reset, or answered something that is not HTTP)
    before the whole answer came. A ConnectError, so firebase-admin maps it to
    UnavailableError, as requests' ConnectionError is on the other transports.
    `request_sent` says whether the request had been written: if so the server may have
    acted on it and the channel must not send it again."""

    def __init__(self, message: str, *, request_sent: bool = True) -> None:
        super().__init__(message)
        self.request_sent = request_sent


class _Answer:
    """A 2xx answer: what firebase-admin's send_each_async reads of an httpx.Response."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers  # lower-cased names
        self.content = content

    def json(self) -> Any:
        return _json.loads(self.content)


_MAX_HEAD = 64 * 1024
_UNSET = object()
# what httpx sends for json= (compact, UTF-8), built once
_JSON_ENCODER = _json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_TOKEN_CHECK_SECONDS = 1.0  # credential.valid (a clock read and datetime sums) at most this often


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time, its answer parsed from
    the byte stream (Content-Length, chunked, or until the connection closes)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.alive = False
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.got_bytes = False  # any byte of the current answer arrived
        self._head: tuple[int, dict[str, str], bool] | None = None  # status, headers, keep-alive
        self._framing = ""  # "length", "chunked" or "close"
        self._length = 0  # bytes of body (length) or of the current chunk (chunked)
        self._chunks: list[bytes] = []
        self._chunk_state = 0  # 0: size line, 1: chunk data + CRLF, 2: trailers

    # asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.alive = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self._head is not None and self._framing == "close":
            body = bytes(self.buffer)
            self.buffer.clear()
            self._finish(body)
            return
        what = "before an answer" if not self.got_bytes else "in the middle of an answer"
        waiter.set_exception(ConnectionLost(
            f"the server closed the connection {what}" + (f": {exc}" if exc else "")))

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():  # nothing was asked: not HTTP as we know it
            self.close()
            return
        self.got_bytes = True
        self.buffer += data
        try:
            self._parse()
        except ValueError as exc:
            self.close()
            if not waiter.done():
                waiter.set_exception(ConnectionLost(f"malformed HTTP answer: {exc}"))

    # a request ------------------------------------------------------------------
    def send(self, data: bytes, waiter: asyncio.Future) -> None:
        self.waiter, self.got_bytes, self._head = waiter, False, None
        self.transport.write(data)  # type: ignore[union-attr]

    def close(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.abort()

    def _finish(self, body: bytes) -> None:
        status, headers, keep_alive = self._head  # type: ignore[misc]
        self._head = None
        if not keep_alive or self.buffer:  # bytes beyond the answer: not to be trusted
            self.alive = False
            self.transport.close()  # type: ignore[union-attr]
        waiter, self.waiter = self.waiter, None
        waiter.set_result((status, headers, body))  # type: ignore[union-attr]

    def _parse(self) -> None:
        buf = self.buffer
        while self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise ValueError("header too large")
                return
            lines = buf[:end].decode("latin-1").split("\r\n")
            del buf[:end + 4]
            version, _, rest = lines[0].partition(" ")
            if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
                raise ValueError(f"status line {lines[0][:80]!r}")
            status = int(rest[:3])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, colon, value = line.partition(":")
                if not colon:
                    raise ValueError(f"header line {line[:80]!r}")
                name = name.strip().lower()
                value = value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            if status < 200:  # 1xx: an interim answer, the real one follows
                continue
            connection = headers.get("connection", "").lower()
            keep_alive = "close" not in connection and (
                version != "HTTP/1.0" or "keep-alive" in connection)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._framing, self._chunk_state, self._chunks = "chunked", 0, []
            elif "content-length" in headers:
                self._framing, self._length = "length", int(headers["content-length"])
                if self._length < 0:
                    raise ValueError("negative Content-Length")
            elif status in (204, 304):
                self._framing, self._length = "length", 0
            else:
                self._framing, keep_alive = "close", False
            self._head = (status, headers, keep_alive)
        if self._framing == "length":
            if len(buf) >= self._length:
                body = bytes(buf[:self._length])
                del buf[:self._length]
                self._finish(body)
        elif self._framing == "chunked":
            self._parse_chunks()

    def _parse_chunks(self) -> None:
        buf = self.buffer
        while True:
            if self._chunk_state == 0:  # size line
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        raise ValueError("chunk size line too long")
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0].strip(), 16)
                del buf[:end + 2]
                if size < 0:
                    raise ValueError("negative chunk size")
                self._length, self._chunk_state = size, (1 if size else 2)
            elif self._chunk_state == 1:  # data and its CRLF
                if len(buf) < self._length + 2:
                    return
                if buf[self._length:self._length + 2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                self._chunks.append(bytes(buf[:self._length]))
                del buf[:self._length + 2]
                self._chunk_state = 0
            else:  # trailers, up to an empty line
                if buf[:2] == b"\r\n":
                    del buf[:2]
                else:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(buf) > _MAX_HEAD:
                            raise ValueError("trailers too large")
                        return
                    del buf[:end + 4]
                self._finish(b"".join(self._chunks))
                return


def _ssl_context() -> ssl.SSLContext:
    import certifi

    return ssl.create_default_context(cafile=os.environ.get("REQUESTS_CA_BUNDLE")
                                      or os.environ.get("CURL_CA_BUNDLE") or certifi.where())


class LeanAsyncFcmClient:
    """What firebase-admin's `send_each_async` needs of its `HttpxAsyncClient`
    (`await request('post', url=..., headers=..., json=...)` returning something with
    `.json()`, raising httpx errors), on a pool of keep-alive HTTP/1.1 connections to the
    one FCM origin, in the event loop that first uses it.

    * at most `pool_size` connections open; a request waits for one when all are busy;
    * one request at a time on a connection; an answer with `Connection: close` (or
      without a length) closes it, an idle connection the server closed is not reused;
    * `timeout` seconds (or a request's `timeout=`) to connect and, separately, for the
      answer once the request is written; httpx.ConnectTimeout / httpx.ReadTimeout
      (firebase-admin: DeadlineExceededError) after which the connection is dropped;
    * a refused connection is httpx.ConnectError, one that breaks before the whole answer
      came `ConnectionLost` (a ConnectError too), both UnavailableError: never sent again
      here (the channel's retry policy does that);
    * a 2xx answer is returned as `_Answer`; any other status raises
      httpx.HTTPStatusError with a real httpx.Response (status, headers, body), which
      firebase-admin maps to its FCM errors exactly as from its own client;
    * the app credential's bearer token; after a 401 it is refreshed once (in a thread,
      one refresh however many requests saw the stale token) and the request sent once
      more.
    """

    def __init__(self, base_url: str, credential: Any, *, pool_size: int = 500,
                 timeout: float | None = 30.0, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"FCM base URL must be http(s)://host[:port], not {base_url!r}")
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = _ssl_context() if parts.scheme == "https" else None
        self._host_header = f"Host: {parts.netloc}\r\n"
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._credential = credential
        self._pool_size = pool_size
        self.timeout = timeout
        self._idle: list[_Connection] = []
        self._open = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._auth_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._token_checked_until = 0.0  # loop time
        self._heads: dict[tuple, str] = {}  # (method, url, headers) -> request head up to the token
        self.refreshes = 0  # tokens fetched after a 401

    # ------------------------------------------------------------------ pool
    async def _acquire(self, connect_timeout: float | None) -> _Connection:
        while True:
            if self._closed:
                raise httpx.ConnectError("the FCM client is closed")
            while self._idle:
                conn = self._idle.pop()
                if conn.alive:
                    return conn
                self._open -= 1
            if self._open < self._pool_size:
                self._open += 1
                try:
                    return await self._connect(connect_timeout)
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
            waiter = self._loop.create_future()  # type: ignore[union-attr]
            self._waiters.append(waiter)
            try:
                conn = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    self._release(waiter.result())
                raise
            if conn is not None:
                return conn

    def _wake(self, conn: _Connection | None = None) -> bool:
        """Hand `conn` (or, with None, the right to open one) to the first waiter."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def _release(self, conn: _Connection) -> None:
        if conn.alive and not self._closed:
            if not self._wake(conn):
                self._idle.append(conn)
            return
        conn.close()
        self._open -= 1
        self._wake()

    async def _connect(self, timeout: float | None) -> _Connection:
        loop = self._loop
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(  # type: ignore[union-attr]
                _Connection, self._host, self._port, ssl=self._ssl,
                server_hostname=self._host if self._ssl else None), timeout)
        except asyncio.TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {self._origin} took over {timeout} s"
                                       ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"connecting to {self._origin}: {exc}") from exc
        return conn

    # ------------------------------------------------------------------ auth
    async def _refresh(self, stale: str | None) -> str:
        """A fresh token, fetched (in a thread) only if nobody did since `stale` was read."""
        async with self._auth_lock:  # type: ignore[union-attr]
            credential = self._credential
            if not credential.valid or credential.token == stale:
                await self._loop.run_in_executor(  # type: ignore[union-attr]
                    None, credential.refresh, google.auth.transport.requests.Request())
                if stale is not None:
                    self.refreshes += 1
            return credential.token

    # ------------------------------------------------------------------ httpx API
    async def request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                      json: Any = None, content: bytes | None = None,
                      timeout: float | tuple[float, float] | None | object = _UNSET,
                      **_: Any) -> _Answer:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._auth_lock = asyncio.Lock()
        if self._closed:
            raise httpx.ConnectError("the FCM client is closed")
        if not url.startswith(self._origin + "/"):
            raise ValueError(f"LeanAsyncFcmClient serves {self._origin}, not {url}")
        if timeout is _UNSET:
            timeout = self.timeout
        connect_timeout, read_timeout = timeout if isinstance(timeout, tuple) else (timeout,
                                                                                      timeout)
        body = _JSON_ENCODER.encode(json).encode("utf-8") if json is not None else content or b""
        key = (method, url, json is not None, *(headers.items() if headers else ()))
        head = self._heads.get(key)
        if head is None:
            head = (f"{method.upper()} {url[len(self._origin):]} HTTP/1.1\r\n"
                    f"{self._host_header}{self._fixed}"
                    + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
                    + ("Content-Type: application/json\r\n" if json is not None else "")
                    + "Content-Length: ")
            if len(self._heads) < 64:
                self._heads[key] = head
        head = f"{head}{len(body)}\r\nAuthorization: Bearer "
        credential = self._credential
        now = self._loop.time()
        if now >= self._token_checked_until:
            if not credential.valid:
                await self._refresh(None)
            self._token_checked_until = now + _TOKEN_CHECK_SECONDS
        token = credential.token
        status, answer_headers, answer = await self._exchange(
            f"{head}{token}\r\n\r\n".encode("latin-1") + body, connect_timeout, read_timeout)
        if status == _REFRESH_STATUS:
            token = await self._refresh(token)
            status, answer_headers, answer = await self._exchange(
                f"{head}{token}\r\n\r\n".encode("latin-1") + body, connect_timeout,
                read_timeout)
        if answer_headers.get("content-encoding", "").lower() == "gzip":
            answer = gzip.decompress(answer)
        if 200 <= status < 300:
            return _Answer(status, answer_headers, answer)
        request = httpx.Request(method.upper(), url)
        response = httpx.Response(status, headers=answer_headers, content=answer,
                                  request=request)
        raise httpx.HTTPStatusError(f"{status} from {url}", request=request, response=response)

    async def _exchange(self, data: bytes, connect_timeout: float | None,
                        read_timeout: float | None) -> tuple[int, dict[str, str], bytes]:
        conn = await self._acquire(connect_timeout)
        loop = self._loop
        waiter = loop.create_future()  # type: ignore[union-attr]
        timer = None
        if read_timeout is not None:
            timer = loop.call_later(read_timeout, _expire, conn, waiter,  # type: ignore[union-attr]
                                    read_timeout)
        try:
            if not conn.alive:
                raise ConnectionLost("the server closed the connection before the request",
                                     request_sent=False)
            conn.send(data, waiter)
            return await waiter
        except BaseException:
            conn.close()  # whatever the state of the answer, the connection is done
            raise
        finally:
            if timer is not None:
                timer.cancel()
            conn.waiter = None
            self._release(conn)

    async def aclose(self) -> None:
        """Close every connection; requests in flight fail with ConnectionLost. Safe to
        call again, from any loop."""
        if self._closed:
            return
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        while self._wake():
            pass

    @property
    def open_connections(self) -> int:
        return self._open


def _expire(conn: _Connection, waiter: asyncio.Future, seconds: float) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.ReadTimeout(f"no answer within {seconds} s"))
    conn.close()


class LoopThread:
    """An event loop run by a daemon thread; `run(coro)` waits for a coroutine from
    another thread."""

    def __init__(self, name: str = "fcm-async") -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()
