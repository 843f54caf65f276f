"""A real Airflow 3.3 deployment for tests: the product's `LocalAirflow` in a private home.

`dag.test()` runs a DAG in-process and skips the scheduler, the executor, the Task SDK
supervisor and the execution API. Tests that must prove the scheduler path start an
`AirflowDeployment` instead: `retention_airflow.local.LocalAirflow(home=...,
dags_folder=...).up(...)`, what `retention airflow up` runs (api-server on a free 127.0.0.1
port, scheduler, dag-processor, LocalExecutor, the pools, the simple auth manager's user with
a password and a JWT secret generated per home and never logged), on a fresh PostgreSQL
metadata database, without the triggerer unless `triggerer=True` (deferrable operators), and
attached to the test process (its components get SIGTERM if it dies). Runs are triggered and
watched through the REST API v2 with the product's `AirflowClient`.

What the tests add to it:

* the subprocesses' environment starts from a copy of the test process's *without* any
  `AIRFLOW*` or `RETENTION_*` variable (tests/conftest.py sets some at import time for
  `dag.test()`); then come LocalAirflow's settings (RETENTION_HOME the test process's
  home), `TEST_SETTINGS` (fast loops, patient execution-API calls) and the caller's `env`,
  which wins over everything (so a test may also override any Airflow setting);
* by default the scheduler creates **only the runs you trigger**
  (`[scheduler] use_job_schedule = False`): unpausing an `@hourly` DAG with `catchup=False`
  would otherwise create a run for the latest hour at once, racing the test's own run. Pass
  `scheduled_runs=True` for timetable- and Asset-triggered runs;
* `synchronous_commit = off` on the throwaway metadata database (`fast_commit`);
* idempotent REST calls retried while the api-server does not answer (a loaded machine can
  stall it); a POST is sent once, a trigger whose answer was lost is looked up first.

Usage from another test (the campaign cascade DAG, say)::

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
                "RETENTION_PROMO_SECRET": secrets.token_hex(16),  # generated, never committed
                # Airflow connections as URIs (or JSON), one env var per conn id:
                "AIRFLOW_CONN_RETENTION_SENDGRID": f"http://:{secrets.token_hex(8)}@127.0.0.1:{port}",
                "AIRFLOW__CORE__PARALLELISM": "8",  # any Airflow setting, the same way
            },
            pools={"sendgrid": 2, "fcm": 4, "telegram": 1},  # name -> slots, before any run
            dag_ids=["weekly_promo_cascade"],                # start() waits until parsed
        )
        run_id = af.trigger("weekly_promo_cascade",
                            logical_date=datetime(2026, 11, 2, tzinfo=timezone.utc))
        state = af.wait("weekly_promo_cascade", run_id, timeout=300)
        assert state == "success", af.report("weekly_promo_cascade", run_id)
        states = af.task_states("weekly_promo_cascade", run_id)   # {task_id: state}

`af.api(method, "/path below /api/v2", json=...)` reaches the rest of the REST API
(variables, connections, XComs, Asset events, ...); `af.client` is the `AirflowClient`,
`af.local` the `LocalAirflow`.

The fixture stops every process (`LocalAirflow.down`) at teardown, also when the test
fails, and prints the tails of the component logs and task logs when the test failed
(unless an assertion message already carried `af.report(...)`); so does an exit of the test
process. Without pytest, use the class as a context manager:
`with AirflowDeployment(dags, metadata_url, env, pools) as af: ...`.

Wall time on the shared 2-core machine: 20-30 s to start (`af.timings` records each
milestone), then a few seconds per task, and a few seconds to stop. Under heavy load it
doubles, which the deadlines (start 240 s, wait 240 s, REST retries 120 s) absorb.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
import requests
import sqlalchemy as sa

from retention_airflow.client import RUN_DONE, AirflowClient
from retention_airflow.local import LocalAirflow, free_port

__all__ = ["AirflowDeployment", "AirflowDeploymentError", "airflow_deployment", "free_port"]

TERMINAL_RUN_STATES = RUN_DONE
_LOGS_HEADER = "===== Airflow deployment home"
_LIVE: set[AirflowDeployment] = set()

#: Airflow settings of every test deployment, before the test's own `env`.
TEST_SETTINGS = {
    "AIRFLOW__CORE__PARALLELISM": "4",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    # Fast loops: the DAG folder is listed every 5 s (a new file is parsed at once; a parsed
    # one again after 60 s, which spares CPU and metadata writes during a test); heartbeats
    # every second so health turns green quickly.
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
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "60",
    "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
    "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
    # A loaded 2-core machine can stall the api-server for seconds: the task supervisor
    # waits up to 30 s per execution-API call (default 5 s) and retries.
    "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
    "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": "8",
}


class AirflowDeploymentError(RuntimeError):
    """A wait ran out or a component died; the message carries log tails."""


def _q(part: str) -> str:
    return quote(part, safe="")


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


class AirflowDeployment:
    """A running Airflow: see the module docstring.

    `dags_folder` holds the DAG files (copy only the DAGs a test needs: every file is parsed);
    `metadata_url` is an empty PostgreSQL database (any `postgresql://` URL); `env` is added to
    the subprocesses' environment last; `pools` maps pool name -> slots (`default_pool` too).
    `dag_ids` are waited for at start; `home` defaults to a new temporary folder (removed at
    stop unless something failed).
    """

    def __init__(self, dags_folder: Path, metadata_url: str, env: Mapping[str, str] | None = None,
                 pools: Mapping[str, int] | None = None, *, dag_ids: Iterable[str] = (),
                 home: Path | None = None, scheduled_runs: bool = False, triggerer: bool = False,
                 start_timeout: float = 240.0, fast_commit: bool = True) -> None:
        self.dags_folder = Path(dags_folder).resolve()
        if not self.dags_folder.is_dir():
            raise ValueError(f"dags_folder {self.dags_folder} is not a folder")
        self.metadata_url = metadata_url
        self.env = {**TEST_SETTINGS, "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(scheduled_runs),
                    **(env or {})}
        self.pools = dict(pools or {})
        self.dag_ids = list(dag_ids)
        self._own_home = home is None
        self.home = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="airflow-deploy-"))
        self.triggerer = triggerer
        self.start_timeout = start_timeout
        self.fast_commit = fast_commit
        self.local = LocalAirflow(home=self.home, out=lambda line: None,
                                  dags_folder=self.dags_folder)
        self.client: AirflowClient | None = None  # logged in, after start()
        self.failed = False
        self.reported = False  # report() was called: its text is in an assertion message
        #: seconds from start() to each milestone: LocalAirflow's ("migrated", "execution
        #: api ready", "healthy", "parsed"), "dag <id>", and any the test adds with mark()
        self.timings = self.local.timings
        self._t0 = time.monotonic()

    @property
    def base_url(self) -> str | None:
        return self.local.base_url

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> AirflowDeployment:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not isinstance(exc, AirflowDeploymentError):
            self.failed = True
            sys.stderr.write(self.logs())
        self.stop()

    def _base_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "RETENTION_"))}

    def environment(self) -> dict[str, str]:
        """The components' environment, once started (contains secrets: never log it)."""
        return self.local.environment(self.metadata_url, self.env, self._base_env())

    def start(self) -> AirflowDeployment:
        _LIVE.add(self)
        try:
            if self.fast_commit:
                self._relax_durability()
            self._t0 = time.monotonic()
            self.local.up(port=free_port(), metadata=self.metadata_url, env=self.env,
                          timeout=self.start_timeout, triggerer=self.triggerer,
                          base_env=self._base_env(), attached=True)
            self.client = AirflowClient.local(self.local)
            self.client.login()
            for name, slots in self.pools.items():
                self.set_pool(name, slots)
            for dag_id in self.dag_ids:
                self.wait_for_dag(dag_id, max(self._t0 + self.start_timeout - time.monotonic(), 1))
        except BaseException as exc:
            self.failed = True
            if "\n----- " not in str(exc):  # LocalAirflow's errors carry the log tails
                exc.add_note(self.logs())
            self.stop()
            raise
        return self

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process this deployment started (idempotent)."""
        _LIVE.discard(self)
        if self.client is not None:
            self.client.http.close()
            self.client = None
        self.local.down(grace, quiet=True)
        if self._own_home and not self.failed:
            shutil.rmtree(self.home, ignore_errors=True)

    def _relax_durability(self) -> None:
        """`synchronous_commit = off` on the (throwaway) metadata database: commits stop
        waiting for WAL flushes, which other tests' bulk loads can delay for many seconds."""
        url = sa.engine.make_url(self.metadata_url)
        with psycopg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False),
                             autocommit=True) as conn:
            conn.execute(f'alter database "{url.database}" set synchronous_commit = off')

    def mark(self, milestone: str) -> None:
        """Record the seconds since start() at `milestone` (first time only) in `timings`."""
        self.timings.setdefault(milestone, round(time.monotonic() - self._t0, 1))

    def _check_alive(self) -> None:
        gone = [c for c, pid in self.local.status().items() if pid is None]
        if gone:
            raise AirflowDeploymentError(f"airflow {', '.join(gone)} exited\n{self.logs()}")

    # ------------------------------------------------------------------ REST API v2

    def api(self, method: str, path: str, *, ok: Iterable[int] = (200, 201, 204),
            retry_for: float = 120.0, **kwargs) -> requests.Response:
        """Call the public API (`path` below `/api/v2`, e.g. "/pools"); raise unless `ok`.

        An idempotent call (GET, PUT, PATCH, DELETE) that times out or cannot connect is
        retried for up to `retry_for` seconds; a POST is sent once."""
        if self.client is None:
            raise AirflowDeploymentError("the deployment is not running")
        deadline = time.monotonic() + retry_for
        while True:
            try:
                return self.client.request(method, path, ok=tuple(ok), **kwargs)
            except (requests.ConnectionError, requests.Timeout):
                self._check_alive()
                if method.upper() == "POST" or time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def set_pool(self, name: str, slots: int) -> None:
        path = f"/pools/{_q(name)}"
        found = self.api("GET", path, ok=(200, 404))
        if found.status_code == 200:  # default_pool, a provider's pool
            self.api("PATCH", path, params={"update_mask": ["slots"]}, json={
                "pool": name, "slots": slots, "include_deferred": found.json()["include_deferred"]})
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
            resp = self.api("GET", f"/dags/{_q(dag_id)}", ok=(200, 404))
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
        self.api("PATCH", f"/dags/{_q(dag_id)}", json={"is_paused": False})
        if isinstance(logical_date, str):
            logical_date = datetime.fromisoformat(logical_date)
        # Our own run id, so a POST whose answer is lost can be checked instead of repeated.
        run_id = run_id or f"test__{datetime.now().strftime('%Y%m%dT%H%M%S')}_{secrets.token_hex(3)}"
        for _ in range(2):
            try:
                return self.client.trigger(dag_id, run_id, logical_date=logical_date,
                                           conf=dict(conf or {})).run_id
            except (requests.ConnectionError, requests.Timeout):
                found = self.api("GET", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}", ok=(200, 404))
                if found.status_code == 200:
                    return run_id
        raise AirflowDeploymentError(f"{dag_id}: no answer to two triggers of {run_id}")

    def run(self, dag_id: str, run_id: str) -> dict:
        """The DAG run as the REST API returns it (state, data_interval_end, conf, ...)."""
        return self.api("GET", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}").json()

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
        path = f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances"
        return self.api("GET", path, params={"limit": 1000}).json()["task_instances"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """task_id -> state; a mapped task's instances are keyed `task_id[map_index]`."""
        return {(ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['map_index']}]"):
                ti["state"] for ti in self.task_instances(dag_id, run_id)}

    # ------------------------------------------------------------------ diagnostics

    def task_logs(self, dag_id: str | None = None, run_id: str | None = None,
                  lines: int = 40) -> str:
        """Tails of the task log files (of one run if given), newest attempt last."""
        root = self.local.logs_dir
        pattern = f"dag_id={dag_id or '*'}/run_id={run_id or '*'}/task_id=*/**/*.log"
        files = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
        return "".join(f"\n----- task log {p.relative_to(root)} (last {lines} lines)\n"
                       f"{_tail(p, lines)}\n" for p in files)

    def logs(self, lines: int = 40) -> str:
        """Tails of the component logs (db-migrate, api-server, scheduler, ...)."""
        running = {c: "running" if pid else "gone" for c, pid in self.local.status().items()}
        return (f"\n{_LOGS_HEADER}: {self.home}; seconds since start: {self.timings}; "
                f"components: {running}\n{self.local.logs(lines)}")

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
