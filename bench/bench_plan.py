"""Planning a wave: start_run (freeze the audience) + plan_step (the ledger rows with their
eligibility) at N recipients, without sending.

    .venv/bin/python bench/bench_plan.py                          # 1,000,000 recipients
    .venv/bin/python bench/bench_plan.py --recipients 100000 --repeat 3
    .venv/bin/python bench/bench_plan.py --old-ref HEAD~1         # old and new code in turns
    .venv/bin/python bench/bench_plan.py --explain                # EXPLAIN (ANALYZE, BUFFERS)

A fresh database on the configured server (RETENTION_TEST_DATABASE_URL, else
RETENTION_DATABASE_URL, else the embedded one) gets N customers with an e-mail address and
a push token each (bench_dispatch.populate) and, unless --empty-ledger, one earlier e-mail
wave of N `sent` ledger rows two days before, which the frequency caps have to count.
Each repetition plans a new e-mail campaign run (all customers, no holdout) and deletes
it afterwards, so every repetition sees the same ledger. With --old-ref the engine module
of that git revision is loaded beside the working tree's and the two run in turns; the
ledger rows of both are compared by customer and step (status, reason, channel, address,
not_before, ...; not the message ids, which depend on whether the code numbers the
members, migration 0007) and must be identical. Each statement of start_run and plan_step slower than
50 ms is timed (and with --explain its plan printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

GOAL_S = 15.0
ENGINE = "plugins/retention/campaigns/engine.py"


def load_engine(ref: str | None):
    """The working tree's engine module, or the one of git revision `ref` (a copy)."""
    if ref is None:
        from retention.campaigns import engine
        return engine
    text = subprocess.run(["git", "show", f"{ref}:{ENGINE}"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-plan-")) / "engine_old.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("engine_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["engine_old"] = module
    spec.loader.exec_module(module)
    return module


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a server process on this machine, else 0."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StatementTimer:
    """Times every statement psycopg executes (and EXPLAINs the big ones on request), and
    adds up the CPU time their server processes spent on them (`cpu`): unlike the wall
    time, it does not count the waits for a core of a loaded machine."""

    def __init__(self, explain: bool) -> None:
        import psycopg
        self.explain, self.records, self.cpu = explain, [], 0.0
        self._orig = psycopg.Connection.execute
        timer = self

        def execute(conn, query, params=None, **kw):
            text = query if isinstance(query, str) else str(query)
            head = " ".join(text.split())[:70]
            big = any(head.lower().startswith(p) for p in
                      ("insert into ops.messages", "insert into ops.audience_members",
                       "create temp table", "with", "insert into step", "create unlogged"))
            if timer.explain and big:
                t = time.perf_counter()
                plan = timer._orig(conn, "explain (analyze, buffers, wal, verbose off) " + text,
                                   params, **kw).fetchall()
                timer.records.append((head, time.perf_counter() - t))
                print(f"\n--- {head}\n" + "\n".join(r[0] for r in plan), flush=True)
                if "insert into ops.audience_members" in head:
                    # start_run's sizes (its RETURNING), which plan_step reads
                    return timer._orig(conn, "select count(*), count(holdout_kind) from "
                                       "ops.audience_members where run_id = %(run_id)s",
                                       params)
                if head.lower().startswith("with members"):
                    # the step's counts, which plan_step may take from the statement
                    return timer._orig(conn, "select status, coalesce(reason, ''), channel, "
                                       "count(*) from ops.messages where run_id = "
                                       "%(member_run_id)s and step = %(step)s "
                                       "group by 1, 2, 3", params)
                return timer._orig(conn, "select 0, 0")
            t, c = time.perf_counter(), backend_cpu(conn.info.backend_pid)
            cur = timer._orig(conn, query, params, **kw)
            timer.records.append((head, time.perf_counter() - t))
            timer.cpu += backend_cpu(conn.info.backend_pid) - c
            return cur

        psycopg.Connection.execute = execute

    def take(self, threshold: float = 0.05) -> list[tuple[str, float]]:
        out = [(h, s) for h, s in self.records if s >= threshold]
        self.records = []
        return out

    def take_cpu(self) -> float:
        cpu, self.cpu = self.cpu, 0.0
        return cpu


def campaign(campaign_id: str):
    from retention.campaigns.spec import parse_campaign
    return parse_campaign(textwrap.dedent(f"""\
        id: {campaign_id}
        kind: promo
        audience: {json.dumps({"include_any": [{"all_customers": True}]})}
        steps:
          - {{name: wave, channel: [mobile_push, email], template: weekly_promo}}
        holdout: 0.05
        """), f"{campaign_id}.yaml")


def seed_earlier_wave(url: str, engine, policy, as_of) -> None:
    """One earlier e-mail wave, planned by the engine and marked sent (the caps count it)."""
    from retention import db
    c = campaign("bench_earlier")
    run = engine.start_run(c, as_of - timedelta(days=2), url, policy)
    engine.plan_step(c, run, "wave", url, policy)
    with db.connect(url, autocommit=True) as conn:
        conn.execute("update ops.messages set status = 'sent', sent_at = planned_at "
                     "where run_id = %s and status = 'planned'", (run.run_id,))
        conn.execute("vacuum analyze ops.messages")
        conn.execute("vacuum analyze ops.audience_members")


def ledger_digest(url: str, run_id: str) -> str:
    """A hash of the run's ledger rows by customer and step: the decisions (status, reason,
    channel, address, not_before, ...), not the message ids, which differ between code
    that numbers the members (migration 0007) and code that does not."""
    from retention import db
    with db.connect(url) as conn:
        return conn.execute(
            "select md5(string_agg(concat_ws('|', customer_id, step, status, reason, channel, "
            "address, not_before, variant, planned_at, step_index, cap_class), ',' "
            "order by customer_id collate \"C\", step)) "
            "from ops.messages where run_id = %s", (run_id,)).fetchone()[0]


def forget_run(url: str, run_id: str) -> None:
    from retention import db
    with db.connect(url, autocommit=True) as conn:
        conn.execute("delete from ops.messages where run_id = %s", (run_id,))
        conn.execute("delete from ops.audience_members where run_id = %s", (run_id,))
        conn.execute("delete from ops.campaign_runs where run_id = %s", (run_id,))
        conn.execute("vacuum analyze ops.messages")
        conn.execute("vacuum analyze ops.audience_members")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--old-ref", help="git revision whose engine.py runs in turns with ours")
    parser.add_argument("--old-schema", metavar="REVISION",
                        help="run the old engine on the schema at this migration revision "
                             "(downgraded before its runs, upgraded to head before ours)")
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--empty-ledger", action="store_true")
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--url", help="an already populated database (from --keep-database)")
    parser.add_argument("--prefix", default="bench_plan",
                        help="name prefix of the database it creates")
    args = parser.parse_args()

    from bench_dispatch import AS_OF, create_database, drop_database, policy, populate
    from retention import db

    from retention.db import schema

    engines = [("new", load_engine(None))]
    if args.old_ref:
        old = load_engine(args.old_ref)
        if args.old_schema:
            # the schema is set up by the loop below: the ledger module it imports from the
            # working tree would upgrade it to head
            old.ensure_ledger = lambda conn: None
        engines.insert(0, (f"old ({args.old_ref})", old))
    timer = StatementTimer(args.explain)
    n = args.recipients
    load0 = os.getloadavg()
    admin = name = None
    if args.url:
        url = args.url
    else:
        server = (os.environ.get("RETENTION_TEST_DATABASE_URL")
                  or os.environ.get("RETENTION_DATABASE_URL") or db.database_url())
        admin, name, url = create_database(server, args.prefix)
    rows, digests = [], {}
    try:
        if not args.url:
            print(f"database {name}: {n:,} customers ...", flush=True)
            print(f"populated in {populate(url, n):.1f} s", flush=True)
            if not args.empty_ledger:
                t = time.perf_counter()
                seed_earlier_wave(url, engines[-1][1], policy(), AS_OF)
                print(f"earlier wave seeded in {time.perf_counter() - t:.1f} s", flush=True)
                timer.take()
        c = campaign("bench_plan")
        for rep in range(args.repeat):
            for label, engine in engines:
                if args.old_schema:
                    if label == "new":
                        schema.upgrade(url)
                    else:
                        schema.downgrade(url, args.old_schema)
                    timer.take()
                timer.take_cpu()
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                run = engine.start_run(c, AS_OF, url, policy())
                t1 = time.perf_counter()
                start_stmts = timer.take()
                start_cpu = timer.take_cpu()
                counts = engine.plan_step(c, run, "wave", url, policy())
                t2 = time.perf_counter()
                plan_stmts = timer.take()
                plan_cpu = timer.take_cpu()
                digests.setdefault(label, set()).add(ledger_digest(url, run.run_id))
                rows.append(dict(label=label, rep=rep, load=load, start=t1 - t0, plan=t2 - t1,
                                 total=t2 - t0, audience=counts["audience"], counts=counts,
                                 start_stmts=start_stmts, plan_stmts=plan_stmts,
                                 start_cpu=start_cpu, plan_cpu=plan_cpu))
                print(f"{label} #{rep + 1}: start_run {t1 - t0:.1f} s, plan_step {t2 - t1:.1f} s "
                      f"(server CPU {start_cpu:.1f} + {plan_cpu:.1f} s; load {load:.2f})",
                      flush=True)
                forget_run(url, run.run_id)
                timer.take()
    finally:
        if name and not args.keep_database:
            drop_database(admin, name)
        elif name:
            print(f"database kept: {url}")

    print(f"\n{n:,} customers; {os.cpu_count()} cores shared with PostgreSQL; "
          f"goal {GOAL_S:g} s for start_run + plan_step\n")
    print("| code | run | load avg | start_run s | plan_step s | total s | rows/s | "
          "total / goal | server CPU start_run + plan_step s | CPU / goal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cpu = r["start_cpu"] + r["plan_cpu"]
        print(f"| {r['label']} | {r['rep'] + 1} | {r['load']:.2f} | {r['start']:.1f} | "
              f"{r['plan']:.1f} | {r['total']:.1f} | {r['audience'] / r['total']:,.0f} | "
              f"{r['total'] / GOAL_S:.2f} | {r['start_cpu']:.1f} + {r['plan_cpu']:.1f} = "
              f"{cpu:.1f} | {cpu / GOAL_S:.2f} |")
    print()
    for r in rows:
        print(f"{r['label']} #{r['rep'] + 1} statements: " + "; ".join(
            f"{h[:48]}... {s:.2f} s" for h, s in r["start_stmts"] + r["plan_stmts"]))
    c0 = rows[0]["counts"] if rows else {}
    print(f"\ncounts: planned {c0.get('planned', 0):,}, holdout {c0.get('holdout', 0):,}, "
          f"suppressed {c0.get('suppressed_by_reason')}, channels {c0.get('channels')}")
    same = len({d for ds in digests.values() for d in ds}) == 1
    if not args.explain:
        print(f"ledger rows identical across code and runs: {'yes' if same else 'NO'}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in load0)} at the start, "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    return 0 if same or args.explain else 1


if __name__ == "__main__":
    raise SystemExit(main())
