"""FCM HTTP v1 `messages:send` over libcurl (pycurl): one POST per message, many in flight.

`FcmClient` owns one `pycurl.CurlMulti` driven by a thread of its own (`_CurlLoop`: the
multi's socket interface on an epoll). `send_all` (callable from any thread) sends a list
of v1 `message` objects at once, each as its own request, and returns one `FcmAnswer` per
message, in order. It never raises for a single message's failure; it raises only when
the OAuth2 token cannot be had before the call (google-auth's exception, which says
whether it is worth retrying). libcurl does the HTTP: connections, keep-alive, framing
(Content-Length, chunked, `Connection: close`), timeouts, proxy and TLS.

* connections: at most `pool_size` requests are handed to libcurl at once, each on a
  connection of its own, opened or taken from the multi's cache of kept-alive ones
  (`M_MAXCONNECTS` is `pool_size` too); the others wait, without a deadline, in the
  client's queue, in the order the calls came (libcurl never queues one, so its
  `TIMEOUT` runs from when the request is handed over). An answer with
  `Connection: close` closes its connection. HTTP/1.1 only.
* no silent resend: libcurl sends a request again by itself when a kept-alive
  connection dies before any byte of the answer came. The body is handed over by a read
  callback that cannot rewind, so such a resend fails (`E_SEND_FAIL_REWIND`) and the
  request is answered "unknown" instead: FCM may have taken the first copy.
* timeouts: `timeout` seconds to open a connection (`CONNECTTIMEOUT`) and `timeout`
  seconds for the whole exchange once libcurl has the request (`TIMEOUT`; FCM answers
  are a few dozen bytes, read at once).
* token: the service account's google-auth credential, refreshed (blocking, under a
  lock) when it is not valid; after a 401 it is refreshed once however many requests
  saw the stale token, and each such request is sent once more.
* proxy and CA bundle: given by the caller (FirebaseChannel resolves them from the
  environment once, when it is built); libcurl's own lookup of the proxy variables is
  off (an empty `PROXY` when there is none).

A transport failure is answered, not raised: `FcmAnswer.failure` is "not_sent" (no
connection could be made: refused, DNS, proxy refused, TLS handshake, connect timeout,
or nothing of the request was written; safe to send again) or "unknown" (a timeout or a
broken connection after the request went out: FCM may have delivered it, so it must not
be sent again), with a short `label`.
"""

from __future__ import annotations

import collections
import json
import os
import select
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
import pycurl

_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
USER_AGENT = f"retention-fcm {pycurl.version.split()[0]}"

# libcurl errors that mean no connection was made: nothing of the request went out
_NOT_CONNECTED = frozenset({
    pycurl.E_COULDNT_CONNECT, pycurl.E_COULDNT_RESOLVE_HOST, pycurl.E_COULDNT_RESOLVE_PROXY,
    pycurl.E_SSL_CONNECT_ERROR, pycurl.E_PEER_FAILED_VERIFICATION,
    getattr(pycurl, "E_PROXY", 97)})

_EPOLL_OF = {pycurl.POLL_IN: select.EPOLLIN, pycurl.POLL_OUT: select.EPOLLOUT,
             pycurl.POLL_INOUT: select.EPOLLIN | select.EPOLLOUT}


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


class Headers(Mapping[str, str]):
    """An answer's header fields by lower-cased name (the last of a repeated one), parsed
    from libcurl's raw header lines when first looked at."""

    __slots__ = ("_lines", "_fields")

    def __init__(self, lines: list[bytes]) -> None:
        self._lines = lines
        self._fields: dict[str, str] | None = None

    def _parsed(self) -> dict[str, str]:
        if self._fields is None:
            fields: dict[str, str] = {}
            for raw in self._lines:
                line = raw.decode("latin-1")
                if line.startswith("HTTP/"):  # a new answer (after a proxy's CONNECT)
                    fields = {}
                    continue
                name, sep, value = line.partition(":")
                if sep:
                    fields[name.strip().lower()] = value.strip()
            self._fields = fields
        return self._fields

    def __getitem__(self, name: str) -> str:
        return self._parsed()[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parsed())

    def __len__(self) -> int:
        return len(self._parsed())


class _Call:
    """One `send_all`'s requests: bodies in, raw outcomes out, an event when all are in."""

    __slots__ = ("bodies", "headers", "outcomes", "left", "done")

    def __init__(self, bodies: list[bytes], headers: list[str]) -> None:
        self.bodies = bodies
        self.headers = headers
        # per request: (status, header lines, content) or (None, failure, label)
        self.outcomes: list[tuple[Any, Any, Any] | None] = [None] * len(bodies)
        self.left = len(bodies)
        self.done = threading.Event()
        if not bodies:
            self.done.set()


class _Slot:
    """An easy handle and what its current request needs; reused request after request."""

    __slots__ = ("curl", "call", "index", "body", "headers", "chunks", "lines")

    def __init__(self, curl: pycurl.Curl) -> None:
        self.curl = curl
        self.call: _Call | None = None
        self.index = 0
        self.body: bytes | None = None
        self.headers: list[str] | None = None  # the HTTPHEADER list set on the handle
        self.chunks: list[bytes] = []
        self.lines: list[bytes] = []

    def read(self, size: int) -> bytes:
        """The body, once: a second read for the same request (libcurl's own resend)
        finds nothing, and without a seek callback libcurl cannot rewind it."""
        body = self.body
        if body is None:
            return b""
        if len(body) > size:
            self.body = body[size:]
            return body[:size]
        self.body = None
        return body


class _CurlLoop:
    """The thread driving one CurlMulti with epoll; holds no reference to the client."""

    def __init__(self, url: str, pool_size: int, timeout: float | None, proxy: str | None,
                 ca_bundle: str | None, name: str) -> None:
        self.pool_size = pool_size
        self._queue: collections.deque[tuple[_Call, int]] = collections.deque()
        self._lock = threading.Lock()  # guards _queue against close(); appends are atomic
        self._closing = False
        self._woken = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll = select.epoll()
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._watched: set[int] = set()
        self._deadline: float | None = None
        multi = pycurl.CurlMulti()
        multi.setopt(pycurl.M_MAXCONNECTS, pool_size)
        multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._multi = multi
        self._free: list[_Slot] = []
        self._active: dict[pycurl.Curl, _Slot] = {}
        for _ in range(pool_size):
            self._free.append(self._slot(url, timeout, proxy, ca_bundle))
        self._slots = list(self._free)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @staticmethod
    def _slot(url: str, timeout: float | None, proxy: str | None,
              ca_bundle: str | None) -> _Slot:
        c = pycurl.Curl()
        slot = _Slot(c)
        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.POST, 1)
        c.setopt(pycurl.READFUNCTION, slot.read)
        c.setopt(pycurl.WRITEFUNCTION, slot.chunks.append)
        c.setopt(pycurl.HEADERFUNCTION, slot.lines.append)
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.PROXY, proxy or "")  # "" also turns off the proxy variables
        if ca_bundle is not None:
            c.setopt(pycurl.CAINFO, ca_bundle)
        if timeout is not None:
            ms = max(1, int(timeout * 1000))
            c.setopt(pycurl.CONNECTTIMEOUT_MS, ms)
            c.setopt(pycurl.TIMEOUT_MS, ms)
        return slot

    # ------------------------------------------------------------------ callers' side
    def submit(self, call: _Call) -> None:
        with self._lock:
            if self._closing:
                raise RuntimeError("the FCM client is closed")
            self._queue.extend((call, i) for i in range(len(call.bodies)))
        self._wake()

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:  # the pipe is full of wake-ups already
                pass

    def stop(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self._thread.is_alive():
            self._woken = False
            self._wake()
            self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ------------------------------------------------------------------ libcurl callbacks
    def _on_socket(self, what: int, fd: int, multi: Any, data: Any) -> None:
        if what == pycurl.POLL_REMOVE:
            if fd in self._watched:
                self._watched.discard(fd)
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):  # closed already
                    pass
            return
        mask = _EPOLL_OF[what]
        try:
            if fd in self._watched:
                self._epoll.modify(fd, mask)
            else:
                self._epoll.register(fd, mask)
        except FileNotFoundError:  # closed and its number reused: epoll forgot it
            self._epoll.register(fd, mask)
        except FileExistsError:
            self._epoll.modify(fd, mask)
        self._watched.add(fd)

    def _on_timer(self, ms: int) -> None:
        self._deadline = None if ms < 0 else time.monotonic() + ms / 1000.0

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        multi, epoll = self._multi, self._epoll
        wake_r, queue, free = self._wake_r, self._queue, self._free
        try:
            while True:
                if self._closing:
                    break
                deadline = self._deadline
                wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
                events = epoll.poll(wait)
                for fd, ev in events:
                    if fd == wake_r:
                        try:
                            os.read(wake_r, 4096)
                        except BlockingIOError:
                            pass
                        self._woken = False
                        continue
                    flags = 0
                    if ev & select.EPOLLIN:
                        flags |= pycurl.CSELECT_IN
                    if ev & select.EPOLLOUT:
                        flags |= pycurl.CSELECT_OUT
                    if ev & (select.EPOLLERR | select.EPOLLHUP):
                        flags |= pycurl.CSELECT_ERR
                    multi.socket_action(fd, flags)
                deadline = self._deadline
                if deadline is not None and time.monotonic() >= deadline:
                    self._deadline = None
                    multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
                self._collect()
                if queue and free:
                    while queue and free:
                        call, i = queue.popleft()
                        self._start(free.pop(), call, i)
                    # libcurl sets its timer to 0 to start them: run it now
                    multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
                    self._collect()
        finally:
            self._shut()

    def _start(self, slot: _Slot, call: _Call, index: int) -> None:
        c = slot.curl
        body = call.bodies[index]
        slot.call, slot.index, slot.body = call, index, body
        if slot.headers is not call.headers:  # a new token: new header list
            c.setopt(pycurl.HTTPHEADER, call.headers)
            slot.headers = call.headers
        c.setopt(pycurl.POSTFIELDSIZE, len(body))
        self._active[c] = slot
        self._multi.add_handle(c)

    def _collect(self) -> None:
        multi = self._multi
        while True:
            left, ok, failed = multi.info_read()
            for c in ok:
                self._finish(c, 0)
            for c, errno, _message in failed:
                self._finish(c, errno)
            if not left:
                return

    def _finish(self, c: pycurl.Curl, errno: int) -> None:
        slot = self._active.pop(c)
        call, index = slot.call, slot.index
        if errno == 0:
            outcome = (c.getinfo(pycurl.RESPONSE_CODE), Headers(slot.lines[:]),
                       b"".join(slot.chunks))
        else:
            outcome = (None, *_failure(c, errno))
        self._multi.remove_handle(c)
        slot.chunks.clear()
        slot.lines.clear()
        slot.call = slot.body = None
        self._free.append(slot)
        assert call is not None
        call.outcomes[index] = outcome
        call.left -= 1
        if not call.left:
            call.done.set()

    def _shut(self) -> None:
        """Answer what is left (queued: not sent; in flight: unknown), close everything."""
        for c, slot in list(self._active.items()):
            call = slot.call
            self._multi.remove_handle(c)
            if call is not None:
                call.outcomes[slot.index] = (None, "unknown", "connection lost before the answer")
                call.left -= 1
                if not call.left:
                    call.done.set()
        self._active.clear()
        with self._lock:
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
        for call, i in queued:
            call.outcomes[i] = (None, "not_sent", "connection error")
            call.left -= 1
            if not call.left:
                call.done.set()
        for slot in self._slots:
            slot.curl.close()
        self._multi.close()
        self._epoll.close()


def _failure(c: pycurl.Curl, errno: int) -> tuple[str, str]:
    """(failure, label) of a transfer libcurl ended with error `errno`."""
    if errno in _NOT_CONNECTED:
        return "not_sent", "connection error"
    sent = c.getinfo(pycurl.REQUEST_SIZE) > 0
    if errno == pycurl.E_OPERATION_TIMEDOUT:
        return ("unknown" if sent else "not_sent"), "timeout"
    if not sent and errno != pycurl.E_SEND_FAIL_REWIND:
        return "not_sent", "connection error"
    return "unknown", "connection lost before the answer"


class FcmClient:
    """`messages:send` of one Firebase project at `base_url`, authorised by
    `credential` (a google-auth credential with the firebase.messaging scope).
    `ca_bundle`: a CA file for https (libcurl's default when None)."""

    def __init__(self, base_url: str, project_id: str, credential: Any, *,
                 pool_size: int = 500, timeout: float | None = 30.0,
                 proxy: str | None = None, ca_bundle: str | None = None,
                 name: str = "fcm") -> None:
        base = base_url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"FCM base URL must be http(s)://host[:port], not {base_url!r}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, not {pool_size}")
        self.url = f"{base}/v1/projects/{project_id}/messages:send"
        self.pool_size = pool_size
        self.timeout = timeout
        self.proxy = proxy
        self._credential = credential
        self._token_lock = threading.Lock()
        self._headers: list[str] = []
        self._headers_token: str | None = None
        self.refreshes = 0  # tokens fetched after a 401
        loop = _CurlLoop(self.url, pool_size, timeout, proxy, ca_bundle, name)
        self._loop: _CurlLoop | None = loop
        # stops the thread and closes the handles at close(), or when the client is
        # collected or the interpreter exits without close()
        self._finalizer = weakref.finalize(self, loop.stop)

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

    def _headers_for(self, token: str) -> list[str]:
        """The request header lines, built once per token (answers asked for
        uncompressed; no `Expect: 100-continue`)."""
        if token != self._headers_token:
            self._headers = [
                f"Authorization: Bearer {token}",
                "Content-Type: application/json; charset=UTF-8",
                "Accept: application/json", f"User-Agent: {USER_AGENT}", "Expect:"]
            self._headers_token = token
        return self._headers

    # ------------------------------------------------------------------ sending
    def send_all(self, messages: Sequence[Mapping[str, Any]]) -> list[FcmAnswer]:
        """Send each v1 `message` object as its own request, all at once; one answer
        per message, in order."""
        if self._loop is None:
            raise RuntimeError("the FCM client is closed")
        token = self.ensure_token()
        bodies = [_ENCODE({"message": m}).encode("utf-8") for m in messages]
        answers = self._post_all(bodies, token)
        stale = [i for i, a in enumerate(answers) if a.status == 401]
        if stale:
            try:
                token = self.ensure_token(stale=token)
            except google.auth.exceptions.GoogleAuthError as exc:
                if getattr(exc, "retryable", False):
                    for i in stale:
                        answers[i] = FcmAnswer(None, failure="not_sent", label="token refresh")
                return answers  # otherwise the 401s stand
            for i, answer in zip(stale, self._post_all([bodies[i] for i in stale], token)):
                answers[i] = answer
        return answers

    def _post_all(self, bodies: list[bytes], token: str) -> list[FcmAnswer]:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the FCM client is closed")
        call = _Call(bodies, self._headers_for(token))
        loop.submit(call)
        call.done.wait()
        answers = []
        for status, second, third in call.outcomes:  # type: ignore[misc]
            if status is None:
                answers.append(FcmAnswer(None, failure=second, label=third))
                continue
            try:
                decoded = json.loads(third) if third else None
            except ValueError:
                decoded = None
            answers.append(FcmAnswer(status, second, decoded))
        return answers

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the connections and stop the thread; safe to call again."""
        self._loop = None
        self._finalizer()
