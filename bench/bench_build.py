"""dbt build of the customer lifetime tables: full, incremental, orchestrated, and the floor.

    .venv/bin/python bench/bench_build.py [--customers 1000000] [--orchestration-customers 100000]
                                          [--steps plain,incremental,equality,floor,airflow,cosmos]
                                          [--results bench/RESULTS.md] [--keep] [--db-prefix P]

For each size: a generated shop (seed 7, data ending 2026-10-31, cached under
$RETENTION_BENCH_CACHE or /tmp/retention-bench, keyed by size and seed) is loaded once into
a base database; the last days of data, about 1% of the timestamped rows, are then moved
out of raw into schema `holdback` (orders and their lines, receipts and their lines,
events, product changes, customers who signed up then without an earlier order,
subscriptions, and unsubscribes that happened then). Every measurement runs on a copy of
that base (`create database ... template`), with a fresh copy of dbt_project/ (no
partial-parse state, as after a change of the project), the same PGOPTIONS, threads and
as_of variable as `retention build` (plugins/retention/warehouse/build.py), and builds as
of the cut-off C:

- plain: `dbt build --exclude-resource-type unit_test` (models and data tests of the
  whole project; unit tests have fixed inputs and run in CI, and `retention build` and
  the DAG leave them out too), the dbt CLI in a subprocess; wall time of the process.
- incremental: the held-back rows go back into raw (then `analyze`, untimed), and
  `dbt build` as of the end of the data, on the tables of the full build (the incremental
  models: dbt_project/README.md), with the full build's project copy, so dbt reuses its
  parse as the daily build does. Printed against the full build with the goal of issue
  17 (GOALS: 0.2x at 100,000 customers, 0.1x at 1,000,000), with the models' and the
  data tests' thread time, dbt's start, and the incremental build's slowest nodes, each
  against the same figure of the full build.
- equality (after incremental, untimed): every table of intermediate and marts is kept,
  a `--full-refresh` build of the same data and as_of is run, and each table is compared
  with it row for row (`except all` both ways; EQUALITY_SKIP lists what differs by
  design).
- floor: bench/floors/customer_lifetime.sql, one hand-written statement computing the
  columns of marts.customer_lifetime from raw (`create temp table ... as`), checked equal
  to the mart row for row; compared with the customer_lifetime model's own time and the
  whole chain of models it reads (run_results.json).
- airflow: the real DAG retention_dbt_build with `dag.test()` in a subprocess (SQLite
  metadata database), only its dbt layer tasks (predicted value and docs are not dbt
  build work and are left out); wall time of the process against plain.
- cosmos: the same project rendered by astronomer-cosmos (DbtDag, LoadMode.DBT_LS,
  ExecutionMode.LOCAL, one run task and one test task per model) with `dag.test()`.

`--orchestration-customers` runs airflow and cosmos (and a plain build to compare them
with) at another size, e.g. when the big size takes too long under Cosmos.
Prints a table per size and, with --results, appends it to that Markdown file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from retention.warehouse.build import AS_OF_ENV, _custom_event_types  # noqa: E402

SEED = 7
END = datetime(2026, 10, 31, tzinfo=timezone.utc)
TARGET_SHARE = 0.01
PY = sys.executable
DBT = str(Path(sys.executable).with_name("dbt"))
STEPS = ("plain", "incremental", "equality", "floor", "airflow", "cosmos")
# issue 17: the daily incremental build's wall time against the full build's, per size
GOALS = {100_000: 0.2, 1_000_000: 0.1}


def _dag_layers() -> tuple[str, ...]:
    """The dbt layer task ids of dags/retention_dbt_build.py: `dbt_<layer>` for each
    selector `layer_<layer>` of dbt_project/selectors.yml (read without importing Airflow)."""
    import yaml

    selectors = yaml.safe_load((ROOT / "dbt_project" / "selectors.yml").read_text())["selectors"]
    layers = tuple(f"dbt_{s['name'][len('layer_'):]}" for s in selectors
                   if s["name"].startswith("layer_"))
    if not layers:
        raise RuntimeError("no layer_<name> selector in dbt_project/selectors.yml")
    return layers


DAG_LAYERS = _dag_layers()

# tables moved out of raw for the incremental step: (table, where-clause on the raw row)
HOLDBACK = [
    ("orders", "ordered_at > %(c)s"),
    ("order_items", "order_id in (select order_id from holdback.orders)"),
    ("offline_receipts", "purchased_at > %(c)s"),
    ("offline_receipt_items", "receipt_id in (select receipt_id from holdback.offline_receipts)"),
    ("events", "occurred_at > %(c)s"),
    ("product_changes", "changed_at > %(c)s"),
    ("customers", "created_at > %(c)s and not exists (select 1 from raw.orders o "
                  "where o.customer_id = customers.customer_id)"),
    ("channel_subscriptions", "subscribed_at > %(c)s"),
]
KEYS = {"orders": "order_id", "order_items": "order_id, line_no", "offline_receipts": "receipt_id",
        "offline_receipt_items": "receipt_id, line_no", "events": "event_id",
        "product_changes": "product_id, changed_at", "customers": "customer_id",
        "channel_subscriptions": "customer_id, channel, address"}
TIMESTAMPED = {"orders": "ordered_at", "offline_receipts": "purchased_at", "events": "occurred_at"}


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- databases

def _server() -> str:
    from retention import db

    return db.database_url()


def _url(name: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(_server()).set(database=name).render_as_string(hide_password=False)


def _admin(sql: str) -> None:
    import psycopg

    from retention import db

    with psycopg.connect(db.libpq_dsn(_url("postgres")), autocommit=True) as conn:
        conn.execute(sql)


def _exists(name: str) -> bool:
    import psycopg

    from retention import db

    with psycopg.connect(db.libpq_dsn(_url("postgres")), autocommit=True) as conn:
        return conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone() is not None


def _connect(name: str):
    import psycopg

    from retention import db

    return psycopg.connect(db.libpq_dsn(_url(name)), autocommit=True)


def clone(base: str, name: str) -> str:
    _admin(f'drop database if exists "{name}" with (force)')
    _admin(f'create database "{name}" template "{base}"')
    return name


def drop(name: str) -> None:
    _admin(f'drop database if exists "{name}" with (force)')


# --------------------------------------------------------------------------- preparation

def shop_folder(customers: int) -> Path:
    cache = Path(os.environ.get("RETENTION_BENCH_CACHE", "/tmp/retention-bench"))
    folder = cache / f"shop-{customers}-seed{SEED}"
    if not (folder / "_COMPLETE").exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        log(f"generating {customers:,} customers into {folder}")
        subprocess.run([PY, "-c", "import sys; from pathlib import Path; "
                        "from retention_dev.generate import generate_shop; "
                        f"generate_shop(Path(sys.argv[1]), customers={customers}, seed={SEED})",
                        str(folder)], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")})
        (folder / "_COMPLETE").write_text("")
    return folder


DB_PREFIX = "bench_build_"  # --db-prefix: scratch databases of concurrent runs kept apart


def prepare_base(customers: int) -> tuple[str, dict]:
    """The base database (raw up to the cut-off, held-back rows in schema holdback)."""
    name = f"{DB_PREFIX}base_{customers}"
    if _exists(name):
        with _connect(name) as conn:
            row = conn.execute("select info from holdback.info").fetchone() \
                if conn.execute("select to_regclass('holdback.info')").fetchone()[0] else None
        if row:
            log(f"reusing {name}")
            return name, row[0]
        # no hold-back recorded: another run is preparing it (or one died doing so); never
        # drop a database another run may be loading
        sys.exit(f"{name} exists but is not prepared: another bench_build may be loading it; "
                 f"if none runs, drop it (drop database \"{name}\") and start again")
    folder = shop_folder(customers)
    _admin(f'create database "{name}"')
    log(f"loading {folder} into {name}")
    t = time.perf_counter()
    subprocess.run([PY, "-c", "import sys; from datetime import datetime, timezone; "
                    "from retention.ingest.load import load_folder; "
                    "load_folder(sys.argv[1], sys.argv[2], loaded_at=datetime(2026, 11, 1, tzinfo=timezone.utc))",
                    str(folder), _url(name)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")})
    log(f"loaded in {time.perf_counter() - t:.0f} s; choosing the hold-back")
    from retention.warehouse.build import default_as_of

    end = default_as_of(_url(name))
    with _connect(name) as conn:
        total = sum(conn.execute(f"select count(*) from raw.{t}").fetchone()[0] for t in TIMESTAMPED)
        per_day: dict = {}
        for table, col in TIMESTAMPED.items():
            for day, n in conn.execute(
                    f"select ({col} at time zone 'UTC')::date, count(*) from raw.{table} "
                    f"where {col} > %s group by 1", (end - timedelta(days=30),)):
                per_day[day] = per_day.get(day, 0) + n
        days, held = 0, 0
        while held < TARGET_SHARE * total and days < 30:
            days += 1
            held += per_day.get((end - timedelta(days=days)).date(), 0)
        cutoff = end - timedelta(days=days)
        conn.execute("create schema holdback")
        moved = {}
        for table, where in HOLDBACK:
            conn.execute(f"create table holdback.{table} as select * from raw.{table} where {where}",
                         {"c": cutoff} if "%(c)s" in where else None)
            conn.execute(f"delete from raw.{table} using holdback.{table} h where "
                         + " and ".join(f"raw.{table}.{k} = h.{k}" for k in KEYS[table].split(", ")))
            moved[table] = conn.execute(f"select count(*) from holdback.{table}").fetchone()[0]
        # unsubscribes after the cut-off had not happened yet: the later load brings them
        conn.execute("create table holdback.unsubscribes as select * from raw.channel_subscriptions "
                     "where unsubscribed_at > %s", (cutoff,))
        conn.execute("update raw.channel_subscriptions set unsubscribed_at = null "
                     "where unsubscribed_at > %s", (cutoff,))
        moved["unsubscribes"] = conn.execute("select count(*) from holdback.unsubscribes").fetchone()[0]
        all_rows = sum(conn.execute(f"select count(*) from raw.{t}").fetchone()[0]
                       for t in KEYS) + sum(v for k, v in moved.items() if k != "unsubscribes")
        info = {"customers": customers, "end": end.isoformat(), "cutoff": cutoff.isoformat(),
                "holdback_days": days, "moved": moved, "rows": all_rows,
                "timestamped_rows": total, "timestamped_share": held / total,
                "share": sum(v for k, v in moved.items() if k != "unsubscribes") / all_rows}
        conn.execute("create table holdback.info (info jsonb)")
        conn.execute("insert into holdback.info values (%s)", (json.dumps(info),))
        conn.execute("vacuum analyze")
    log(f"hold-back: last {days} days, {info['share']:.2%} of all rows ({info['moved']})")
    return name, info


def restore_holdback(name: str) -> float:
    with _connect(name) as conn:
        for table, _ in HOLDBACK:
            conn.execute(f"insert into raw.{table} select * from holdback.{table}")
        conn.execute(
            "update raw.channel_subscriptions s set unsubscribed_at = h.unsubscribed_at "
            "from holdback.unsubscribes h where (s.customer_id, s.channel, s.address) = "
            "(h.customer_id, h.channel, h.address)")
        for table in KEYS:
            conn.execute(f"analyze raw.{table}")
    return 0.0


# --------------------------------------------------------------------------- runs

def fresh_project(label: str) -> Path:
    """A copy of dbt_project/ without target/: no partial-parse state, own manifest."""
    dest = Path(tempfile.mkdtemp(prefix=f"bench-build-{label}-")) / "dbt_project"
    shutil.copytree(ROOT / "dbt_project", dest, ignore=shutil.ignore_patterns("target", "logs"))
    return dest


def dbt_env(url: str, project: Path) -> dict:
    """The environment `retention build` gives dbt (profile variables, PGOPTIONS, threads)."""
    from retention.warehouse.build import _profile_env

    with _profile_env(url):
        env = dict(os.environ)
    env["RETENTION_DBT_PROJECT_DIR"] = str(project)
    env["RETENTION_DATABASE_URL"] = url
    env["PYTHONPATH"] = str(ROOT / "plugins")
    env["DBT_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    return env


def ensure_schemas_in(url: str) -> None:
    from retention import db
    from retention.db.schema import ensure_schemas

    with db.connect(url) as conn:
        ensure_schemas(conn)
        conn.commit()


def plain_build(name: str, as_of: datetime, label: str, project: Path | None = None,
                extra: tuple[str, ...] = ()) -> dict:
    url = _url(name)
    ensure_schemas_in(url)
    project = project or fresh_project(label)
    env = dbt_env(url, project)
    # as `retention build`: the as_of through the environment and the project's vars on
    # the command line, so a build of the same project and database as of another moment
    # reuses dbt's parse (the incremental build after the full one)
    env[AS_OF_ENV] = as_of.isoformat()
    cmd = [DBT, "build", "--project-dir", str(project), "--profiles-dir", str(project),
           "--target-path", str(project / "target"), "--log-path", str(project / "target" / "logs"),
           "--vars", json.dumps({"custom_event_types": _custom_event_types()}),
           # as `retention build` and the DAG: unit tests belong to CI, not to production
           "--exclude-resource-type", "unit_test", *extra]
    log(f"{label}: dbt build as of {as_of.isoformat()} on {name}")
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"{label}: dbt build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    out = {"wall": wall, "project": str(project), **run_results(project)}
    log(f"{label}: {wall:.1f} s ({out['counts']})")
    return out


def run_results(project: Path) -> dict:
    rr = json.loads((project / "target" / "run_results.json").read_text())
    manifest = json.loads((project / "target" / "manifest.json").read_text())
    counts: dict[str, int] = {}
    times: dict[str, float] = {}
    for r in rr["results"]:
        kind = r["unique_id"].split(".")[0]
        counts[kind] = counts.get(kind, 0) + 1
        times[r["unique_id"]] = r["execution_time"]
    lifetime = "model.retention.customer_lifetime"
    chain, todo = set(), [lifetime]
    while todo:  # every model customer_lifetime reads, directly or not
        node = todo.pop()
        for parent in manifest["parent_map"].get(node, []):
            if parent.startswith("model.") and parent not in chain:
                chain.add(parent)
                todo.append(parent)
    return {
        "elapsed": rr.get("elapsed_time"),
        "counts": counts,
        "model_seconds": sum(v for k, v in times.items() if k.startswith("model.")),
        "test_seconds": sum(v for k, v in times.items() if not k.startswith("model.")),
        "lifetime_model": times.get(lifetime),
        "lifetime_chain": times.get(lifetime, 0) + sum(times.get(m, 0) for m in chain),
        "slowest": sorted(((v, k.split(".")[-1]) for k, v in times.items()), reverse=True)[:6],
        "times": {k.split(".")[-1] if k.startswith("model.") else k: v for k, v in times.items()},
    }


# what differs between an incremental build and a full refresh by design: the lists of
# changed customers (int_*_customers_changed), the build's own bookkeeping (which dbt
# invocation last rewrote a daily events row; the as_of of each incremental table), and
# the history of snapshots, which a full refresh leaves alone (full_refresh: false)
EQUALITY_SKIP = {"incremental_state", "int_purchases_customers_changed",
                 "int_affinity_customers_changed", "int_send_time_customers_changed"}
EQUALITY_SKIP_COLUMNS = {"int_events_aggregated_daily": {"aggregated_in"}}


def equality(name: str, as_of: datetime, project: Path) -> dict:
    """Every table of intermediate and marts after the incremental build, against a
    `--full-refresh` build of the same data and as_of (untimed): rows in one and not the
    other (`except all` both ways), per table."""
    with _connect(name) as conn:
        tables = [(s, t) for s, t in conn.execute(
            "select table_schema, table_name from information_schema.tables where "
            "table_schema in ('intermediate', 'marts') and table_type = 'BASE TABLE' "
            "order by 1, 2") if t not in EQUALITY_SKIP]
        conn.execute("drop schema if exists bench_incremental cascade; create schema bench_incremental")
        for schema, table in tables:
            conn.execute(f'create table bench_incremental."{schema}__{table}" as '
                         f'select * from {schema}."{table}"')
    plain_build(name, as_of, "full refresh (equality)", project=project, extra=("--full-refresh",))
    out: dict = {"tables": len(tables), "differ": {}, "rows": 0}
    with _connect(name) as conn:
        for schema, table in tables:
            cols = ", ".join(f'"{c}"' for (c,) in conn.execute(
                "select column_name from information_schema.columns where table_schema = %s "
                "and table_name = %s order by ordinal_position", (schema, table))
                if c not in EQUALITY_SKIP_COLUMNS.get(table, ()))
            inc, full = f'bench_incremental."{schema}__{table}"', f'{schema}."{table}"'
            differ = conn.execute(
                f"select count(*) from ((select {cols} from {inc} except all select {cols} from {full}) "
                f"union all (select {cols} from {full} except all select {cols} from {inc})) d").fetchone()[0]
            out["rows"] += conn.execute(f"select count(*) from {full}").fetchone()[0]
            if differ:
                out["differ"][f"{schema}.{table}"] = differ
        conn.execute("drop schema bench_incremental cascade")
    log(f"equality: {out}")
    return out


def floor(name: str, as_of: datetime) -> dict:
    from bench_floors import read_floor  # its fragments (-- include: lines) expanded

    sql = read_floor(ROOT / "bench" / "floors" / "customer_lifetime.sql")
    sql = sql.format(as_of=f"('{as_of.isoformat()}'::timestamptz)")
    with _connect(name) as conn:
        conn.execute("set jit = off; set work_mem = '64MB'; set timezone = 'UTC'")
        times = []
        for _ in range(2):  # the second run shows the cached figure
            conn.execute("drop table if exists floor_lifetime")
            t = time.perf_counter()
            conn.execute("create temp table floor_lifetime as " + sql)
            times.append(time.perf_counter() - t)
        cols = [r[0] for r in conn.execute(
            "select column_name from information_schema.columns where table_schema = 'marts' "
            "and table_name = 'customer_lifetime' order by ordinal_position")]
        col_list = ", ".join(cols)
        diff = conn.execute(
            f"select count(*) from ((select {col_list} from floor_lifetime except all "
            f"select {col_list} from marts.customer_lifetime) union all "
            f"(select {col_list} from marts.customer_lifetime except all "
            f"select {col_list} from floor_lifetime)) d").fetchone()[0]
        rows = conn.execute("select count(*) from floor_lifetime").fetchone()[0]
    log(f"floor: {times[0]:.1f} s / {times[1]:.1f} s, {rows:,} rows, {diff} rows differ from the mart")
    return {"first": times[0], "second": times[1], "rows": rows, "differ": diff}


AIRFLOW_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from datetime import datetime
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=sys.argv[1]).dags["retention_dbt_build"]
layers = json.loads(sys.argv[3])
sub = dag.partial_subset(task_ids=layers, include_upstream=False, include_downstream=False)
t1 = time.perf_counter()
run = sub.test(logical_date=datetime.fromisoformat(sys.argv[2]))
t2 = time.perf_counter()
tis = {ti.task_id: {"state": str(ti.state), "seconds": ti.duration} for ti in run.get_task_instances()}
print(json.dumps({"import_parse": t1 - t0, "dag_test": t2 - t1, "tasks": tis, "state": str(run.state)}))
"""

COSMOS_DAG = r"""
# Written by bench/bench_build.py: the dbt project rendered by astronomer-cosmos as an
# Airflow DAG (DagBag safe mode skips files that name neither "airflow" nor "dag").
import os
from datetime import datetime
from pathlib import Path

from cosmos import DbtDag, ExecutionConfig, ProfileConfig, ProjectConfig, RenderConfig
from cosmos.constants import ExecutionMode, InvocationMode, LoadMode, TestIndirectSelection

project = Path(os.environ["RETENTION_DBT_PROJECT_DIR"])
cosmos_retention_bench = DbtDag(
    dag_id="cosmos_retention_bench",
    project_config=ProjectConfig(project, dbt_vars={"as_of": os.environ["BENCH_AS_OF"]}),
    profile_config=ProfileConfig(profile_name="retention", target_name="default",
                                 profiles_yml_filepath=project / "profiles.yml"),
    execution_config=ExecutionConfig(execution_mode=ExecutionMode.LOCAL,
                                     invocation_mode=InvocationMode.DBT_RUNNER,
                                     # as the DAG's layers: dbt's default (eager) would run a
                                     # test of int_receipts_matched with stg_customers, before
                                     # int_receipts_matched exists
                                     test_indirect_selection=TestIndirectSelection.BUILDABLE),
    render_config=RenderConfig(load_method=LoadMode.DBT_LS),
    operator_args={"install_deps": False},
    schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
)
"""

COSMOS_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
from datetime import datetime
try:
    import cosmos
except ImportError:
    print(json.dumps({"missing": True})); sys.exit(0)
from airflow.dag_processing.dagbag import DagBag
t1 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
if "cosmos_retention_bench" not in bag.dags:
    sys.exit(f"the Cosmos DAG did not load: {bag.import_errors}")
dag = bag.dags["cosmos_retention_bench"]
t2 = time.perf_counter()
run = dag.test(logical_date=datetime.fromisoformat(sys.argv[2]))
t3 = time.perf_counter()
tis = [ti for ti in run.get_task_instances()]
states, kinds = {}, {}
for ti in tis:
    states[str(ti.state)] = states.get(str(ti.state), 0) + 1
    kind = ti.task_id.rsplit("_", 1)[-1]
    kinds[kind] = kinds.get(kind, 0) + 1
print(json.dumps({"import": t1 - t0, "render": t2 - t1, "dag_test": t3 - t2, "tasks": len(tis),
                  "states": states, "kinds": kinds,
                  "task_seconds": sum(ti.duration or 0 for ti in tis),
                  "failed": [ti.task_id for ti in tis if str(ti.state) != "success"][:10],
                  "version": cosmos.__version__, "state": str(run.state)}))
"""


def airflow_env(url: str, project: Path, home: Path, dags: Path | None = None) -> dict:
    """A private AIRFLOW_HOME with SQLite metadata; `dags` holds only the DAG under test
    (dag.test() parses and stores every DAG of the folder on each call)."""
    env = dbt_env(url, project)
    for k in [k for k in env if k.startswith("AIRFLOW")]:
        env.pop(k)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags or ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "AIRFLOW__COSMOS__ENABLE_CACHE": "True",
        "PATH": f"{Path(DBT).parent}{os.pathsep}{env.get('PATH', '')}",  # Cosmos looks for `dbt`
    })
    return env


def airflow_home() -> Path:
    home = Path(tempfile.mkdtemp(prefix="bench-build-airflow-"))
    env = airflow_env("postgresql://unused@127.0.0.1/unused", ROOT / "dbt_project", home)
    subprocess.run([PY, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, cwd=ROOT)
    return home


def child_json(code: str, args: list[str], env: dict, label: str) -> tuple[float, dict]:
    t = time.perf_counter()
    proc = subprocess.run([PY, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        sys.exit(f"{label} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    out = json.loads(lines[-1])
    out["stderr"] = proc.stderr[-6000:]
    return wall, out


def airflow_build(name: str, as_of: datetime, home: Path) -> dict:
    url = _url(name)
    ensure_schemas_in(url)
    project = fresh_project("airflow")
    dags = Path(tempfile.mkdtemp(prefix="bench-build-airflow-dags-"))
    shutil.copy(ROOT / "dags" / "retention_dbt_build.py", dags)
    env = airflow_env(url, project, home, dags)
    log(f"airflow: dag.test() of retention_dbt_build's dbt tasks as of {as_of.isoformat()} on {name}")
    wall, out = child_json(AIRFLOW_CHILD, [str(dags / "retention_dbt_build.py"),
                                           as_of.isoformat(), json.dumps(list(DAG_LAYERS))],
                           env, "airflow")
    states = {t: v["state"] for t, v in out["tasks"].items()}
    if any(s != "success" for s in states.values()):
        sys.exit(f"airflow: a task failed: {states}\n{out.get('stderr', '')}")
    with _connect(name) as conn:
        built = conn.execute("select max(as_of) from marts.customer_lifetime").fetchone()[0]
    if built != as_of:
        sys.exit(f"airflow: marts built as of {built}, expected {as_of}")
    out["wall"] = wall
    out["task_seconds"] = sum(v["seconds"] or 0 for v in out["tasks"].values())
    log(f"airflow: {wall:.1f} s ({ {t: round(v['seconds'] or 0, 1) for t, v in out['tasks'].items()} })")
    return out


def cosmos_build(name: str, as_of: datetime, home: Path) -> dict:
    url = _url(name)
    ensure_schemas_in(url)
    project = fresh_project("cosmos")
    dags = Path(tempfile.mkdtemp(prefix="bench-build-cosmos-dags-"))
    (dags / "cosmos_retention_bench.py").write_text(COSMOS_DAG)
    env = airflow_env(url, project, home, dags)
    env["BENCH_AS_OF"] = as_of.isoformat()
    log(f"cosmos: dag.test() of a Cosmos DbtDag as of {as_of.isoformat()} on {name}")
    wall, out = child_json(COSMOS_CHILD, [str(dags / "cosmos_retention_bench.py"), as_of.isoformat()],
                           env, "cosmos")
    if out.get("missing"):
        log("cosmos not installed: skipped")
        return out
    out["wall"] = wall
    log(f"cosmos: {wall:.1f} s ({ {k: v for k, v in out.items() if k != 'stderr'} })")
    if out["failed"]:
        sys.exit(f"cosmos: tasks failed: {out['failed']}\n{out['stderr']}")
    return out


# --------------------------------------------------------------------------- report

def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def table(size: int, info: dict, res: dict, orch_size: int, concurrent: list[str]) -> str:
    rows = [("what", "seconds", "ratio", "note")]
    plain = res.get("plain")
    if plain:
        c = plain["counts"]
        rows.append(("plain `dbt build`, full", f"{plain['wall']:.1f}", "1.00",
                     f"{c.get('model', 0)} models, {c.get('test', 0)} data tests, "
                     f"{c.get('unit_test', 0)} unit tests (tests included; models alone "
                     f"{plain['model_seconds']:.0f} s, tests {plain['test_seconds']:.0f} s of "
                     f"thread time)"))
    inc = res.get("incremental")
    if inc:
        goal = GOALS.get(size)
        ratio = inc["wall"] / plain["wall"] if plain else None
        verdict = "" if goal is None or ratio is None else \
            f"; goal {goal}x: {'met' if ratio <= goal else 'not met'}"
        rows.append((f"incremental `dbt build`, +{info['share']:.2%} rows", f"{inc['wall']:.1f}",
                     _ratio(inc["wall"], plain and plain["wall"]),
                     f"last {info['holdback_days']} days held back and loaded, as_of moved to "
                     f"{info['end'][:10]}; vs full{verdict}"))
        if plain:
            for what, key in (("models", "model_seconds"), ("data tests", "test_seconds")):
                rows.append((f"  incremental: {what} (thread time)", f"{inc[key]:.1f}",
                             _ratio(inc[key], plain[key]),
                             f"vs the full build's {plain[key]:.1f} s; "
                             f"{inc[key] / (inc['model_seconds'] + inc['test_seconds']):.0%} "
                             f"of the incremental build's thread time"))
            start_inc, start_full = inc["wall"] - inc["elapsed"], plain["wall"] - plain["elapsed"]
            rows.append(("  incremental: dbt start, parse, hooks", f"{start_inc:.1f}",
                         _ratio(start_inc, start_full),
                         f"wall time outside run_results' elapsed time, vs the full build's "
                         f"{start_full:.1f} s (a full parse there)"))
            for v, name in inc["slowest"]:
                full_v = plain["times"].get(name)
                rows.append((f"  incremental: {name}", f"{v:.1f}", _ratio(v, full_v),
                             f"vs {full_v:.1f} s in the full build" if full_v else "not in the full build"))
    eq = res.get("equality")
    if eq:
        rows.append(("  incremental == `--full-refresh` of the same data", "-", "-",
                     f"{eq['tables']} tables of intermediate and marts, {eq['rows']:,} rows: "
                     + (f"differ: {eq['differ']}" if eq["differ"] else "every row equal")))
    fl = res.get("floor")
    if fl and plain:
        rows.append(("floor: one SQL statement (customer_lifetime columns)", f"{fl['first']:.1f}",
                     "1.00", f"{fl['rows']:,} rows, {fl['differ']} differ from the mart; "
                     f"second run {fl['second']:.1f} s"))
        rows.append(("  customer_lifetime model alone", f"{plain['lifetime_model']:.1f}",
                     _ratio(plain["lifetime_model"], fl["first"]), "vs floor (dbt execution_time)"))
        rows.append(("  customer_lifetime + every model it reads", f"{plain['lifetime_chain']:.1f}",
                     _ratio(plain["lifetime_chain"], fl["first"]), "vs floor (sum of execution times)"))
        rows.append(("  whole plain build", f"{plain['wall']:.1f}", _ratio(plain["wall"], fl["first"]),
                     "vs floor"))
    orch = res.get("orch_plain") or (plain if orch_size == size else None)
    af = res.get("airflow")
    sz = "" if orch_size == size else f" at {orch_size:,} customers"
    if res.get("orch_plain"):
        rows.append((f"plain `dbt build`, full{sz}", f"{orch['wall']:.1f}", "1.00",
                     "the reference of the orchestrated builds below"))
    if af:
        rows.append((f"Airflow DAG retention_dbt_build ({len(DAG_LAYERS)} layer tasks){sz}", f"{af['wall']:.1f}",
                     _ratio(af["wall"], orch and orch["wall"]),
                     f"vs plain; dag.test() {af['dag_test']:.1f} s, tasks "
                     f"{af['task_seconds']:.1f} s, Airflow import + DAG parse {af['import_parse']:.1f} s"))
    cs = res.get("cosmos")
    if cs and not cs.get("missing"):
        rows.append((f"Cosmos {cs['version']} DbtDag ({cs['tasks']} tasks){sz}", f"{cs['wall']:.1f}",
                     _ratio(cs["wall"], orch and orch["wall"]),
                     f"vs plain; render (dbt ls) {cs['render']:.1f} s, dag.test() "
                     f"{cs['dag_test']:.1f} s, states {cs['states']}"))
    elif cs:
        rows.append(("Cosmos", "-", "-", "cosmos not installed: skipped"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["| " + " | ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2]), r[3]])
             + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|---|")
    head = (f"{size:,} customers, {info['rows']:,} raw rows, seed {SEED}, data up to "
            f"{info['end'][:10]}; full build as of {info['cutoff'][:10]} (hold-back "
            f"{info['holdback_days']} days = {info['share']:.2%} of rows, "
            f"{info['timestamped_share']:.2%} of orders+receipts+events)")
    notes = ["", head]
    if concurrent:
        notes.append("concurrent load during the runs: " + "; ".join(concurrent))
    return "\n".join(notes + [""] + lines)


def busy() -> str:
    out = subprocess.run(["pgrep", "-af", "bench_|prof.py|pytest"], capture_output=True, text=True).stdout
    mine = {str(os.getpid()), str(os.getppid())}  # this run and what started it
    others = [ln[:90] for ln in out.splitlines()
              if ln.split()[0] not in mine and "bench_build" not in ln]
    load = open("/proc/loadavg").read().split()[:3]
    return f"load {' '.join(load)}" + (f", running: {' | '.join(others)}" if others else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--orchestration-customers", type=int,
                        help="size of the Airflow and Cosmos comparison (default: --customers)")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--results", type=Path, help="append the table to this Markdown file")
    parser.add_argument("--keep", action="store_true",
                        help="keep the base databases (<prefix>base_<N>) for the next run")
    parser.add_argument("--db-prefix", default="bench_build_",
                        help="prefix of the databases this run creates (default %(default)s)")
    args = parser.parse_args()
    globals()["DB_PREFIX"] = args.db_prefix
    steps = set(args.steps.split(","))
    orch_size = args.orchestration_customers or args.customers
    res: dict = {}
    concurrent: list[str] = []
    started = datetime.now(timezone.utc)

    def note(step: str) -> None:
        b = busy()
        log(f"before {step}: {b}")
        if "running" in b:
            concurrent.append(f"{step}: {b}")

    base, info = prepare_base(args.customers)
    cutoff, end = datetime.fromisoformat(info["cutoff"]), datetime.fromisoformat(info["end"])
    work = f"{DB_PREFIX}run_{args.customers}_{os.getpid()}"  # two runs may share a base
    bases = [base]
    try:
        if steps & {"plain", "incremental", "floor"}:
            clone(base, work)
            note("plain")
            res["plain"] = plain_build(work, cutoff, "plain")
            if "floor" in steps:
                note("floor")
                res["floor"] = floor(work, cutoff)
            if "incremental" in steps:
                restore_holdback(work)
                note("incremental")
                res["incremental"] = plain_build(work, end, "incremental",
                                                 project=Path(res["plain"]["project"]))
                if "equality" in steps:
                    note("equality")
                    res["equality"] = equality(work, end, Path(res["plain"]["project"]))
            drop(work)
        if steps & {"airflow", "cosmos"}:
            obase, oinfo = (base, info) if orch_size == args.customers else prepare_base(orch_size)
            bases.append(obase)
            ocut = datetime.fromisoformat(oinfo["cutoff"])
            if orch_size != args.customers or "plain" not in res:
                clone(obase, work)
                note("plain (orchestration size)")
                res["orch_plain"] = plain_build(work, ocut, "plain")
            for step, run in (("airflow", airflow_build), ("cosmos", cosmos_build)):
                if step in steps:
                    home = airflow_home()
                    clone(obase, work)
                    note(step)
                    res[step] = run(work, ocut, home)
                    shutil.rmtree(home, ignore_errors=True)
            drop(work)
    finally:
        drop(work)
        if not args.keep:
            for b in set(bases):
                drop(b)

    text = table(args.customers, info, res, orch_size, concurrent)
    print(text)
    for step in ("plain", "incremental"):
        if step in res and res[step].get("slowest"):
            print(f"\nslowest nodes of the {step} build (s):",
                  ", ".join(f"{k} {v:.1f}" for v, k in res[step]["slowest"]))
    if args.results:
        with open(args.results, "a") as f:
            f.write(f"\n## dbt build (bench/bench_build.py)\n\n{started:%Y-%m-%d %H:%M} UTC, "
                    f"machine: 2 cores ({platform.processor() or platform.machine()}), PostgreSQL "
                    f"on 127.0.0.1\n\n```\n.venv/bin/python bench/bench_build.py "
                    f"{' '.join(sys.argv[1:])}\n```\n{text}\n")


if __name__ == "__main__":
    main()
