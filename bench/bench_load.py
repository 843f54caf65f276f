"""Load a generated shop: the load and a re-load against the floor of a plain COPY.

    .venv/bin/python bench/bench_load.py --customers 100000 [--customers 1000000]
    .venv/bin/python bench/bench_load.py --folder /tmp/retention-bench/shop-100000-seed7

Each size runs in a fresh database on the configured server (RETENTION_DATABASE_URL or
the embedded one). `--customers N` generates the shop first (seed 7) into a temporary
folder; `--folder` takes a shop already generated (a folder of contract files; its size
is read from customers.csv). Every step runs in its own child process, so each one's peak
RSS is its own:

* floor: every file COPYed into a text-only table of its own (the file's columns, all
  text, no index), in one transaction, streamed as the loader streams them; run before
  the load and again after the re-load, and the mean is the floor (the machine is
  shared: the two runs show how much it moved);
* load: `retention.ingest.load.load_folder` into the empty database;
* re-load: the same files again (nothing changes; files unchanged since the load that
  wrote their table are not read again, see retention.ingest.load);
* recheck: the same files again with `recheck=True`, every file read and checked (what a
  re-load costs when its files changed or the tables were written by hand; a loader
  without `recheck` runs a plain re-load here).

Each is given in wall seconds and in the seconds of CPU its server process used (read
from /proc when the server runs on this machine: steadier than wall time on a busy
machine), with the ratio of each to the floor's, rows per second and the peak RSS.
That CPU leaves out the parallel workers PostgreSQL may start for an index build (a
first load builds its tables' indexes after the insert); `--serial` runs every step
with max_parallel_maintenance_workers = 0, so the server process does all the work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

CHILD = r"""
import json, os, resource, sys, time
from datetime import datetime, timezone
from pathlib import Path
import psycopg
mode, arg, url = sys.argv[1], sys.argv[2], sys.argv[3]

server_cpu = {}
def _cpu(conn):
    # the server process's CPU seconds so far (0 when it is not on this machine)
    try:
        with open(f"/proc/{conn.info.backend_pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
_commit = psycopg.Connection.commit
def commit(self):
    server_cpu[self.info.backend_pid] = _cpu(self)
    _commit(self)
psycopg.Connection.commit = commit

t = time.perf_counter()
if mode == "generate":
    from retention_dev.generate import generate_shop
    counts = generate_shop(Path(arg), customers=int(sys.argv[4]), seed=7)
    out = {"rows": sum(counts.values()), "counts": counts}
elif mode == "floor":
    from retention import db
    from retention.ingest.load import _stream, discover, read_header
    files, _ = discover(Path(arg))
    with psycopg.connect(db.libpq_dsn(url)) as conn:
        for name, path in files.items():
            header = read_header(path)
            cols = ", ".join('"' + h + '"' for h in header)
            conn.execute(f'create table "floor_{name}" (' +
                         ", ".join('"' + h + '" text' for h in header) + ")")
            with conn.cursor().copy(f'copy "floor_{name}" ({cols}) from stdin with '
                                    "(format csv, header true, encoding 'UTF8')") as copy:
                for chunk in _stream(path):
                    copy.write(chunk)
        conn.commit()
        for name in files:
            conn.execute(f'drop table "floor_{name}"')
        conn.commit()
    out = {}
else:
    import inspect
    from retention.ingest.load import load_folder
    extra = {}
    if mode == "recheck" and "recheck" in inspect.signature(load_folder).parameters:
        extra["recheck"] = True
    report = load_folder(arg, url, loaded_at=datetime(2026, 11, 1, tzinfo=timezone.utc), **extra)
    out = {"rows": sum(t.rows for t in report.tables), "accepted": report.accepted,
           "quarantined": report.quarantined, "inserted": sum(t.inserted for t in report.tables),
           "updated": sum(t.updated for t in report.tables)}
out["seconds"] = time.perf_counter() - t
out["server_cpu"] = sum(server_cpu.values()) if mode == "floor" else max(server_cpu.values(), default=0.0)
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


SERIAL = False


def child(*args: str) -> dict:
    env = dict(os.environ)
    if SERIAL:
        env["PGOPTIONS"] = (env.get("PGOPTIONS", "") + " -c max_parallel_maintenance_workers=0"
                            ).strip()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    if proc.returncode:
        sys.exit(f"child failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, action="append", default=[],
                        help="generate a shop of N customers (seed 7) and load it")
    parser.add_argument("--folder", type=Path, action="append", default=[],
                        help="load this already generated shop instead")
    parser.add_argument("--db-prefix", default="bench_load_",
                        help="name prefix of the scratch databases (dropped at the end)")
    parser.add_argument("--serial", action="store_true",
                        help="no parallel workers for index builds: the server CPU figure "
                             "then counts every build's work")
    args = parser.parse_args()
    global SERIAL
    SERIAL = args.serial
    runs: list[tuple[int | None, Path | None]] = [(n, None) for n in args.customers]
    runs += [(None, f.resolve()) for f in args.folder]
    if not runs:
        runs = [(100_000, None)]

    import psycopg
    import sqlalchemy as sa

    from retention import db

    server = db.database_url()
    admin = sa.engine.make_url(server).set(database="postgres").render_as_string(
        hide_password=False)
    results = []
    for n, given in runs:
        name = f"{args.db_prefix}{uuid.uuid4().hex[:8]}"
        with psycopg.connect(db.libpq_dsn(admin), autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        url = sa.engine.make_url(server).set(database=name).render_as_string(hide_password=False)
        folder = given or Path(tempfile.mkdtemp(prefix=f"shop{n}-"))
        try:
            gen = child("generate", str(folder), url, str(n)) if given is None else None
            if n is None:
                with open(folder / "customers.csv", "rb") as f:
                    n = sum(1 for _ in f) - 1
            size_mb = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20
            before = load_average()
            floor1 = child("floor", str(folder), url)
            first = child("load", str(folder), url)
            second = child("load", str(folder), url)
            third = child("recheck", str(folder), url)
            floor2 = child("floor", str(folder), url)
            after = load_average()
        finally:
            if given is None:
                shutil.rmtree(folder, ignore_errors=True)
            with psycopg.connect(db.libpq_dsn(admin), autocommit=True) as conn:
                conn.execute(f'drop database if exists "{name}" with (force)')
        results.append((n, gen, size_mb, floor1, floor2, first, second, third, before, after))

    print(f"{'customers':>10} {'rows':>11} {'csv MB':>7} | {'floor s (2 runs)':>16} "
          f"{'cpu s (2 runs)':>14} | "
          f"{'load s':>7} {'x':>5} {'cpu s':>6} {'x':>5} {'rows/s':>9} {'RSS MB':>6} | "
          f"{'reload s':>8} {'x':>5} {'cpu s':>6} {'x':>5} {'rows/s':>9} {'RSS MB':>6} | "
          f"{'recheck s':>9} {'x':>5} {'cpu s':>6} {'x':>5} {'rows/s':>9} {'RSS MB':>6} | load avg")
    for n, gen, size_mb, floor1, floor2, first, second, third, before, after in results:
        wall = (floor1["seconds"] + floor2["seconds"]) / 2
        cpu = (floor1["server_cpu"] + floor2["server_cpu"]) / 2
        rows = first["rows"]

        def cells(r: dict) -> str:
            ratio_cpu = f"{r['server_cpu'] / cpu:>5.1f}" if cpu else f"{'-':>5}"
            return (f"{r['seconds']:>7.1f} {r['seconds'] / wall:>5.1f} {r['server_cpu']:>6.1f} "
                    f"{ratio_cpu} {rows / r['seconds']:>9,.0f} {r['peak_rss_mb']:>6.0f}")

        print(f"{n:>10,} {rows:>11,} {size_mb:>7.0f} | "
              f"{wall:>6.1f} ({floor1['seconds']:.1f}, {floor2['seconds']:.1f}) "
              f"{cpu:>5.1f} ({floor1['server_cpu']:.1f}, {floor2['server_cpu']:.1f}) | "
              f"{cells(first)} | {cells(second):>8} | {cells(third):>9} | {before} .. {after}")
    for n, gen, _, _, _, first, second, third, _, _ in results:
        made = f"generated in {gen['seconds']:.0f} s, " if gen else ""
        print(f"  {n:,} customers: {made}{first['accepted']:,} accepted, "
              f"{first['quarantined']:,} quarantined; re-load: {second['inserted']:,} inserted, "
              f"{second['updated']:,} updated; recheck: {third['inserted']:,} inserted, "
              f"{third['updated']:,} updated")
    print("  x: the ratio to the floor (the mean of the two floor runs, before the load and "
          "after the re-load); cpu s: the server process's CPU seconds")


if __name__ == "__main__":
    main()
