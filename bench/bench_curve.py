"""The cost curve: load, full build, daily incremental build and a 1-per-customer e-mail
wave at several sizes, with the fitted growth exponent of each and a projection.

    .venv/bin/python bench/bench_curve.py --customers 100000 --customers 1000000 \
                                          --customers 3000000 [--results bench/RESULTS.md]

For each size, in this order, on the machine's PostgreSQL (RETENTION_DATABASE_URL):

- load: the generated shop (seed 7, bench_build's cache) loaded by `load_folder` into a
  fresh database, in a child process, as bench_build prepares its base; then the last
  days (about 1% of the rows) are moved out to schema `holdback` (untimed);
- full build: `dbt build` of the whole project as of the cut-off, on a copy of that base;
- incremental: the held-back rows put back, `dbt build` as of the end of the data with the
  full build's project (dbt's parse reused, as the daily build);
- e-mail wave: bench_dispatch.py's e-mail wave (start_run + plan_step + dispatch through
  SendGrid's stand-in, 20 ms per request), one message per customer, its own database.

Besides the seconds it records what each size costs the server: the database's size on
disk after the incremental build, the temporary files the builds wrote (pg_stat_database
temp_bytes) and the longest single dbt node (one statement runs on one core).

The exponent b of each step is the least-squares slope of log(seconds) on log(customers)
(t = a * N^b); the projection to 10M and 30M customers extrapolates that line.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

import bench_build as bb  # noqa: E402

STEPS = ("load", "full build", "incremental build", "e-mail wave")
PROJECT_TO = (10_000_000, 30_000_000)


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def db_stats(name: str) -> dict:
    with bb._connect(name) as conn:
        size, temp = conn.execute(
            "select pg_database_size(current_database()), temp_bytes from pg_stat_database "
            "where datname = current_database()").fetchone()
    return {"size": size, "temp": temp}


def measure_load_and_builds(n: int) -> dict:
    """Load (timed inside prepare_base, read from its log line), then full and incremental."""
    seen: list[str] = []
    plain_log = bb.log

    def capture(msg: str) -> None:
        seen.append(msg)
        plain_log(msg)

    bb.log = capture
    try:
        bb.shop_folder(n)  # generation is not part of the curve
        before = loadavg()
        base, info = bb.prepare_base(n)
    finally:
        bb.log = plain_log
    loaded = [float(m.group(1)) for s in seen if (m := re.match(r"loaded in ([\d.]+) s", s))]
    if not loaded:
        sys.exit(f"{base} was reused, so its load was not timed: drop it and run again")
    cutoff, end = (datetime.fromisoformat(info[k]) for k in ("cutoff", "end"))
    work = f"{bb.DB_PREFIX}curve_{n}_{os.getpid()}"
    out = {"rows": info["rows"], "load": loaded[0], "load_avg": {"load": before}}
    try:
        # the base becomes the work database (renamed, not copied): a copy would hold raw
        # twice on disk for a moment, about 80 GB at 3,000,000 customers
        bb._admin(f'alter database "{base}" rename to "{work}"')
        stats0 = db_stats(work)
        out["load_avg"]["full build"] = loadavg()
        full = bb.plain_build(work, cutoff, "full")
        bb.restore_holdback(work)
        out["load_avg"]["incremental build"] = loadavg()
        inc = bb.plain_build(work, end, "incremental", project=Path(full["project"]))
        stats1 = db_stats(work)
        out.update({"full build": full["wall"], "incremental build": inc["wall"],
                    "db_bytes": stats1["size"], "temp_bytes": stats1["temp"] - stats0["temp"],
                    "slowest": full.get("slowest", [])[:1],
                    "held_share": info["share"]})
    finally:
        bb.drop(work)
        bb.drop(base)
    return out


def measure_wave(n: int) -> tuple[float, str]:
    before = loadavg()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_dispatch.py"),
                           "--recipients", str(n), "--skip-push", "--skip-per-message"],
                          capture_output=True, text=True, cwd=ROOT)
    row = next((ln for ln in proc.stdout.splitlines() if ln.startswith("| e-mail (")), None)
    if proc.returncode or row is None:
        sys.exit(f"e-mail wave at {n:,} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    cells = [c.strip() for c in row.strip("|").split("|")]
    return float(cells[4]), before  # total s: start_run + plan_step + dispatch


def fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """(a, b) of t = a * N^b by least squares on the logs."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - b * mx), b


def table(res: dict[int, dict]) -> str:
    sizes = sorted(res)
    lines = ["| step | " + " | ".join(f"{n:,}" for n in sizes) + " | exponent b | "
             + " | ".join(f"{p // 1_000_000}M projected" for p in PROJECT_TO) + " |",
             "|---|" + "---:|" * (len(sizes) + 1 + len(PROJECT_TO))]
    for step in STEPS:
        secs = [res[n][step] for n in sizes]
        if len(sizes) > 1:
            a, b = fit(sizes, secs)
            proj = [a * p ** b for p in PROJECT_TO]
            tail = f"{b:.2f} | " + " | ".join(f"{t:,.0f} s ({t / 3600:.1f} h)" for t in proj)
        else:
            tail = "- | " + " | ".join("-" for _ in PROJECT_TO)
        lines.append(f"| {step} s | " + " | ".join(f"{t:,.1f}" for t in secs) + f" | {tail} |")
    lines.append("| raw rows | " + " | ".join(f"{res[n]['rows']:,}" for n in sizes) + " |"
                 + " |" * (1 + len(PROJECT_TO)))
    lines.append("| database on disk after the builds, GB | "
                 + " | ".join(f"{res[n]['db_bytes'] / 2**30:.1f}" for n in sizes) + " |"
                 + " |" * (1 + len(PROJECT_TO)))
    lines.append("| temporary files written by the two builds, GB | "
                 + " | ".join(f"{res[n]['temp_bytes'] / 2**30:.1f}" for n in sizes) + " |"
                 + " |" * (1 + len(PROJECT_TO)))
    lines.append("| slowest node of the full build | "
                 + " | ".join(", ".join(f"{k} {v:.0f} s" for v, k in res[n]["slowest"]) or "-"
                              for n in sizes) + " |" + " |" * (1 + len(PROJECT_TO)))
    lines.append("")
    for n in sizes:
        lines.append(f"- {n:,}: load average before each step: "
                     + ", ".join(f"{k} {v}" for k, v in res[n]["load_avg"].items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, action="append")
    parser.add_argument("--results", type=Path, help="append the table to this Markdown file")
    parser.add_argument("--skip-wave", action="store_true")
    args = parser.parse_args()
    sizes = sorted(args.customers or [100_000, 1_000_000, 3_000_000])
    bb.DB_PREFIX = "bench_curve_"
    started = datetime.now(timezone.utc)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    res: dict[int, dict] = {}
    for n in sizes:
        t = time.perf_counter()
        res[n] = measure_load_and_builds(n)
        if args.skip_wave:
            res[n]["e-mail wave"] = float("nan")
        else:
            res[n]["e-mail wave"], res[n]["load_avg"]["e-mail wave"] = measure_wave(n)
        bb.log(f"{n:,} done in {time.perf_counter() - t:.0f} s: "
               + ", ".join(f"{s} {res[n][s]:.1f} s" for s in STEPS))
        print(table(res), flush=True)
    text = table(res)
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write(f"\n## The cost curve (bench/bench_curve.py, {commit}, "
                    f"{started:%Y-%m-%d %H:%M} UTC)\n\n```\n.venv/bin/python bench/bench_curve.py "
                    f"{' '.join(sys.argv[1:])}\n```\n\n{text}\n")


if __name__ == "__main__":
    main()
