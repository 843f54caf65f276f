"""PostgreSQL restarted mid-wave: the run fails cleanly or carries on; nothing is doubled.

Each case gets a PostgreSQL server of its own (the pgserver package's binaries, a
cluster in a temporary folder, a free TCP port on 127.0.0.1, password authentication),
so that it can be crashed and started again without touching the shared test server.
A dispatcher process sends a wave to a slow provider stand-in (800 ms per request); once
the provider has accepted at least one batch the server is stopped with
`pg_ctl stop -m immediate` (every backend killed, crash recovery at the next start) and
started again. The dispatcher either exits non-zero with a database connection error
(no password, no recipient address in what it printed) or finishes; then the step is run
again until nothing is left planned or claimed. The judge is the provider (`faults.tally`):
every recipient accepted exactly once, none twice, none lost, the ledger agreeing with
the provider; a push whose answer was lost with the database stays `unknown` (accepted
once, never resent), an e-mail is looked up at the activity API and recorded `sent`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time as clock
import warnings
from pathlib import Path

import psycopg
import pytest

from faults import PROVIDER_OF, dispatcher_process, make_shop, plan, result_of, tally, wait_for
from retention import db
from retention_dev.stack import local_provider_stack
from retention.db.schema import ensure_schemas

# one after another on one pytest-xdist worker: a private PostgreSQL cluster restarted
# mid-send
pytestmark = pytest.mark.xdist_group("serial")



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnServer:
    """A PostgreSQL 16 cluster in `folder`, run as `user` when the tests run as root
    (postgres refuses to run as root; pgserver does the same with its `pgserver` user)."""

    def __init__(self, folder: Path, user: str | None) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH  # type: ignore[attr-defined]

        self.bin = POSTGRES_BIN_PATH
        self.folder = folder
        self.data = folder / "data"
        self.log = folder / "server.log"
        self.user = user
        self.port = _free_port()
        self.password = secrets.token_urlsafe(18)
        self.url = (f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/"
                    "retention_restart")

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        done = subprocess.run([str(self.bin / tool), *args], user=self.user, cwd=self.folder,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}): "
                               f"{done.stdout}{done.stderr}\n--- server log ---\n{log}")

    def init(self) -> None:
        pwfile = self.folder / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.user:
            shutil.chown(pwfile, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--encoding=utf8",
                  "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
        pwfile.unlink()

    def start(self) -> None:
        # fsync off: an immediate stop kills the server's processes, not the machine, so
        # what was written is in the OS cache; synchronous_commit stays on (a commit is
        # in the WAL file before the client hears of it)
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} "
                   "-c fsync=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


@pytest.fixture()
def own_server(monkeypatch):
    """A server of this test's own with the raw and ops schemas in a fresh database;
    RETENTION_DATABASE_URL points at it. Stopped and deleted at teardown."""
    user = None
    with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR at import
        warnings.simplefilter("ignore")
        import pgserver  # noqa: F401
    if os.geteuid() == 0:
        import stat

        from pgserver._commands import POSTGRES_BIN_PATH  # type: ignore[attr-defined]
        from pgserver.utils import (ensure_folder_permissions, ensure_prefix_permissions,
                                    ensure_user_exists)

        user = "pgserver"
        ensure_user_exists(user)
        # as pgserver does: the user must reach and run the binaries and their libraries
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, stat.S_IRGRP | stat.S_IROTH
                                  | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib",
                                  stat.S_IRGRP | stat.S_IROTH)
    folder = Path(tempfile.mkdtemp(prefix="retention-pg-restart-"))  # /tmp: traversable
    if user:
        shutil.chown(folder, user)
    server = OwnServer(folder, user)
    try:
        server.init()
        server.start()
        admin = server.url.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("create database retention_restart")
        with db.connect(server.url) as conn:
            ensure_schemas(conn)
        monkeypatch.setenv("RETENTION_DATABASE_URL", server.url)
        yield server
    finally:
        if server.running():
            try:
                server.stop("immediate")
            except Exception:  # noqa: BLE001 - the folder goes anyway
                pass
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture()
def slow_stack(monkeypatch):
    """The local providers at 800 ms a request; an e-mail's activity shows after 1 s."""
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    with local_provider_stack(latency_ms=800, activity_lag_seconds=1.0) as (handle, env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield handle, env


def _total_accepted(handle, channel: str) -> int:
    return sum(handle.providers[PROVIDER_OF[channel]].accepted_recipients().values())


def _is_connection_error(stderr: str) -> bool:
    """The traceback's final exception is psycopg's OperationalError or a subclass
    (AdminShutdown, CannotConnectNow, ...): the database connection was lost."""
    lines = [line for line in stderr.splitlines() if line.startswith("psycopg.")]
    if not lines:
        return False
    name = lines[-1].split(":", 1)[0]
    module_name, _, class_name = name.rpartition(".")
    module = {"psycopg": psycopg, "psycopg.errors": psycopg.errors}.get(module_name)
    cls = getattr(module, class_name, None)
    return isinstance(cls, type) and issubclass(cls, psycopg.OperationalError)


def _ledger(url: str) -> dict:
    with db.connect(url, autocommit=True) as conn:
        return dict(conn.execute("""
            select case when m.status = 'planned' and m.claim_token is not null
                          then 'planned claimed' || case when c.sending_at is not null
                                                         then ' sending' else '' end
                        else m.status end, count(*)
            from ops.messages m left join ops.claims c on c.claim_token = m.claim_token
            group by 1""").fetchall())


def _second_request_out(url: str, batch: int) -> bool:
    """The first batch is recorded sent and the next claim is marked as going out."""
    try:
        counts = _ledger(url)
    except psycopg.OperationalError:
        return False
    return counts.get("sent", 0) >= batch and counts.get("planned claimed sending", 0) > 0


@pytest.mark.parametrize("moment", ["first_batch_accepted", "second_request_on_the_wire"])
@pytest.mark.parametrize("channel, n, batch", [("email", 4000, 1000),
                                              ("mobile_push", 2000, 500)])
def test_postgres_restarted_mid_wave(own_server, slow_stack, channel, n, batch, moment):
    """`first_batch_accepted`: the crash comes as soon as the provider has taken the first
    batch (racing the dispatcher's recording of it). `second_request_on_the_wire`: the
    first batch is recorded and the second request is at the provider when the server
    goes; its answer comes back to a dead database session."""
    handle, env = slow_stack
    url = own_server.url
    make_shop(url, n)
    campaign, _ = plan(url, channel)
    started = clock.monotonic()
    victim = dispatcher_process(url, env, channel)
    if moment == "first_batch_accepted":
        wait_for(lambda: victim.poll() is not None or _total_accepted(handle, channel) >= batch,
                  "the provider to accept the first batch")
    else:
        wait_for(lambda: victim.poll() is not None or _second_request_out(url, batch),
                  "the second request to go out")
    assert victim.poll() is None, victim.communicate()  # still mid-wave
    accepted_at_crash = _total_accepted(handle, channel)
    own_server.stop("immediate")
    own_server.start()
    try:
        out, err = victim.communicate(timeout=90)  # a hang is a failure, not a wait
    except subprocess.TimeoutExpired:
        victim.kill()
        out, err = victim.communicate()
        pytest.fail(f"the dispatcher hung after the restart: {err[-3000:]}")
    if victim.returncode != 0:
        # a clean failure: the database connection, said so; neither the database URL
        # (its password) nor a recipient's address in what the process printed
        assert _is_connection_error(err), err[-3000:]
        for text in (out, err):
            assert own_server.password not in text and "postgresql://" not in text
            assert "@example.com" not in text.lower() and "token-" not in text, text[-3000:]
    first = {"returncode": victim.returncode, "accepted_at_crash": accepted_at_crash,
             "ledger_after_crash": _ledger(url), "error": [line for line in err.splitlines() if line.startswith("psycopg.")][-1:]}
    print(f"\nFIRST DISPATCHER {channel}/{moment}: {first}")

    # run the step again until nothing is planned or claimed (the dead dispatcher's
    # claims settle once its lease ran out: 2 s in the tests)
    runs = []
    for _ in range(5):
        counts = _ledger(url)
        if not any(k.startswith("planned") for k in counts) and not (
                channel == "email" and counts.get("unknown")):
            break
        runs.append(result_of(dispatcher_process(url, env, channel), timeout=120))
    print(f"RERUNS {channel}/{moment}: {runs}")
    final = _ledger(url)
    assert not any(k.startswith("planned") for k in final), final

    t = tally(handle, url, campaign.id, channel)
    assert t["recipients"] == n
    assert t["accepted_twice"] == 0 and t["lost"] == 0 and t["ledger_disagrees"] == 0
    assert t["accepted_once"] == n
    assert _total_accepted(handle, channel) == n  # nothing sent beyond the audience
    if channel == "email":
        assert t["statuses"] == {"sent": n}  # lost answers looked up at the activity API
    else:
        assert set(t["statuses"]) <= {"sent", "unknown"}
        assert t["statuses"].get("unknown", 0) <= batch  # at most the batch on the wire
    # one more run changes nothing at the provider
    before = _total_accepted(handle, channel)
    again = result_of(dispatcher_process(url, env, channel))
    assert again["messages"] == 0 and _total_accepted(handle, channel) == before
    print(f"ELAPSED {channel}/{moment}: {clock.monotonic() - started:.1f} s")
