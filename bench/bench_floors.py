"""Floors of the published marts: each mart computed by one hand-written statement from
raw, timed, checked equal to the mart dbt built, and set against the dbt build.

    .venv/bin/python bench/bench_floors.py --customers 100000 [--database bench_floors_100000]
                                           [--template DB] [--keep] [--results bench/RESULTS.md]
    .venv/bin/python bench/bench_floors.py --database NAME --as-of 2026-10-31T00:00:00Z \\
                                           --project /path/to/dbt_project   # already built

The floors are bench/floors/<mart>.sql (customer_lifetime.sql is also run by
bench/bench_build.py), one per mart of dbt_project/models/marts except
product_recommendations; {as_of} in them is replaced by a timestamptz literal. CTEs several
floors share are written once in fragments, bench/floors/_<name>.sql (not floors
themselves): a line `-- include: _<name>.sql` stands for the fragment's text (read_floor). "From raw"
means the raw schema, and for the results marts (campaign_results, message_attribution,
customer_send_time, customer_channel_engagement) also the pipeline's own tables
ops.messages and ops.message_events, which is what those marts read; each file's header
says what it reads and which constants (dbt_project.yml vars) it uses.

With --customers: a database is loaded from the generated shop cached by bench_build.py
(seed 7, /tmp/retention-bench/shop-<N>-seed7, or cloned from --template when given), a
synthetic ledger is written into ops.messages and ops.message_events (LEDGER below:
13 weekly campaign runs to a quarter of the customers, a reminder step to 30% of them,
holdout, every status, deliveries, opens with machine opens, clicks, bounces,
unsubscribes; some planned and opened after as_of), and `dbt build` runs as
`retention build` does (bench_build.plain_build: fresh project copy, PGOPTIONS, threads,
as_of through the environment) as of the end of the data (default_as_of). The database is
dropped afterwards unless --keep. With --database/--as-of/--project the database is taken
as built, and the times come from that project's target/run_results.json. The server is
the one bench_build.py uses (RETENTION_DATABASE_URL, e.g.
postgresql://postgres@127.0.0.1:5432/postgres).

Each floor runs `--repeat` times (default 2) as `create temp table ... as` in a session with
the build's settings (jit=off, work_mem=64MB, timezone=UTC); the table shows the first and
the best time, and the ratios use the best. The floor is then compared with the mart,
every column the mart has (EXCEPT ALL both ways plus counts; numbers exactly, no
rounding beyond the mart's own; customer_stage_history: the snapshot of this as_of).
For each mart: its own dbt execution time, and its chain (the mart plus every model
upstream of it in manifest.json's parent_map). At the bottom: the full build (wall time of
`dbt build`, models and data tests, when built here; dbt's elapsed_time otherwise; and the
sum of every model's execution time) against the sum of the floors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

FLOORS = {
    "customer_lifetime": ROOT / "bench" / "floors" / "customer_lifetime.sql",
    "customer_stage_history": ROOT / "bench" / "floors" / "customer_stage_history.sql",
    "cohort_retention": ROOT / "bench" / "floors" / "cohort_retention.sql",
    "ropo_purchases": ROOT / "bench" / "floors" / "ropo_purchases.sql",
    "customer_category_affinity": ROOT / "bench" / "floors" / "customer_category_affinity.sql",
    "customer_top_category_affinity": ROOT / "bench" / "floors" / "customer_top_category_affinity.sql",
    "message_attribution": ROOT / "bench" / "floors" / "message_attribution.sql",
    "campaign_results": ROOT / "bench" / "floors" / "campaign_results.sql",
    "customer_channel_engagement": ROOT / "bench" / "floors" / "customer_channel_engagement.sql",
    "customer_send_time": ROOT / "bench" / "floors" / "customer_send_time.sql",
}
# the mart rows a floor computes: the snapshot of this as_of for the history
MART_WHERE = {"customer_stage_history": "as_of = {as_of}"}
SESSION = "-c jit=off -c work_mem=64MB -c timezone=UTC"  # as retention.warehouse.build

# A synthetic ledger (ops.messages, ops.message_events) for the results marts, derived
# deterministically from raw.customers and as_of (%(as_of)s): hashtext of the ids stands
# in for chance. share = %(share)s of the customers per run (percent).
LEDGER = [
    """
    insert into ops.messages (message_id, campaign_id, run_id, step, step_index, channel,
                              customer_id, variant, status, planned_at, sent_at, cap_class)
    select message_id, 'bench_c' || k %% 3, 'bench_r' || k, step, s,
           (array['email', 'email', 'email', 'mobile_push', 'mobile_push', 'web_push',
                  'telegram', 'sms', 'viber'])[1 + h %% 9],
           customer_id,
           case when s = 0 and h / 10 %% 100 < 5 then 'holdout'
                when h / 1000 %% 2 = 0 then 'a' else 'b' end,
           status, planned_at,
           case when status = 'sent' then planned_at + (h / 7 %% 300) * interval '1 second' end,
           case when k %% 3 = 2 then 'trigger' else 'promo' end
    from (
        select *,
            case when s = 0 and h / 10 %% 100 < 5 then 'holdout'
                 when h / 100000 %% 100 < 86 then 'sent'
                 when h / 100000 %% 100 < 89 then 'failed'
                 when h / 100000 %% 100 < 92 then 'suppressed'
                 when h / 100000 %% 100 < 95 then 'unknown'
                 else 'planned' end as status,
            %(as_of)s - (k * 7 - 3) * interval '1 day' + s * interval '2 days'
                + (h %% 600) * interval '1 minute' as planned_at
        from (
            select 'bm' || k || '-' || s || '-' || c.customer_id as message_id, k, s,
                   case s when 0 then 'main' else 'reminder' end as step, c.customer_id,
                   abs(hashtext('bm' || k || '-' || s || '-' || c.customer_id)) as h
            from raw.customers as c
            cross join generate_series(0, 12) as k
            cross join generate_series(0, 1) as s
            where abs(hashtext(c.customer_id || ':' || k)) %% 100 < %(share)s
              and (s = 0 or abs(hashtext(c.customer_id || ':r' || k)) %% 100 < 30)
        ) as drawn
    ) as decided
    """,
    """
    insert into ops.message_events (provider, provider_event_id, message_id, event_type,
                                    occurred_at, payload, received_at)
    select case when channel = 'email' then 'sendgrid' else channel end,
           message_id || ':' || event_type, message_id, event_type, occurred_at,
           payload, occurred_at
    from (
        select m.message_id, m.channel, t.event_type, t.occurred_at, t.payload
        from (select *, abs(hashtext(message_id || ':e')) as h from ops.messages
              where sent_at is not null and message_id like 'bm%%') as m
        cross join lateral (values
            ('delivered', m.sent_at + interval '30 seconds', '{}'::jsonb, h %% 100 < 92),
            ('open', m.sent_at + (h / 100 %% 4320) * interval '1 minute',
             case when m.channel = 'email' and h / 1000000 %% 10 = 0
                  then '{"sg_machine_open": true}'::jsonb else '{}'::jsonb end,
             h / 10 %% 100 < 35),
            ('click', m.sent_at + (h / 100 %% 4320 + 5) * interval '1 minute', '{}'::jsonb,
             h / 10 %% 100 < 35 and h / 100000 %% 100 < 30),
            ('bounce', m.sent_at + interval '1 minute', '{}'::jsonb,
             m.channel = 'email' and h %% 100 >= 98),
            ('unsubscribe', m.sent_at + interval '2 hours', '{}'::jsonb, h / 7 %% 1000 < 5)
        ) as t(event_type, occurred_at, payload, happened)
        where t.happened
    ) as e
    """,
    # events the provider could not tie to a message
    """
    insert into ops.message_events (provider, provider_event_id, message_id, event_type,
                                    occurred_at, payload, received_at)
    select 'sendgrid', 'bench-orphan-' || n, null, 'open', %(as_of)s - n * interval '1 hour',
           '{}'::jsonb, %(as_of)s
    from generate_series(1, 50) as n
    """,
]


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def _connect(url: str):
    import psycopg

    from retention import db

    return psycopg.connect(db.libpq_dsn(url), autocommit=True, options=SESSION)


def as_of_sql(as_of: datetime) -> str:
    return f"('{as_of.isoformat()}'::timestamptz)"


INCLUDE = re.compile(r"^-- include: (_[\w.-]+\.sql)[ \t]*$", re.MULTILINE)


def read_floor(path: Path, _within: tuple[Path, ...] = ()) -> str:
    """The text of a floor with each `-- include: _<name>.sql` line replaced by that
    fragment of the floor's folder (a list of CTEs, each followed by a comma, which may
    include other fragments), so the floor is one statement again."""
    if path in _within:
        raise ValueError(f"floor fragments include each other: {' -> '.join(p.name for p in _within + (path,))}")

    def expand(match: re.Match) -> str:
        fragment = path.parent / match.group(1)
        if not fragment.is_file():
            raise ValueError(f"{path}: included fragment {fragment} does not exist")
        return read_floor(fragment, _within + (path,)).rstrip("\n")

    return INCLUDE.sub(expand, path.read_text())


def floor_sql(mart: str, as_of: datetime) -> str:
    return read_floor(FLOORS[mart]).format(as_of=as_of_sql(as_of))


def write_ledger(url: str, as_of: datetime, share: int) -> dict:
    with _connect(url) as conn:
        if conn.execute("select exists (select 1 from ops.messages)").fetchone()[0]:
            log("ops.messages already has rows: ledger left as it is")
        else:
            t = time.perf_counter()
            for sql in LEDGER:
                conn.execute(sql, {"as_of": as_of, "share": share})
            conn.execute("analyze ops.messages")
            conn.execute("analyze ops.message_events")
            log(f"ledger written in {time.perf_counter() - t:.1f} s")
        return {
            "messages": conn.execute("select count(*) from ops.messages").fetchone()[0],
            "events": conn.execute("select count(*) from ops.message_events").fetchone()[0],
        }


def run_floors(url: str, as_of: datetime, marts: list[str], repeat: int) -> dict:
    """Each floor: times of `create temp table` (repeat runs), rows, and how many rows
    differ from the mart each way (0 and 0 when equal)."""
    out = {}
    with _connect(url) as conn:
        for mart in marts:
            sql = floor_sql(mart, as_of)
            times = []
            for _ in range(repeat):
                conn.execute(f"drop table if exists floor_{mart}")
                t = time.perf_counter()
                conn.execute(f"create temp table floor_{mart} as {sql}")
                times.append(time.perf_counter() - t)
            cols = [r[0] for r in conn.execute(
                "select column_name from information_schema.columns where table_schema = 'marts' "
                "and table_name = %s order by ordinal_position", (mart,))]
            if not cols:
                sys.exit(f"marts.{mart} does not exist: build the database first")
            floor_cols = {r[0] for r in conn.execute(
                "select attname from pg_attribute where attrelid = %s::regclass and attnum > 0 "
                "and not attisdropped", (f"floor_{mart}",))}
            missing = [c for c in cols if c not in floor_cols]
            if missing:
                sys.exit(f"floor of {mart} lacks columns {missing}")
            col_list = ", ".join(f'"{c}"' for c in cols)
            where = MART_WHERE.get(mart, "true").format(as_of=as_of_sql(as_of))
            mart_rows = f"select {col_list} from marts.{mart} where {where}"
            floor_rows = f"select {col_list} from floor_{mart}"
            only_mart = conn.execute(
                f"select count(*) from ({mart_rows} except all {floor_rows}) d").fetchone()[0]
            only_floor = conn.execute(
                f"select count(*) from ({floor_rows} except all {mart_rows}) d").fetchone()[0]
            rows = conn.execute(f"select count(*) from floor_{mart}").fetchone()[0]
            mart_count = conn.execute(f"select count(*) from ({mart_rows}) m").fetchone()[0]
            out[mart] = {"times": times, "best": min(times), "rows": rows, "mart_rows": mart_count,
                         "only_mart": only_mart, "only_floor": only_floor}
            log(f"{mart}: {', '.join(f'{x:.2f}' for x in times)} s, {rows:,} rows "
                f"(mart {mart_count:,}), differ: {only_mart} only in the mart, "
                f"{only_floor} only in the floor")
            conn.execute(f"drop table floor_{mart}")
    return out


def dbt_times(project: Path, marts: list[str]) -> dict:
    """From the build's run_results.json and manifest.json: each mart's execution time and
    its chain's (the mart and every model upstream), every model's, dbt's elapsed time."""
    rr = json.loads((project / "target" / "run_results.json").read_text())
    manifest = json.loads((project / "target" / "manifest.json").read_text())
    times = {r["unique_id"]: r["execution_time"] for r in rr["results"]}
    out = {"elapsed": rr.get("elapsed_time"),
           "models": sum(v for k, v in times.items() if k.startswith("model.")),
           "tests": sum(v for k, v in times.items() if not k.startswith("model.")),
           "marts": {}}
    needed: set[str] = set()
    for mart in marts:
        node = f"model.retention.{mart}"
        chain, todo = {node}, [node]
        while todo:
            for parent in manifest["parent_map"].get(todo.pop(), []):
                if parent.startswith("model.") and parent not in chain:
                    chain.add(parent)
                    todo.append(parent)
        needed |= chain
        out["marts"][mart] = {"model": times.get(node), "chain": sum(times.get(m, 0) for m in chain),
                              "chain_models": len(chain)}
    # the models these marts need, each once (intermediates shared by several chains)
    out["needed"] = sum(times.get(m, 0) for m in needed)
    out["needed_models"] = len(needed)
    out["other_models"] = sorted(k.split(".")[-1] for k in times
                                 if k.startswith("model.") and k not in needed)
    return out


def _r(a, b) -> str:
    return f"{a / b:.1f}x" if a is not None and b else "-"


def table(floors: dict, dbt: dict, wall: float | None, header: str) -> str:
    lines = [header, "",
             "| mart | rows | floor s (1st / best) | mart model s | model / floor | "
             "chain s (models) | chain / floor | differs (mart-only / floor-only) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    total = 0.0
    for mart, f in floors.items():
        d = dbt["marts"][mart]
        total += f["best"]
        same = "equal" if f["only_mart"] == 0 and f["only_floor"] == 0 and f["rows"] == f["mart_rows"] \
            else f"**{f['only_mart']} / {f['only_floor']}**"
        lines.append(f"| {mart} | {f['rows']:,} | {f['times'][0]:.2f} / {f['best']:.2f} | "
                     f"{d['model']:.2f} | {_r(d['model'], f['best'])} | "
                     f"{d['chain']:.2f} ({d['chain_models']}) | {_r(d['chain'], f['best'])} | {same} |")
    lines.append(f"| **sum of the floors** | | {total:.2f} | | | | | |")
    lines.append("")
    if wall is not None:
        lines.append(f"- full build, wall time of `dbt build` (models and data tests): {wall:.1f} s, "
                     f"{_r(wall, total)} the sum of the floors")
    lines.append(f"- dbt's elapsed_time of the build: {dbt['elapsed']:.1f} s, "
                 f"{_r(dbt['elapsed'], total)} the sum of the floors")
    lines.append(f"- every model's execution time, summed: {dbt['models']:.1f} s "
                 f"({_r(dbt['models'], total)}); data tests summed: {dbt['tests']:.1f} s")
    lines.append(f"- the {dbt['needed_models']} models these marts need (the union of the chains, "
                 f"each once), summed: {dbt['needed']:.1f} s ({_r(dbt['needed'], total)}); "
                 f"models without a floor here: {', '.join(dbt['other_models']) or 'none'}")
    return "\n".join(lines)


def load_database(name: str, customers: int, template: str | None) -> None:
    import bench_build as bb

    if bb._exists(name):
        log(f"reusing {name}")
        return
    if template:
        log(f"cloning {template} into {name}")
        bb.clone(template, name)
        return
    folder = bb.shop_folder(customers)
    bb._admin(f'create database "{name}"')
    bb.ensure_schemas_in(bb._url(name))
    log(f"loading {folder} into {name}")
    from retention.ingest.load import load_folder

    load_folder(folder, bb._url(name), loaded_at=datetime(2026, 11, 1, tzinfo=timezone.utc))
    with bb._connect(name) as conn:
        conn.execute("vacuum analyze")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, help="load, ledger and build a generated shop of this size")
    parser.add_argument("--database", help="database name (default bench_floors_<customers>)")
    parser.add_argument("--template", help="with --customers: clone this loaded database instead of loading")
    parser.add_argument("--ledger-share", type=int, default=25,
                        help="percent of the customers in each synthetic campaign run")
    parser.add_argument("--as-of", help="without --customers: the as_of the database was built for")
    parser.add_argument("--project", type=Path,
                        help="without --customers: the dbt project directory of that build (target/)")
    parser.add_argument("--marts", default=",".join(FLOORS))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the database built with --customers")
    parser.add_argument("--results", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()
    marts = args.marts.split(",")
    started = datetime.now(timezone.utc)
    load_before = open("/proc/loadavg").read().split()[:3]

    import bench_build as bb

    wall = None
    ledger = None
    if args.customers:
        from retention.warehouse.build import default_as_of

        name = args.database or f"bench_floors_{args.customers}"
        load_database(name, args.customers, args.template)
        url = bb._url(name)
        as_of = default_as_of(url)
        ledger = write_ledger(url, as_of, args.ledger_share)
        built = bb.plain_build(name, as_of, "floors")
        wall, project = built["wall"], Path(built["project"])
    else:
        if not (args.database and args.as_of and args.project):
            parser.error("give --customers, or --database, --as-of and --project of a built database")
        name, project = args.database, args.project
        as_of = datetime.fromisoformat(args.as_of.replace("Z", "+00:00"))
        url = bb._url(name)
    try:
        floors = run_floors(url, as_of, marts, args.repeat)
        dbt = dbt_times(project, marts)
    finally:
        if args.customers and not args.keep:
            bb.drop(name)
    load_after = open("/proc/loadavg").read().split()[:3]
    size = f"{args.customers:,} customers" if args.customers else name
    header = (f"{size}, as_of {as_of.isoformat()}"
              + (f", ledger {ledger['messages']:,} messages and {ledger['events']:,} events" if ledger else "")
              + f"; load average {' '.join(load_before)} before, {' '.join(load_after)} after")
    text = table(floors, dbt, wall, header)
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write(f"\n## Floors of the marts (bench/bench_floors.py)\n\n{started:%Y-%m-%d %H:%M} UTC, "
                    f"machine: 2 cores ({platform.processor() or platform.machine()}), PostgreSQL "
                    f"on 127.0.0.1\n\n```\n.venv/bin/python bench/bench_floors.py "
                    f"{' '.join(sys.argv[1:])}\n```\n{text}\n")
    bad = [m for m, f in floors.items() if f["only_mart"] or f["only_floor"] or f["rows"] != f["mart_rows"]]
    if bad:
        sys.exit(f"floors that differ from their mart: {', '.join(bad)}")


if __name__ == "__main__":
    main()
