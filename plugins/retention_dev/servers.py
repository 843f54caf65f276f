"""Local provider servers that speak the providers' wire protocols on 127.0.0.1.

The channel clients use the real SDKs (sendgrid, firebase-admin) and plain `requests`
against these servers, so tests, benchmarks and the demo exercise the same bytes a real
provider would see, without an account or the network.

| provider | endpoints | success | errors |
|---|---|---|---|
| sendgrid | `POST /v3/mail/send` (Bearer API key), `GET /v3/messages` (E-mail Activity) | 202 + `X-Message-Id` (200, no id, in sandbox mode) | 400 `{"errors": [{"message", "field", "help"}]}`, 401, 429 + `Retry-After` |
| fcm | `POST /token` (OAuth2 JWT-bearer grant), `POST /v1/projects/{p}/messages:send` | `{"name": "projects/p/messages/<id>"}` | Google error body; 404 `UNREGISTERED`, 400 `INVALID_ARGUMENT` |
| telegram | `POST /bot<token>/sendMessage` (JSON or form), `getMe` | `{"ok": true, "result": {...}}` | `{"ok": false, "error_code", "description", "parameters": {"retry_after"}}` |
| gateway | any `/gateway/...` (a shop's SMS / Viber provider) | configurable JSON | configurable |

The HTTP layer is uvicorn (httptools, uvloop) on a thread of the calling process, the
provider routes dispatched by the app it runs and Starlette's Router for the rest (see
"HTTP server" below): HTTP/1.1 with keep-alive (idle connections closed after
`keep_alive_seconds`), pipelined requests answered in order, request bodies above
`max_body_bytes` refused with 413, malformed requests with 400, unknown paths 404 and
methods a route does not take 405 (Starlette's plain-text answers).

Every provider has switches, given to `start(...)` or changed at runtime with
`handle.configure(...)`: `latency_ms` per request (a request received in full is
processed at once and answered after the latency; it stays processed, and counted, if
its client hung up meanwhile, as at a real provider), an explicit `sequence` of outcomes
(`"ok"`, `"timeout"` or an HTTP status such as 429 or 503, consumed one per request), or
seeded fractions (`rate_limit_fraction`, `server_error_fraction`, `timeout_fraction`,
`accept_timeout_fraction`, `accept_drop_fraction`), `retry_after` seconds for 429s, and
the provider's invalid credentials, addresses and tokens, and `accept_delay_seconds`: a
request received in full is processed only that long after (a provider whose intake is
behind; processed even if its client is gone by then, `handle.provider.waiting_to_process`
counts the held ones). A "timeout" holds the request
without answering for `hang_seconds` (or until the server stops) so the client's own
timeout fires. Outcomes for HTTP clients' framing: `"chunked"` answers as "ok" with a
chunked body (`Transfer-Encoding: chunked`, chunks of 7 bytes), `"close"` as "ok" with
`Connection: close` and then closes the connection, `"drop"` closes the connection
without answering (recorded with status None). Faults after the provider took the
request, after which a client that resends delivers twice: `"accept_timeout"` processes the
request as "ok" (recorded with the handler's status, 2xx: accepted) and holds the
connection without answering for `hang_seconds`, then closes it, or with `late_answer`
writes the answer then; `"accept_drop"` processes it as "ok" and closes the connection
without answering. Everything is deterministic: a sequence is exact; fractions draw
from `random.Random(seed)` in arrival order.

SendGrid's E-mail Activity API shows an accepted send once `activity_lag_seconds` have
passed since it was accepted, with `to_email` lower-cased.

`handle.received` lists every request (method, path, headers, parsed body, status,
outcome); `handle.accepted` the ones with a 2xx status, i.e. what the provider took for
delivery, answered or not ("accept_timeout", "accept_drop"). `accepted_recipients()` and
`accepted_message_ids()` count them per recipient and per message id (SendGrid: each
personalization's `to` address lower-cased and its `message_id` custom argument, sandbox
sends excluded; FCM: `message.token` and `message.data["message_id"]`; Telegram: the
`chat_id`; gateway: the values at `address_path`, by default `address_field`, and at
`message_id_path`, not for `rejected_addresses`), while `record_bodies` is on; a handle
serving several providers answers `{provider: Counter}`. `connections_accepted` counts
the TCP connections the server accepted (keep-alive reuse shows).

In-process: `base_url, handle = start("sendgrid", api_keys={"SG.test"})`, `handle.stop()`.
Command line (all providers on one port, for the demo):
`python -m retention_dev.servers --port 8025 --latency-ms 20`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import random
import re
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route as StarletteRoute
from starlette.routing import Router
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from retention.serving import bind, start_in_thread

Outcome = Any  # "ok" | "timeout" | "drop" | "chunked" | "close" | "accept_timeout" |
#                 "accept_drop" | int (an HTTP status)

JSON = "application/json"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_SCOPES = ("https://www.googleapis.com/auth/firebase.messaging",
              "https://www.googleapis.com/auth/cloud-platform")


# --------------------------------------------------------------------------- plumbing

@dataclass(frozen=True)
class RecordedRequest:
    provider: str
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, a form as {name: value}, else text
    status: int | None  # None: not processed ("timeout", "drop"); for "accept_timeout" and
    #                     "accept_drop" the status of the answer that was never sent
    outcome: Outcome  # what the switches decided: "ok", "timeout", ... or a status
    response: Any  # the parsed body answered (or withheld), or None
    response_headers: dict[str, str] = field(default_factory=dict)
    processed_at: float = 0.0  # time.monotonic() when the provider processed it
    query: dict[str, str] = field(default_factory=dict)  # the URL's query parameters


@dataclass
class Reply:
    status: int
    body: Any = None  # dict/list -> JSON; bytes/str as is; None -> empty
    headers: dict[str, str] = field(default_factory=dict)
    framing: str = "length"  # "length" (Content-Length), "chunked" or "close" (see _outcome)

    def encoded(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()


HANG = object()  # a handler's answer meaning: hold the connection, answer nothing
DROP = object()  # a handler's answer meaning: close the connection, answer nothing
FRAMINGS = ("chunked", "close")  # outcomes answered as "ok", framed differently
ACCEPTED_FAULTS = ("accept_timeout", "accept_drop")  # processed as "ok", answer not sent


@dataclass
class Withheld:
    """A processed request's answer that is not sent ("accept_timeout", "accept_drop"):
    with `hang`, the connection is held for `hang_seconds`, then closed, or the answer
    written if `late`; without, the connection is closed at once."""
    reply: Reply
    hang: bool
    late: bool = False


@dataclass
class Incoming:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw: bytes
    params: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.raw or b"null")

    def parsed(self) -> Any:
        ctype = self.headers.get("content-type", "")
        if "json" in ctype:
            try:
                return self.json()
            except ValueError:
                return self.raw.decode(errors="replace")
        if "x-www-form-urlencoded" in ctype:
            return {k: v[-1] for k, v in parse_qs(self.raw.decode(), keep_blank_values=True).items()}
        return self.raw.decode(errors="replace") if self.raw else None


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    path: str  # a Starlette path template: "/bot{token}/sendMessage", "/gateway/{rest:path}"
    handler: str
    faulty: bool  # latency and injected failures apply


class Provider:
    """One provider's routes, switches and request log. Thread-safe."""

    name = "provider"
    routes: tuple[Route, ...] = ()
    #: switches every provider has, with defaults
    COMMON = dict(latency_ms=0.0, sequence=(), rate_limit_fraction=0.0, server_error_fraction=0.0,
                  timeout_fraction=0.0, accept_timeout_fraction=0.0, accept_drop_fraction=0.0,
                  retry_after=1, server_error_status=503, hang_seconds=30.0, late_answer=False,
                  seed=0, record_bodies=True, accept_delay_seconds=0.0)
    #: switches of this provider, with defaults
    OPTIONS: dict[str, Any] = {}
    #: handlers that read what the provider took (SendGrid's activity) instead of
    #: submitting work: `accept_delay_seconds` does not hold them
    LOOKUPS: tuple[str, ...] = ("activity",)
    #: options that are None (anything goes) or a set of accepted values
    OPTIONAL_SETS: tuple[str, ...] = ("api_keys", "bot_tokens")

    def __init__(self, **options: Any) -> None:
        self._lock = threading.Lock()
        self._received: list[RecordedRequest] = []
        self._recipients: Counter = Counter()
        self._message_ids: Counter = Counter()
        self._counter = itertools.count(1)
        for name, default in {**self.COMMON, **self.OPTIONS}.items():
            setattr(self, name, default() if callable(default) else default)
        self._sequence: deque = deque()
        self._random = random.Random(0)
        self._waiting = 0
        self.configure(**options)

    # switches ---------------------------------------------------------------
    def configure(self, **options: Any) -> None:
        allowed = {**self.COMMON, **self.OPTIONS}
        unknown = set(options) - set(allowed)
        if unknown:
            raise TypeError(f"{self.name}: unknown option(s) {sorted(unknown)}; "
                            f"known: {sorted(allowed)}")
        with self._lock:
            for name, value in options.items():
                if name == "sequence":
                    self._sequence = deque(_outcome(v) for v in value)
                elif name == "seed":
                    self._random = random.Random(value)
                elif allowed[name] is set or (name in self.OPTIONAL_SETS and value is not None):
                    value = {str(v) for v in value}
                setattr(self, name, value)

    def _draw(self) -> Outcome:
        with self._lock:
            if self._sequence:
                return self._sequence.popleft()
            r = self._random.random()
            for fraction, outcome in ((self.rate_limit_fraction, 429),
                                      (self.server_error_fraction, self.server_error_status),
                                      (self.timeout_fraction, "timeout"),
                                      (self.accept_timeout_fraction, "accept_timeout"),
                                      (self.accept_drop_fraction, "accept_drop")):
                if r < fraction:
                    return outcome
                r -= fraction
            return "ok"

    def next_number(self) -> int:
        return next(self._counter)

    @property
    def waiting_to_process(self) -> int:
        """Requests received in full and held by `accept_delay_seconds`, not processed yet."""
        with self._lock:
            return self._waiting

    def _wait_count(self, change: int) -> None:
        with self._lock:
            self._waiting += change

    # log --------------------------------------------------------------------
    @property
    def received(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._received)

    @property
    def accepted(self) -> list[RecordedRequest]:
        return [r for r in self.received if r.status is not None and 200 <= r.status < 300]

    def accepted_recipients(self) -> Counter:
        """How many times each recipient was accepted for delivery (2xx, "accept_timeout"
        and "accept_drop" included): SendGrid's `to` addresses lower-cased, FCM's tokens,
        Telegram's chat ids, the gateway's `address_path`. Counted while `record_bodies`
        is on, like the log; `clear` resets it."""
        with self._lock:
            return Counter(self._recipients)

    def accepted_message_ids(self) -> Counter:
        """How many times each message id was accepted for delivery: SendGrid's
        personalization `custom_args["message_id"]`, FCM's `message.data["message_id"]`,
        the gateway's `message_id_path`; Telegram has none."""
        with self._lock:
            return Counter(self._message_ids)

    def deliveries(self, route: Route, inc: Incoming, body: Any) -> tuple[list[str], list[str]]:
        """The recipients and message ids an accepted request on `route` delivers to,
        `body` being the parsed request body."""
        return [], []

    def clear(self) -> None:
        with self._lock:
            self._received.clear()
            self._recipients.clear()
            self._message_ids.clear()

    def _record(self, inc: Incoming, route: Route, outcome: Outcome, reply: Reply | None) -> None:
        body = inc.parsed() if self.record_bodies else None
        response = None
        if reply is not None and isinstance(reply.body, (dict, list)):
            response = reply.body
        rec = RecordedRequest(self.name, inc.method, inc.path, dict(inc.headers), body,
                              None if reply is None else reply.status, outcome, response,
                              dict(reply.headers) if reply is not None else {},
                              time.monotonic(), dict(inc.query))
        recipients: list[str] = []
        message_ids: list[str] = []
        if self.record_bodies and reply is not None and 200 <= reply.status < 300 \
                and not isinstance(outcome, int):  # the handler's answer, not an injected one
            recipients, message_ids = self.deliveries(route, inc, body)
        with self._lock:
            self._received.append(rec)
            self._recipients.update(recipients)
            self._message_ids.update(message_ids)

    # serving ----------------------------------------------------------------
    def delay(self, route: Route) -> float:
        """Seconds between processing a request on `route` and answering it (the latency
        switch)."""
        return self.latency_ms / 1000 if route.faulty and self.latency_ms else 0.0

    def respond(self, route: Route, inc: Incoming) -> Reply | object:
        """Process a request received in full: authentication, the switches' outcome, the
        handler; recorded; the answer to send once the latency is over. `HANG` means: answer nothing, hold the connection; `DROP`:
        close it without an answer; a `Withheld`: the handler's answer, not to be sent."""
        handler: Callable[[Incoming], Reply] = getattr(self, route.handler)
        if not route.faulty:
            reply = handler(inc)
            self._record(inc, route, "ok", reply)
            return reply
        denied = self.authenticate(inc)
        if denied is not None:
            self._record(inc, route, "ok", denied)
            return denied
        outcome = self._draw()
        if outcome in ("timeout", "drop"):
            self._record(inc, route, outcome, None)
            return HANG if outcome == "timeout" else DROP
        if outcome in ACCEPTED_FAULTS:
            reply = handler(inc)
            self._record(inc, route, outcome, reply)
            return Withheld(reply, hang=outcome == "accept_timeout", late=bool(self.late_answer))
        if outcome == "ok" or outcome in FRAMINGS:
            reply = handler(inc)
            if outcome in FRAMINGS:
                reply.framing = outcome
        else:
            reply = self.fault_reply(int(outcome))
        self._record(inc, route, outcome, reply)
        return reply

    def authenticate(self, inc: Incoming) -> Reply | None:
        return None

    def fault_reply(self, status: int) -> Reply:
        return Reply(status, {"error": "injected", "status": status},
                     {"Retry-After": str(self.retry_after)} if status == 429 else {})


def _outcome(value: Any) -> Outcome:
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if value not in ("ok", "timeout", "drop", *FRAMINGS, *ACCEPTED_FAULTS) \
            and not isinstance(value, int):
        raise ValueError("an outcome is 'ok', 'timeout', 'chunked', 'close', 'drop', "
                         f"'accept_timeout', 'accept_drop' or an HTTP status, not {value!r}")
    return value


def _short_id(*parts: Any, length: int = 22) -> str:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:length]


# --------------------------------------------------------------------------- SendGrid

EMAIL_RE = re.compile(r"^[^@\s<>(),;:\"\[\]\\]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")
SENDGRID_RESERVED_HEADERS = {"x-sg-id", "x-sg-eid", "received", "dkim-signature", "content-type",
                             "content-transfer-encoding", "to", "from", "subject", "reply-to",
                             "cc", "bcc"}
SENDGRID_HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
MAX_PERSONALIZATIONS = 1000
MAX_SUBSTITUTION_BYTES = 10_000
MAX_CUSTOM_ARGS_BYTES = 10_000


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _string_map_errors(value: Any, where: str) -> list[dict]:
    if not isinstance(value, dict):
        return [_sg_error(f"Invalid type. Expected: object, given: {_type_name(value)}.", where)]
    return [_sg_error(f"Invalid type. Expected: string, given: {_type_name(v)}.", f"{where}.{k}")
            for k, v in value.items() if not isinstance(v, str)]


def _map_bytes(value: Any) -> int:
    if not isinstance(value, dict):
        return 0
    return sum(len(str(k).encode()) + len(str(v).encode()) for k, v in value.items())


def _sg_error(message: str, field_: str | None) -> dict:
    anchor = (field_ or "").split(".")[0]
    return {"message": message, "field": field_,
            "help": f"{SENDGRID_HELP}#message.{anchor}" if field_ else None}


def validate_mail_send(body: Any, invalid_addresses: Iterable[str] = ()) -> list[dict]:
    """SendGrid v3 Mail Send checks, with SendGrid's messages and field names.

    Strict where SendGrid is strict: 1..1000 personalizations and 1000 recipients a
    request, each address once, string-only custom_args/substitutions/headers, reserved
    headers, subject and content unless a template, text/plain before text/html,
    a boolean sandbox flag, 10,000 bytes of substitutions and of custom_args per
    personalization.
    """
    invalid = {a.lower() for a in invalid_addresses}
    if not isinstance(body, dict):
        return [_sg_error("Bad Request", None)]
    errors: list[dict] = []
    pers = body.get("personalizations")
    if not isinstance(pers, list) or not pers:
        errors.append(_sg_error("The personalizations field is required and must have at least "
                                "one personalization.", "personalizations"))
        pers = []
    elif len(pers) > MAX_PERSONALIZATIONS:
        errors.append(_sg_error(
            f"The personalization block is limited to {MAX_PERSONALIZATIONS} personalizations per "
            f"API request. You have provided {len(pers)} personalizations. Please consider "
            "splitting this into multiple requests and resending your request.",
            "personalizations"))
    template = body.get("template_id")
    if template is not None and not isinstance(template, str):
        errors.append(_sg_error("The template_id must be a string.", "template_id"))
    seen: set[str] = set()
    recipients = 0
    top_args = body.get("custom_args") or {}
    for i, p in enumerate(pers):
        where = f"personalizations.{i}"
        if not isinstance(p, dict):
            errors.append(_sg_error(f"Invalid type. Expected: object, given: {_type_name(p)}.", where))
            continue
        if not isinstance(p.get("to"), list) or not p["to"]:
            errors.append(_sg_error("The to array is required for all personalization objects, and "
                                    "must have at least one email object with a valid email address.",
                                    f"{where}.to"))
        for kind in ("to", "cc", "bcc"):
            people = p.get(kind) or []
            if not isinstance(people, list):
                errors.append(_sg_error("Invalid type. Expected: array, given: "
                                        f"{_type_name(people)}.", f"{where}.{kind}"))
                continue
            for j, person in enumerate(people):
                recipients += 1
                email = person.get("email") if isinstance(person, dict) else None
                field_ = f"{where}.{kind}.{j}.email"
                if not isinstance(email, str) or not EMAIL_RE.match(email) \
                        or email.lower() in invalid:
                    errors.append(_sg_error("Does not contain a valid address.", field_))
                    continue
                if email.lower() in seen:
                    errors.append(_sg_error(
                        "Each unique email address in the personalizations array should only be "
                        f"included once. You have included {email} more than once.", field_))
                seen.add(email.lower())
        if "subject" in p and not isinstance(p["subject"], str):
            errors.append(_sg_error("The subject of your email must be a string.", f"{where}.subject"))
        if "headers" in p:
            errors += _header_errors(p["headers"], f"{where}.headers")
        if "substitutions" in p:
            errors += _string_map_errors(p["substitutions"], f"{where}.substitutions")
            if _map_bytes(p["substitutions"]) > MAX_SUBSTITUTION_BYTES:
                errors.append(_sg_error(
                    f"The total size of substitutions in a personalization may not exceed "
                    f"{MAX_SUBSTITUTION_BYTES} bytes.", f"{where}.substitutions"))
        if "custom_args" in p:
            errors += _string_map_errors(p["custom_args"], f"{where}.custom_args")
            if _map_bytes({**top_args, **(p["custom_args"] or {})}) > MAX_CUSTOM_ARGS_BYTES:
                errors.append(_sg_error(
                    f"The custom_args of a personalization may not exceed {MAX_CUSTOM_ARGS_BYTES} "
                    "bytes.", f"{where}.custom_args"))
        if "dynamic_template_data" in p and not isinstance(p["dynamic_template_data"], dict):
            errors.append(_sg_error("Invalid type. Expected: object, given: "
                                    f"{_type_name(p['dynamic_template_data'])}.",
                                    f"{where}.dynamic_template_data"))
        if "send_at" in p and not isinstance(p["send_at"], int):
            errors.append(_sg_error("The send_at parameter must be an integer.", f"{where}.send_at"))
    if recipients > MAX_PERSONALIZATIONS:
        errors.append(_sg_error(f"There is a limit of {MAX_PERSONALIZATIONS} total recipients "
                                "(to + cc + bcc) per request.", "personalizations"))

    sender = body.get("from")
    if not isinstance(sender, dict) or "email" not in sender:
        errors.append(_sg_error("The from object must be provided for every email send. It is an "
                                "object that requires the email parameter, but may also contain a "
                                "name parameter.", "from"))
    elif not isinstance(sender["email"], str) or not EMAIL_RE.match(sender["email"]):
        errors.append(_sg_error("The from email does not contain a valid address.", "from.email"))
    if "reply_to" in body:
        reply_to = body["reply_to"]
        if not isinstance(reply_to, dict) or not EMAIL_RE.match(str(reply_to.get("email", ""))):
            errors.append(_sg_error("The reply_to email does not contain a valid address.",
                                    "reply_to.email"))

    if not template:
        subject = body.get("subject")
        if not (isinstance(subject, str) and subject) and not (
                pers and all(isinstance(p, dict) and isinstance(p.get("subject"), str)
                             and p["subject"] for p in pers)):
            errors.append(_sg_error("The subject is required. You can get around this requirement if "
                                    "you use a template with a subject defined or if every "
                                    "personalization has a subject defined.", "subject"))
        content = body.get("content")
        if not isinstance(content, list) or not content:
            errors.append(_sg_error("Unless a valid template_id is provided, the content parameter "
                                    "is required. There must be at least one defined content block. "
                                    "We typically suggest both text/plain and text/html blocks are "
                                    "included, but only one block is required.", "content"))
        else:
            types = []
            for k, block in enumerate(content):
                if not isinstance(block, dict) or not isinstance(block.get("type"), str) \
                        or not block["type"]:
                    errors.append(_sg_error("The content type must be a string at least one "
                                            "character in length.", f"content.{k}.type"))
                    continue
                types.append(block["type"])
                if not isinstance(block.get("value"), str) or not block["value"]:
                    errors.append(_sg_error("The content value must be a string at least one "
                                            "character in length.", f"content.{k}.value"))
            if len(set(types)) != len(types):
                errors.append(_sg_error("Each content type may only be given once.", "content"))
            order = [t for t in types if t in ("text/plain", "text/html")]
            if "text/plain" in types and types[0] != "text/plain" or \
                    order not in ([], ["text/plain"], ["text/html"], ["text/plain", "text/html"]):
                errors.append(_sg_error("If present, text/plain and text/html may only be provided "
                                        "in this order: text/plain, text/html.", "content.0.type"))
    if "headers" in body:
        errors += _header_errors(body["headers"], "headers")
    if "custom_args" in body:
        errors += _string_map_errors(body["custom_args"], "custom_args")
    settings = body.get("mail_settings")
    if settings is not None:
        if not isinstance(settings, dict):
            errors.append(_sg_error("Invalid type. Expected: object, given: "
                                    f"{_type_name(settings)}.", "mail_settings"))
        elif "sandbox_mode" in settings:
            sandbox = settings["sandbox_mode"]
            if not isinstance(sandbox, dict) or not isinstance(sandbox.get("enable"), bool):
                errors.append(_sg_error("The sandbox mode enable param should be a boolean value.",
                                        "mail_settings.sandbox_mode.enable"))
    return errors


def _header_errors(headers: Any, where: str) -> list[dict]:
    errors = _string_map_errors(headers, where)
    if isinstance(headers, dict):
        errors += [_sg_error(f"The following header is reserved and cannot be used: {name}",
                             f"{where}.{name}")
                   for name in headers if name.lower() in SENDGRID_RESERVED_HEADERS]
    return errors


def expand_mail_send(body: dict) -> list[dict]:
    """What each recipient of a (valid) Mail Send body receives: one dict per
    personalization with to, subject, text, html, headers and custom_args, after
    SendGrid's substitutions and the personalization-over-message merge."""
    content = {c["type"]: c["value"] for c in body.get("content") or []}
    mails = []
    for p in body["personalizations"]:
        subs = p.get("substitutions") or {}

        def fill(value: str | None) -> str | None:
            if value is None:
                return None
            for tag, sub in subs.items():
                value = value.replace(tag, sub)
            return value
        mails.append({"to": [t["email"] for t in p["to"]],
                      "subject": fill(p.get("subject", body.get("subject"))),
                      "text": fill(content.get("text/plain")), "html": fill(content.get("text/html")),
                      "headers": {**(body.get("headers") or {}), **(p.get("headers") or {})},
                      "custom_args": {**(body.get("custom_args") or {}), **(p.get("custom_args") or {})}})
    return mails


def _is_sandbox(body: dict) -> bool:
    return ((body.get("mail_settings") or {}).get("sandbox_mode") or {}).get("enable") is True


class SendGridProvider(Provider):
    name = "sendgrid"
    routes = (Route(("POST",), "/v3/mail/send", "mail_send", True),
              Route(("GET",), "/v3/messages", "activity", True))
    OPTIONS = dict(api_keys=None, invalid_addresses=set, activity_lag_seconds=0.0)
    _ACTIVITY_QUERY = re.compile(r"""^\(?\s*unique_args\['([\w.-]+)'\]\s*=\s*"([^"]*)"\s*\)?$""")

    def activity(self, inc: Incoming) -> Reply:
        """E-mail Activity API (`GET /v3/messages?query=unique_args['k']="v"&limit=N`): the
        messages SendGrid accepted whose custom argument k equals v, once
        `activity_lag_seconds` have passed since they were accepted; `to_email`
        lower-cased, as SendGrid reports it. The dispatcher asks it after a crash whether
        a claimed request went out."""
        m = self._ACTIVITY_QUERY.match(inc.query.get("query", "").strip())
        if not m:
            return Reply(400, {"errors": [_sg_error("invalid query", "query")]})
        key, value = m.groups()
        limit = int(inc.query.get("limit", "10"))
        found = []
        with self._lock:
            sends = list(getattr(self, "_accepted_sends", []))
        shown_before = time.monotonic() - float(self.activity_lag_seconds)
        for x_message_id, body, accepted_at in sends:
            if accepted_at > shown_before:
                continue
            for i, p in enumerate(body.get("personalizations", [])):
                if str((p.get("custom_args") or {}).get(key)) == value:
                    for to in p.get("to", []):
                        found.append({"msg_id": f"{x_message_id}.local.{i}",
                                      "from_email": body.get("from", {}).get("email"),
                                      "subject": p.get("subject", body.get("subject")),
                                      "to_email": str(to.get("email")).lower(),
                                      "status": "processed", "opens_count": 0, "clicks_count": 0})
        return Reply(200, {"messages": found[:limit]})

    def deliveries(self, route: Route, inc: Incoming, body: Any) -> tuple[list[str], list[str]]:
        """Each personalization's `to` addresses, lower-cased, and its message_id custom
        argument (the message's own under the personalization's); none in sandbox mode."""
        if route.handler != "mail_send" or not isinstance(body, dict) or _is_sandbox(body):
            return [], []
        recipients, message_ids = [], []
        top_args = body.get("custom_args") or {}
        for p in body.get("personalizations") or []:
            recipients += [str(to["email"]).lower() for to in p.get("to") or []]
            message_id = {**top_args, **(p.get("custom_args") or {})}.get("message_id")
            if message_id is not None:
                message_ids.append(str(message_id))
        return recipients, message_ids

    def authenticate(self, inc: Incoming) -> Reply | None:
        auth = inc.headers.get("authorization", "")
        key = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if key and (self.api_keys is None or key in self.api_keys):
            return None
        return Reply(401, {"errors": [{"field": None, "message": "The provided authorization "
                                       "grant is invalid, expired, or revoked", "help": None}]})

    def fault_reply(self, status: int) -> Reply:
        if status == 429:
            return Reply(429, {"errors": [{"field": None, "message": "too many requests",
                                           "help": None}]},
                         {"Retry-After": str(self.retry_after), "X-RateLimit-Limit": "600",
                          "X-RateLimit-Remaining": "0",
                          "X-RateLimit-Reset": str(int(time.time()) + int(self.retry_after))})
        return Reply(status, {"errors": [{"field": None, "message": "internal error",
                                          "help": None}]})

    def mail_send(self, inc: Incoming) -> Reply:
        try:
            body = inc.json()
        except ValueError:
            return Reply(400, {"errors": [_sg_error("Bad Request", None)]})
        errors = validate_mail_send(body, self.invalid_addresses)
        if errors:
            return Reply(400, {"errors": errors})
        if _is_sandbox(body):
            return Reply(200)
        x_message_id = _short_id("sendgrid", self.seed, self.next_number())
        if getattr(self, "record_bodies", True):
            with self._lock:
                if not hasattr(self, "_accepted_sends"):
                    self._accepted_sends = []
                self._accepted_sends.append((x_message_id, body, time.monotonic()))
        return Reply(202, None, {"X-Message-Id": x_message_id})


# --------------------------------------------------------------------------- FCM

def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _google_error(code: int, status: str, message: str, details: list | None = None) -> dict:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def _fcm_suffix(seed: int, n: int) -> str:
    """16 hex digits after the '%' of an FCM message id, distinct for each n of a seed
    (an odd multiplier is a bijection modulo 2**64); cheaper than a hash per push."""
    return f"{((n ^ (seed << 40)) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF:016x}"


FCM_MESSAGE_FIELDS = {"name", "data", "notification", "android", "webpush", "apns", "fcm_options",
                      "token", "topic", "condition"}


class FcmProvider(Provider):
    name = "fcm"
    routes = (Route(("POST",), "/token", "token", False),
              Route(("POST",), "/v1/projects/{project}/messages:send", "send", True))
    OPTIONS = dict(project_id=None, unregistered_tokens=set, invalid_tokens=set,
                   public_keys=list, token_lifetime=3600)

    def __init__(self, **options: Any) -> None:
        self._issued: set[str] = set()
        super().__init__(**options)

    def revoke_tokens(self) -> None:
        """Forget every access token issued so far, as when they expire or are revoked
        early: the next request with one of them gets 401 UNAUTHENTICATED."""
        with self._lock:
            self._issued.clear()

    # OAuth2 token endpoint used by service-account credentials (JWT-bearer grant)
    def token(self, inc: Incoming) -> Reply:
        form = inc.parsed() if isinstance(inc.parsed(), dict) else {}
        if form.get("grant_type") != JWT_BEARER:
            return Reply(400, {"error": "unsupported_grant_type",
                               "error_description": "Invalid grant_type"})
        problem = self._check_assertion(form.get("assertion", ""), inc)
        if problem:
            return Reply(400, {"error": "invalid_grant", "error_description": problem})
        access_token = f"ya29.local.{_short_id('fcm-token', self.seed, self.next_number(), length=32)}"
        with self._lock:
            self._issued.add(access_token)
        return Reply(200, {"access_token": access_token, "expires_in": int(self.token_lifetime),
                           "token_type": "Bearer"})

    def _check_assertion(self, assertion: str, inc: Incoming) -> str | None:
        try:
            head_b64, claims_b64, sig_b64 = assertion.split(".")
            header = json.loads(_b64url_decode(head_b64))
            claims = json.loads(_b64url_decode(claims_b64))
        except ValueError:
            return "Invalid JWT: malformed"
        if header.get("alg") != "RS256":
            return "Invalid JWT: alg must be RS256"
        for claim in ("iss", "aud", "iat", "exp", "scope"):
            if claim not in claims:
                return f"Invalid JWT: missing claim {claim}"
        if not str(claims["aud"]).endswith("/token"):
            return "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe"
        if not any(s in str(claims["scope"]).split() for s in FCM_SCOPES):
            return "Invalid JWT: the scope does not grant Firebase Cloud Messaging"
        if self.public_keys:
            from cryptography.exceptions import InvalidSignature
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import padding
            signed = f"{head_b64}.{claims_b64}".encode()
            for pem in self.public_keys:
                key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
                try:
                    key.verify(_b64url_decode(sig_b64), signed, padding.PKCS1v15(), hashes.SHA256())
                    return None
                except InvalidSignature:
                    continue
            return "Invalid JWT Signature."
        return None

    def authenticate(self, inc: Incoming) -> Reply | None:
        auth = inc.headers.get("authorization", "")
        with self._lock:
            ok = auth.startswith("Bearer ") and auth[7:] in self._issued
        if ok:
            return None
        return Reply(401, _google_error(
            401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected "
            "OAuth 2 access token, login cookie or other valid authentication credential."))

    def fault_reply(self, status: int) -> Reply:
        if status == 429:
            return Reply(429, _google_error(
                429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Send requests'.",
                [{"@type": FCM_ERROR_TYPE, "errorCode": "QUOTA_EXCEEDED"}]),
                {"Retry-After": str(self.retry_after)})
        status_name = {500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}.get(status,
                                                                                        "UNKNOWN")
        return Reply(status, _google_error(
            status, status_name, "Internal error encountered." if status == 500 else
            "The service is currently unavailable.",
            [{"@type": FCM_ERROR_TYPE, "errorCode": status_name}]))

    def deliveries(self, route: Route, inc: Incoming, body: Any) -> tuple[list[str], list[str]]:
        """A `messages:send`'s `message.token` and `message.data["message_id"]`; none for
        `validate_only`."""
        if route.handler != "send" or not isinstance(body, dict) or body.get("validate_only"):
            return [], []
        message = body.get("message") or {}
        token = message.get("token")
        message_id = (message.get("data") or {}).get("message_id")
        return ([] if token is None else [str(token)],
                [] if message_id is None else [str(message_id)])

    def send(self, inc: Incoming) -> Reply:
        project = inc.params["project"]

        def invalid(message: str, field_: str) -> Reply:
            return Reply(400, _google_error(400, "INVALID_ARGUMENT", message, [
                {"@type": FCM_ERROR_TYPE, "errorCode": "INVALID_ARGUMENT"},
                {"@type": BAD_REQUEST_TYPE,
                 "fieldViolations": [{"field": field_, "description": message}]}]))

        if self.project_id and project != self.project_id:
            return Reply(404, _google_error(404, "NOT_FOUND", "Requested entity was not found."))
        try:
            body = inc.json()
        except ValueError:
            return invalid("Invalid JSON payload received.", "")
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, dict):
            return invalid("Request contains an invalid argument.", "message")
        unknown = set(message) - FCM_MESSAGE_FIELDS
        if unknown:
            name = sorted(unknown)[0]
            return invalid(f"Invalid JSON payload received. Unknown name \"{name}\" at 'message': "
                           "Cannot find field.", f"message.{name}")
        targets = [k for k in ("token", "topic", "condition") if message.get(k)]
        if len(targets) != 1:
            return invalid("Recipient of the message is not set." if not targets else
                           "Exactly one of token, topic or condition must be set.", "message")
        for part in ("notification", "android", "webpush", "apns", "fcm_options"):
            if part in message and not isinstance(message[part], dict):
                return invalid("Request contains an invalid argument.", f"message.{part}")
        for k, v in (message.get("notification") or {}).items():
            if k in ("title", "body", "image") and not isinstance(v, str):
                return invalid("Request contains an invalid argument.", f"message.notification.{k}")
        data = message.get("data")
        if data is not None and (not isinstance(data, dict)
                                 or not all(isinstance(v, str) for v in data.values())):
            return invalid("Invalid value at 'message.data': values must be strings.", "message.data")
        token = message.get("token")
        if token is not None:
            if not isinstance(token, str) or token in self.invalid_tokens:
                return invalid("The registration token is not a valid FCM registration token",
                               "message.token")
            if token in self.unregistered_tokens:
                return Reply(404, _google_error(404, "NOT_FOUND", "Requested entity was not found.",
                                                [{"@type": FCM_ERROR_TYPE,
                                                  "errorCode": "UNREGISTERED"}]))
        if body.get("validate_only"):
            return Reply(200, {"name": f"projects/{project}/messages/fake_message_id"})
        n = self.next_number()
        return Reply(200, {"name": f"projects/{project}/messages/0:{n}%{_fcm_suffix(self.seed, n)}"})


# --------------------------------------------------------------------------- Telegram

TELEGRAM_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span", "tg-spoiler",
                 "a", "code", "pre", "blockquote", "tg-emoji", "br"}


class _TelegramHtml(HTMLParser):
    """Telegram's HTML subset: known tags, properly nested; returns the plain text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.text: list[str] = []
        self.error: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag not in TELEGRAM_TAGS:
            self.error = self.error or f'Unsupported start tag "{tag}"'
        elif tag != "br":
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.error = self.error or f'Unexpected end tag "{tag}"'
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def telegram_html_text(html: str) -> tuple[str, str | None]:
    parser = _TelegramHtml()
    parser.feed(html)
    parser.close()
    if parser.stack and not parser.error:
        parser.error = f'Can\'t find end tag corresponding to start tag "{parser.stack[-1]}"'
    return "".join(parser.text), parser.error


class TelegramProvider(Provider):
    name = "telegram"
    routes = (Route(("POST", "GET"), "/bot{token}/sendMessage", "send_message", True),
              Route(("POST", "GET"), "/bot{token}/getMe", "get_me", False))
    OPTIONS = dict(bot_tokens=None, blocked_chat_ids=set, unknown_chat_ids=set)
    TOKEN_RE = re.compile(r"\d+:[A-Za-z0-9_-]+")

    def __init__(self, **options: Any) -> None:
        self._per_chat: dict[str, itertools.count] = {}
        super().__init__(**options)

    def _token_ok(self, token: str) -> bool:
        return bool(self.TOKEN_RE.fullmatch(token)) and (
            self.bot_tokens is None or token in self.bot_tokens)

    def authenticate(self, inc: Incoming) -> Reply | None:
        if self._token_ok(inc.params["token"]):
            return None
        return Reply(401, {"ok": False, "error_code": 401, "description": "Unauthorized"})

    def fault_reply(self, status: int) -> Reply:
        if status == 429:
            n = int(self.retry_after)
            return Reply(429, {"ok": False, "error_code": 429,
                               "description": f"Too Many Requests: retry after {n}",
                               "parameters": {"retry_after": n}}, {"Retry-After": str(n)})
        return Reply(status, {"ok": False, "error_code": status,
                              "description": "Internal Server Error" if status == 500 else
                              "Bad Gateway"})

    @staticmethod
    def _bad(description: str, code: int = 400) -> Reply:
        return Reply(code, {"ok": False, "error_code": code, "description": description})

    def _bot(self, token: str) -> dict:
        return {"id": int(token.split(":")[0]), "is_bot": True, "first_name": "Local bot",
                "username": "local_test_bot"}

    def get_me(self, inc: Incoming) -> Reply:
        if not self._token_ok(inc.params["token"]):
            return self._bad("Unauthorized", 401)
        return Reply(200, {"ok": True, "result": self._bot(inc.params["token"])})

    def deliveries(self, route: Route, inc: Incoming, body: Any) -> tuple[list[str], list[str]]:
        """A sendMessage's `chat_id` (query or body), as a string; no message ids."""
        if route.handler != "send_message":
            return [], []
        chat_id = {**inc.query, **(body if isinstance(body, dict) else {})}.get("chat_id")
        return ([] if chat_id is None else [str(chat_id)]), []

    def send_message(self, inc: Incoming) -> Reply:
        params = dict(inc.query)
        body = inc.parsed()
        if isinstance(body, dict):
            params.update(body)
        chat_id = params.get("chat_id")
        text = params.get("text")
        if chat_id in (None, ""):
            return self._bad("Bad Request: chat_id is empty")
        if not isinstance(text, str) or not text.strip():
            return self._bad("Bad Request: message text is empty")
        parse_mode = params.get("parse_mode")
        if parse_mode not in (None, "", "HTML", "Markdown", "MarkdownV2"):
            return self._bad(f"Bad Request: unsupported parse_mode \"{parse_mode}\"")
        plain = text
        if parse_mode == "HTML":
            plain, problem = telegram_html_text(text)
            if problem:
                return self._bad(f"Bad Request: can't parse entities: {problem}")
        if len(plain) > 4096:
            return self._bad("Bad Request: message is too long")
        markup = params.get("reply_markup")
        if markup is not None:
            try:
                markup = json.loads(markup) if isinstance(markup, str) else markup
                rows = markup["inline_keyboard"]
                assert all(isinstance(b["text"], str) and ("url" in b or "callback_data" in b)
                           for row in rows for b in row)
            except (ValueError, KeyError, TypeError, AssertionError):
                return self._bad("Bad Request: can't parse reply keyboard markup JSON object")
        chat = str(chat_id)
        if chat in self.blocked_chat_ids:
            return self._bad("Forbidden: bot was blocked by the user", 403)
        if chat in self.unknown_chat_ids:
            return self._bad("Bad Request: chat not found")
        with self._lock:
            counter = self._per_chat.setdefault(chat, itertools.count(1))
            message_id = next(counter)
        chat_obj = {"id": int(chat) if chat.lstrip("-").isdigit() else chat, "type": "private"}
        return Reply(200, {"ok": True, "result": {
            "message_id": message_id, "from": self._bot(inc.params["token"]), "chat": chat_obj,
            "date": int(time.time()), "text": plain}})


# --------------------------------------------------------------------------- generic gateway

def _dig(value: Any, path: str) -> Any:
    for part in [p for p in path.split(".") if p]:
        if isinstance(value, list) and part.isdigit():
            value = value[int(part)] if int(part) < len(value) else None
        elif isinstance(value, dict):
            value = value.get(part)
        else:
            return None
    return value


class GatewayProvider(Provider):
    """A shop's SMS or Viber HTTP gateway: answers `accepted_response` (string leaves
    formatted with `{n}`, a running number), or `rejected_response` with HTTP 200 for
    `rejected_addresses` (found in the request JSON at `address_field`), the way many
    gateways report a per-message failure in a 200 body. `accepted_recipients` counts
    the value at `address_path` (None: `address_field`), `accepted_message_ids` the one
    at `message_id_path` (None: not counted), both dotted paths into the parsed body;
    requests answered `rejected_response` are not counted."""

    name = "gateway"
    routes = (Route(("POST", "PUT", "GET"), "/gateway", "deliver", True),
              Route(("POST", "PUT", "GET"), "/gateway/{rest:path}", "deliver", True))
    OPTIONS = dict(expected_headers=dict, address_field="to", rejected_addresses=set,
                   address_path=None, message_id_path=None,
                   accepted_response=lambda: {"status": "accepted", "message": {"id": "gw-{n}"}},
                   rejected_response=lambda: {"status": "rejected", "error": "unknown subscriber"})

    def authenticate(self, inc: Incoming) -> Reply | None:
        for name, value in self.expected_headers.items():
            if inc.headers.get(name.lower()) != value:
                return Reply(401, {"status": "error", "error": "unauthorized"})
        return None

    def deliveries(self, route: Route, inc: Incoming, body: Any) -> tuple[list[str], list[str]]:
        """The address and message id in the body; none when answered `rejected_response`."""
        if not isinstance(body, dict) \
                or str(_dig(body, self.address_field)) in self.rejected_addresses:
            return [], []
        address = _dig(body, self.address_path or self.address_field)
        message_id = _dig(body, self.message_id_path) if self.message_id_path else None
        return ([] if address is None else [str(address)],
                [] if message_id is None else [str(message_id)])

    def deliver(self, inc: Incoming) -> Reply:
        body = inc.parsed()
        if isinstance(body, dict) and str(_dig(body, self.address_field)) in self.rejected_addresses:
            return Reply(200, self.rejected_response)
        n = self.next_number()
        return Reply(200, _format_leaves(self.accepted_response, {"n": n}))


def _format_leaves(value: Any, values: dict) -> Any:
    if isinstance(value, str):
        return value.format(**values)
    if isinstance(value, dict):
        return {k: _format_leaves(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_format_leaves(v, values) for v in value]
    return value


PROVIDERS: dict[str, type[Provider]] = {p.name: p for p in
                                        (SendGridProvider, FcmProvider, TelegramProvider,
                                         GatewayProvider)}


# --------------------------------------------------------------------------- HTTP server

# The providers are served by uvicorn (httptools, uvloop) on a thread of this process:
# uvicorn parses requests and frames answers (Content-Length, chunked), keeps connections
# alive and answers pipelined requests on a connection in order. The app uvicorn runs
# (`_App`) dispatches on the path itself for the routes whose path is fixed or has one
# parameter filling a whole segment (SendGrid's mail/send, FCM's messages:send,
# Telegram's bot methods), checking the body limit as it reads; every other request
# (the gateway's `{rest:path}`, unknown paths, methods a route does not take, the
# HEAD of a GET) goes to a Starlette Router behind Starlette's request-body limit, which
# answers as Starlette does (404, 405, a redirect for a trailing slash, 413). The routes
# are plain ASGI apps reading uvicorn's messages (no Request objects, no exception
# middleware); an answer's head and body leave in one write; the latency is a timer, not
# a thread or a task. The provider paths do not overlap, so which of the two dispatches a
# request does not change which route serves it.

#: largest request body accepted (413 beyond it); SendGrid's own limit is 30 MB a message
MAX_BODY_BYTES = 30 * 1024 * 1024
#: idle seconds before a kept-alive connection is closed (nginx's default)
KEEP_ALIVE_SECONDS = 75.0
#: connections waiting to be accepted: send_each's and the bench's hundreds at once
BACKLOG = 1024
#: seconds `stop` lets answers in progress finish before cancelling them
STOP_GRACE_SECONDS = 5
#: the ASGI scope extension through which a route closes its connection unanswered
DROP_EXTENSION = "retention.drop_connection"
#: the ASGI scope extension holding the connection's `_Wire` (an answer in one write)
WIRE_EXTENSION = "retention.wire"
CHUNK_BYTES = 7  # the "chunked" outcome's chunk size: several chunks for any body
#: a path parameter that fills a whole segment, as in "/bot{token}/sendMessage"
_ONE_PARAMETER = re.compile(r"^([^{}]*)\{(\w+)\}([^{}]*)$")


class _Wire:
    """A connection's transport as uvicorn's protocol sees it: writes go straight through,
    except between `hold()` and `flush()` (or `close()`), where they are gathered and leave
    as one write (an answer's head and body in one TCP segment instead of two). Everything
    else is the transport's."""

    __slots__ = ("_transport", "_held")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._transport.write(data)
        else:
            self._held.append(data)

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(b"".join(held))

    def close(self) -> None:  # uvicorn closes right after an answer's last write
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, which also counts the connections it accepts, writes
    through a `_Wire`, and offers each request two scope extensions: `WIRE_EXTENSION`, the
    connection's `_Wire`, and `DROP_EXTENSION`, a callable that closes the connection
    without an answer (the "drop" faults): the request's cycle is marked disconnected
    first, so uvicorn neither answers for the app nor reports it."""

    stats: _Stats  # set per server (see `serve`)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Wire(transport))  # type: ignore[arg-type]
        self.stats.connections_accepted += 1

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            self.scope["extensions"] = {  # type: ignore[typeddict-unknown-key]
                WIRE_EXTENSION: self.transport,
                DROP_EXTENSION: lambda: self._drop(cycle)}

    def _drop(self, cycle: Any) -> None:
        cycle.disconnected = True
        if not self.transport.is_closing():
            self.transport.close()


@dataclass
class _Stats:
    connections_accepted: int = 0  # since the server started


class _TooLarge(Exception):
    """The request body is over the limit (answered 413, not processed)."""


class _Endpoint:
    """One provider route as an ASGI app: reads the body, has the provider process the
    request at once (authentication, the switches' outcome, the handler, the record),
    then waits out the latency and answers, holds or drops as the outcome says.

    The processing is synchronous and comes right after the body is read, before any
    wait, so a request is processed (and counted, if accepted) whether or not its client
    is still there for the answer, as at a real provider: no disconnect or cancellation
    can come between reading it and processing it. A client that hangs up before its
    body was read (uvicorn then reports the disconnect instead) sent nothing."""

    def __init__(self, server: _Uvicorn, provider: Provider, route: Route) -> None:
        self.server, self.provider, self.route = server, provider, route

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Reached through the Starlette Router (its body limit wraps `receive`)."""
        await self.serve(scope, receive, send, scope.get("path_params") or {}, None)

    async def serve(self, scope: dict, receive: Callable, send: Callable,
                    params: dict[str, str], limit: int | None) -> None:
        """Serve a request; with `limit`, a body over `limit` bytes (by its Content-Length
        or as it arrives) is answered 413 as Starlette's limit answers it."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            raw = await _body(receive, headers, limit)
        except _TooLarge:
            await PlainTextResponse("Content Too Large", status_code=413)(scope, receive, send)
            return
        if raw is None:  # not received in full: not processed, nobody to answer
            return
        query = scope["query_string"].decode("latin-1")
        inc = Incoming(scope["method"], scope["path"],
                       {k: v[-1] for k, v in parse_qs(query).items()} if query else {},
                       headers, raw, params)
        provider = self.provider
        backlog = (provider.accept_delay_seconds
                   if self.route.faulty and self.route.handler not in provider.LOOKUPS else 0.0)
        if backlog:  # a provider whose intake is behind: processed later, client or not
            provider._wait_count(1)
            try:
                if not await self.server.hold(backlog):
                    return  # the server stops: never processed
            finally:
                provider._wait_count(-1)
        try:
            reply = provider.respond(self.route, inc)
        except Exception as exc:  # noqa: BLE001 - a handler's bug answers 500
            reply = Reply(500, {"error": f"{type(exc).__name__}: {exc}"})
        wait = provider.delay(self.route)
        if wait and not await self.server.hold(wait):
            reply = DROP  # the server stops: no answer
        if reply is HANG:  # hold the connection, answer nothing, then drop it
            await self.server.hold(provider.hang_seconds)
        elif isinstance(reply, Withheld):  # processed; the answer is not sent (or sent late)
            if reply.hang and await self.server.hold(provider.hang_seconds) and reply.late:
                await _answer(reply.reply, scope, send)
                return
        elif reply is not DROP:
            await _answer(reply, scope, send)  # type: ignore[arg-type]
            return
        scope["extensions"][DROP_EXTENSION]()  # close the connection without an answer


async def _body(receive: Callable, headers: dict[str, str], limit: int | None) -> bytes | None:
    """The request body as uvicorn hands it over; None if the client hung up first."""
    if limit is not None:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _TooLarge
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if limit is not None:
            size += len(chunk)
            if size > limit:
                raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _answer(reply: Reply, scope: dict, send: Callable) -> None:
    payload = reply.encoded()
    headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1"))
               for k, v in reply.headers.items()]
    if reply.body is not None:
        ctype = JSON if isinstance(reply.body, (dict, list)) else "text/plain; charset=utf-8"
        headers.append((b"content-type", ctype.encode()))
    if reply.framing == "close":
        headers.append((b"connection", b"close"))  # uvicorn closes after the answer
    if reply.framing == "chunked":  # no Content-Length: uvicorn frames each piece a chunk
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        for i in range(0, len(payload), CHUNK_BYTES):
            await send({"type": "http.response.body", "body": payload[i:i + CHUNK_BYTES],
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    headers.append((b"content-length", str(len(payload)).encode()))
    wire = scope["extensions"].get(WIRE_EXTENSION)
    if wire is None:
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        return
    wire.hold()  # uvicorn writes the head and the body apart: one write for both
    try:
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
    finally:
        wire.flush()


class _App:
    """The ASGI app uvicorn serves: the routes whose path is fixed or has one whole-segment
    parameter are dispatched here, by method and path, with the body limit checked while
    reading; any other request goes to `fallback` (the Starlette Router behind its body
    limit)."""

    def __init__(self, router: Router, max_body_bytes: int) -> None:
        self.router = router
        self.fallback = RequestBodyLimitMiddleware(router, max_body_size=max_body_bytes)
        self.max_body_bytes = max_body_bytes
        self.exact: dict[tuple[str, str], _Endpoint] = {}
        #: (method, prefix, suffix, parameter name, endpoint)
        self.patterns: list[tuple[str, str, str, str, _Endpoint]] = []

    def add(self, endpoints: Iterable[_Endpoint]) -> None:
        """Serve `endpoints`: each a route of the Router, and the eligible ones here too."""
        for endpoint in endpoints:
            self.router.routes.append(StarletteRoute(
                endpoint.route.path, endpoint, methods=list(endpoint.route.methods),
                name=f"{endpoint.provider.name}.{endpoint.route.handler}"))
            path = endpoint.route.path
            one = _ONE_PARAMETER.match(path)
            for method in endpoint.route.methods:
                if "{" not in path:
                    self.exact.setdefault((method, path), endpoint)
                elif one:
                    self.patterns.append((method, one[1], one[3], one[2], endpoint))

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            endpoint = self.exact.get((method, path))
            if endpoint is not None:
                await endpoint.serve(scope, receive, send, {}, self.max_body_bytes)
                return
            for m, prefix, suffix, name, endpoint in self.patterns:
                if m == method and path.startswith(prefix) and path.endswith(suffix):
                    value = path[len(prefix):len(path) - len(suffix)]
                    if value and "/" not in value:
                        await endpoint.serve(scope, receive, send, {name: value},
                                             self.max_body_bytes)
                        return
        await self.fallback(scope, receive, send)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling the starting thread when it listens, with `hold` for the
    routes: a wait that ends early when the server stops."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self._holds: set[asyncio.Future] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        self.ready.set()

    async def hold(self, seconds: float) -> bool:
        """Wait `seconds` (a future and a timer: no task); False if the server began to
        stop meanwhile."""
        if self.stopping:
            return False
        if seconds <= 0:
            return True
        done = self.loop.create_future()  # type: ignore[union-attr]
        timer = self.loop.call_later(seconds, _release, done)  # type: ignore[union-attr]
        self._holds.add(done)
        try:
            await done
        finally:
            timer.cancel()
            self._holds.discard(done)
        return not self.stopping

    def _stop_holding(self) -> None:
        self.stopping = True
        for done in list(self._holds):
            _release(done)

    def begin_stop(self) -> None:
        """From any thread: release held requests (their connections are dropped), stop
        accepting, let answers in progress finish, end."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._stop_holding)
            except RuntimeError:  # the loop closed meanwhile
                pass
        self.should_exit = True


def _release(done: asyncio.Future) -> None:
    if not done.done():
        done.set_result(None)


class ServerHandle:
    """A running server. With one provider, `received`, `accepted`, `configure`, `clear`,
    `accepted_recipients` and `accepted_message_ids` are that provider's; with several,
    the counts are `{provider name: Counter}`; `providers[name]` reaches each of them."""

    def __init__(self, server: _Uvicorn, thread: threading.Thread, sock: socket.socket,
                 providers: list[Provider], stats: _Stats) -> None:
        self._server = server
        self._thread = thread
        self._stats = stats
        self.providers: dict[str, Provider] = {p.name: p for p in providers}
        host, port = sock.getsockname()[:2]
        self.base_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def provider(self) -> Provider:
        if len(self.providers) != 1:
            raise AttributeError("this server hosts several providers: use providers[name]")
        return next(iter(self.providers.values()))

    @property
    def received(self) -> list[RecordedRequest]:
        return [r for p in self.providers.values() for r in p.received]

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since the server started (keep-alive reuse shows)."""
        return self._stats.connections_accepted

    @property
    def accepted(self) -> list[RecordedRequest]:
        return [r for p in self.providers.values() for r in p.accepted]

    def accepted_recipients(self) -> Counter | dict[str, Counter]:
        if len(self.providers) == 1:
            return self.provider.accepted_recipients()
        return {name: p.accepted_recipients() for name, p in self.providers.items()}

    def accepted_message_ids(self) -> Counter | dict[str, Counter]:
        if len(self.providers) == 1:
            return self.provider.accepted_message_ids()
        return {name: p.accepted_message_ids() for name, p in self.providers.items()}

    def configure(self, **options: Any) -> None:
        self.provider.configure(**options)

    def clear(self) -> None:
        for p in self.providers.values():
            p.clear()

    def stop(self) -> None:
        """Drop held requests, close every connection, stop serving; returns once done."""
        if not self._thread.is_alive():
            return
        self._server.begin_stop()
        self._thread.join()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(providers: Iterable[Provider], host: str = "127.0.0.1", port: int = 0, *,
          max_body_bytes: int = MAX_BODY_BYTES, keep_alive_seconds: float = KEEP_ALIVE_SECONDS
          ) -> tuple[str, ServerHandle]:
    """Serve `providers` on one port (0: a free one) in a thread of this process and
    return once it accepts connections: (base_url, handle). Request bodies above
    `max_body_bytes` get 413; a kept-alive connection idle `keep_alive_seconds` is
    closed."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("the local provider servers listen on loopback only")
    providers = list(providers)
    stats = _Stats()
    protocol = type("LocalProviderProtocol", (_Protocol,), {"stats": stats})
    app = _App(Router(), max_body_bytes)
    config = uvicorn.Config(
        app, http=protocol, ws="none", lifespan="off", interface="asgi3",
        timeout_keep_alive=keep_alive_seconds,  # type: ignore[arg-type]
        timeout_graceful_shutdown=STOP_GRACE_SECONDS, backlog=BACKLOG,
        access_log=False, log_config=None,  # the process's logging stays as configured
        server_header=False, headers=[("server", "retention-local-providers")],
        proxy_headers=False)
    server = _Uvicorn(config)
    app.add(_Endpoint(server, provider, route)
            for provider in providers for route in provider.routes)
    sock = bind(host, port, BACKLOG)
    thread = start_in_thread(server, sock, name=f"local-provider-{sock.getsockname()[1]}",
                             what="the local provider server")
    handle = ServerHandle(server, thread, sock, providers, stats)
    return handle.base_url, handle


def start(provider: str, *, host: str = "127.0.0.1", port: int = 0, **options: Any
          ) -> tuple[str, ServerHandle]:
    """Start one provider's server in this process: returns (base_url, handle)."""
    return serve([PROVIDERS[provider](**options)], host, port)


def start_sendgrid(**options: Any) -> tuple[str, ServerHandle]:
    return start("sendgrid", **options)


def start_fcm(**options: Any) -> tuple[str, ServerHandle]:
    return start("fcm", **options)


def start_telegram(**options: Any) -> tuple[str, ServerHandle]:
    return start("telegram", **options)


def start_gateway(**options: Any) -> tuple[str, ServerHandle]:
    return start("gateway", **options)


def fake_service_account(token_uri: str, project_id: str = "local-project",
                         client_email: str | None = None) -> tuple[dict, str]:
    """A service-account JSON (as a dict) with a freshly generated RSA key whose
    `token_uri` is the local server's `/token`, and the public key PEM to give the FCM
    server (`public_keys=[pem]`) so it checks the SDK's signed assertions. Generated at
    run time, never stored in the repository."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    email = client_email or f"firebase-adminsdk-local@{project_id}.iam.gserviceaccount.com"
    info = {"type": "service_account", "project_id": project_id,
            "private_key_id": _short_id("key", email, time.time_ns(), length=40),
            "private_key": private_pem, "client_email": email, "client_id": "1",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "", "universe_domain": "googleapis.com"}
    return info, public_pem


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m retention_dev.servers",
        description="Serve local SendGrid, FCM, Telegram and HTTP-gateway stand-ins on one port.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument("--providers", default="sendgrid,fcm,telegram,gateway")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rate-limit-fraction", type=float, default=0.0)
    parser.add_argument("--server-error-fraction", type=float, default=0.0)
    parser.add_argument("--timeout-fraction", type=float, default=0.0)
    parser.add_argument("--retry-after", type=int, default=1)
    parser.add_argument("--activity-lag-seconds", type=float, default=0.0,
                        help="SendGrid: an accepted send shows in GET /v3/messages this long after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequence", default="", help="outcomes, e.g. 429,503,ok,timeout")
    parser.add_argument("--no-record-bodies", action="store_true",
                        help="keep memory flat under long benchmarks")
    parser.add_argument("--sendgrid-api-key", action="append", default=None,
                        help="accepted key (repeatable); default: any Bearer key")
    parser.add_argument("--bot-token", action="append", default=None,
                        help="accepted bot token (repeatable); default: any well-formed token")
    parser.add_argument("--blocked-chat-id", action="append", default=[])
    parser.add_argument("--unregistered-token", action="append", default=[])
    parser.add_argument("--project-id", default="local-project")
    parser.add_argument("--write-service-account", metavar="PATH",
                        help="write a fake FCM service-account JSON whose token_uri is this server "
                             "(mode 0600) and check assertions against its key")
    args = parser.parse_args(argv)

    common = dict(latency_ms=args.latency_ms, rate_limit_fraction=args.rate_limit_fraction,
                  server_error_fraction=args.server_error_fraction,
                  timeout_fraction=args.timeout_fraction, retry_after=args.retry_after,
                  seed=args.seed, record_bodies=not args.no_record_bodies,
                  sequence=[s for s in args.sequence.split(",") if s])
    specific = {"sendgrid": dict(api_keys=args.sendgrid_api_key,
                                 activity_lag_seconds=args.activity_lag_seconds),
                "fcm": dict(unregistered_tokens=args.unregistered_token),
                "telegram": dict(bot_tokens=args.bot_token, blocked_chat_ids=args.blocked_chat_id),
                "gateway": {}}
    names = [n.strip() for n in args.providers.split(",") if n.strip()]
    providers = [PROVIDERS[n](**common, **specific[n]) for n in names]
    base_url, handle = serve(providers, args.host, args.port)
    if args.write_service_account and "fcm" in handle.providers:
        write_service_account(handle, args.write_service_account, args.project_id)
    print(f"local providers ({', '.join(names)}) on {base_url}", flush=True)
    serve_until_signalled(handle)
    return 0


def write_service_account(handle: ServerHandle, path: str, project_id: str) -> dict:
    """A fake FCM service account whose token_uri is this server, written to `path`
    (mode 0600); the server's FCM then accepts only assertions signed by its key."""
    import os

    info, public_pem = fake_service_account(f"{handle.base_url}/token", project_id)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    handle.providers["fcm"].configure(public_keys=[public_pem])
    return info


def serve_until_signalled(handle: ServerHandle) -> None:
    """Block until SIGTERM or SIGINT, then stop the server."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    handle.stop()


if __name__ == "__main__":
    raise SystemExit(main())
