"""A real Airflow 3.3 deployment for tests: api-server, scheduler and dag-processor.

`dag.test()` runs a DAG in-process and skips the scheduler, the executor, the Task SDK
supervisor and the execution API. Tests that must prove the scheduler path start an
`AirflowDeployment` instead: a private AIRFLOW_HOME, a fresh PostgreSQL metadata database,
LocalExecutor, `airflow api-server` on a free 127.0.0.1 port (its `/execution/` URL is the
tasks' execution API), `airflow scheduler` and `airflow dag-processor` as subprocesses, each
in its own process group, with logs in the home. Runs are triggered and watched through
the public REST API v2, authenticated as a user generated at test time (simple auth
manager; the password and the JWT secret are random per deployment and never logged).

Environment of the subprocesses: a copy of the test process's environment *without* any
`AIRFLOW*` or `RETENTION_*` variable (tests/conftest.py sets some at import time for
`dag.test()`), then the deployment's own `AIRFLOW__*` settings, then the caller's `env`,
which wins over everything (so a test may also override any Airflow setting).

By default the scheduler creates **only the runs you trigger**
(`[scheduler] use_job_schedule = False`): unpausing an `@hourly` DAG with `catchup=False`
would otherwise create a run for the latest hour at once, racing the test's own run.
Pass `scheduled_runs=True` for timetable- and Asset-triggered runs (e.g. a DAG scheduled on
the Assets an upstream DAG emits).

Usage from another test (the campaign cascade DAG, say)::

    import secrets, shutil
    from datetime import datetime, timezone

    import pytest

    from airflow_deployment import airflow_deployment  # noqa: F401  (the pytest fixture)

    @pytest.mark.scheduler
    def test_weekly_promo_cascade(airflow_deployment, database_url, tmp_path):  # noqa: F811
        dags = tmp_path / "dags"
        dags.mkdir()
        shutil.copy(ROOT / "dags" / "weekly_promo_cascade.py", dags)  # only the DAGs needed
        af = airflow_deployment(
            dags,
            env={   # the tasks' whole RETENTION_* world: nothing leaks in from the test process
                "RETENTION_DATABASE_URL": database_url,
                "RETENTION_WAIT_SCALE": "0.0001",
                "RETENTION_PROMO_SECRET": secrets.token_hex(16),  # generated, never committed
                # Airflow connections as URIs (or JSON), one env var per conn id:
                "AIRFLOW_CONN_RETENTION_SENDGRID": f"http://:{secrets.token_hex(8)}@127.0.0.1:{port}",
                # any Airflow setting can be overridden the same way:
                "AIRFLOW__CORE__PARALLELISM": "8",
            },
            pools={"sendgrid": 2, "fcm": 4, "telegram": 1},  # name -> slots, before any run
            dag_ids=["weekly_promo_cascade"],                # start() waits until parsed
        )
        run_id = af.trigger("weekly_promo_cascade",
                            logical_date=datetime(2026, 11, 2, tzinfo=timezone.utc))
        state = af.wait("weekly_promo_cascade", run_id, timeout=300)
        assert state == "success", af.report("weekly_promo_cascade", run_id)
        states = af.task_states("weekly_promo_cascade", run_id)   # {task_id: state}
        assert states["send_email"] == "success", af.report("weekly_promo_cascade", run_id)

Reschedule-mode sensors need nothing more; deferrable operators need `triggerer=True`.
`af.api(method, "/path below /api/v2", json=...)` reaches the rest of the REST API
(variables, connections, XComs, Asset events, ...).

The fixture stops every process (SIGTERM to each process group and to every descendant,
SIGKILL after a grace period) at teardown, also when the test fails, and prints the tails
of the component logs and task logs when the test failed (unless an assertion message
already carried `af.report(...)`). Components also get SIGTERM if the test process dies.
Without pytest, use the class as a context manager:
`with AirflowDeployment(dags, metadata_url, env, pools) as af: ...`.

Wall time on the shared 2-core machine: 20-30 s to start (migration, api-server import,
execution-API warm-up, first parse; `af.timings` records each milestone), then a few
seconds per task, and about 6 s to stop. Under heavy load (load average 5 on 2 cores)
it doubles, which the deadlines (start 240 s, wait 240 s, REST retries 120 s) absorb.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import psycopg
import pytest
import requests
import sqlalchemy as sa
from cryptography.fernet import Fernet

from retention_airflow.local import STOP_ORDER, stop_tree

ROOT = Path(__file__).resolve().parents[1]
PLUGINS_FOLDER = ROOT / "plugins"

TERMINAL_RUN_STATES = frozenset({"success", "failed"})
_API_USER = "tester"
_LOGS_HEADER = "===== Airflow deployment home"
_LIVE: set[AirflowDeployment] = set()


class AirflowDeploymentError(RuntimeError):
    """The deployment did not start, or a wait ran out; the message carries log tails."""


class ApiUnreachable(AirflowDeploymentError):
    """A REST call got no answer (timeout, refused connection)."""


def metadata_conn(url: str) -> str:
    """`postgresql://...` (any driver) -> the `postgresql+psycopg2://...` Airflow expects."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"the Airflow metadata database must be PostgreSQL, got {parsed.drivername}")
    return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM this component if the test process dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _killpg(pgid: int, sig: int) -> None:
    """Signal a component's process group if it still has members (a leader that exited
    and was reaped leaves its group behind; an empty group's number is not ours anymore)."""
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                break
        except (ProcessLookupError, psutil.Error):
            continue
    else:
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class _Component:
    name: str
    popen: subprocess.Popen
    log: Path


class AirflowDeployment:
    """A running Airflow: see the module docstring.

    `dags_folder` holds the DAG files (copy only the DAGs a test needs: every file is parsed);
    `metadata_url` is an empty PostgreSQL database (any `postgresql://` URL); `env` is added to
    the subprocesses' environment last; `pools` maps pool name -> slots (`default_pool` too).
    `dag_ids` are waited for at start; `home` defaults to a new temporary folder (removed at
    stop unless something failed); `triggerer=True` also starts `airflow triggerer` for
    deferrable operators.
    """

    def __init__(self, dags_folder: Path, metadata_url: str, env: Mapping[str, str] | None = None,
                 pools: Mapping[str, int] | None = None, *, dag_ids: Iterable[str] = (),
                 home: Path | None = None, scheduled_runs: bool = False, triggerer: bool = False,
                 start_timeout: float = 240.0, fast_commit: bool = True) -> None:
        self.dags_folder = Path(dags_folder).resolve()
        if not self.dags_folder.is_dir():
            raise ValueError(f"dags_folder {self.dags_folder} is not a folder")
        self.metadata_url = metadata_url
        self.metadata_conn = metadata_conn(metadata_url)
        self.extra_env = dict(env or {})
        self.pools = dict(pools or {})
        self.dag_ids = list(dag_ids)
        self._own_home = home is None
        self.home = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="airflow-deploy-"))
        self.scheduled_runs = scheduled_runs
        self.triggerer = triggerer
        self.start_timeout = start_timeout
        self.fast_commit = fast_commit
        self.port = free_port()
        self._log_ports = (free_port(), free_port())
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.components: list[_Component] = []
        self.failed = False
        self.reported = False  # report() was called: its text is in an assertion message
        #: seconds from start() to each milestone: "migrated", "api-server up",
        #: "execution api ready", "healthy", "dag <id>", and any the test adds with mark()
        self.timings: dict[str, float] = {}
        self._t0 = time.monotonic()
        self._session: requests.Session | None = None  # authenticated, after start()
        self._http = requests.Session()  # unauthenticated: health checks
        self._http.trust_env = False  # 127.0.0.1 never through a proxy
        self._password = secrets.token_urlsafe(24)
        # Generated per deployment, shared by all its components, never written to a log.
        self._secret_settings = {
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(48),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        }

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> AirflowDeployment:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not isinstance(exc, AirflowDeploymentError):
            self.failed = True
            sys.stderr.write(self.logs())
        self.stop()

    def environment(self) -> dict[str, str]:
        """The subprocesses' environment (contains secrets: never log it)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AIRFLOW", "RETENTION_"))}
        no_proxy = ",".join(filter(None, ["127.0.0.1", "localhost", env.get("NO_PROXY")]))
        env.update({
            "NO_PROXY": no_proxy, "no_proxy": no_proxy,
            "PYTHONUNBUFFERED": "1",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.metadata_conn,
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{_API_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self._passwords_file),
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__EXPOSE_CONFIG": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.home / "logs"),
            # The scheduler's and triggerer's log servers: free ports, so deployments (other
            # helpers', parallel sessions) never collide on the 8793/8794 defaults.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self._log_ports[0]),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self._log_ports[1]),
            # Fast loops: the DAG folder is listed every 5 s (a new file is parsed at once; a
            # parsed one again after 60 s, which spares CPU and metadata writes during a
            # test); heartbeats every second so health turns green quickly.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "60",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT": "120",
            "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "300",
            "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__STALE_DAG_THRESHOLD": "120",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(self.scheduled_runs),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "60",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
            # A loaded 2-core machine can stall the api-server for seconds: the task
            # supervisor waits up to 30 s per execution-API call (default 5 s) and retries.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
            "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": "8",
            **self._secret_settings,
        })
        env.update(self.extra_env)
        return env

    @property
    def _passwords_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json"

    def start(self) -> AirflowDeployment:
        self._t0 = time.monotonic()
        deadline = self._t0 + self.start_timeout
        self.home.mkdir(parents=True, exist_ok=True)
        # The API user's password, generated now; the api-server reads it, never prints it.
        fd = os.open(self._passwords_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({_API_USER: self._password}, fh)
        _LIVE.add(self)
        try:
            if self.fast_commit:
                self._relax_durability()
            self._run_cli(["db", "migrate"], "db-migrate", deadline)
            self.mark("migrated")
            self._spawn("api-server", ["api-server", "--host", "127.0.0.1",
                                       "--port", str(self.port), "--workers", "1"])
            self._spawn("scheduler", ["scheduler"])
            self._spawn("dag-processor", ["dag-processor"])
            if self.triggerer:
                self._spawn("triggerer", ["triggerer"])
            self._wait_healthy(deadline)
            self.mark("healthy")
            self._login()
            for name, slots in self.pools.items():
                self.set_pool(name, slots)
            for dag_id in self.dag_ids:
                self.wait_for_dag(dag_id, timeout=max(deadline - time.monotonic(), 1.0))
        except BaseException as exc:
            self.failed = True
            if _LOGS_HEADER not in str(exc):
                exc.add_note(self.logs())
            self.stop()
            raise
        return self

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process this deployment started (idempotent)."""
        _LIVE.discard(self)
        self._http.close()
        if self._session is not None:
            self._session.close()
            self._session = None
        roots: list[psutil.Process] = []
        for comp in self.components:
            if comp.popen.poll() is None:
                try:
                    roots.append(psutil.Process(comp.popen.pid))
                except psutil.NoSuchProcess:
                    pass
        # the product's shutdown: scheduler first (so it launches nothing more), then
        # what each component left behind ...
        order = {name: i for i, name in enumerate(STOP_ORDER)}
        stop_tree(sorted(roots, key=lambda r: order.get(self._name_of(r.pid), 9)), grace)
        # ... and the process groups (start_new_session), also of a component that died
        # earlier
        for comp in self.components:
            _killpg(comp.popen.pid, signal.SIGKILL)
        for comp in self.components:
            try:
                comp.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self._own_home and not self.failed:
            shutil.rmtree(self.home, ignore_errors=True)

    def _name_of(self, pid: int) -> str:
        return next((c.name for c in self.components if c.popen.pid == pid), "")

    def _relax_durability(self) -> None:
        """`synchronous_commit = off` on the (throwaway) metadata database: commits stop
        waiting for WAL flushes, which other tests' bulk loads can delay for many seconds."""
        name = sa.engine.make_url(self.metadata_url).database
        dsn = sa.engine.make_url(self.metadata_url).set(drivername="postgresql")
        with psycopg.connect(dsn.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute(f'alter database "{name}" set synchronous_commit = off')

    def mark(self, milestone: str) -> None:
        """Record the seconds since start() at `milestone` (first time only) in `timings`."""
        self.timings.setdefault(milestone, round(time.monotonic() - self._t0, 1))

    def _run_cli(self, args: list[str], name: str, deadline: float) -> None:
        log = self.home / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "airflow", *args], env=self.environment(),
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.home,
                                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            try:
                code = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
            except BaseException as exc:  # timeout, Ctrl-C: never leave it running
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if isinstance(exc, subprocess.TimeoutExpired):
                    raise AirflowDeploymentError(
                        f"`airflow {' '.join(args)}` did not finish in time\n{_tail(log, 60)}"
                    ) from None
                raise
        if code != 0:
            raise AirflowDeploymentError(
                f"`airflow {' '.join(args)}` exited with {code}\n{_tail(log, 60)}")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = self.home / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen([sys.executable, "-m", "airflow", *args], env=self.environment(),
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=self.home,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.components.append(_Component(name, popen, log))

    def _check_alive(self) -> None:
        for comp in self.components:
            code = comp.popen.poll()
            if code is not None:
                raise AirflowDeploymentError(
                    f"airflow {comp.name} exited with {code}\n{self.logs()}")

    def _wait_healthy(self, deadline: float) -> None:
        """Poll the health endpoint until the metadata database, scheduler and dag-processor
        (and triggerer) are healthy; warm the execution API as soon as the server answers."""
        last: Any = "no answer"
        while True:
            self._check_alive()
            try:
                resp = self._http.get(f"{self.base_url}/api/v2/monitor/health", timeout=30)
                if resp.ok:
                    if "execution api ready" not in self.timings:
                        self.mark("api-server up")
                        self._warm_execution_api(deadline)
                        self.mark("execution api ready")
                        continue
                    last = resp.json()
                    parts = ["metadatabase", "scheduler", "dag_processor"]
                    if self.triggerer:
                        parts.append("triggerer")
                    if all(last.get(part, {}).get("status") == "healthy" for part in parts):
                        return
                else:
                    last = f"HTTP {resp.status_code}"
            except requests.RequestException as exc:
                last = type(exc).__name__
            if time.monotonic() > deadline:
                raise AirflowDeploymentError(
                    f"Airflow not healthy within {self.start_timeout:.0f}s (last health: {last})\n"
                    f"{self.logs()}")
            time.sleep(0.5)

    def _warm_execution_api(self, deadline: float) -> None:
        """The api-server builds its execution API (`/execution/`) on the first request to it,
        blocking every other request meanwhile: seconds on an idle machine, more than the
        task supervisor's timeout on a loaded one, where the first task then fails to start.
        So make that first request here, before anything runs."""
        try:
            resp = self._http.get(f"{self.base_url}/execution/health",
                                  timeout=max(deadline - time.monotonic(), 1.0))
        except requests.RequestException as exc:
            raise AirflowDeploymentError(
                f"execution API did not answer: {type(exc).__name__}\n{self.logs()}") from exc
        if not resp.ok:
            raise AirflowDeploymentError(
                f"execution API health: HTTP {resp.status_code} {resp.text[:500]}\n{self.logs()}")

    def _login(self) -> None:
        session = requests.Session()
        session.trust_env = False
        resp = session.post(f"{self.base_url}/auth/token", timeout=30,
                            json={"username": _API_USER, "password": self._password})
        if resp.status_code not in (200, 201):
            raise AirflowDeploymentError(f"login failed: HTTP {resp.status_code} {resp.text[:500]}")
        session.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"
        self._session = session

    # ------------------------------------------------------------------ REST API v2

    def api(self, method: str, path: str, *, ok: Iterable[int] = (200, 201, 204),
            retry_for: float = 120.0, **kwargs) -> requests.Response:
        """Call the public API (`path` below `/api/v2`, e.g. "/pools"); raise unless `ok`.

        An idempotent call (GET, PUT, PATCH, DELETE) that times out or cannot connect is
        retried for up to `retry_for` seconds (a loaded machine can stall the api-server);
        a POST is sent once."""
        if self._session is None:
            raise AirflowDeploymentError("the deployment is not running")
        kwargs.setdefault("timeout", 60)
        deadline = time.monotonic() + retry_for
        while True:
            try:
                resp = self._session.request(method, f"{self.base_url}/api/v2{path}", **kwargs)
                break
            except (requests.ConnectionError, requests.Timeout) as exc:
                self._check_alive()
                if method.upper() == "POST" or time.monotonic() > deadline:
                    raise ApiUnreachable(
                        f"{method} /api/v2{path}: {type(exc).__name__}: {exc}") from exc
                time.sleep(1)
        if resp.status_code not in set(ok):
            raise AirflowDeploymentError(
                f"{method} /api/v2{path} -> HTTP {resp.status_code}: {resp.text[:2000]}")
        return resp

    def set_pool(self, name: str, slots: int) -> None:
        path = f"/pools/{quote(name, safe='')}"
        if self.api("GET", path, ok=(200, 404)).status_code == 200:  # default_pool
            self.api("PATCH", path, json={"slots": slots}, params={"update_mask": ["slots"]})
        else:
            self.api("POST", "/pools", json={"name": name, "slots": slots, "description": "test pool",
                                             "include_deferred": False})

    def import_errors(self) -> list[dict]:
        return self.api("GET", "/importErrors", params={"limit": 100}).json()["import_errors"]

    def wait_for_dag(self, dag_id: str, timeout: float = 120.0) -> dict:
        """Poll until the dag-processor has serialized `dag_id`; fail fast on import errors."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            resp = self.api("GET", f"/dags/{quote(dag_id, safe='')}", ok=(200, 404))
            if resp.status_code == 200:
                self.mark(f"dag {dag_id}")
                return resp.json()
            errors = self.import_errors()
            if errors:
                text = "\n\n".join(f"{e['filename']}:\n{e['stack_trace']}" for e in errors)
                raise AirflowDeploymentError(f"DAG import errors (waiting for {dag_id}):\n{text}")
            if time.monotonic() > deadline:
                raise AirflowDeploymentError(
                    f"DAG {dag_id} not parsed within {timeout:.0f}s\n{self.logs()}")
            time.sleep(0.5)

    def trigger(self, dag_id: str, logical_date: datetime | str | None = None,
                conf: Mapping[str, Any] | None = None, *, run_id: str | None = None) -> str:
        """Unpause `dag_id` and create a manual run through the REST API; return its run id."""
        self.wait_for_dag(dag_id)
        self.api("PATCH", f"/dags/{quote(dag_id, safe='')}", json={"is_paused": False})
        if isinstance(logical_date, datetime):
            if logical_date.tzinfo is None:
                raise ValueError("logical_date must be timezone-aware")
            logical_date = logical_date.isoformat()
        # Our own run id, so a POST whose answer is lost can be checked instead of repeated.
        run_id = run_id or f"test__{datetime.now().strftime('%Y%m%dT%H%M%S')}_{secrets.token_hex(3)}"
        body = {"dag_run_id": run_id, "logical_date": logical_date, "conf": dict(conf or {})}
        path = f"/dags/{quote(dag_id, safe='')}/dagRuns"
        try:
            return self.api("POST", path, json=body).json()["dag_run_id"]
        except ApiUnreachable:
            pass
        if self.api("GET", f"{path}/{quote(run_id, safe='')}", ok=(200, 404)).status_code == 404:
            return self.api("POST", path, json=body).json()["dag_run_id"]
        return run_id

    def run(self, dag_id: str, run_id: str) -> dict:
        """The DAG run as the REST API returns it (state, data_interval_end, conf, ...)."""
        return self.api("GET", f"/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}").json()

    def wait(self, dag_id: str, run_id: str, timeout: float = 240.0,
             states: Iterable[str] = TERMINAL_RUN_STATES) -> str:
        """Poll the run until its state is one of `states`; return it. Raise with the task
        states and log tails if `timeout` seconds pass or a component dies."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            state = self.run(dag_id, run_id)["state"]
            if state in wanted:
                return state
            if time.monotonic() > deadline:
                self.failed = True
                raise AirflowDeploymentError(
                    f"run {dag_id}/{run_id} still {state!r} after {timeout:.0f}s\n"
                    f"{self.report(dag_id, run_id)}")
            time.sleep(1.0)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        path = f"/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}/taskInstances"
        return self.api("GET", path, params={"limit": 1000}).json()["task_instances"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """task_id -> state; a mapped task's instances are keyed `task_id[map_index]`."""
        return {(ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['map_index']}]"):
                ti["state"] for ti in self.task_instances(dag_id, run_id)}

    # ------------------------------------------------------------------ diagnostics

    def task_logs(self, dag_id: str | None = None, run_id: str | None = None,
                  lines: int = 40) -> str:
        """Tails of the task log files (of one run if given), newest attempt last."""
        root = self.home / "logs"
        pattern = f"dag_id={dag_id or '*'}/run_id={run_id or '*'}/task_id=*/**/*.log"
        files = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
        return "".join(f"\n----- task log {p.relative_to(root)} (last {lines} lines)\n"
                       f"{_tail(p, lines)}\n" for p in files)

    def logs(self, lines: int = 40) -> str:
        """Tails of the component logs (api-server, scheduler, dag-processor, ...)."""
        out = [f"\n{_LOGS_HEADER}: {self.home}; seconds since start: {self.timings}"]
        for comp in self.components:
            state = comp.popen.poll()
            out.append(f"\n----- {comp.name} ({'running' if state is None else f'exit {state}'}), "
                       f"last {lines} lines of {comp.log}\n{_tail(comp.log, lines)}")
        return "\n".join(out) + "\n"

    def report(self, dag_id: str, run_id: str) -> str:
        """Run state, task states and log tails: for assertion messages."""
        self.reported = True
        try:
            run = self.run(dag_id, run_id)
            head = (f"run {dag_id}/{run_id}: {run['state']}; "
                    f"tasks: {self.task_states(dag_id, run_id)}")
        except Exception as exc:  # the report must not hide the original failure
            head = f"run {dag_id}/{run_id}: <cannot read: {exc}>"
        return f"{head}\n{self.task_logs(dag_id, run_id)}{self.logs()}"


@atexit.register
def _stop_leftovers() -> None:  # a crashed test session must not leave servers behind
    for deployment in list(_LIVE):
        deployment.stop(grace=5)


@pytest.fixture()
def airflow_deployment(make_database, tmp_path, request) -> Iterator[Callable[..., AirflowDeployment]]:
    """Factory fixture: `airflow_deployment(dags_folder, env=None, pools=None, **kw)` starts an
    `AirflowDeployment` on a fresh metadata database (from `make_database`) and returns it
    running; all are stopped at teardown, with log tails printed if the test failed."""
    started: list[AirflowDeployment] = []
    failed_before = request.session.testsfailed

    def start(dags_folder: Path, env: Mapping[str, str] | None = None,
              pools: Mapping[str, int] | None = None, **kwargs) -> AirflowDeployment:
        kwargs.setdefault("home", tmp_path / f"airflow-{len(started)}")
        deployment = AirflowDeployment(dags_folder, make_database("airflow"), env, pools, **kwargs)
        started.append(deployment)
        return deployment.start()

    try:
        yield start
    finally:
        test_failed = request.session.testsfailed > failed_before
        for deployment in started:
            if test_failed and not (deployment.failed or deployment.reported):
                with _uncaptured(request):
                    sys.stderr.write(deployment.task_logs() + deployment.logs())
            deployment.stop()


@contextmanager
def _uncaptured(request):
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        yield
    else:
        with capture.global_and_fixture_disabled():
            yield
