"""A uvicorn server on a socket bound before its loop runs (so connections queue from
the start and port 0 gives a free port), run on a thread of this process: the webhook
receiver's `serve_in_thread` and the development stand-ins use it."""

from __future__ import annotations

import socket
import threading

import uvicorn


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def start_in_thread(server: uvicorn.Server, sock: socket.socket, *, name: str,
                    what: str) -> threading.Thread:
    """Run `server` on `sock` in a daemon thread; return once it accepts connections.
    `server` sets its `ready` event (a threading.Event) when started; a server that
    fails to start raises RuntimeError naming `what`, with the cause."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            failure.append(exc)
        finally:
            server.ready.set()  # type: ignore[attr-defined]
            sock.close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    server.ready.wait(30)  # type: ignore[attr-defined]
    if failure or not server.started:
        server.should_exit = True
        thread.join(5)
        raise RuntimeError(f"{what} did not start") from (failure[0] if failure else None)
    return thread
