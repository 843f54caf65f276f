"""The cost of sending a campaign wave through Airflow's CeleryExecutor: the same waves as
bench_dispatch.py, dispatched in-process and by the campaign DAG on Celery workers.

    .venv/bin/python bench/bench_celery.py                          # 1,000,000 e-mail + push
    .venv/bin/python bench/bench_celery.py --recipients 100000 --push-recipients 50000

One database (bench_dispatch.create_database/populate: N customers with an e-mail address,
the first --push-recipients of them with a push token too) and bench_dispatch's counting
provider servers (SendGrid and FCM, 20 ms per request, in their own process). Each wave is
a campaign run of its own (a `transactional` campaign file: no holdout, no frequency caps,
so every wave reaches every customer who has the channel):

* single process: bench_dispatch.run_wave (start_run, plan_step, dispatch_step with
  --shards processes of one sending thread each, ledger included);
* Celery, 1 worker: `retention airflow up --executor celery --workers 1` in a private
  home (retention_airflow.local.LocalAirflow; Redis DB --broker-db, flushed before each
  deployment; metadata database of its own), the campaign DAG of that file
  (start_run, plan_wave, send_wave mapped over RETENTION_SEND_SHARDS = --shards
  dispatchers of one thread each, deliver_deferred_wave), the worker with --shards slots;
* Celery, 2 workers: the same with two workers of --shards / 2 slots each, so the shards
  run on different workers.

Times of a Celery wave come from the task instances (REST API): plan = start_run's start
to plan_wave's end, send = first send shard's start to the last one's end, total =
start_run's start to the last shard's end (the scheduler's and the workers' hand-over
between tasks included, the trigger's own latency not). After each wave every ledger row
of its campaign must be `sent` and the servers must have accepted exactly that many
messages. The ratio is msgs/s through Celery over msgs/s in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

import bench_dispatch  # noqa: E402  (the waves' data, servers and single-process run)

AS_OF = bench_dispatch.AS_OF
BROKER_DB = 12
DAG_FILE = "celery_waves.py"


# --------------------------------------------------------------------------- campaigns

def write_campaign(folder: Path, campaign_id: str, channel: str) -> Path:
    """A one-step transactional campaign to every customer who has `channel`."""
    path = folder / f"{campaign_id}.yaml"
    path.write_text(textwrap.dedent(f"""\
        id: {campaign_id}
        kind: transactional
        audience: {{"include_any": [{{"has_channel": "{channel}"}}]}}
        steps:
          - {{name: wave, channel: {channel}, template: weekly_promo}}
        """))
    return path


def write_dags(folder: Path, campaigns: Iterable[Path]) -> None:
    """One DAG file with a campaign DAG (`campaign_<id>`) per campaign file."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["from retention_airflow.campaign_dag import campaign_dag", ""]
    lines += [f"dag_{i} = campaign_dag({str(p)!r})" for i, p in enumerate(campaigns)]
    (folder / DAG_FILE).write_text("\n".join(lines) + "\n")


def airflow_connections(connections: Mapping[str, Mapping]) -> dict[str, str]:
    """bench_dispatch.Servers.connections() as the AIRFLOW_CONN_* variables the campaign
    DAG's channel hooks read (holds the API key: never print it)."""
    ids = {"email": "RETENTION_SENDGRID", "mobile_push": "RETENTION_FCM"}
    return {f"AIRFLOW_CONN_{ids[name]}": json.dumps(conn) for name, conn in connections.items()}


# --------------------------------------------------------------------------- deployment

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flush_broker(broker_url: str) -> None:
    """Empty this deployment's own Redis database (never another index)."""
    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        client.flushdb()
    finally:
        client.close()


class CeleryDeployment:
    """`LocalAirflow.up(executor="celery")` in `home`, with a REST session."""

    def __init__(self, home: Path, dags: Path, metadata: str, env: Mapping[str, str], *,
                 workers: int, concurrency: int, broker_url: str, pool_slots: int = 4,
                 out=lambda line: None) -> None:
        from retention_airflow.local import LocalAirflow

        self.local = LocalAirflow(home=home, out=out, dags_folder=dags)
        self.metadata, self.env = metadata, dict(env)
        self.workers, self.concurrency = workers, concurrency
        self.broker_url, self.pool_slots = broker_url, pool_slots
        self.http = None

    def __enter__(self) -> CeleryDeployment:
        flush_broker(self.broker_url)
        self.local.up(port=free_port(), metadata=self.metadata, env=self.env, timeout=600,
                      executor="celery", workers=self.workers, broker_url=self.broker_url,
                      worker_concurrency=self.concurrency, pool_slots=self.pool_slots)
        self.http = self.local.session()
        return self

    def __exit__(self, *exc) -> None:
        self.local.down(quiet=True)
        flush_broker(self.broker_url)

    def api(self, method: str, path: str, **kwargs):
        """A REST call below /api/v2, retried while the api-server does not answer."""
        import requests

        deadline = time.monotonic() + 120
        while True:
            try:
                resp = self.http.request(method, f"{self.local.base_url}/api/v2{path}",
                                         timeout=60, **kwargs)
                if resp.status_code == 401:  # the token expired
                    self.http = self.local.session()
                    continue
                resp.raise_for_status()
                return resp.json() if resp.content else None
            except (requests.ConnectionError, requests.Timeout):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def trigger(self, dag_id: str, logical_date: datetime) -> str:
        dag = quote(dag_id, safe="")
        self.api("PATCH", f"/dags/{dag}", json={"is_paused": False})
        run_id = f"bench__{secrets.token_hex(4)}"
        self.api("POST", f"/dags/{dag}/dagRuns",
                 json={"dag_run_id": run_id, "logical_date": logical_date.isoformat()})
        return run_id

    def state(self, dag_id: str, run_id: str) -> str:
        return self.api("GET", f"/dags/{quote(dag_id, safe='')}/dagRuns/"
                               f"{quote(run_id, safe='')}")["state"]

    def wait(self, dag_id: str, run_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.state(dag_id, run_id)) not in ("success", "failed"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dag_id} {run_id} still {state} after {timeout:.0f} s: "
                                   f"{self.task_instances(dag_id, run_id)}")
            time.sleep(2)
        return state

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1):
        """The return value of a task instance (a mapped one by its index)."""
        entry = self.api("GET", f"/dags/{quote(dag_id, safe='')}/dagRuns/"
                                f"{quote(run_id, safe='')}/taskInstances/{task_id}/xcomEntries/"
                                f"return_value", params={"map_index": map_index,
                                                         "deserialize": "true",
                                                         "stringify": "false"})
        return entry["value"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.api("GET", f"/dags/{quote(dag_id, safe='')}/dagRuns/"
                               f"{quote(run_id, safe='')}/taskInstances",
                        params={"limit": 1000})["task_instances"]


HEADER = ("| wave | how | recipients | plan s | send s | total s | msgs/s | vs one process | "
          "ledger rows sent = accepted by servers | load avg at start |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---|---|")


def row(r: dict, single: Mapping[str, dict]) -> str:
    rate = r["recipients"] / r["total_s"]
    base = single.get(r["channel"])
    ratio = f"{rate / (base['recipients'] / base['total_s']):.2f}x" if base else "-"
    return (f"| {r['label']} | {r['how']} | {r['recipients']:,} | {r['plan_s']:.1f} | "
            f"{r['send_s']:.1f} | {r['total_s']:.1f} | {rate:,.0f} | {ratio} | "
            f"{'yes' if r['ok'] else 'NO'} ({r['sent']:,} / {r['accepted']:,}) | "
            f"{r['load'][0]:.2f} |")


def _at(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def celery_wave(dep: CeleryDeployment, servers, url: str, label: str, campaign_id: str,
                provider: str, timeout: float) -> dict:
    from retention import db

    dag_id = f"campaign_{campaign_id}"
    before = servers.counts()
    load = os.getloadavg()
    t0 = time.perf_counter()
    run_id = dep.trigger(dag_id, AS_OF)
    state = dep.wait(dag_id, run_id, timeout)
    wall = time.perf_counter() - t0
    tis = dep.task_instances(dag_id, run_id)
    after = servers.counts()
    by_task: dict[str, list[dict]] = {}
    for ti in tis:
        by_task.setdefault(ti["task_id"], []).append(ti)
    start = _at(by_task["start_run"][0]["start_date"])
    plan_end = _at(by_task["plan_wave"][0]["end_date"])
    sends = by_task["send_wave"]
    send_start = min(_at(t["start_date"]) for t in sends)
    send_end = max(_at(t["end_date"]) for t in sends)
    with db.connect(url) as conn:
        rows, sent = conn.execute(
            "select count(*), count(*) filter (where status = 'sent') from ops.messages "
            "where campaign_id = %s", (campaign_id,)).fetchone()
    accepted = after[provider]["messages"] - before[provider]["messages"]
    requests = (sum(after[provider]["requests"].values())
                - sum(before[provider]["requests"].values()))
    ok = state == "success" and rows == sent == accepted
    return {"label": label, "recipients": rows, "plan_s": plan_end - start,
            "send_s": send_end - send_start, "total_s": send_end - start, "wall_s": wall,
            "rows": rows, "sent": sent, "accepted": accepted, "requests": requests, "ok": ok,
            "load": load, "tries": {t["map_index"]: t["try_number"] for t in sends},
            "state": state}


# --------------------------------------------------------------------------- main

def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=bench_dispatch.WAVE,
                        help="customers, each with an e-mail address (the e-mail wave)")
    parser.add_argument("--push-recipients", type=int, default=None,
                        help="the first N customers also have a push token (the push wave); "
                             "default: all")
    parser.add_argument("--shards", type=int, default=2,
                        help="send shards (RETENTION_SEND_SHARDS) = single-process dispatch "
                             "processes = task slots in all")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--broker-db", type=int, default=BROKER_DB,
                        help="the Redis database index (flushed before and after)")
    parser.add_argument("--workers", default="1,2", help="Celery deployments to measure")
    parser.add_argument("--skip-email", action="store_true")
    parser.add_argument("--skip-push", action="store_true")
    parser.add_argument("--skip-single", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per wave")
    args = parser.parse_args()

    os.environ.setdefault("RETENTION_PROMO_SECRET", "bench-" + secrets.token_hex(8))
    os.environ["RETENTION_DISPATCH_THREADS"] = "1"
    # SIGTERM stops like Ctrl-C: Airflow, the servers and the databases are cleaned up
    signal.signal(signal.SIGTERM, _interrupt)
    from retention import db
    from retention.campaigns.spec import load_campaign
    from retention.connections import build_channel

    server = (os.environ.get("RETENTION_TEST_DATABASE_URL")
              or os.environ.get("RETENTION_DATABASE_URL") or db.database_url())
    n = args.recipients
    push_n = min(args.push_recipients or n, n)
    worker_counts = [int(w) for w in args.workers.split(",") if w]
    broker_url = f"redis://127.0.0.1:6379/{args.broker_db}"
    channels = {"email": ("sendgrid", "e-mail (SendGrid, 1,000/request)"),
                "mobile_push": ("fcm", "push (FCM HTTP v1, 500/call)")}
    waves = [c for c in channels if not (c == "email" and args.skip_email)
             and not (c == "mobile_push" and args.skip_push)]
    workdir = Path(tempfile.mkdtemp(prefix="bench-celery-"))
    notes = [f"load average before the benchmark: "
             f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"]
    results: list[dict] = []
    single: dict[str, dict] = {}  # channel -> the one-process wave

    def measured(r: dict) -> None:  # each row as it is measured, the table again at the end
        results.append(r)
        if r["how"].startswith("one process"):
            single[r["channel"]] = r
        print(f"measured: {row(r, single)}", flush=True)

    admin, name, url = bench_dispatch.create_database(server)
    meta_admin, meta_name, meta_url = bench_dispatch.create_database(server)
    servers = None
    try:
        print(f"database {name}: {n:,} customers with e-mail, {push_n:,} with push ...",
              flush=True)
        seconds = bench_dispatch.populate(url, n)
        if push_n < n:
            with db.connect(url) as conn:
                conn.execute("delete from raw.channel_subscriptions where channel = "
                             "'mobile_push' and customer_id > %s", (f"c{push_n:08d}",))
                conn.commit()
        notes.append(f"data: {n:,} customers ({push_n:,} with push) inserted in {seconds:.1f} s")
        servers = bench_dispatch.Servers(args.latency_ms, str(workdir))
        conns = servers.connections()
        campaigns = workdir / "campaigns"
        campaigns.mkdir()
        files = {(c, k): write_campaign(campaigns, f"bench_{c}_{k}", c)
                 for c in waves for k in ["single", *[f"w{w}" for w in worker_counts]]}
        write_dags(workdir / "dags", [p for (c, k), p in files.items() if k != "single"])
        expected = {"email": n, "mobile_push": push_n}

        for channel in waves:
            if args.skip_single:
                continue
            provider, label = channels[channel]
            print(f"{label}: single process ...", flush=True)
            built = build_channel(channel, conns[channel])
            try:
                r = bench_dispatch.run_wave(
                    url, servers, label, load_campaign(str(files[(channel, "single")])),
                    {channel: built}, processes=args.shards, workers=1, connections=conns)
            finally:
                getattr(built, "close", lambda: None)()
            r.update(how=f"one process, {args.shards} dispatch processes x 1 thread",
                     channel=channel, ok=r["ok"] and r["recipients"] == expected[channel])
            measured(r)

        env = {"RETENTION_DATABASE_URL": url,
               "RETENTION_PROMO_SECRET": os.environ["RETENTION_PROMO_SECRET"],
               "RETENTION_SEND_SHARDS": str(args.shards),
               "RETENTION_DISPATCH_THREADS": "1",
               "RETENTION_HOME": str(workdir / "home"),
               **airflow_connections(conns)}
        for workers in worker_counts:
            slots = max(1, args.shards // workers)
            print(f"Celery, {workers} worker(s) of {slots} slot(s) ...", flush=True)
            t = time.perf_counter()
            with CeleryDeployment(workdir / f"airflow-w{workers}", workdir / "dags", meta_url,
                                  env, workers=workers, concurrency=slots,
                                  broker_url=broker_url) as dep:
                notes.append(f"Celery deployment with {workers} worker(s) up in "
                             f"{time.perf_counter() - t:.0f} s")
                for channel in waves:
                    provider, label = channels[channel]
                    print(f"{label}: Celery, {workers} worker(s) ...", flush=True)
                    r = celery_wave(dep, servers, url, label, f"bench_{channel}_w{workers}",
                                    provider, args.timeout)
                    r.update(how=f"Celery, {workers} worker(s) x {slots} slot(s), "
                                 f"{args.shards} shards x 1 thread", channel=channel,
                             ok=r["ok"] and r["recipients"] == expected[channel])
                    measured(r)
    finally:
        if servers:
            servers.stop()
        bench_dispatch.drop_database(admin, name)
        bench_dispatch.drop_database(meta_admin, meta_name)

    print(f"\n{args.latency_ms:g} ms latency per provider request; {os.cpu_count()} cores "
          f"shared with PostgreSQL, the provider servers and (Celery rows) Airflow\n")
    print(HEADER)
    for r in results:
        print(row(r, single))
    print()
    for r in results:
        if "wall_s" in r:
            print(f"{r['label']}, {r['how']}: trigger to run success {r['wall_s']:.1f} s; "
                  f"{r['requests']:,} provider requests; shard tries {r['tries']}")
    for note in notes:
        print(note)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
