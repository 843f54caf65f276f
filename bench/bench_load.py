"""Generate a shop of N customers and load it: rows per second and peak memory.

    .venv/bin/python bench/bench_load.py --customers 100000 [--customers 1000000]

Each size runs in a fresh database on the configured server (RETENTION_DATABASE_URL or
the embedded one), generation and load in separate child processes so each one's peak
RSS is its own. The load is run twice: the second run shows the cost of a re-load that
changes nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

CHILD = r"""
import json, resource, sys, time
from datetime import datetime, timezone
from pathlib import Path
mode, arg, url = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
if mode == "generate":
    from retention_dev.generate import generate_shop
    counts = generate_shop(Path(arg), customers=int(sys.argv[4]), seed=7)
    out = {"rows": sum(counts.values()), "counts": counts}
else:
    from retention.ingest.load import load_folder
    report = load_folder(arg, url, loaded_at=datetime(2026, 11, 1, tzinfo=timezone.utc))
    out = {"rows": sum(t.rows for t in report.tables), "accepted": report.accepted,
           "quarantined": report.quarantined}
out["seconds"] = time.perf_counter() - t
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode:
        sys.exit(f"child failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, action="append")
    args = parser.parse_args()
    sizes = args.customers or [100_000]

    import psycopg
    import sqlalchemy as sa

    from retention import db

    server = db.database_url()
    rows = []
    for n in sizes:
        name = f"bench_load_{uuid.uuid4().hex[:8]}"
        admin = sa.engine.make_url(server).set(database="postgres").render_as_string(hide_password=False)
        with psycopg.connect(db.libpq_dsn(admin), autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        url = sa.engine.make_url(server).set(database=name).render_as_string(hide_password=False)
        folder = Path(tempfile.mkdtemp(prefix=f"shop{n}-"))
        try:
            gen = child("generate", str(folder), url, str(n))
            size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
            first = child("load", str(folder), url)
            second = child("load", str(folder), url)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            with psycopg.connect(db.libpq_dsn(admin), autocommit=True) as conn:
                conn.execute(f'drop database if exists "{name}" with (force)')
        rows.append((n, gen, size_mb, first, second))

    print(f"{'customers':>10} {'rows':>12} {'csv MB':>8} | {'generate s':>10} {'rows/s':>10} {'RSS MB':>7} | "
          f"{'load s':>8} {'rows/s':>10} {'RSS MB':>7} | {'reload s':>8} {'rows/s':>10}")
    for n, gen, size_mb, first, second in rows:
        print(f"{n:>10,} {first['rows']:>12,} {size_mb:>8.0f} | {gen['seconds']:>10.1f} "
              f"{gen['rows'] / gen['seconds']:>10,.0f} {gen['peak_rss_mb']:>7.0f} | "
              f"{first['seconds']:>8.1f} {first['rows'] / first['seconds']:>10,.0f} "
              f"{first['peak_rss_mb']:>7.0f} | {second['seconds']:>8.1f} "
              f"{second['rows'] / second['seconds']:>10,.0f}")
    for n, _, _, first, _ in rows:
        print(f"  {n:,} customers: {first['accepted']:,} accepted, {first['quarantined']:,} quarantined")


if __name__ == "__main__":
    main()
