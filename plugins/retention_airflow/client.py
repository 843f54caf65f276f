"""A small client of the local Airflow's REST API (`/api/v2`), for operators and scripts.

    client = AirflowClient.local()            # the deployment of `retention airflow up`
    client.unpause("retention_results")
    run = client.start_run("retention_results", "manual__2026-10-31",
                           data_interval=(start, end))
    run = client.wait(run, on_task=print)      # polls; calls on_task for every state change
    client.xcom("retention_results", run.run_id, "load_results")

* `start_run` triggers a run with the given run id, logical date and data interval (the
  tasks take their as_of from it); when a run with that id already exists it clears it
  (`existing="clear"`: every task runs again, as a further try), deletes it and triggers
  it anew (`"replace"`: every task runs again from its first try) or leaves it (`"keep"`).
* `wait` polls the run and its task instances until the run is finished or the deadline
  passes, calling `on_task(TaskChange)` whenever a task's state changes; it never sleeps
  longer than the poll interval.
* `xcom` reads a task's return value, `task_log` the lines the task printed.

It logs in as the simple auth manager's user with the password from the deployment's
password file (`LocalAirflow.passwords_file`), and logs in again when the token expires.
No Airflow import: it speaks HTTP only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import requests

#: states after which a task instance does not change again in this try
TASK_DONE = frozenset({"success", "failed", "skipped", "upstream_failed", "removed"})
RUN_DONE = frozenset({"success", "failed"})


class AirflowApiError(RuntimeError):
    """The API refused a request (the message carries the status and the answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RunTimeout(AirflowApiError):
    """A run did not finish before the deadline."""


@dataclass
class TaskChange:
    """A task instance of a run whose state changed (`previous` None: first seen);
    `task_id` of a mapped task instance is `<task_id>[<map_index>]`."""

    dag_id: str
    run_id: str
    task_id: str
    state: str | None
    previous: str | None
    try_number: int
    duration: float | None
    map_index: int = -1
    instance: dict = field(repr=False, default_factory=dict)


@dataclass
class DagRun:
    dag_id: str
    run_id: str
    state: str
    logical_date: str | None
    data_interval_start: str | None
    data_interval_end: str | None
    created: bool = False  # start_run: True if triggered now, False if cleared or left
    raw: dict = field(repr=False, default_factory=dict)

    @classmethod
    def of(cls, raw: dict, created: bool = False) -> DagRun:
        return cls(raw["dag_id"], raw["dag_run_id"], raw.get("state") or "", raw.get("logical_date"),
                   raw.get("data_interval_start"), raw.get("data_interval_end"), created, raw)


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r}: give an aware datetime (the API refuses naive ones)")
    return moment.astimezone(timezone.utc).isoformat()


def _q(part: str) -> str:
    return quote(part, safe="")


class AirflowClient:
    """The REST API of one Airflow deployment at `base_url` (e.g. http://127.0.0.1:8080)."""

    def __init__(self, base_url: str, username: str, password: str, *, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.username = username
        self._password = password
        self.timeout = timeout
        self.http = requests.Session()
        self.http.trust_env = False  # a local deployment: never through a proxy

    @classmethod
    def local(cls, local: Any = None, **kwargs: Any) -> AirflowClient:
        """The client of the local deployment (`retention_airflow.local.LocalAirflow`,
        default the one under RETENTION_HOME), logged in with its password file."""
        if local is None:
            from retention_airflow.local import LocalAirflow

            local = LocalAirflow()
        from retention_airflow.local import API_USER

        if not local.base_url:
            raise AirflowApiError(f"no local Airflow under {local.home}: run `retention airflow up`")
        try:
            password = json.loads(local.passwords_file.read_text())[API_USER]
        except (OSError, ValueError, KeyError) as exc:
            raise AirflowApiError(f"cannot read the password of {API_USER} from "
                                  f"{local.passwords_file}: {type(exc).__name__}") from None
        return cls(local.base_url, API_USER, password, **kwargs)

    # ------------------------------------------------------------------ HTTP

    def login(self) -> None:
        resp = self.http.post(f"{self.base_url}/auth/token", timeout=self.timeout,
                              json={"username": self.username, "password": self._password})
        if resp.status_code not in (200, 201):
            raise AirflowApiError(f"login as {self.username} at {self.base_url} failed: "
                                  f"HTTP {resp.status_code}", resp.status_code)
        self.http.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,),
                **kwargs: Any) -> requests.Response:
        """`method` on `/api/v2{path}`; logs in first and again on a 401. A status not in
        `ok` raises AirflowApiError."""
        kwargs.setdefault("timeout", self.timeout)
        if "Authorization" not in self.http.headers:
            self.login()
        url = f"{self.base_url}/api/v2{path}"
        resp = self.http.request(method, url, **kwargs)
        if resp.status_code == 401:
            self.login()
            resp = self.http.request(method, url, **kwargs)
        if resp.status_code not in ok:
            raise AirflowApiError(f"{method} {path}: HTTP {resp.status_code} {resp.text[:500]}",
                                  resp.status_code)
        return resp

    # ------------------------------------------------------------------ DAGs

    def dag(self, dag_id: str) -> dict:
        return self.request("GET", f"/dags/{_q(dag_id)}").json()

    def unpause(self, dag_id: str) -> bool:
        """Unpause the DAG (a paused DAG's runs are not scheduled); True if it was paused."""
        if not self.dag(dag_id).get("is_paused"):
            return False
        self.request("PATCH", f"/dags/{_q(dag_id)}", json={"is_paused": False})
        return True

    # ------------------------------------------------------------------ runs

    def dag_run(self, dag_id: str, run_id: str) -> DagRun | None:
        resp = self.request("GET", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}", ok=(200, 404))
        return None if resp.status_code == 404 else DagRun.of(resp.json())

    def trigger(self, dag_id: str, run_id: str, *, logical_date: datetime | None,
                data_interval: tuple[datetime, datetime] | None = None,
                conf: dict | None = None, note: str | None = None) -> DagRun:
        """A new manual run with this run id, logical date and data interval (the DAG's
        timetable infers the interval from the logical date when it is not given)."""
        body: dict[str, Any] = {"dag_run_id": run_id,
                                "logical_date": _iso(logical_date) if logical_date else None,
                                "conf": conf or {}}
        if data_interval is not None:
            body["data_interval_start"] = _iso(data_interval[0])
            body["data_interval_end"] = _iso(data_interval[1])
        if note:
            body["note"] = note
        resp = self.request("POST", f"/dags/{_q(dag_id)}/dagRuns", json=body, ok=(200, 201))
        return DagRun.of(resp.json(), created=True)

    def clear(self, dag_id: str, run_id: str) -> None:
        """Clear every task of the run: the run is queued again and its tasks run again."""
        self.request("POST", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/clear",
                     json={"dry_run": False, "only_failed": False})

    def delete_run(self, dag_id: str, run_id: str) -> bool:
        """Delete the run with its task instances and XComs; False if there was none."""
        resp = self.request("DELETE", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}",
                            ok=(204, 404))
        return resp.status_code == 204

    def start_run(self, dag_id: str, run_id: str, *, logical_date: datetime | None,
                  data_interval: tuple[datetime, datetime] | None = None,
                  existing: str = "clear", note: str | None = None) -> DagRun:
        """Trigger the run; if a run with this id exists: `existing="clear"` clears it (its
        tasks run again as further tries), `"replace"` deletes it and triggers it anew
        (first tries), `"keep"` leaves it. `created` of the answer: not a cleared or kept run.

        An existing run must have the same data interval: a run id names one interval."""
        if existing not in ("clear", "replace", "keep"):
            raise ValueError(f"existing={existing!r}: clear, replace or keep")
        found = self.dag_run(dag_id, run_id)
        if found is not None and data_interval is not None and \
                found.data_interval_end is not None and \
                datetime.fromisoformat(found.data_interval_end) != data_interval[1]:
            raise AirflowApiError(f"{dag_id} run {run_id} exists with data interval end "
                                  f"{found.data_interval_end}, not {_iso(data_interval[1])}")
        if found is not None and existing == "keep":
            return found
        if found is not None and existing == "clear":
            self.clear(dag_id, run_id)
            return self.dag_run(dag_id, run_id) or found
        if found is not None:
            self.delete_run(dag_id, run_id)
        return self.trigger(dag_id, run_id, logical_date=logical_date,
                            data_interval=data_interval, note=note)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        resp = self.request("GET", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances",
                            params={"limit": 1000})
        return resp.json()["task_instances"]

    def wait(self, run: DagRun, *, timeout: float = 900.0, poll: float = 1.0,
             on_task: Callable[[TaskChange], None] | None = None) -> DagRun:
        """Poll until `run` is success or failed; `on_task` for every task state change
        (first sight included). RunTimeout after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        seen: dict[str, str | None] = {}
        while True:
            started = time.monotonic()
            current = self.dag_run(run.dag_id, run.run_id)
            if current is None:
                raise AirflowApiError(f"{run.dag_id} run {run.run_id} is gone")
            instances = self.task_instances(run.dag_id, run.run_id)
            for ti in sorted(instances, key=lambda t: (t.get("start_date") or "~", t["task_id"])):
                map_index = int(ti.get("map_index", -1))
                key = ti["task_id"] if map_index < 0 else f"{ti['task_id']}[{map_index}]"
                state = ti.get("state")
                if key in seen and seen[key] == state:
                    continue
                previous = seen.get(key)
                seen[key] = state
                if on_task is not None:
                    on_task(TaskChange(run.dag_id, run.run_id, key, state, previous,
                                       int(ti.get("try_number") or 0), ti.get("duration"),
                                       map_index, ti))
            if current.state in RUN_DONE:
                # the run's state is final once every task is: one more look for the tasks
                if all(ti.get("state") in TASK_DONE for ti in instances):
                    return DagRun.of(current.raw, run.created)
            if time.monotonic() > deadline:
                raise RunTimeout(f"{run.dag_id} run {run.run_id} not finished after {timeout:.0f} s "
                                 f"(state {current.state}; tasks: "
                                 + ", ".join(f"{k} {v}" for k, v in seen.items()) + ")")
            time.sleep(max(0.0, poll - (time.monotonic() - started)))

    # ------------------------------------------------------------------ results

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", *,
             map_index: int = -1) -> Any:
        """The task's XCom `key` (its return value by default), None if it has none."""
        resp = self.request(
            "GET", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}"
                   f"/xcomEntries/{_q(key)}", params={"map_index": map_index}, ok=(200, 404))
        if resp.status_code == 404:
            return None
        value = resp.json().get("value")
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> list[dict]:
        """The structured log events of one try of a task (each a dict with `event`,
        `level`, `logger`, `timestamp`, ...)."""
        resp = self.request(
            "GET", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}"
                   f"/logs/{try_number}", params={"full_content": "true"},
            headers={"Accept": "application/json"})
        content = resp.json().get("content") or []
        return [c if isinstance(c, dict) else {"event": str(c)} for c in content]

    def printed(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        """What the task printed to stdout in that try (its log events from stdout)."""
        lines = [str(e.get("event", "")) for e in self.task_log(dag_id, run_id, task_id, try_number)
                 if e.get("logger") == "task.stdout"]
        return "\n".join(lines)

    def ui_run_url(self, dag_id: str, run_id: str) -> str:
        return f"{self.base_url}/dags/{_q(dag_id)}/runs/{_q(run_id)}"
