"""The local provider servers' HTTP layer (one asyncio event loop): keep-alive, requests
pipelined on one connection answered in order after their latency, concurrent latency,
malformed and chunked requests, held ("timeout") requests released by stop."""

from __future__ import annotations

import json
import socket
import threading
import time

import requests

from retention.providers.local_servers import start


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
        assert len(server.received) == 40
    finally:
        server.stop()


def test_malformed_chunked_unknown_and_unsupported():
    url, server = start("gateway")
    host, port = url.removeprefix("http://").split(":")
    try:
        for raw, status in ((b"NONSENSE\r\n\r\n", 400),
                            (b"POST /gateway/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"2\r\n{}\r\n0\r\n\r\n", 411),
                            (b"DELETE /gateway/x HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 501),
                            (b"GET /nowhere HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 404)):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(raw)
                assert _read_response(sock, bytearray())[0] == status, raw
        assert requests.post(f"{url}/gateway/x", json={"to": "1"}, timeout=5).status_code == 200
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
    chunks, an extension, a trailer), an answer with Connection: close (then closed), a
    connection closed without an answer."""
    url, server = start("gateway", sequence=["chunked", "close", "drop"])
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(_post("/gateway/x", {"to": "1"}, host))
            buffer = bytearray()
            while not buffer.endswith(b"0\r\nX-Trailer: 1\r\n\r\n"):
                chunk = sock.recv(65536)
                assert chunk, "closed before the last chunk"
                buffer += chunk
            head, _, body = bytes(buffer).partition(b"\r\n\r\n")
            assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
            assert body.split(b"\r\n")[0] == b"7" and b"7;ext=1\r\n" in body
            decoded, rest = b"", body
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    break
                decoded, rest = decoded + rest[:size], rest[size + 2:]
            assert json.loads(decoded)["message"]["id"] == "gw-1"
            # the connection is kept: the next answer comes on it, then it is closed
            sock.sendall(_post("/gateway/x", {"to": "2"}, host))
            answer = _read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close\r\n" in answer
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
