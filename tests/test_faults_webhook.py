"""The SendGrid Event Webhook receiver under attack and under faults: it fails closed.

The receiver is the real server (uvicorn, `serve_in_thread`) on 127.0.0.1, spoken to over
HTTP (urllib, or a raw socket when the request itself must be malformed or incomplete),
against a real PostgreSQL database. Signatures are real ECDSA P-256 signatures: the vector
SendGrid ships in its own wheel, and key pairs made here signing the way SendGrid does.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from retention import db
from retention.results.receiver import (
    MAX_BODY, MAX_HEAD, MissingVerificationKey, make_app, serve_in_thread,
)
from retention.results.webhook import (
    KEY_ENV, SIGNATURE_HEADER, TIMESTAMP_HEADER, land_batch, load_landed_batches, sign_batch,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 2, 7, 0, tzinfo=timezone.utc)
POISON = "poison.reader@example.com"


# --- helpers ---------------------------------------------------------------------------

def _now() -> int:
    return int(time.time())


def _event(kind: str, event_id: str, email: str, at: datetime = T0, **extra) -> dict:
    out = {"email": email, "timestamp": int(at.timestamp()), "event": kind,
           "sg_event_id": event_id, "sg_message_id": f"xmsg1.filter0001.{event_id}"}
    out.update(extra)
    return out


def _signed(private: ec.EllipticCurvePrivateKey, body: bytes, ts: int | None = None) -> dict:
    stamp = str(_now() if ts is None else ts)
    return {SIGNATURE_HEADER: sign_batch(private, body, stamp), TIMESTAMP_HEADER: stamp}


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _raw(base: str, data: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send `data` as is and read until the server closes the connection.

    A server that waited for more of the request would leave recv blocked: the socket
    timeout then fails the test.
    """
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    assert received.startswith(b"HTTP/1.1 "), received
    return int(received.split(b" ", 2)[1]), received


def _head(length: str | None, extra: str = "", path: str = "/sendgrid/events") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _files(folder: Path, pattern: str = "*.json") -> list[Path]:
    return sorted(folder.rglob(pattern)) if folder.exists() else []


def _count(url: str, sql: str, params: tuple = ()) -> int:
    with db.connect(url) as conn:
        return conn.execute(sql, params).fetchone()[0]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sendgrid_vector() -> dict:
    """The signed batch SendGrid's own unit tests verify, read from the installed wheel."""
    spec = importlib.util.find_spec("sendgrid")
    assert spec is not None and spec.origin
    source = Path(spec.origin).parent.parent / "test" / "unit" / "test_eventwebhook.py"
    if not source.exists():
        pytest.skip("the sendgrid wheel's unit tests are not installed")
    module_spec = importlib.util.spec_from_file_location("_sendgrid_eventwebhook_vector", source)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    module.UnitTests.setUpClass()
    cls = module.UnitTests
    return {"key": cls.PUBLIC_KEY, "signature": cls.SIGNATURE, "timestamp": cls.TIMESTAMP,
            "body": cls.PAYLOAD.encode()}


# --- fixtures --------------------------------------------------------------------------

@pytest.fixture()
def keypair() -> tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey]:
    private = ec.generate_private_key(ec.SECP256R1())
    return private, private.public_key()


@pytest.fixture()
def folder(tmp_path) -> Path:
    return tmp_path / "webhooks"


@pytest.fixture()
def serve(database_url, folder, keypair):
    """Factory: the receiver served on a free port (verifying with `keypair` unless told
    otherwise); every server started is stopped at the end."""
    handles = []

    def start(*, server: dict | None = None, **app_kwargs):
        app_kwargs.setdefault("key", keypair[1])
        app_kwargs.setdefault("root", folder)
        app_kwargs.setdefault("url", database_url)
        handle = serve_in_thread(make_app(**app_kwargs), **(server or {}))
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


# --- no key, no start ------------------------------------------------------------------

def test_no_key_no_start_unless_the_insecure_switch(monkeypatch, folder, database_url,
                                                     caplog):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(MissingVerificationKey, match=KEY_ENV):
        make_app(root=folder)
    with pytest.raises(MissingVerificationKey, match=KEY_ENV):
        make_app(key=None, root=folder)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")]))
    env.pop(KEY_ENV, None)
    refused = subprocess.run([sys.executable, "-m", "retention.results.receiver", "--port", "0",
                              "--landing", str(folder)], env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0
    assert KEY_ENV in refused.stderr and "--insecure-no-signature" in refused.stderr
    assert "listening" not in refused.stdout

    # the explicit switch starts it, loudly, and it lands unsigned batches as unverified
    proc = subprocess.Popen([sys.executable, "-m", "retention.results.receiver", "--port", "0",
                             "--landing", str(folder), "--insecure-no-signature"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "INSECURE" in stderr and KEY_ENV in stderr

    with caplog.at_level(logging.WARNING, logger="retention.results.receiver"):
        app = make_app(insecure=True, root=folder, url=database_url)
    assert any("INSECURE" in r.getMessage() for r in caplog.records)
    with serve_in_thread(app) as handle:
        body = json.dumps([_event("open", "ins1", "a@example.com")]).encode()
        status, answer = _post(handle.events_url, body, {})
    assert status == 200 and answer["ingested"]["inserted"] == 1
    assert _count(database_url, "select count(*) from ops.webhook_batches "
                                "where not signature_verified") == 1


# --- signatures ------------------------------------------------------------------------

def test_unsigned_and_forged_batches_are_403_and_nothing_lands(serve, keypair, folder,
                                                               database_url):
    handle = serve()
    private, _ = keypair
    body = json.dumps([_event("unsubscribe", "f1", "victim@example.com")]).encode()
    forger = ec.generate_private_key(ec.SECP256R1())
    stamp = _now()
    attempts = {
        "unsigned": {},
        "timestamp only": {TIMESTAMP_HEADER: str(stamp)},
        "forged": _signed(forger, body, stamp),
        "signature of another body": _signed(private, body.replace(b"unsubscribe", b"open"),
                                             stamp),
        "signature of another timestamp": {
            SIGNATURE_HEADER: sign_batch(private, body, str(stamp - 1)),
            TIMESTAMP_HEADER: str(stamp)},
        "garbage signature": {SIGNATURE_HEADER: "not base64!", TIMESTAMP_HEADER: str(stamp)},
    }
    for name, headers in attempts.items():
        status, answer = _post(handle.events_url, body, headers)
        assert status == 403, (name, status, answer)
    assert not _files(folder), "nothing was written"
    assert _count(database_url, "select count(*) from ops.consent_changes") == 0
    # the genuine signature over the same bytes is accepted
    status, answer = _post(handle.events_url, body, _signed(private, body))
    assert status == 200 and answer["ingested"]["consent_changes"] == 1


def test_stale_and_future_signatures_are_403(serve, keypair, folder, database_url):
    handle = serve()
    private, _ = keypair
    body = json.dumps([_event("open", "s1", "a@example.com")]).encode()
    stale = _post(handle.events_url, body, _signed(private, body, _now() - 3600))
    future = _post(handle.events_url, body, _signed(private, body, _now() + 3600))
    assert stale[0] == 403 and "stale" in stale[1]["error"]
    assert future[0] == 403 and "future" in future[1]["error"]
    assert not _files(folder)
    # inside the tolerance (600 s by default) is fine
    status, _ = _post(handle.events_url, body, _signed(private, body, _now() - 300))
    assert status == 200


def test_tolerance_is_a_setting(serve, keypair, monkeypatch):
    monkeypatch.setenv("RETENTION_SENDGRID_WEBHOOK_TOLERANCE_SECONDS", "60")
    handle = serve()
    private, _ = keypair
    body = json.dumps([_event("open", "t1", "a@example.com")]).encode()
    status, answer = _post(handle.events_url, body, _signed(private, body, _now() - 300))
    assert status == 403 and "stale" in answer["error"]


def test_sendgrids_own_signed_vector(serve, folder, database_url):
    """SendGrid's published vector (signed in 2020) is genuine at its own time and stale
    now: the clock decides, and the clock is injectable."""
    from retention.results.webhook import load_verification_key

    vector = _sendgrid_vector()
    key = load_verification_key(vector["key"])
    headers = {SIGNATURE_HEADER: vector["signature"], TIMESTAMP_HEADER: vector["timestamp"]}
    now = serve(key=key, root=folder / "now")
    status, answer = _post(now.events_url, vector["body"], headers)
    assert status == 403 and "stale" in answer["error"]
    signed_at = datetime.fromtimestamp(int(vector["timestamp"]) + 5, timezone.utc)
    then = serve(key=key, root=folder / "then", clock=lambda: signed_at)
    status, answer = _post(then.events_url, vector["body"], headers)
    assert status == 200, answer
    assert answer["ingested"]["consent_changes"] == 1  # a dropped "Bounced Address"
    assert _count(database_url, "select count(*) from ops.consent_changes "
                                "where address = 'hello@world.com'") == 1
    tampered = vector["body"].replace(b"dropped", b"droppe ")
    status, _ = _post(then.events_url, tampered, headers)
    assert status == 403


# --- replays ---------------------------------------------------------------------------

def test_replayed_batch_lands_once_even_after_a_restart(serve, keypair, folder, database_url,
                                                        caplog):
    private, _ = keypair
    body = json.dumps([_event("unsubscribe", "r1", "replayed.reader@example.com"),
                       _event("open", "r2", "replayed.reader@example.com")]).encode()
    handle = serve()
    first = _post(handle.events_url, body, _signed(private, body))
    with caplog.at_level(logging.INFO, logger="retention"):
        second = _post(handle.events_url, body, _signed(private, body, _now() - 1))
    assert first[0] == 200 and first[1]["ingested"]["inserted"] == 2
    assert second == (200, {"duplicate": True, "batch_id": first[1]["batch_id"],
                            "landed": None, "events": 2, "ingested": None})
    assert [m for m in (r.getMessage() for r in caplog.records) if "replay" in m], \
        "the duplicate is logged"
    assert all("replayed.reader" not in r.getMessage() for r in caplog.records)
    with urllib.request.urlopen(handle.url + "/healthz", timeout=10) as response:
        counters = json.loads(response.read())
    assert counters["landed"] == 1 and counters["duplicates"] == 1
    handle.stop()

    # a new receiver process on the same folder remembers what landed
    again = serve()
    third = _post(again.events_url, body, _signed(private, body))
    assert third[0] == 200 and third[1]["duplicate"] is True
    assert len(_files(folder / "incoming") + _files(folder / "loaded")) == 1
    assert _count(database_url, "select deliveries from ops.webhook_batches") == 1
    # the digest record is private like the batches
    markers = [p for p in (folder / "digests").rglob("*") if p.is_file()]
    assert len(markers) == 1 and markers[0].name == first[1]["batch_id"]
    assert _mode(markers[0]) == 0o600


# --- the request head: refused before the body -----------------------------------------

def test_oversized_batch_is_413_before_the_body_is_sent(serve, folder):
    handle = serve()
    # the head announces more than the cap; only a few bytes of the body follow and the
    # client then waits: the answer must come without the rest of the body
    status, answer = _raw(handle.url, _head(str(MAX_BODY + 1)) + b"[" + b" " * 1000)
    assert status == 413 and b"connection: close" in answer.lower()
    small = serve(root=folder / "small", max_body=1024)
    status, _ = _raw(small.url, _head("1025") + b"[")
    assert status == 413
    assert not _files(folder)


def test_missing_negative_malformed_and_chunked_lengths(serve, folder):
    handle = serve()
    assert _raw(handle.url, _head(None))[0] == 411
    assert _raw(handle.url, _head(None, "Transfer-Encoding: chunked") + b"2\r\n[]\r\n")[0] \
        == 411
    for length in ("-1", "-100", "abc", "1e3", "0x10", "+5"):
        status, _ = _raw(handle.url, _head(length) + b"[]")
        assert status == 400, length
    assert not _files(folder)


def test_slow_body_gets_408_and_slow_head_is_cut(serve, keypair, folder):
    private, _ = keypair
    body = json.dumps([_event("open", "slow1", "a@example.com")]).encode()
    signed = _signed(private, body)
    handle = serve(body_timeout=1.0, server={"head_timeout": 1.0})
    head = _head(str(len(body)), "\r\n".join(f"{k}: {v}" for k, v in signed.items()))
    # a slowloris body: half of it, then nothing; the deadline answers, and closes
    status, answer = _raw(handle.url, head + body[: len(body) // 2])
    assert status == 408 and b"connection: close" in answer.lower()
    # a head that never completes: the connection is closed
    parts = urlsplit(handle.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"POST /sendgrid/events HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert sock.recv(1024) == b""
    assert not _files(folder)
    # the same request sent whole is fine
    status, answer = _post(handle.events_url, body, signed)
    assert status == 200, answer


def test_oversized_head_and_concurrency_limit(serve):
    handle = serve(server={"max_connections": 2})
    # a head that goes on past the cap without ending is refused, not buffered
    status, _ = _raw(handle.url, b"POST /sendgrid/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 b"X-Padding: " + b"a" * (MAX_HEAD + 1024))
    assert status == 400
    parts = urlsplit(handle.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            response += kept.recv(4096)
        assert response.startswith(b"HTTP/1.1 200")
        # one connection is kept alive; with a limit of two, another request gets 503
        status, _ = _raw(handle.url, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                     b"Connection: close\r\n\r\n")
        assert status == 503


# --- the body: what PostgreSQL could not store is refused at the door ------------------

BAD_BODIES = {
    "NaN": b'[{"event": "open", "timestamp": NaN, "email": "a@example.com"}]',
    "Infinity": b'[{"event": "open", "timestamp": Infinity}]',
    "-Infinity": b'[{"event": "open", "timestamp": -Infinity}]',
    "overflowing float": b'[{"event": "open", "timestamp": 1e999}]',
    "NUL in a value": b'[{"event": "open", "email": "nul\\u0000@example.com"}]',
    "NUL in a key": b'[{"event": "open", "x\\u0000": 1}]',
    "NUL nested": b'[{"event": "open", "custom_args": {"a": ["\\u0000"]}}]',
    "unpaired surrogate": b'[{"event": "open", "email": "\\ud800@example.com"}]',
    "an object": b'{"event": "open"}',
    "a string": b'"events"',
    "a number": b"42",
    "null": b"null",
    "non-object items": b'[{"event": "open"}, 1]',
    "nested arrays": b"[[{}]]",
    "strings": b'["open"]',
    "not JSON": b"not json",
    "trailing garbage": b'[{"event": "open"}] x',
    "not UTF-8": b'[{"event": "open", "email": "\xff\xfe"}]',
    "too deep": b'[{"a": ' + b"[" * 100 + b"]" * 100 + b"}]",
    "huge integer": b'[{"event": "open", "timestamp": ' + b"9" * 5000 + b"}]",
}


def test_unstorable_bodies_are_400_and_nothing_lands(serve, keypair, folder, database_url):
    handle = serve()
    private, _ = keypair
    for name, body in BAD_BODIES.items():
        status, answer = _post(handle.events_url, body, _signed(private, body))
        assert status == 400, (name, status, answer)
    assert not _files(folder)
    assert _count(database_url, "select count(*) from ops.message_events") == 0


# --- poisoned batches never block the folder -------------------------------------------

def _poison_the_database(url: str) -> None:
    """PostgreSQL refuses one address, and its error text quotes the row (the address)."""
    with db.connect(url) as conn:
        conn.execute(f"alter table ops.message_events add constraint refuses_one_address "
                     f"check (address is distinct from '{POISON}')")
        conn.commit()


def _no_address_in_logs(records, *addresses: str) -> None:
    formatter = logging.Formatter("%(message)s")
    for record in records:
        text = formatter.format(record)  # the message, and any traceback
        for address in addresses:
            assert address not in text, (record.name, text)


def test_poisoned_batch_is_quarantined_and_the_next_one_loads(serve, keypair, folder,
                                                               database_url, caplog):
    _poison_the_database(database_url)
    private, _ = keypair
    handle = serve()
    poisoned = json.dumps([_event("open", "p1", POISON)]).encode()
    valid = json.dumps([_event("unsubscribe", "v1", "valid.reader@example.com")]).encode()
    with caplog.at_level(logging.DEBUG):
        first = _post(handle.events_url, poisoned, _signed(private, poisoned))
        second = _post(handle.events_url, valid, _signed(private, valid))
    # the poisoned batch is acknowledged (retrying cannot help) and set aside
    assert first[0] == 200 and first[1]["rejected"] is True and first[1]["ingested"] is None
    assert second[0] == 200 and second[1]["ingested"]["consent_changes"] == 1
    assert _count(database_url, "select count(*) from ops.consent_changes "
                                "where address = 'valid.reader@example.com'") == 1
    rejected = folder / "rejected" / first[1]["landed"]
    reason = rejected.with_name(rejected.name + ".reason")
    assert rejected.exists() and reason.exists()
    assert "CheckViolation" in reason.read_text() and "23514" in reason.read_text()
    assert not _files(folder / "incoming")
    assert any(first[1]["landed"] in r.getMessage() and "CheckViolation" in r.getMessage()
               for r in caplog.records), "the quarantine is logged by file and class"
    _no_address_in_logs(caplog.records, POISON, "valid.reader@example.com")
    # batches, reasons and digests are private: files 0600, folders 0700
    for path in (rejected, reason, folder / "loaded" / second[1]["landed"]):
        assert _mode(path) == 0o600, path
    for sub in ("", "incoming", "loaded", "rejected", "digests"):
        assert _mode(folder / sub) == 0o700, sub


def test_loader_goes_past_poisoned_files(database_url, folder, caplog):
    """Landed files the loader finds: a database refusal and an unparsable batch each go to
    rejected/, and the valid batch after them still reaches ops.consent_changes."""
    _poison_the_database(database_url)
    land_batch(json.dumps([_event("open", "p1", POISON)]).encode(), T0, verified=True,
               root=folder)
    nul = b'[{"event": "open", "email": "nul\\u0000' + POISON.encode() + b'"}]'
    land_batch(nul, T0 + timedelta(seconds=1), verified=True, root=folder)
    land_batch(json.dumps([_event("unsubscribe", "v1", "valid.reader@example.com")]).encode(),
               T0 + timedelta(seconds=2), verified=True, root=folder)
    with caplog.at_level(logging.DEBUG):
        totals = load_landed_batches(folder, database_url)
    assert totals["rejected_files"] == 2 and totals["files"] == 1
    assert totals["consent_changes"] == 1
    assert _count(database_url, "select count(*) from ops.consent_changes "
                                "where address = 'valid.reader@example.com'") == 1
    rejected = sorted(p.name for p in (folder / "rejected").iterdir())
    assert len(rejected) == 4 and sum(n.endswith(".reason") for n in rejected) == 2
    assert all(_mode(folder / "rejected" / n) == 0o600 for n in rejected)
    assert not _files(folder / "incoming")
    _no_address_in_logs(caplog.records, POISON, "valid.reader@example.com")


def test_database_down_the_batch_waits_in_incoming(serve, keypair, folder, database_url):
    private, _ = keypair
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"postgresql://nobody@127.0.0.1:{probe.getsockname()[1]}/nothing"
    handle = serve(url=dead)
    body = json.dumps([_event("unsubscribe", "w1", "waiting.reader@example.com")]).encode()
    status, answer = _post(handle.events_url, body, _signed(private, body))
    assert status == 200 and answer["ingested"] is None and "pending" in answer
    assert [p.name for p in _files(folder / "incoming")] == [answer["landed"]]
    assert _mode(folder / "incoming" / answer["landed"]) == 0o600
    # the results DAG's loader picks it up once the database is back
    totals = load_landed_batches(folder, database_url)
    assert totals["files"] == 1 and totals["consent_changes"] == 1
    assert not _files(folder / "incoming") and not _files(folder / "rejected")


def test_schema_not_deployed_defers_instead_of_rejecting(database_url, folder):
    """An error that is not the batch's own (here a table missing) leaves every batch in
    incoming/ for the next pass rather than rejecting them all."""
    body = json.dumps([_event("unsubscribe", "d1", "deferred.reader@example.com")]).encode()
    landed = land_batch(body, T0, verified=True, root=folder)
    with db.connect(database_url) as conn:
        conn.execute("alter table ops.message_events rename to message_events_elsewhere")
        conn.commit()
    totals = load_landed_batches(folder, database_url)
    assert totals["deferred_files"] == 1 and totals["rejected_files"] == 0
    assert landed.exists() and not _files(folder / "rejected")
    with db.connect(database_url) as conn:
        conn.execute("alter table ops.message_events_elsewhere rename to message_events")
        conn.commit()
    totals = load_landed_batches(folder, database_url)
    assert totals["files"] == 1 and totals["consent_changes"] == 1
