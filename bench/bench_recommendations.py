"""The weekly product_recommendations refresh against an independent computation.

    .venv/bin/python bench/bench_recommendations.py [--customers 1000000] [--runs 1]
                                                    [--db-prefix bench_recs_] [--keep]
                                                    [--project DIR] [--compare DIR]
                                                    [--results bench/RESULTS.md]

The generated shop of that size (seed 7, data up to 2026-10-31, cached under
$RETENTION_BENCH_CACHE or /tmp/retention-bench as bench/bench_build.py keeps it) is loaded
into database <prefix>built_<N>, and the models product_recommendations reads are built
once (`dbt run --select +product_recommendations`) as of the end of the data; with
--keep the built database is kept and reused by the next run.

Then, on that database, per run:

- refresh: what the daily build does on the day the weekly snapshot moment moves. The
  build DAG (dags/retention_dbt_build.py) runs product_recommendations in its
  `dbt_lifetime_marts` task (selector layer_lifetime_marts); on the six other days the
  model computes nothing (it finds its snapshot moment in intermediate.incremental_state).
  The bench deletes that record (the snapshot moment "moved") and runs
  `dbt build --select product_recommendations` (the model and its data tests) with the
  dbt CLI on a copy of dbt_project/ (or --project), with the same environment, vars
  and as_of as `retention build`. dbt parses the copy once beforehand, untimed: the
  daily build parses the project anyway. Figures: wall time of the dbt process, and
  the model's and its tests' execution times (run_results.json).
- with --compare DIR (e.g. `git archive <commit> dbt_project | tar -x -C DIR/..`): the
  same refresh with that project first, in the same run, for a before/after.
- floor: bench/floors/product_recommendations.sql, the mart's definition written by
  hand from raw (purchases resolved as bench/floors/_purchases.sql does, their
  lines, and the view events; no model SQL, no intermediate table), timed as
  `create temp table ... as`, then compared with marts.product_recommendations row for
  row (every column; `except all` both ways).

Prints seconds, the ratios against the floor and the 60 s goal (issue 17, item 4);
with --results appends the table to that Markdown file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

import bench_build as bb  # noqa: E402  (its database and dbt helpers, not its steps)

from retention.warehouse.build import AS_OF_ENV, _custom_event_types  # noqa: E402

GOAL_SECONDS = 60.0
MODEL = "product_recommendations"
COLUMNS = ("product_id", "recommended_product_id", "rank", "score", "customers",
           "customers_bought", "buyers", "as_of")
# the model's vars at their defaults (dbt_project.yml)
VARS = {"window_days": 90, "per_product": 20, "weight": 2, "min_customers": 1}
PREFIX = "bench_recs_"


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def built_database(customers: int, source: Path | None) -> tuple[str, dict]:
    """<prefix>built_<N>: the shop loaded, and the models product_recommendations reads
    (`dbt run --select +product_recommendations` of dbt_project/ or `source`) built as
    of the end of its data. public.bench_recs_info records each stage done, so a run
    that stopped after the load resumes with the build."""
    name = f"{PREFIX}built_{customers}"
    info: dict = {}
    if bb._exists(name):
        with bb._connect(name) as conn:
            if conn.execute("select to_regclass('public.bench_recs_info')").fetchone()[0]:
                info = conn.execute("select info from public.bench_recs_info").fetchone()[0]
        if not info:
            sys.exit(f"{name} exists but is not loaded to the end: another run may be loading "
                     f"it; if none runs, drop it (drop database \"{name}\") and start again")
        if "build_seconds" in info:
            log(f"reusing {name} ({info})")
            return name, info
        log(f"{name} is loaded ({info}); building")
    else:
        folder = bb.shop_folder(customers)
        bb._admin(f'create database "{name}"')
        log(f"loading {folder} into {name}")
        t = time.perf_counter()
        subprocess.run([bb.PY, "-c", "import sys; from datetime import datetime, timezone; "
                        "from retention.ingest.load import load_folder; "
                        "load_folder(sys.argv[1], sys.argv[2], loaded_at=datetime(2026, 11, 1, tzinfo=timezone.utc))",
                        str(folder), bb._url(name)], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "plugins")})
        loaded = time.perf_counter() - t
        from retention.warehouse.build import default_as_of

        end = default_as_of(bb._url(name))
        info = {"customers": customers, "as_of": end.isoformat(), "load_seconds": round(loaded, 1)}
        with bb._connect(name) as conn:
            conn.execute("vacuum analyze")
            conn.execute("create table public.bench_recs_info (info jsonb)")
            conn.execute("insert into public.bench_recs_info values (%s)", (json.dumps(info),))
        log(f"loaded in {loaded:.0f} s")
    as_of = datetime.fromisoformat(info["as_of"])
    bb.ensure_schemas_in(bb._url(name))
    project = project_copy(source)
    log(f"dbt run --select +{MODEL} as of {as_of.isoformat()}")
    wall, _ = dbt(project, bb._url(name), as_of, "run", "--select", f"+{MODEL}")
    shutil.rmtree(project.parent, ignore_errors=True)
    info["build_seconds"] = round(wall, 1)
    with bb._connect(name) as conn:
        conn.execute("update public.bench_recs_info set info = %s", (json.dumps(info),))
    log(f"built in {wall:.0f} s")
    return name, info


def project_copy(source: Path | None) -> Path:
    dest = Path(tempfile.mkdtemp(prefix="bench-recs-")) / "dbt_project"
    shutil.copytree(source or ROOT / "dbt_project", dest,
                    ignore=shutil.ignore_patterns("target", "logs"))
    return dest


def dbt(project: Path, url: str, as_of: datetime, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    env = bb.dbt_env(url, project)
    env[AS_OF_ENV] = as_of.isoformat()
    cmd = [bb.DBT, *args, "--project-dir", str(project), "--profiles-dir", str(project),
           "--target-path", str(project / "target"), "--log-path", str(project / "target" / "logs"),
           "--vars", json.dumps({"custom_event_types": _custom_event_types()})]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"dbt {args[0]} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    return wall, proc


def refresh(name: str, as_of: datetime, project: Path) -> dict:
    """The Monday refresh: the model's snapshot record removed, its node built and tested."""
    url = bb._url(name)
    with bb._connect(name) as conn:
        conn.execute("delete from intermediate.incremental_state where model_name = %s", (MODEL,))
    load_before = load()
    wall, _ = dbt(project, url, as_of, "build", "--select", MODEL,
                  "--exclude-resource-type", "unit_test")
    rr = json.loads((project / "target" / "run_results.json").read_text())
    model = sum(r["execution_time"] for r in rr["results"] if r["unique_id"].startswith("model."))
    tests = [r for r in rr["results"] if r["unique_id"].startswith("test.")]
    if [r for r in rr["results"] if r["status"] not in ("success", "pass", "warn")]:
        sys.exit(f"refresh: a node failed: {[(r['unique_id'], r['status']) for r in rr['results']]}")
    with bb._connect(name) as conn:
        rows, snapshots = conn.execute(
            f"select count(*), array_agg(distinct as_of) from marts.{MODEL}").fetchone()
    out = {"wall": wall, "model": model, "tests": sum(r["execution_time"] for r in tests),
           "test_count": len(tests), "rows": rows, "snapshots": snapshots, "load": load_before}
    log(f"refresh: {wall:.1f} s (model {model:.1f} s, {len(tests)} tests "
        f"{out['tests']:.1f} s), {rows:,} rows, load before {load_before}")
    return out


def floor(name: str, as_of: datetime, snapshot: datetime) -> dict:
    sql = (ROOT / "bench" / "floors" / "product_recommendations.sql").read_text()
    sql = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    sql = sql.format(as_of=f"('{as_of.isoformat()}'::timestamptz)",
                     snapshot=f"('{snapshot.isoformat()}'::timestamptz)", **VARS)
    with bb._connect(name) as conn:
        # the session of `retention build` (PGOPTIONS of plugins/retention/warehouse/build.py)
        conn.execute("set jit = off; set work_mem = '64MB'; set timezone = 'UTC'")
        conn.execute("drop table if exists floor_recommendations")
        load_before = load()
        t = time.perf_counter()
        conn.execute("create temp table floor_recommendations as " + sql)
        seconds = time.perf_counter() - t
        cols = ", ".join(COLUMNS)
        differ = conn.execute(
            f"select count(*) from ((select {cols} from floor_recommendations except all "
            f"select {cols} from marts.{MODEL}) union all (select {cols} from marts.{MODEL} "
            f"except all select {cols} from floor_recommendations)) d").fetchone()[0]
        rows = conn.execute("select count(*) from floor_recommendations").fetchone()[0]
    log(f"floor: {seconds:.1f} s, {rows:,} rows, {differ} rows differ from the mart, "
        f"load before {load_before}")
    return {"seconds": seconds, "rows": rows, "differ": differ, "load": load_before}


def main() -> None:
    global PREFIX
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=1, help="refresh and floor, this many times")
    parser.add_argument("--db-prefix", default=PREFIX)
    parser.add_argument("--keep", action="store_true", help="keep <prefix>built_<N> for the next run")
    parser.add_argument("--project", type=Path,
                        help="dbt project to build and refresh with (default dbt_project/)")
    parser.add_argument("--compare", type=Path,
                        help="another dbt project (e.g. an earlier commit's) whose refresh runs "
                             "first in each run, side by side")
    parser.add_argument("--results", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()
    PREFIX = args.db_prefix
    started = datetime.now(timezone.utc)
    name, info = built_database(args.customers, args.project)
    as_of = datetime.fromisoformat(info["as_of"])
    try:
        project = project_copy(args.project)
        dbt(project, bb._url(name), as_of, "parse")
        other = project_copy(args.compare) if args.compare else None
        if other:
            dbt(other, bb._url(name), as_of, "parse")
        results = []
        for i in range(args.runs):
            before = refresh(name, as_of, other) if other else None
            r = refresh(name, as_of, project)
            r["compare"] = before
            if len(r["snapshots"]) != 1:
                sys.exit(f"the mart holds {r['snapshots']} as_of values, not one snapshot")
            f = floor(name, as_of, r["snapshots"][0])
            results.append((r, f))
        shutil.rmtree(project.parent, ignore_errors=True)
        if other:
            shutil.rmtree(other.parent, ignore_errors=True)
    finally:
        if not args.keep:
            bb.drop(name)
    rows = [("what", "seconds", "ratio", "note")]
    for i, (r, f) in enumerate(results, 1):
        run = f" (run {i})" if len(results) > 1 else ""
        rows += [
            (f"floor: one SQL statement{run}", f"{f['seconds']:.1f}", "1.00",
             f"{f['rows']:,} rows, {f['differ']} differ from the mart; load {f['load']}"),
            (f"refresh: `dbt build --select {MODEL}`{run}", f"{r['wall']:.1f}",
             f"{r['wall'] / f['seconds']:.2f}",
             f"vs floor; {r['rows']:,} rows, snapshot {r['snapshots'][0]:%Y-%m-%d %H:%M}; "
             f"load {r['load']}; goal {GOAL_SECONDS:.0f} s: "
             f"{'met' if r['wall'] <= GOAL_SECONDS else 'missed'}"),
            (f"  model alone{run}", f"{r['model']:.1f}", f"{r['model'] / f['seconds']:.2f}",
             "vs floor (dbt execution_time)"),
            (f"  its {r['test_count']} data tests{run}", f"{r['tests']:.1f}", "",
             "thread time (dbt execution_time)"),
        ]
        c = r["compare"]
        if c:
            rows += [
                (f"refresh with {args.compare}{run}", f"{c['wall']:.1f}",
                 f"{c['wall'] / f['seconds']:.2f}",
                 f"vs floor; run just before the one above; {c['rows']:,} rows; load {c['load']}"),
                (f"  model alone{run}", f"{c['model']:.1f}", f"{c['model'] / f['seconds']:.2f}",
                 f"vs floor; {r['model'] / c['model']:.2f}x of it above"),
            ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["| " + " | ".join([row[0].ljust(widths[0]), row[1].rjust(widths[1]),
                                row[2].rjust(widths[2]), row[3]]) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|---|")
    head = (f"{args.customers:,} customers, seed {bb.SEED}, built as of {info['as_of'][:10]}; "
            f"weekly snapshot as of the Monday before; goal: refresh within {GOAL_SECONDS:.0f} s")
    text = "\n".join([head, ""] + lines)
    print(text)
    if args.results:
        with open(args.results, "a") as out:
            out.write(f"\n```\n.venv/bin/python bench/bench_recommendations.py "
                      f"{' '.join(sys.argv[1:])}   # {started:%Y-%m-%d %H:%M} UTC\n```\n\n{text}\n")


if __name__ == "__main__":
    main()
