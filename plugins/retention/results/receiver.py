"""The SendGrid Event Webhook receiver: a small WSGI app in its own process.

    python -m retention.results.receiver --port 8025 [--host 127.0.0.1]

`POST /sendgrid/events` (the URL to give SendGrid's Event Webhook settings):

* with `RETENTION_SENDGRID_WEBHOOK_KEY` set, a request whose signature is missing or wrong
  gets 403 and nothing is written; a body that is not a JSON array of objects gets 400;
* otherwise the raw batch lands durably (fsynced file under the webhook folder, see
  `webhook.land_batch`) and only then is 200 answered; the batch is ingested into the
  database at once, so unsubscribes reach `ops.consent_changes` before the next wave. If
  the database is down the batch waits in `incoming/` for `load_landed_batches` (the
  `retention_results` DAG), and SendGrid still gets its 200: the batch is safe on disk.

`GET /healthz` answers 200. `make_app()` is a plain WSGI callable, so any WSGI server
(gunicorn, uwsgi) can serve it behind TLS in production; the built-in server here is the
standard library's, threaded, bound to 127.0.0.1 by default.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from cryptography.hazmat.primitives.asymmetric import ec

from retention.results.webhook import (
    WebhookError, check_request, configured_key, ingest_landed_file, land_batch, webhook_dir,
)

log = logging.getLogger(__name__)

EVENT_PATHS = ("/sendgrid/events", "/webhooks/sendgrid")
#: SendGrid posts batches of up to a few MB; anything far larger is not SendGrid
MAX_BODY = 32 * 1024 * 1024

_NOT_CONFIGURED = object()


def _utc_now() -> datetime:
    # the receiver's clock: when the batch arrived is a recorded fact, never a metric input
    return datetime.now(timezone.utc)


def make_app(*, key: ec.EllipticCurvePublicKey | None | object = _NOT_CONFIGURED,
             root: Path | None = None, url: str | None = None, ingest: bool = True,
             clock: Callable[[], datetime] = _utc_now):
    """The WSGI app. `key` defaults to RETENTION_SENDGRID_WEBHOOK_KEY (None: no check)."""
    verification_key = configured_key() if key is _NOT_CONFIGURED else key
    if verification_key is None:
        log.warning("RETENTION_SENDGRID_WEBHOOK_KEY is not set: webhook signatures are not "
                    "verified")

    def respond(start_response, status: int, payload: dict) -> Iterable[bytes]:
        body = json.dumps(payload, default=str).encode()
        reason = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                  405: "Method Not Allowed", 411: "Length Required",
                  413: "Payload Too Large"}.get(status, "Error")
        start_response(f"{status} {reason}", [("Content-Type", "application/json"),
                                              ("Content-Length", str(len(body)))])
        return [body]

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/healthz":
            return respond(start_response, 200, {"status": "ok"})
        if path not in EVENT_PATHS:
            return respond(start_response, 404, {"error": "not found"})
        if method != "POST":
            return respond(start_response, 405, {"error": "POST a batch of events"})
        try:
            length = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            return respond(start_response, 411, {"error": "Content-Length required"})
        if length > MAX_BODY:
            return respond(start_response, 413, {"error": "batch too large"})
        body = environ["wsgi.input"].read(length)
        headers = {k[5:].replace("_", "-"): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        try:
            events = check_request(body, headers, verification_key)
        except WebhookError as exc:
            log.warning("webhook batch refused (%s): %s", exc.status, exc)
            return respond(start_response, exc.status, {"error": str(exc)})
        landed = land_batch(body, clock(), verified=verification_key is not None, root=root)
        answer: dict = {"landed": landed.name, "events": len(events)}
        if ingest:
            try:
                answer["ingested"] = ingest_landed_file(landed, url).as_dict()
            except Exception as exc:  # noqa: BLE001 - the batch is safe on disk; load it later
                log.exception("batch %s landed but not ingested; it waits in incoming/",
                              landed.name)
                answer["ingested"] = None
                answer["pending"] = f"{type(exc).__name__}: will be loaded from the landing folder"
        return respond(start_response, 200, answer)

    return app


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        log.info("%s %s", self.address_string(), format % args)


def serve(host: str = "127.0.0.1", port: int = 8025, **app_kwargs) -> None:
    app = make_app(**app_kwargs)
    with make_server(host, port, app, server_class=_ThreadingWSGIServer,
                     handler_class=_QuietHandler) as server:
        bound = server.server_address[1]
        print(f"retention webhook receiver listening on http://{host}:{bound}"
              f"{EVENT_PATHS[0]} (landing folder {app_kwargs.get('root') or webhook_dir()})",
              flush=True)
        server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retention.results.receiver",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025, help="0: any free port (printed)")
    parser.add_argument("--landing", type=Path, help="webhook folder (default: "
                        "RETENTION_WEBHOOK_DIR, else RETENTION_HOME/webhooks)")
    parser.add_argument("--no-ingest", action="store_true",
                        help="only land batches; the results DAG loads them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        serve(args.host, args.port, root=args.landing, ingest=not args.no_ingest)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
