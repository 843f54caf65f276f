"""A local Airflow 3.3 on this machine, started and stopped by `retention airflow up|down|status`.

`up` runs, each as its own `airflow` subprocess in its own session so it outlives the command:
`api-server`, `scheduler`, `dag-processor` and `triggerer`, with the LocalExecutor, or with
`executor="celery"` (`retention airflow up --executor celery --workers 2`) the production
shape of docker-compose.yaml on one machine: the CeleryExecutor and N Celery workers
(`airflow celery worker --celery-hostname worker-<i>@<host>`, components `worker-1` ..
`worker-N`, each serving its task logs on a port of its own), the broker a Redis database
(`broker_url`, default `redis://127.0.0.1:6379/0`; `.ci/run` starts a Redis where none
answers), the Celery result backend the metadata database. And:

* AIRFLOW_HOME `RETENTION_HOME/airflow` (`home()`), component and task logs in its `logs/`,
  one PID file per component in its `run/`;
* dags_folder the repository's `dags/` (or `dags_folder`), plugins_folder its `plugins/`;
* the metadata database `airflow_meta` (`METADATA_DATABASE`) on the PostgreSQL server the
  pipeline uses (`retention.db.database_url()`: RETENTION_DATABASE_URL's server or the
  embedded one), created when missing and migrated with `airflow db migrate`;
* the per-provider pools the campaign DAGs send in (`provider_pools()`, derived from
  `retention_airflow.campaign_dag.PROVIDER_POOLS`), created when missing;
* the simple auth manager with one user, `admin`, whose password is generated on the first
  `up` into `home()/simple_auth_manager_passwords.json` (mode 0600; never printed);
* the JWT secret, API secret key and Fernet key generated on the first `up` into
  `home()/secrets.json` (mode 0600) and passed to the components through their environment.

The components inherit the environment of `up` (or the `base_env` given to it): the
channel connections come from `AIRFLOW_CONN_RETENTION_*` variables set there (Airflow reads
a connection from `AIRFLOW_CONN_<CONN_ID>` before its metadata database), and so do the
RETENTION_* settings the tasks read; `up(env=...)` is laid over everything, so it can also
change any Airflow setting. `up` returns once the api-server answers (its execution API,
which it builds on the first request to it, warmed before any task needs it), every
component reports healthy (every Celery worker answers a ping through the broker) and every
file of the DAGs folder is parsed (or has an import error, which it reports); `timings`
holds the seconds from the start of `up` to each of those milestones. A second `up` finds
the running components by their PID files and leaves them alone. `down` sends SIGTERM to
each component (scheduler first, then the workers, which finish their running tasks within
the grace period), waits, then SIGTERM/SIGKILL to whatever is left of them, their children
and their process groups (also of a component that died earlier), and removes the PID files.

For tests and benchmarks, `up(triggerer=False)` leaves out the triggerer (no deferrable
operators), and `up(attached=True)` has the components receive SIGTERM when the process
that called `up` dies (Linux), so nothing outlives it even when it is killed.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psutil
import requests
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]
DAGS_FOLDER = ROOT / "dags"
PLUGINS_FOLDER = ROOT / "plugins"
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
STOP_ORDER = ("scheduler", "triggerer", "dag-processor", "api-server")
EXECUTORS = {"local": "LocalExecutor", "celery": "CeleryExecutor"}
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_WORKER_CONCURRENCY = 4
METADATA_DATABASE = "airflow_meta"
API_USER = "admin"
DEFAULT_PORT = 8080
DEFAULT_POOL_SLOTS = 4
CONNECTION_PREFIX = "AIRFLOW_CONN_RETENTION_"


class LocalAirflowError(RuntimeError):
    """The local Airflow did not start (the message carries log tails) or is in a bad state."""


def provider_pools() -> list[str]:
    """Every pool a campaign DAG task may run in: one per provider."""
    from retention_airflow.campaign_dag import PROVIDER_POOLS

    return sorted(set(PROVIDER_POOLS.values()))


def home() -> Path:
    from retention.config import paths

    return paths().home / "airflow"


def metadata_url(database: str = METADATA_DATABASE, warehouse_url: str | None = None) -> str:
    """The database `database` on the pipeline's PostgreSQL server (created when missing)."""
    from retention import db

    base = sa.engine.make_url(warehouse_url or db.database_url())
    if base.get_backend_name() != "postgresql":
        raise LocalAirflowError(f"the Airflow metadata database must be PostgreSQL, "
                                f"got {base.drivername}")
    db._ensure_database(base.render_as_string(hide_password=False), database)
    return base.set(database=database).render_as_string(hide_password=False)


def _airflow_conn(url: str) -> str:
    return sa.engine.make_url(url).set(drivername="postgresql+psycopg2").render_as_string(
        hide_password=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def _write_private(path: Path, data: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)


@dataclass
class LocalAirflow:
    """The local deployment under `home` (default `home()`)."""

    home: Path = field(default_factory=home)
    out: Callable[[str], None] = print
    dags_folder: Path = DAGS_FOLDER
    #: seconds from the start of the last `up` to each milestone: "migrated",
    #: "execution api ready", "healthy", "parsed"
    timings: dict[str, float] = field(default_factory=dict, init=False)

    # ------------------------------------------------------------------ files

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def passwords_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json"

    @property
    def state_file(self) -> Path:
        return self.home / "local.json"

    def pid_file(self, component: str) -> Path:
        return self.run_dir / f"{component}.pid"

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def components(self) -> tuple[str, ...]:
        """The components of the deployment the state file describes: the four services
        (three without the triggerer), then the Celery workers (none with the LocalExecutor)."""
        state = self.state()
        services = COMPONENTS if state.get("triggerer", True) else COMPONENTS[:-1]
        return (*services, *state.get("workers", ()))

    @property
    def base_url(self) -> str | None:
        port = self.state().get("port")
        return f"http://127.0.0.1:{port}" if port else None

    def secret_settings(self) -> dict[str, str]:
        """Generated once per home, shared by all components, never printed."""
        path = self.home / "secrets.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            from cryptography.fernet import Fernet

            values = {"AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(48),
                      "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
                      "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode()}
            _write_private(path, values)
            return values

    def _password(self) -> str:
        try:
            passwords = json.loads(self.passwords_file.read_text())
            if passwords.get(API_USER):
                return passwords[API_USER]
        except (OSError, ValueError):
            passwords = {}
        passwords[API_USER] = secrets.token_urlsafe(18)
        _write_private(self.passwords_file, passwords)
        return passwords[API_USER]

    # ------------------------------------------------------------------ processes

    def process(self, component: str) -> psutil.Process | None:
        """The running process of `component` from its PID file (None if gone or reused)."""
        try:
            pid_text, _, created = self.pid_file(component).read_text().partition(" ")
            proc = psutil.Process(int(pid_text))
            if created and abs(proc.create_time() - float(created)) > 1.0:
                return None  # the PID now belongs to another process
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (OSError, ValueError, psutil.Error):
            return None

    def status(self) -> dict[str, int | None]:
        """component -> PID of its running process, or None."""
        return {c: (p.pid if (p := self.process(c)) else None) for c in self.components()}

    def health(self) -> dict | None:
        if not self.base_url:
            return None
        try:
            resp = requests.get(f"{self.base_url}/api/v2/monitor/health", timeout=10,
                                proxies={"http": None, "https": None})
            return resp.json() if resp.ok else None
        except (requests.RequestException, ValueError):
            return None

    def environment(self, metadata: str, extra: Mapping[str, str] | None = None,
                    base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The components' environment (holds secrets: never print it): `base` (default
        this process's environment), the deployment's settings, then `extra`."""
        from retention.config import paths

        state = self.state()
        base_url = f"http://127.0.0.1:{state['port']}"
        env = dict(os.environ if base is None else base)
        executor = state.get("executor", "local")
        no_proxy = ",".join(filter(None, ["127.0.0.1", "localhost", env.get("NO_PROXY")]))
        env.update({
            "NO_PROXY": no_proxy, "no_proxy": no_proxy,
            "PYTHONUNBUFFERED": "1",
            "RETENTION_HOME": str(paths().home),
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": _airflow_conn(metadata),
            "AIRFLOW__CORE__EXECUTOR": EXECUTORS[executor],
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base_url}/execution/",
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{API_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            "AIRFLOW__API__BASE_URL": base_url,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(state["port"]),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__EXPOSE_CONFIG": "False",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.logs_dir),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(state["log_ports"][0]),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(state["log_ports"][1]),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            **self.secret_settings(),
        })
        if executor == "celery":
            env.update({
                "AIRFLOW__CELERY__BROKER_URL": state["broker_url"],
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + _airflow_conn(metadata),
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(state["worker_concurrency"]),
            })
        env.update(extra or {})
        return env

    def _spawn(self, component: str, env: Mapping[str, str], attached: bool) -> subprocess.Popen:
        state = self.state()
        args = [sys.executable, "-m", "airflow", component]
        if component == "api-server":
            args += ["--host", "127.0.0.1", "--port", str(state["port"]), "--workers", "1"]
        elif component in state.get("workers", ()):
            # each worker its own Celery node name, Airflow PID file and log-server port
            args = [sys.executable, "-m", "airflow", "celery", "worker",
                    "--celery-hostname", f"{component}@%h",
                    "--concurrency", str(state["worker_concurrency"]),
                    "--pid", str(self.run_dir / f"{component}.airflow-pid")]
            env = {**env, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT":
                   str(state["worker_log_ports"][component])}
        with (self.logs_dir / f"{component}.log").open("ab") as log:
            popen = subprocess.Popen(args, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     cwd=self.home,
                                     preexec_fn=_die_with_parent if attached else None)
        created = psutil.Process(popen.pid).create_time()
        self.pid_file(component).write_text(f"{popen.pid} {created}")
        return popen

    def logs(self, lines: int = 30) -> str:
        return "".join(f"\n----- {self.logs_dir / f'{c}.log'} (last {lines} lines)\n"
                       f"{_tail(self.logs_dir / f'{c}.log', lines)}\n"
                       for c in ("db-migrate", *self.components())
                       if (self.logs_dir / f"{c}.log").exists())

    # ------------------------------------------------------------------ up

    def up(self, *, port: int = DEFAULT_PORT, metadata_database: str = METADATA_DATABASE,
           metadata: str | None = None,
           env: Mapping[str, str] | None = None, timeout: float = 300.0,
           pool_slots: int = DEFAULT_POOL_SLOTS, executor: str = "local", workers: int = 2,
           broker_url: str = DEFAULT_BROKER_URL,
           worker_concurrency: int = DEFAULT_WORKER_CONCURRENCY, triggerer: bool = True,
           base_env: Mapping[str, str] | None = None, attached: bool = False) -> bool:
        """Start everything (see the module docstring); False if it was already running.

        The metadata database is `metadata` (a full URL) or else `metadata_database` on the
        pipeline's server; the components' environment is `base_env` (default this
        process's), the deployment's settings, then `env`. With `executor="celery"`:
        `workers` Celery workers of `worker_concurrency` task slots each, on the Redis
        broker `broker_url`. `triggerer=False`: no triggerer; `attached=True`: the
        components get SIGTERM when this process dies."""
        if executor not in EXECUTORS:
            raise LocalAirflowError(f"executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
        if executor == "celery" and workers < 1:
            raise LocalAirflowError(f"--workers {workers}: the CeleryExecutor needs at least one")
        running = {c: pid for c, pid in self.status().items() if pid}
        if running and len(running) == len(self.components()):
            self.out(f"Airflow is already running at {self.base_url} "
                     f"(PIDs {', '.join(f'{c} {p}' for c, p in running.items())})")
            self._print_login()
            return False
        if running:
            raise LocalAirflowError(
                f"Airflow is partly running ({', '.join(running)}; the others are gone): "
                f"run `retention airflow down`, then `retention airflow up` (logs in {self.logs_dir})")
        if _port_in_use(port):
            raise LocalAirflowError(f"port {port} on 127.0.0.1 is taken by another program: "
                                    f"choose another with --port")
        started = time.monotonic()
        deadline = started + timeout
        self.timings.clear()
        for folder in (self.home, self.run_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self.run_dir.glob("*.pid"):
            stale.unlink()
        password = self._password()
        state: dict = {"port": port, "log_ports": [free_port(), free_port()],
                       "executor": executor, "triggerer": triggerer}
        if executor == "celery":
            _check_broker(broker_url)
            names = [f"worker-{i}" for i in range(1, workers + 1)]
            state.update(workers=names, broker_url=broker_url,
                         worker_concurrency=worker_concurrency,
                         worker_log_ports={n: free_port() for n in names})
        self.state_file.write_text(json.dumps(state))
        metadata = metadata or metadata_url(metadata_database)
        component_env = self.environment(metadata, env, base_env)
        self.out(f"AIRFLOW_HOME {self.home}; metadata database "
                 f"{sa.engine.make_url(metadata).render_as_string(hide_password=True)}")
        try:
            self._migrate(component_env, deadline, attached)
            self._mark("migrated", started)
            popens = {c: self._spawn(c, component_env, attached) for c in self.components()}
            self._wait_healthy(popens, deadline, started)
            self._wait_workers(popens, deadline)
            self._mark("healthy", started)
            session = self._login(password)
            self._create_pools(session, pool_slots)
            errors = self._wait_parsed(session, popens, deadline)
            self._mark("parsed", started)
        except BaseException:
            self.down(quiet=True)
            raise
        services = ", ".join(c for c in self.components() if c in COMPONENTS)
        connections = sorted(k.removeprefix("AIRFLOW_CONN_").lower()
                             for k, v in component_env.items()
                             if k.startswith(CONNECTION_PREFIX) and v)
        if executor == "celery":
            self.out(f"Airflow is up at {self.base_url} ({services}; "
                     f"CeleryExecutor with {workers} worker(s) of "
                     f"{worker_concurrency} slots, broker {_hide_password(broker_url)})")
        else:
            self.out(f"Airflow is up at {self.base_url} ({services}; LocalExecutor)")
        self.out(f"  DAGs from {self.dags_folder}; logs in {self.logs_dir}")
        self.out(f"  pools: {', '.join(provider_pools())}")
        self.out(f"  connections from the environment: {', '.join(connections) or 'none'} "
                 f"(set AIRFLOW_CONN_RETENTION_* before `retention airflow up`)")
        self._print_login()
        if errors:
            raise LocalAirflowError("DAG import errors (Airflow keeps running):\n" + "\n\n".join(
                f"{e['filename']}:\n{e['stack_trace']}" for e in errors))
        return True

    def _mark(self, milestone: str, started: float) -> None:
        self.timings.setdefault(milestone, round(time.monotonic() - started, 1))

    def _print_login(self) -> None:
        self.out(f"  log in as `{API_USER}`: the password is in {self.passwords_file} "
                 f"(simple auth manager)")

    def _migrate(self, env: Mapping[str, str], deadline: float, attached: bool) -> None:
        log = self.logs_dir / "db-migrate.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "airflow", "db", "migrate"], env=dict(env),
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.home,
                                    preexec_fn=_die_with_parent if attached else None)
            try:
                code = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        if code != 0:
            raise LocalAirflowError(f"`airflow db migrate` exited with {code}\n{_tail(log, 60)}")

    def _check_alive(self, popens: Mapping[str, subprocess.Popen]) -> None:
        for name, popen in popens.items():
            if popen.poll() is not None:
                raise LocalAirflowError(f"airflow {name} exited with {popen.returncode}\n{self.logs()}")

    def _wait_healthy(self, popens: Mapping[str, subprocess.Popen], deadline: float,
                      started: float) -> None:
        http = requests.Session()
        http.trust_env = False
        last: object = "no answer"
        warmed = False
        parts = ["metadatabase", *(c.replace("-", "_") for c in popens if c in COMPONENTS[1:])]
        while True:
            self._check_alive(popens)
            try:
                if not warmed:
                    # The api-server builds its execution API on the first request to it,
                    # blocking every other request meanwhile, on a loaded machine for longer
                    # than a task supervisor waits: so the first request is made here.
                    warmed = http.get(f"{self.base_url}/execution/health", timeout=60).ok
                    if warmed:
                        self._mark("execution api ready", started)
                resp = http.get(f"{self.base_url}/api/v2/monitor/health", timeout=30)
                last = resp.json() if resp.ok else f"HTTP {resp.status_code}"
                if resp.ok and all(last.get(part, {}).get("status") == "healthy"
                                   for part in parts):
                    return
            except (requests.RequestException, ValueError) as exc:
                last = type(exc).__name__
            if time.monotonic() > deadline:
                raise LocalAirflowError(f"Airflow not healthy in time (last health: {last})\n"
                                        f"{self.logs()}")
            time.sleep(1)

    def _wait_workers(self, popens: Mapping[str, subprocess.Popen], deadline: float) -> None:
        """Wait until every Celery worker of the state answers a ping through the broker."""
        state = self.state()
        names = set(state.get("workers", ()))
        if not names:
            return
        from celery import Celery

        app = Celery(broker=state["broker_url"])
        missing = names
        try:
            while True:
                self._check_alive(popens)
                try:
                    replies = app.control.ping(timeout=2.0)
                    missing = names - {node.partition("@")[0] for reply in replies
                                       for node in reply}
                except Exception as exc:  # noqa: BLE001 - broker not answering yet: retry
                    missing = {f"{', '.join(sorted(names))} ({type(exc).__name__})"}
                if not missing:
                    return
                if time.monotonic() > deadline:
                    raise LocalAirflowError(f"Celery workers not answering in time: "
                                            f"{sorted(missing)}\n{self.logs()}")
                time.sleep(1)
        finally:
            app.close()

    def session(self) -> requests.Session:
        """A REST session of the running deployment, logged in as `admin`."""
        return self._login(self._password())

    def _login(self, password: str) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        resp = session.post(f"{self.base_url}/auth/token", timeout=30,
                            json={"username": API_USER, "password": password})
        if resp.status_code not in (200, 201):
            raise LocalAirflowError(f"login as {API_USER} failed: HTTP {resp.status_code}")
        session.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"
        return session

    def _create_pools(self, session: requests.Session, slots: int) -> None:
        """Create each provider pool that is missing; an existing pool keeps its slots."""
        for name in provider_pools():
            url = f"{self.base_url}/api/v2/pools/{quote(name, safe='')}"
            resp = session.get(url, timeout=30)
            if resp.status_code == 404:
                resp = session.post(f"{self.base_url}/api/v2/pools", timeout=30, json={
                    "name": name, "slots": slots, "include_deferred": False,
                    "description": "per-provider cap on concurrent senders (retention)"})
            if resp.status_code not in (200, 201):
                raise LocalAirflowError(f"pool {name}: HTTP {resp.status_code} {resp.text[:500]}")

    def _wait_parsed(self, session: requests.Session, popens: Mapping[str, subprocess.Popen],
                     deadline: float) -> list[dict]:
        """Wait until every DAG file has a DAG or an import error; return the import errors."""
        files = {p.name for p in self.dags_folder.glob("*.py")}
        missing = files
        while True:
            self._check_alive(popens)
            try:
                dags = session.get(f"{self.base_url}/api/v2/dags", params={"limit": 1000},
                                   timeout=60).json()["dags"]
                errors = session.get(f"{self.base_url}/api/v2/importErrors",
                                     params={"limit": 1000}, timeout=60).json()["import_errors"]
                seen = {Path(d["fileloc"]).name for d in dags}
                seen |= {Path(e["filename"]).name for e in errors}
                missing = files - seen
                if not missing:
                    return errors
            except (requests.RequestException, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise LocalAirflowError(f"DAG files not parsed in time: {sorted(missing)}\n"
                                        f"{self.logs()}")
            time.sleep(1)

    # ------------------------------------------------------------------ down

    def _left_behind(self, component: str) -> list[psutil.Process]:
        """The members of the process group of `component` but itself. It ran in a session
        of its own, so the group's number is its PID, which no new process gets while the
        group has members; a PID that belongs to another process now means the group is
        empty."""
        try:
            pid_text, _, created = self.pid_file(component).read_text().partition(" ")
            group = int(pid_text)
        except (OSError, ValueError):
            return []
        try:
            if created and abs(psutil.Process(group).create_time() - float(created)) > 1.0:
                return []
        except psutil.Error:
            pass
        members = []
        for proc in psutil.process_iter():
            try:
                if proc.pid != group and os.getpgid(proc.pid) == group:
                    members.append(proc)
            except (OSError, psutil.Error):
                continue
        return members

    def down(self, grace: float = 30.0, *, quiet: bool = False) -> list[str]:
        """Stop every component and its children; remove the PID files. Returns the names
        of the components that were running."""
        order = (STOP_ORDER[0], *self.state().get("workers", ()), *STOP_ORDER[1:])
        roots = {c: p for c in order if (p := self.process(c))}
        stop_tree(list(roots.values()), grace)  # scheduler first: it launches nothing more
        # what is still in a component's process group: the children of a component that
        # died earlier, or of one that started them while it was being stopped
        stop_tree([p for c in order for p in self._left_behind(c)], 5.0)
        for component in self.components():
            self.pid_file(component).unlink(missing_ok=True)
            (self.run_dir / f"{component}.airflow-pid").unlink(missing_ok=True)
        if not quiet:
            self.out(f"stopped {', '.join(roots)}" if roots else "Airflow was not running")
        return list(roots)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM this process when the process that started it dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _hide_password(url: str) -> str:
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def _check_broker(broker_url: str) -> None:
    """The Redis broker answers PING (else: a clear error naming the URL)."""
    if not broker_url.startswith(("redis://", "rediss://")):
        raise LocalAirflowError(f"broker {_hide_password(broker_url)}: expected a redis:// URL")
    import redis

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise LocalAirflowError(f"the Celery broker {_hide_password(broker_url)} does not answer "
                                f"({type(exc).__name__}): start Redis (e.g. `redis-server "
                                f"--daemonize yes --save '' --appendonly no`) or pass "
                                f"--broker-url") from None
    finally:
        client.close()


def stop_tree(roots: list[psutil.Process], grace: float) -> None:
    """Stop `roots` and every process below them: SIGTERM to each root in the given
    order and up to `grace` seconds for them to end (each shuts its own children down),
    then SIGTERM to the descendants still there (task supervisors, executor workers)
    and SIGKILL to those alive 5 s later."""
    procs: list[psutil.Process] = []
    for proc in roots:
        try:
            procs += [proc, *proc.children(recursive=True)]
        except psutil.Error:
            pass
    _signal(roots, signal.SIGTERM)
    psutil.wait_procs(roots, timeout=grace)
    _signal(procs, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=5)
    _signal(alive, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)


def _signal(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:  # already gone
            pass
