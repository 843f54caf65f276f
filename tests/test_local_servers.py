"""The local provider servers on the wire (Starlette on uvicorn): keep-alive and its idle
timeout, requests pipelined on one connection answered in order after their latency,
concurrent latency, malformed, chunked, oversized and misrouted requests, held
("timeout") requests released by stop, a request processed when its client hung up
during the latency; the framing outcomes ("chunked", "close", "drop"), faults after
acceptance ("accept_timeout", "accept_drop"), SendGrid's activity lag, and the
per-recipient and per-message-id counts of what each provider accepted."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from retention_dev.servers import PROVIDERS, SendGridProvider, TelegramProvider, serve, start


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict, bytes]:
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response"
        buffer += chunk
    end = buffer.index(b"\r\n\r\n")
    lines = buffer[:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(buffer) < end + 4 + length:
        buffer += sock.recv(65536)
    body = bytes(buffer[end + 4:end + 4 + length])
    del buffer[:end + 4 + length]
    return status, headers, body


def _post(path: str, body: dict, host: str) -> bytes:
    raw = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw


def test_pipelined_requests_answered_in_order_after_latency():
    url, server = start("gateway", latency_ms=50)
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port))) as sock:
            t = time.perf_counter()
            sock.sendall(b"".join(_post("/gateway/send", {"to": f"+38050{i}"}, host)
                                  for i in range(3)))
            buffer = bytearray()
            answers = [_read_response(sock, buffer) for _ in range(3)]
            elapsed = time.perf_counter() - t
        assert [a[0] for a in answers] == [200, 200, 200]
        assert [json.loads(a[2])["message"]["id"] for a in answers] == ["gw-1", "gw-2", "gw-3"]
        assert elapsed >= 0.15  # one after the other on a connection
        assert all(a[1]["content-type"] == "application/json" and "date" in a[1] for a in answers)
        assert [r.body["to"] for r in server.received] == ["+380500", "+380501", "+380502"]
    finally:
        server.stop()


def test_latency_overlaps_across_connections_and_keep_alive_is_reused():
    url, server = start("gateway", latency_ms=100)
    try:
        session = requests.Session()
        for i in range(3):  # one after the other: one connection, kept alive
            assert session.post(f"{url}/gateway/x", json={"to": f"k{i}"}, timeout=5).ok
        assert server.connections_accepted == 1
        results = []

        def send(i: int) -> None:
            results.append(session.post(f"{url}/gateway/x", json={"to": str(i)}, timeout=5).status_code)

        t = time.perf_counter()
        threads = [threading.Thread(target=send, args=(i,)) for i in range(40)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert results == [200] * 40
        assert time.perf_counter() - t < 2.0  # 40 x 100 ms would be 4 s one at a time
        assert len(server.received) == 43
    finally:
        server.stop()


def test_malformed_chunked_oversized_unknown_and_unsupported():
    """uvicorn answers a malformed request 400 and reads a chunked request body; Starlette
    refuses a body over the limit (413, by its Content-Length or as it arrives chunked),
    an unknown path (404) and a method the route does not take (405), none processed."""
    _, server = serve([PROVIDERS["gateway"]()], max_body_bytes=100)
    url = server.base_url
    host, port = url.removeprefix("http://").split(":")
    big = json.dumps({"to": "9", "text": "x" * 100}).encode()
    try:
        for raw, status in ((b"NONSENSE\r\n\r\n", 400),
                            (b"POST /gateway/x HTTP/1.1\r\nContent-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"to\"\r\n6\r\n: \"1\"}\r\n"
                             b"0\r\n\r\n", 200),
                            (b"POST /gateway/x HTTP/1.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(big), big), 413),
                            (b"POST /gateway/x HTTP/1.1\r\nContent-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                             % (len(big), big), 413),
                            (b"DELETE /gateway/x HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
                            (b"GET /nowhere HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 404)):
            with socket.create_connection((host, int(port))) as sock:
                sock.settimeout(5)
                sock.sendall(raw)
                assert _read_response(sock, bytearray())[0] == status, raw
        assert [(r.body, r.status) for r in server.received] == [({"to": "1"}, 200)]
        assert requests.post(f"{url}/gateway/x", json={"to": "2"}, timeout=5).status_code == 200
        assert server.accepted_recipients() == Counter({"1": 1, "2": 1})
    finally:
        server.stop()


def test_routes_dispatched_before_starlette_answer_as_starlette_would():
    """The provider routes with a fixed path or one whole-segment parameter are served
    without the Router: their bodies over the limit get Starlette's 413 (by Content-Length
    or as they arrive chunked), unprocessed; a method the route does not take, a
    parameter spanning segments and a trailing slash still get the Router's 405, 404 and
    redirect; a well-formed request is served with its path parameter."""
    _, server = serve([PROVIDERS["sendgrid"](), PROVIDERS["telegram"]()], max_body_bytes=100)
    host, port = server.base_url.removeprefix("http://").split(":")
    big = json.dumps({"personalizations": [], "text": "x" * 100}).encode()
    mail = b"POST /v3/mail/send HTTP/1.1\r\nContent-Type: application/json\r\n"
    try:
        for raw, status, body in (
                (mail + b"Content-Length: %d\r\n\r\n%s" % (len(big), big), 413,
                 b"Content Too Large"),
                (mail + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                 % (len(big), big), 413, b"Content Too Large"),
                (b"GET /v3/mail/send HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405,
                 b"Method Not Allowed"),
                (b"POST /bot1:a/b/sendMessage HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 404,
                 b"Not Found"),
                (b"POST /v3/mail/send/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 307, b"")):
            with socket.create_connection((host, int(port))) as sock:
                sock.settimeout(5)
                sock.sendall(raw)
                answer = _read_response(sock, bytearray())
                assert (answer[0], answer[2]) == (status, body), raw
        assert server.received == []
        sent = requests.post(f"{server.base_url}/bot12:abc/sendMessage",
                             json={"chat_id": 7, "text": "hi"}, timeout=5)
        assert sent.status_code == 200 and sent.json()["ok"] is True
        assert [(r.path, r.status) for r in server.received] == [("/bot12:abc/sendMessage", 200)]
    finally:
        server.stop()


def test_an_answer_leaves_in_one_write():
    """uvicorn writes an answer's head and body apart; the connection's wire joins the
    writes made between hold and flush (or close) into one, and passes others through."""
    from retention_dev.servers import _Wire

    class Transport:  # what asyncio's transport receives
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

    transport = Transport()
    wire = _Wire(transport)  # type: ignore[arg-type]
    wire.write(b"a")
    wire.hold()
    wire.write(b"HTTP/1.1 200 OK\r\n\r\n")
    wire.write(b"{}")
    assert transport.writes == [b"a"]
    wire.flush()
    wire.write(b"b")
    wire.hold()
    wire.write(b"c")
    wire.close()
    assert transport.writes == [b"a", b"HTTP/1.1 200 OK\r\n\r\n{}", b"b", b"c"]
    assert wire.is_closing()


def test_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout():
    _, server = serve([PROVIDERS["gateway"]()], keep_alive_seconds=0.3)
    host, port = server.base_url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port))) as sock:
            sock.settimeout(5)
            sock.sendall(_post("/gateway/x", {"to": "1"}, host))
            buffer = bytearray()
            assert _read_response(sock, buffer)[0] == 200
            t = time.perf_counter()
            assert _read_until_closed(sock) == b""  # closed by the server, no answer
            assert 0.25 <= time.perf_counter() - t < 3
        assert server.connections_accepted == 1
    finally:
        server.stop()


def test_request_is_processed_when_its_client_hangs_up_during_the_latency():
    """The client gives up before the latency is over; the provider took the request all
    the same (counted once), and answers nobody."""
    url, server = start("sendgrid", api_keys={SG_KEY}, latency_ms=1000)
    try:
        t = time.perf_counter()
        with pytest.raises(requests.ReadTimeout):
            _send_mail(url, _mail((["Joy@example.com"], "m-11")), timeout=0.3)
        assert time.perf_counter() - t < 0.9
        assert _poll(server.accepted_recipients) == Counter({"joy@example.com": 1})
        assert server.accepted_message_ids() == Counter({"m-11": 1})
        [rec] = server.received
        assert (rec.outcome, rec.status) == ("ok", 202)
        assert [m["to_email"] for m in _activity(url, "m-11")] == ["joy@example.com"]
        assert server.accepted_recipients() == Counter({"joy@example.com": 1})  # not twice
    finally:
        server.stop()


def test_held_request_times_out_client_and_stop_releases_it():
    url, server = start("gateway", sequence=["timeout"], hang_seconds=30)
    try:
        t = time.perf_counter()
        try:
            requests.post(f"{url}/gateway/x", json={"to": "1"}, timeout=0.3)
            raise AssertionError("the held request was answered")
        except requests.Timeout:
            pass
        assert time.perf_counter() - t < 2
        assert requests.post(f"{url}/gateway/x", json={"to": "2"}, timeout=5).status_code == 200
        assert [r.outcome for r in server.received] == ["timeout", "ok"]
    finally:
        t = time.perf_counter()
        server.stop()
        assert time.perf_counter() - t < 5


def _read_until_closed(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def test_chunked_close_and_drop_outcomes():
    """The framing switches HTTP clients are tested with: a chunked answer (several
    chunks), an answer with Connection: close (then closed), a connection closed without
    an answer."""
    url, server = start("gateway", sequence=["chunked", "close", "drop"])
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(_post("/gateway/x", {"to": "1"}, host))
            buffer = bytearray()
            while not buffer.endswith(b"\r\n0\r\n\r\n"):
                chunk = sock.recv(65536)
                assert chunk, "closed before the last chunk"
                buffer += chunk
            head, _, body = bytes(buffer).partition(b"\r\n\r\n")
            head = head.lower()
            assert b"transfer-encoding: chunked" in head and b"content-length" not in head
            decoded, rest, sizes = b"", body, []
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                sizes.append(int(size_line, 16))
                if sizes[-1] == 0:
                    break
                decoded, rest = decoded + rest[:sizes[-1]], rest[sizes[-1] + 2:]
            assert rest == b"\r\n" and len(sizes) > 3 and sizes[0] == 7
            assert json.loads(decoded)["message"]["id"] == "gw-1"
            # the connection is kept: the next answer comes on it, then it is closed
            sock.sendall(_post("/gateway/x", {"to": "2"}, host))
            answer = _read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 200 ") and b"\r\nconnection: close\r\n" in answer
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["message"]["id"] == "gw-2"
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(_post("/gateway/x", {"to": "3"}, host))
            assert _read_until_closed(sock) == b""
        # a client that decodes chunked bodies reads the same JSON
        server.configure(sequence=["chunked"])
        response = requests.post(f"{url}/gateway/x", json={"to": "4"}, timeout=5)
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.json()["message"]["id"] == "gw-3"
        assert [(r.outcome, r.status) for r in server.received] == [
            ("chunked", 200), ("close", 200), ("drop", None), ("chunked", 200)]
    finally:
        server.stop()


# --------------------------------------------------------------------------- accepted faults

SG_KEY = "SG.local-test-key"


def _mail(*personalizations: tuple[list[str], str], sandbox: bool = False) -> dict:
    """A valid Mail Send body: one personalization per (to addresses, message_id)."""
    body = {"personalizations": [{"to": [{"email": a} for a in to],
                                  "custom_args": {"message_id": mid}}
                                 for to, mid in personalizations],
            "from": {"email": "shop@example.com"}, "subject": "Hello",
            "content": [{"type": "text/plain", "value": "hi"}]}
    if sandbox:
        body["mail_settings"] = {"sandbox_mode": {"enable": True}}
    return body


def _send_mail(url: str, body: dict, timeout: float = 5) -> requests.Response:
    return requests.post(f"{url}/v3/mail/send", json=body, timeout=timeout,
                         headers={"Authorization": f"Bearer {SG_KEY}"})


def _activity(url: str, message_id: str) -> list[dict]:
    response = requests.get(f"{url}/v3/messages", timeout=5,
                            params={"query": f"unique_args['message_id']=\"{message_id}\"",
                                    "limit": "10"},
                            headers={"Authorization": f"Bearer {SG_KEY}"})
    assert response.status_code == 200, response.text
    return response.json()["messages"]


def test_accept_timeout_is_delivered_but_unanswered():
    """The provider takes the send (counted, in the activity log), the client's read
    timeout fires; the connection is closed after hang_seconds."""
    url, server = start("sendgrid", api_keys={SG_KEY}, sequence=["accept_timeout"],
                        hang_seconds=2)
    try:
        body = _mail((["Ann@Example.com", "bob@example.com"], "m-1"), (["cy@example.com"], "m-2"))
        t = time.perf_counter()
        with pytest.raises(requests.ReadTimeout):
            _send_mail(url, body, timeout=0.5)
        assert time.perf_counter() - t < 1.9  # the client gave up, not the server
        assert server.accepted_recipients() == Counter(
            {"ann@example.com": 1, "bob@example.com": 1, "cy@example.com": 1})
        assert server.accepted_message_ids() == Counter({"m-1": 1, "m-2": 1})
        [rec] = server.received
        assert (rec.outcome, rec.status) == ("accept_timeout", 202)
        assert server.accepted == [rec] and "X-Message-Id" in rec.response_headers
        assert [m["to_email"] for m in _activity(url, "m-1")] == ["ann@example.com",
                                                                  "bob@example.com"]
        # the client's resend is a second delivery, answered this time
        assert _send_mail(url, body).status_code == 202
        assert server.accepted_recipients()["ann@example.com"] == 2
        assert server.accepted_message_ids() == Counter({"m-1": 2, "m-2": 2})
        assert [r.outcome for r in server.received] == ["accept_timeout", "ok", "ok"]
    finally:
        server.stop()


def test_accept_timeout_closes_after_hang_or_answers_late():
    url, server = start("gateway", sequence=["accept_timeout"], hang_seconds=0.3)
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port))) as sock:
            sock.settimeout(5)
            t = time.perf_counter()
            sock.sendall(_post("/gateway/x", {"to": "1"}, host))
            assert _read_until_closed(sock) == b""
            assert time.perf_counter() - t >= 0.3
        # late_answer: the real answer after hang_seconds, then the connection goes on
        server.configure(sequence=["accept_timeout"], late_answer=True)
        with socket.create_connection((host, int(port))) as sock:
            sock.settimeout(5)
            t = time.perf_counter()
            sock.sendall(_post("/gateway/x", {"to": "2"}, host)
                         + _post("/gateway/x", {"to": "3"}, host))  # the second waits
            buffer = bytearray()
            status, _, body = _read_response(sock, buffer)
            assert time.perf_counter() - t >= 0.3
            assert (status, json.loads(body)["message"]["id"]) == (200, "gw-2")
            status, _, body = _read_response(sock, buffer)
            assert (status, json.loads(body)["message"]["id"]) == (200, "gw-3")
        assert [(r.outcome, r.status) for r in server.received] == [
            ("accept_timeout", 200), ("accept_timeout", 200), ("ok", 200)]
        assert server.accepted_recipients() == Counter({"1": 1, "2": 1, "3": 1})
    finally:
        server.stop()


def test_accept_drop_is_delivered_then_the_connection_closes():
    url, server = start("sendgrid", api_keys={SG_KEY}, sequence=["accept_drop"])
    try:
        with pytest.raises(requests.ConnectionError) as info:
            _send_mail(url, _mail((["Dee@example.com"], "m-3")))
        assert not isinstance(info.value, requests.Timeout)
        [rec] = server.received
        assert (rec.outcome, rec.status) == ("accept_drop", 202)
        assert server.accepted_recipients() == Counter({"dee@example.com": 1})
        assert server.accepted_message_ids() == Counter({"m-3": 1})
        assert [m["to_email"] for m in _activity(url, "m-3")] == ["dee@example.com"]
    finally:
        server.stop()


def test_accepted_fault_of_a_refused_request_is_not_counted():
    """The handler decides: a 400 (invalid address) withheld is still not accepted; a
    sandbox 200 is not a delivery; an injected 429 not processed."""
    url, server = start("sendgrid", api_keys={SG_KEY}, sequence=["accept_drop", "ok", 429])
    try:
        with pytest.raises(requests.ConnectionError):
            _send_mail(url, _mail((["not-an-address"], "m-4")))
        assert _send_mail(url, _mail((["eve@example.com"], "m-5"), sandbox=True)).status_code == 200
        assert _send_mail(url, _mail((["eve@example.com"], "m-6"))).status_code == 429
        assert [(r.outcome, r.status) for r in server.received] == [
            ("accept_drop", 400), ("ok", 200), (429, 429)]
        assert server.accepted_recipients() == Counter()
        assert server.accepted_message_ids() == Counter()
    finally:
        server.stop()


def test_accepted_faults_drawn_as_fractions_and_cleared():
    url, server = start("gateway", accept_drop_fraction=0.5, accept_timeout_fraction=0.5,
                        hang_seconds=0.1, seed=3)
    try:
        for i in range(6):
            with pytest.raises(requests.ConnectionError):  # held 0.1 s, closed before 0.5 s
                requests.post(f"{url}/gateway/x", json={"to": str(i)}, timeout=0.5)
        outcomes = [r.outcome for r in server.received]
        assert set(outcomes) == {"accept_drop", "accept_timeout"}
        assert server.accepted_recipients() == Counter({str(i): 1 for i in range(6)})
        server.clear()
        assert server.accepted_recipients() == Counter() and server.received == []
    finally:
        server.stop()
    with pytest.raises(ValueError, match="accept_timeout"):
        start("gateway", sequence=["accept_later"])


# --------------------------------------------------------------------------- activity lag

def _poll(condition, deadline_s: float = 5.0, every_s: float = 0.05):
    """`condition()`'s first truthy value before the deadline (None after it)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    return None


def test_activity_shows_a_send_after_the_lag_lower_cased():
    lag = 1.0
    url, server = start("sendgrid", api_keys={SG_KEY}, activity_lag_seconds=lag)
    try:
        t = time.monotonic()
        assert _send_mail(url, _mail((["Fay.Q@Example.COM"], "m-7"))).status_code == 202
        assert _activity(url, "m-7") == []
        assert time.monotonic() - t < lag  # the empty answer came before the lag was over
        found = _poll(lambda: _activity(url, "m-7"))
        assert time.monotonic() - t >= lag
        assert found is not None and [m["to_email"] for m in found] == ["fay.q@example.com"]
        assert server.accepted_recipients() == Counter({"fay.q@example.com": 1})
        server.configure(activity_lag_seconds=0.0)
        assert _send_mail(url, _mail((["gil@example.com"], "m-8"))).status_code == 202
        assert [m["to_email"] for m in _activity(url, "m-8")] == ["gil@example.com"]
    finally:
        server.stop()


def test_command_line_activity_lag():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "retention_dev.servers", "--port", "0",
         "--providers", "sendgrid", "--activity-lag-seconds", "0.5"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(root / "plugins")})
    try:
        line = proc.stdout.readline()
        assert " on http://" in line, line
        url = line.rsplit(" on ", 1)[1].strip()
        t = time.monotonic()
        assert _send_mail(url, _mail((["Hal@example.com"], "m-9"))).status_code == 202
        assert _activity(url, "m-9") == [] and time.monotonic() - t < 0.5
        found = _poll(lambda: _activity(url, "m-9"))
        assert found is not None and found[0]["to_email"] == "hal@example.com"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


# --------------------------------------------------------------------------- counting

def test_gateway_counts_address_and_message_id_paths():
    url, server = start("gateway", address_path="recipient.phone", message_id_path="meta.id",
                        address_field="recipient.phone", rejected_addresses={"+380009"},
                        sequence=["ok", 503, "accept_drop", "ok", "ok"])

    def send(phone: str, mid: str) -> requests.Response:
        return requests.post(f"{url}/gateway/sms", timeout=5,
                             json={"recipient": {"phone": phone}, "meta": {"id": mid}})
    try:
        assert send("+380001", "a").status_code == 200
        assert send("+380001", "a").status_code == 503  # injected: not processed
        with pytest.raises(requests.ConnectionError):
            send("+380001", "a")  # processed, the answer lost
        assert send("+380002", "b").status_code == 200
        assert send("+380009", "c").json()["status"] == "rejected"  # a 200 that refuses
        assert server.accepted_recipients() == Counter({"+380001": 2, "+380002": 1})
        assert server.accepted_message_ids() == Counter({"a": 2, "b": 1})
    finally:
        server.stop()
    # by default the address is at "to" and message ids are not counted
    url, server = start("gateway")
    try:
        requests.post(f"{url}/gateway/x", json={"to": "+380003", "id": "x"}, timeout=5)
        requests.post(f"{url}/gateway/x", data={"to": "+380003"}, timeout=5)  # a form
        assert server.accepted_recipients() == Counter({"+380003": 2})
        assert server.accepted_message_ids() == Counter()
    finally:
        server.stop()


def test_telegram_counts_chat_ids():
    token = "123456:local-bot"
    url, server = start("telegram", blocked_chat_ids={"13"}, sequence=["ok", "ok", "accept_drop"])
    try:
        base = f"{url}/bot{token}/sendMessage"
        assert requests.post(base, json={"chat_id": 42, "text": "a"}, timeout=5).json()["ok"]
        assert requests.post(base, data={"chat_id": "-100", "text": "b"}, timeout=5).json()["ok"]
        with pytest.raises(requests.ConnectionError):
            requests.get(base, params={"chat_id": "42", "text": "c"}, timeout=5)
        assert requests.post(base, json={"chat_id": 13, "text": "d"}, timeout=5).status_code == 403
        assert requests.post(f"{url}/bot{token}/getMe", timeout=5).status_code == 200
        assert server.accepted_recipients() == Counter({"42": 2, "-100": 1})
        assert server.accepted_message_ids() == Counter()
    finally:
        server.stop()


def _b64(value: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def test_fcm_counts_tokens_and_message_ids():
    url, server = start("fcm", project_id="p", unregistered_tokens={"gone"},
                        sequence=["ok", "accept_timeout", "ok", "ok", "ok"], hang_seconds=1)
    try:
        now = int(time.time())
        assertion = ".".join([_b64({"alg": "RS256", "typ": "JWT"}),
                              _b64({"iss": "a@p.iam.gserviceaccount.com", "aud": f"{url}/token",
                                    "iat": now, "exp": now + 3600,
                                    "scope": "https://www.googleapis.com/auth/firebase.messaging"}),
                              "c2ln"])
        access = requests.post(f"{url}/token", timeout=5, data={
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "assertion": assertion}).json()["access_token"]

        def send(token: str, mid: str, timeout: float = 5, **extra) -> requests.Response:
            return requests.post(f"{url}/v1/projects/p/messages:send", timeout=timeout,
                                 headers={"Authorization": f"Bearer {access}"},
                                 json={"message": {"token": token, "data": {"message_id": mid}},
                                       **extra})
        assert send("tok-1", "p-1").status_code == 200
        with pytest.raises(requests.ReadTimeout):
            send("tok-1", "p-1", timeout=0.3)
        assert send("tok-2", "p-2").status_code == 200
        assert send("tok-3", "p-3", validate_only=True).status_code == 200  # a dry run
        assert send("gone", "p-4").status_code == 404
        assert server.accepted_recipients() == Counter({"tok-1": 2, "tok-2": 1})
        assert server.accepted_message_ids() == Counter({"p-1": 2, "p-2": 1})
    finally:
        server.stop()


def test_handle_with_several_providers_counts_per_provider():
    base_url, handle = serve([SendGridProvider(api_keys={SG_KEY}), TelegramProvider()])
    try:
        assert _send_mail(base_url, _mail((["Ivy@example.com"], "m-10"))).status_code == 202
        requests.post(f"{base_url}/bot1:x/sendMessage", json={"chat_id": 7, "text": "hi"},
                      timeout=5)
        assert handle.accepted_recipients() == {"sendgrid": Counter({"ivy@example.com": 1}),
                                                "telegram": Counter({"7": 1})}
        assert handle.accepted_message_ids() == {"sendgrid": Counter({"m-10": 1}),
                                                 "telegram": Counter()}
        assert handle.providers["sendgrid"].accepted_recipients() == Counter({"ivy@example.com": 1})
    finally:
        handle.stop()
