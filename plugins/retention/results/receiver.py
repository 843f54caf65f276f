"""The SendGrid Event Webhook receiver: an ASGI app served by uvicorn, in its own process.

    python -m retention.results.receiver --port 8025 [--host 127.0.0.1]
    python -m retention.results.receiver --port 8025 --insecure-no-signature   # local only

`POST /sendgrid/events` (the URL to give SendGrid's Event Webhook settings) fails closed:

* it does not start without a verification key (`RETENTION_SENDGRID_WEBHOOK_KEY`), unless
  it is started with `--insecure-no-signature` (`make_app(insecure=True)`), for a local
  machine only, which it says loudly at start;
* before any of the body is read: no `Content-Length` (a chunked body too) gets 411, a
  malformed one 400, one above the cap 413; a missing signature, or a signature timestamp
  further than `RETENTION_SENDGRID_WEBHOOK_TOLERANCE_SECONDS` (600) from the receiver's
  clock, gets 403. The body must then arrive within a deadline (408 otherwise);
* a wrong signature gets 403, a body that is not a strict JSON array of storable event
  objects 400 (`webhook.parse_batch`); nothing is written for any of them;
* a batch whose digest (sha256 of the raw body) has landed before is a replay: 200, so
  SendGrid stops retrying, and nothing new lands (counted and logged as a duplicate);
* otherwise the raw batch lands durably (mode 0600 file under the webhook folder, see
  `webhook.land_new_batch`) and only then is 200 answered; the batch is ingested into the
  database at once, so unsubscribes reach `ops.consent_changes` before the next wave. A
  batch the database refuses moves to `rejected/` (with a `.reason` file) and later
  batches go on; if the database is down the batch waits in `incoming/` for
  `load_landed_batches` (the `retention_results` DAG), and SendGrid still gets its 200.

`GET /healthz` answers 200 with the counters. Log lines carry no payload, address or
client IP (uvicorn's access log is off). The server is uvicorn (h11) with bounded
concurrency (`limit_concurrency`: connections beyond it get 503), a keep-alive timeout, a
cap on the request head (`h11_max_incomplete_event_size`), a deadline for a request head
to arrive and one for the body, so a slow client cannot hold a connection for long.
`serve_in_thread` runs the same server in this process (tests, the demo). Put TLS in
front of it (a proxy or load balancer) in production.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec
from uvicorn.protocols.http.h11_impl import H11Protocol

from retention.results.webhook import (
    KEY_ENV, SIGNATURE_HEADER, TIMESTAMP_HEADER, BatchRejected, WebhookError, check_timestamp,
    configured_key, ingest_landed_file, land_new_batch, parse_batch, signature_tolerance,
    verify_signature, webhook_dir,
)
from retention.serving import bind, start_in_thread

log = logging.getLogger(__name__)

EVENT_PATHS = ("/sendgrid/events", "/webhooks/sendgrid")
#: SendGrid's batches are well under a megabyte; anything far larger is not SendGrid
MAX_BODY = 8 * 1024 * 1024
#: seconds the whole body may take to arrive once the request head is in
BODY_TIMEOUT = 30.0
#: seconds a request head may take to arrive (on a new or a kept-alive connection)
HEAD_TIMEOUT = 10.0
#: connections and requests served at once; beyond them uvicorn answers 503
MAX_CONNECTIONS = 64
#: idle seconds before a kept-alive connection is closed
KEEP_ALIVE_TIMEOUT = 5
#: largest request head (request line and headers) in bytes
MAX_HEAD = 16 * 1024
#: batches landed and ingested at once (file fsyncs, database transactions)
INGEST_THREADS = 4

_NOT_CONFIGURED = object()
_CONTENT_LENGTH = re.compile(r"[0-9]{1,15}")


#: connections waiting to be accepted before the server takes them
BACKLOG = 128


class MissingVerificationKey(RuntimeError):
    """The receiver was asked to start without a key and without the insecure switch."""


def _utc_now() -> datetime:
    # the receiver's clock: when the batch arrived is a recorded fact, never a metric input
    return datetime.now(timezone.utc)


class _ClientGone(Exception):
    pass


@dataclass
class WebhookApp:
    """The ASGI app (see the module docstring); `counters` are what it has done so far."""

    key: ec.EllipticCurvePublicKey | None
    root: Path | None = None
    url: str | None = None
    ingest: bool = True
    clock: Callable[[], datetime] = _utc_now
    tolerance: float = 600.0
    max_body: int = MAX_BODY
    body_timeout: float = BODY_TIMEOUT
    ingest_threads: int = INGEST_THREADS
    counters: dict[str, int] = field(default_factory=lambda: {
        "landed": 0, "duplicates": 0, "refused": 0, "rejected": 0, "pending": 0})

    def __post_init__(self) -> None:
        self._executor = ThreadPoolExecutor(self.ingest_threads,
                                            thread_name_prefix="webhook-ingest")
        self._lock = threading.Lock()

    def _count(self, what: str) -> None:
        with self._lock:
            self.counters[what] += 1

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        try:
            status, payload, close = await self._handle(scope, receive)
        except _ClientGone:
            return
        except WebhookError as exc:
            self._count("refused")
            log.warning("webhook request refused (%s): %s", exc.status, exc)
            status, payload, close = exc.status, {"error": str(exc)}, True
        except Exception as exc:  # noqa: BLE001 - answer 500, log no payload
            log.error("webhook request failed (%s)", type(exc).__name__)
            status, payload, close = 500, {"error": "internal error"}, True
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if close:  # a refused request's body may be unread: the connection ends here
            headers.append((b"connection", b"close"))
        if status == 405:
            headers.append((b"allow", b"POST"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _handle(self, scope, receive) -> tuple[int, dict, bool]:
        path, method = scope["path"], scope["method"]
        if path == "/healthz":
            with self._lock:
                return 200, {"status": "ok", **self.counters}, False
        if path not in EVENT_PATHS:
            return 404, {"error": "not found"}, True
        if method != "POST":
            return 405, {"error": "POST a batch of events"}, True
        headers: dict[str, list[str]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1").lower(), []).append(
                value.decode("latin-1"))
        # everything that can be refused from the request head is, before the body is read
        if "transfer-encoding" in headers:
            raise WebhookError(411, "Content-Length required (chunked bodies are not accepted)")
        lengths = headers.get("content-length")
        if not lengths:
            raise WebhookError(411, "Content-Length required")
        if len(lengths) > 1 or not _CONTENT_LENGTH.fullmatch(lengths[0].strip()):
            raise WebhookError(400, "Content-Length must be one non-negative integer")
        length = int(lengths[0].strip())
        if length > self.max_body:
            raise WebhookError(413, f"batch too large (more than {self.max_body} bytes)")
        signature = timestamp = None
        if self.key is not None:
            signature = (headers.get(SIGNATURE_HEADER.lower()) or [None])[0]
            timestamp = (headers.get(TIMESTAMP_HEADER.lower()) or [None])[0]
            if not signature:
                raise WebhookError(403, "missing SendGrid event webhook signature")
            check_timestamp(timestamp, self.clock(), self.tolerance)
        body = await self._read_body(receive, length)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._accept, body, signature,
                                          timestamp)

    async def _read_body(self, receive, length: int) -> bytes:
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone
                    body += message.get("body", b"")
                    if len(body) > length:
                        raise WebhookError(400, "the body is longer than its Content-Length")
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise WebhookError(408, "the body did not arrive in time") from None
        if len(body) != length:
            raise WebhookError(400, "the body is shorter than its Content-Length")
        return bytes(body)

    def _accept(self, body: bytes, signature: str | None,
                timestamp: str | None) -> tuple[int, dict, bool]:
        """Verify, parse, land once, ingest (in a worker thread: fsyncs and the database)."""
        if self.key is not None and not verify_signature(self.key, body, signature, timestamp):
            raise WebhookError(403, "invalid SendGrid event webhook signature")
        events = parse_batch(body)
        landing = land_new_batch(body, self.clock(), verified=self.key is not None,
                                 root=self.root)
        if landing.duplicate:
            self._count("duplicates")
            log.info("webhook batch %s landed before: a replay, not landed again",
                     landing.batch_id[:16])
            return 200, {"duplicate": True, "batch_id": landing.batch_id, "landed": None,
                         "events": len(events), "ingested": None}, False
        self._count("landed")
        landed = landing.path
        answer: dict = {"landed": landed.name, "batch_id": landing.batch_id,
                        "events": len(events)}
        if self.ingest:
            try:
                result = ingest_landed_file(landed, self.url, root=self.root or webhook_dir())
                answer["ingested"] = result.as_dict() if result is not None else None
            except BatchRejected:
                self._count("rejected")
                answer["ingested"] = None
                answer["rejected"] = True
            except Exception as exc:  # noqa: BLE001 - the batch is safe on disk
                self._count("pending")
                log.warning("webhook batch %s landed but not ingested (%s); it waits in "
                            "incoming/", landed.name, type(exc).__name__)
                answer["ingested"] = None
                answer["pending"] = "will be loaded from the landing folder"
        return 200, answer, False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def make_app(*, key: ec.EllipticCurvePublicKey | None | object = _NOT_CONFIGURED,
             insecure: bool = False, root: Path | None = None, url: str | None = None,
             ingest: bool = True, clock: Callable[[], datetime] = _utc_now,
             tolerance: float | None = None, max_body: int = MAX_BODY,
             body_timeout: float = BODY_TIMEOUT) -> WebhookApp:
    """The ASGI app. `key` defaults to RETENTION_SENDGRID_WEBHOOK_KEY; without a key it
    refuses to exist unless `insecure=True` (then no signature is checked: local use only).
    `tolerance` defaults to RETENTION_SENDGRID_WEBHOOK_TOLERANCE_SECONDS."""
    verification_key = configured_key() if key is _NOT_CONFIGURED else key
    if verification_key is None and not insecure:
        raise MissingVerificationKey(
            f"{KEY_ENV} is not set: the webhook receiver does not start without a "
            "verification key (the public key SendGrid shows under Mail Settings > Signed "
            "Event Webhook). For a local test only, start it with --insecure-no-signature "
            "(make_app(insecure=True)).")
    if verification_key is None:
        log.warning("!!! INSECURE: the SendGrid webhook receiver runs WITHOUT signature "
                    "verification (%s unset, --insecure-no-signature): anyone who can reach "
                    "it can write events and withdraw consent. Local use only. !!!", KEY_ENV)
    tolerance = signature_tolerance() if tolerance is None else float(tolerance)
    if not tolerance > 0:
        raise ValueError("tolerance must be a positive number of seconds")
    return WebhookApp(key=verification_key, root=root, url=url, ingest=ingest, clock=clock,
                      tolerance=tolerance, max_body=max_body, body_timeout=body_timeout)


# --- the server ------------------------------------------------------------------------

class _DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head: a client that opens a
    connection, or keeps one alive, and sends a head slowly is closed after
    `head_timeout` seconds (uvicorn's keep-alive timer stops at the first byte)."""

    head_timeout = HEAD_TIMEOUT

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head arrived
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_head_timer()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


def _server_config(app, *, max_connections: int = MAX_CONNECTIONS,
                   head_timeout: float = HEAD_TIMEOUT) -> uvicorn.Config:
    protocol = type("WebhookH11Protocol", (_DeadlineH11Protocol,),
                    {"head_timeout": head_timeout})
    return uvicorn.Config(
        app, http=protocol, ws="none", lifespan="off", interface="asgi3",
        limit_concurrency=max_connections, timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
        h11_max_incomplete_event_size=MAX_HEAD, timeout_graceful_shutdown=5,
        access_log=False,  # it would log client addresses
        log_config=None,   # the process's logging stays as configured
        server_header=False, proxy_headers=False)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


@dataclass
class ServerHandle:
    """A receiver served in this process: `url` is its base, `events_url` the batch URL."""

    url: str
    server: _Server
    thread: threading.Thread
    app: object

    @property
    def events_url(self) -> str:
        return self.url + EVENT_PATHS[0]

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if isinstance(self.app, WebhookApp):
            self.app.close()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, *,
                    max_connections: int = MAX_CONNECTIONS,
                    head_timeout: float = HEAD_TIMEOUT) -> ServerHandle:
    """Serve `app` with uvicorn on a thread of this process (port 0: a free one) and
    return once it accepts connections; `.stop()` ends it."""
    sock = bind(host, port, BACKLOG)
    server = _Server(_server_config(app, max_connections=max_connections,
                                    head_timeout=head_timeout))
    thread = start_in_thread(server, sock, name="webhook-receiver",
                             what="the webhook receiver")
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    return ServerHandle(f"http://{shown}:{bound[1]}", server, thread, app)


def serve(host: str = "127.0.0.1", port: int = 8025, *,
          max_connections: int = MAX_CONNECTIONS, **app_kwargs) -> None:
    app = make_app(**app_kwargs)  # refuses to start without a key or the insecure switch
    sock = bind(host, port, BACKLOG)
    bound = sock.getsockname()[1]
    print(f"retention webhook receiver listening on http://{host}:{bound}"
          f"{EVENT_PATHS[0]} (landing folder {app_kwargs.get('root') or webhook_dir()})",
          flush=True)
    try:
        _Server(_server_config(app, max_connections=max_connections)).run(sockets=[sock])
    finally:
        sock.close()
        app.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retention.results.receiver",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025, help="0: any free port (printed)")
    parser.add_argument("--landing", type=Path, help="webhook folder (default: "
                        "RETENTION_WEBHOOK_DIR, else RETENTION_HOME/webhooks)")
    parser.add_argument("--no-ingest", action="store_true",
                        help="only land batches; the results DAG loads them")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                        help="connections served at once; beyond them 503 (default "
                        f"{MAX_CONNECTIONS})")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY,
                        help=f"largest batch accepted (default {MAX_BODY})")
    parser.add_argument("--insecure-no-signature", action="store_true",
                        help=f"start without {KEY_ENV}: no signature is checked and anyone "
                        "who can reach the port can write events. Local use only.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        serve(args.host, args.port, max_connections=args.max_connections, root=args.landing,
              ingest=not args.no_ingest, insecure=args.insecure_no_signature,
              max_body=args.max_body_bytes)
    except MissingVerificationKey as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
