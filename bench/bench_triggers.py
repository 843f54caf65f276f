"""One 15-minute trigger run over a large shop, with the shipped triggers and with 60.

    .venv/bin/python bench/bench_triggers.py                      # 1,000,000 customers
    .venv/bin/python bench/bench_triggers.py --customers 20000    # a smoke check

A fresh database on the configured server (RETENTION_TEST_DATABASE_URL, else
RETENTION_DATABASE_URL, else the embedded one) is migrated by the project's migrations
(retention.db.schema) and filled set-wise (generate_series, a fixed seed) with:

* N customers, each subscribed to e-mail (half also to push); a few hundred per million
  subscribed in the last two days (welcome moments);
* products in 20 x 10 categories, each with a first product_changes row 90 days back,
  a share out of stock since 10 days, and in the last hours price drops, returns to
  stock and new products (the catalogue triggers);
* clickstream in sessions (views, carts, removals, wishlists, searches, purchases,
  app opens, the custom `bonus_credited` with an amount): --events-per-interval events
  per 15 minutes over the last 4 days, a twentieth of that rate over the 31 days before
  (the lookbacks: a cart's contents, interest in a product, the wishlist wait);
* orders (paid, delivered, cancelled, a share for a stock-out, returned) over 35 days,
  with 1-3 lines each.

The run is `retention.triggers.runner.run_triggers` over one interval (T - 15 min, T]:
exits, detection, recording, health and planning of the due steps through the campaign
engine; no sending (no channels). Two sets of triggers:

* (a) the shipped ones: every code trigger of the 15-minute run and every campaign file
  with an `entry:` (what `run_triggers` runs by default);
* (b) 60: the shipped ones plus generated campaign files with definitions of varied kinds
  (event entries on different types, categories, prices, brands and properties; order,
  subscription and product-change entries; waits and unless clauses), written to a
  temporary campaigns directory and loaded from there.

Before each timed run the trigger state (chains, hits, watermarks, health, the ledger) is
emptied, so both find the same moments; with --repeat the two alternate. Printed: the
data's sizes, the seconds of each run with its phases (the runner's `seconds`), the ratio
60 / shipped against the goal (3x), and the slowest triggers.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_dispatch import create_database, drop_database  # noqa: E402

END = datetime(2026, 11, 2, 10, 0, tzinfo=timezone.utc)
START = END - timedelta(minutes=15)
GOAL = 3.0
TOTAL = 60


# --------------------------------------------------------------------------- database

def populate(url: str, customers: int, per_interval: int) -> dict:
    """The shop (module docstring); returns the row counts."""
    from retention import db
    from retention.db.schema import upgrade

    upgrade(url)
    products = max(2000, customers // 50)
    dense_sessions = per_interval * 4 * 96 // 4      # ~4 events a session
    sparse_sessions = per_interval * 31 * 96 // 4 // 20
    orders = customers * 3 // 10
    p = {"n": customers, "np": products, "end": END, "dense": dense_sessions,
         "sparse": sparse_sessions, "orders": orders}
    steps = [
        ("customers", """
         insert into raw.customers (customer_id, email, created_at, timezone, country)
         select 'c' || lpad(i::text, 8, '0'), 'c' || i || '@example.test',
                case when i %% 2000 = 0 then %(end)s - (i %% 47) * interval '1 hour'
                     else %(end)s - interval '3 days' - (i %% 730) * interval '1 day' end,
                'Europe/Kyiv', 'UA'
         from generate_series(1, %(n)s) i"""),
        ("channel_subscriptions", """
         insert into raw.channel_subscriptions (customer_id, channel, address, subscribed_at)
         select c.customer_id, 'email', c.email, c.created_at from raw.customers c;
         insert into raw.channel_subscriptions (customer_id, channel, address, subscribed_at)
         select c.customer_id, 'mobile_push', 'tok-' || c.customer_id, c.created_at
         from raw.customers c where right(c.customer_id, 1) in ('0', '2', '4', '6', '8')"""),
        ("products", """
         insert into raw.products (product_id, name, category_path, brand, price, in_stock,
                                   updated_at)
         select 'p' || lpad(i::text, 6, '0'), 'Product ' || i,
                'cat' || lpad((i %% 20)::text, 2, '0') || '.sub' || ((i / 20) %% 10),
                'brand' || (i %% 37), (5 + (i * 7919) %% 500)::numeric, i %% 50 <> 1,
                %(end)s - interval '90 days'
         from generate_series(1, %(np)s) i"""),
        ("product_changes", """
         -- every product's first row; the last 30 per 20,000 are new in the scan window
         insert into raw.product_changes (product_id, changed_at, price, in_stock)
         select 'p' || lpad(i::text, 6, '0'),
                case when i > %(np)s - greatest(3, %(np)s * 30 / 20000)
                     then %(end)s - (i %% 130) * interval '1 minute' - interval '1 minute'
                     else %(end)s - interval '90 days' end,
                (5 + (i * 7919) %% 500)::numeric, true
         from generate_series(1, %(np)s) i;
         -- out of stock 10 days ago (2%%)
         insert into raw.product_changes (product_id, changed_at, price, in_stock)
         select 'p' || lpad(i::text, 6, '0'), %(end)s - interval '10 days', null, false
         from generate_series(1, %(np)s) i where i %% 50 = 1;
         -- back in stock in the last 2 hours (a quarter of those)
         insert into raw.product_changes (product_id, changed_at, price, in_stock)
         select 'p' || lpad(i::text, 6, '0'), %(end)s - (i %% 120) * interval '1 minute',
                null, true
         from generate_series(1, %(np)s) i where i %% 200 = 1;
         -- price drops of 5-30%% in the last 2 hours (0.5%% of products)
         insert into raw.product_changes (product_id, changed_at, price, in_stock)
         select 'p' || lpad(i::text, 6, '0'), %(end)s - (i %% 125) * interval '1 minute',
                round((5 + (i * 7919) %% 500) * (0.7 + (i %% 25) / 100.0), 2), true
         from generate_series(1, %(np)s) i where i %% 200 = 7"""),
        ("events", """
         select setseed(0.42);
         create temp table sessions as
         select s as sid,
                'c' || lpad((1 + floor(random() * %(n)s))::int::text, 8, '0') as customer_id,
                case when s <= %(dense)s then %(end)s - random() * interval '4 days'
                     else %(end)s - interval '4 days' - random() * interval '31 days' end
                  as started,
                (1 + floor(random() * 7))::int as k,
                floor(random() * 200)::int as cat,
                random() as kind
         from generate_series(1, %(dense)s + %(sparse)s) s;
         insert into raw.events (event_id, occurred_at, event_type, customer_id, session_id,
                                 product_id, price, search_query, properties)
         select 'e' || s.sid || '-' || j, t.at, t.type, s.customer_id, 's' || s.sid,
                case when t.type in ('view', 'cart', 'wishlist', 'remove_from_cart', 'purchase')
                     then 'p' || lpad((s.cat %% 20 + 20 * (s.cat / 20) + 200 * (1 + floor(t.r * (%(np)s / 200 - 1))::int))::text, 6, '0')
                end,
                null,
                case when t.type = 'search' then 'query ' || (s.cat * 7 + j) %% 500 end,
                case when t.type = 'bonus_credited'
                     then jsonb_build_object('amount', (j * 10) %% 50, 'reason', 'promo') end
         from sessions s
         cross join lateral generate_series(1, s.k) j
         cross join lateral (
           select s.started + j * interval '50 seconds' as at, random() as r,
                  case when s.kind < 0.01 then 'bonus_credited'
                       when s.kind < 0.05 then 'app_open'
                       else (array['view', 'view', 'view', 'view', 'view', 'view', 'view',
                                   'view', 'view', 'view', 'view', 'view', 'cart', 'cart',
                                   'cart', 'search', 'search', 'wishlist',
                                   'remove_from_cart', 'purchase'])[1 + floor(random() * 20)::int]
                  end as type) t
         where t.at <= %(end)s"""),
        ("orders", """
         select setseed(0.17);
         insert into raw.orders (order_id, customer_id, ordered_at, status, total_amount,
                                 currency, payment_method, cancel_reason)
         select 'o' || i, 'c' || lpad((1 + floor(random() * %(n)s))::int::text, 8, '0'),
                %(end)s - random() * interval '35 days',
                (array['paid', 'paid', 'delivered', 'delivered', 'delivered', 'delivered',
                       'cancelled', 'cancelled', 'returned', 'placed'])[1 + i %% 10],
                (10 + (i * 31) %% 400)::numeric, 'UAH',
                (array['card', 'cash', 'apple_pay'])[1 + i %% 3],
                case when i %% 10 = 6 then 'Out of stock' when i %% 10 = 7 then 'customer' end
         from generate_series(1, %(orders)s) i;
         insert into raw.order_items (order_id, line_no, product_id, quantity, unit_price)
         select 'o' || i, l, 'p' || lpad((1 + (i * 13 + l * 101) %% %(np)s)::text, 6, '0'), 1,
                (5 + (i * 7) %% 200)::numeric
         from generate_series(1, %(orders)s) i cross join generate_series(1, 1 + i %% 3) l"""),
    ]
    timings = {}
    with db.connect(url) as conn:
        # the migrations' secondary indexes of raw.events are built after the bulk insert
        indexes = conn.execute("""
            select indexname, indexdef from pg_indexes
            where schemaname = 'raw' and tablename = 'events'
              and indexname <> 'events_pkey'""").fetchall()
        for index, _ in indexes:
            conn.execute(f"drop index raw.{index}")
        for name, sql in steps:
            t = time.perf_counter()
            for statement in sql.split(";\n"):
                if statement.strip():
                    conn.execute(statement, p if "%(" in statement else None)
            conn.commit()
            timings[name] = time.perf_counter() - t
            print(f"  {name}: {timings[name]:.1f} s", flush=True)
        t = time.perf_counter()
        for _, definition in indexes:
            conn.execute(definition)
        conn.commit()
        timings["raw.events indexes"] = time.perf_counter() - t
    with db.connect(url, autocommit=True) as conn:
        t = time.perf_counter()
        conn.execute("vacuum analyze")
        timings["vacuum analyze"] = time.perf_counter() - t
        counts = {t: conn.execute(f"select count(*) from raw.{t}").fetchone()[0]
                  for t in ("customers", "channel_subscriptions", "products", "product_changes",
                            "events", "orders", "order_items")}
        counts["events in the interval"] = conn.execute(
            "select count(*) from raw.events where occurred_at > %s and occurred_at <= %s",
            (START, END)).fetchone()[0]
        counts["events in the scan range (interval + 2 h lateness)"] = conn.execute(
            "select count(*) from raw.events where occurred_at > %s and occurred_at <= %s",
            (START - timedelta(hours=2), END)).fetchone()[0]
    return {"counts": counts, "timings": timings}


# --------------------------------------------------------------------------- triggers

def generated_campaigns(n: int, seed: int = 7) -> list[str]:
    """`n` campaign files of varied trigger definitions (YAML texts)."""
    rnd = random.Random(seed)
    texts = []
    steps = ("steps:\n  - {name: first, channel: [mobile_push, email], template: weekly_promo, "
             "wait: 0m, only_unengaged: false}\n  - {name: second, channel: [email], "
             "template: weekly_promo, wait: 24h, only_unengaged: false}\n"
             "exit_on: [purchase, unsubscribe]\n")
    waits = ["0m", "15m", "30m", "1h", "2h", "1d", "3d"]
    for i in range(n):
        cat = f"cat{rnd.randrange(20):02d}"
        shape = i % 8
        wait = rnd.choice(waits)
        if shape == 0:
            body = (f"entry: {{event: view, per: category, where: {{category: {cat}}}}}\n"
                    f"wait: {wait}\nunless:\n  - {{event: [cart, purchase], same: category}}\n")
        elif shape == 1:
            body = (f"entry: {{event: cart, per: product, where: {{price: {{min: "
                    f"{rnd.choice([50, 100, 200])}}}}}}}\nwait: {wait}\nunless:\n"
                    "  - purchase: {same: product}\n  - {event: remove_from_cart, same: product}\n")
        elif shape == 2:
            body = (f"entry: {{event: wishlist, per: product, where: {{brand: "
                    f"[brand{rnd.randrange(37)}, brand{rnd.randrange(37)}]}}}}\n"
                    f"wait: {wait}\nunless:\n  - {{event: cart, same: product}}\n"
                    "  - purchase: {}\n")
        elif shape == 3:
            body = (f"entry: {{event: search, per: search}}\nwait: {wait}\nunless:\n"
                    "  - event: [view, cart]\n")
        elif shape == 4:
            body = (f"entry: {{event: [view, cart], where: {{category: {cat}.sub{rnd.randrange(10)}}}}}\n"
                    f"wait: {wait}\nunless:\n  - purchase: {{}}\n"
                    f"reentry: {{every: 7d}}\n")
        elif shape == 5:
            body = (f"entry: {{event: bonus_credited, where: {{properties: {{amount: {{gte: "
                    f"{rnd.choice([10, 20, 30])}}}}}}}}}\n")
        elif shape == 6:
            status = rnd.choice(["paid", "delivered", "[paid, delivered]"])
            body = (f"entry:\n  order: {{status: {status}, amount: {{min: {rnd.choice([50, 150])}}}}}\n"
                    f"  key: o{i}\nwait: {rnd.choice(['1h', '1d', '3d', '7d'])}\n"
                    "unless:\n  - purchase: {}\n")
        else:
            kind = rnd.choice(["price_drop", "back_in_stock", "app_open"])
            if kind == "app_open":
                body = ("entry: {event: app_open}\nwait: 30m\nunless:\n  - event: [view, search]\n"
                        "reentry: once\n")
            else:
                extra = "  min_drop: 0.1\n" if kind == "price_drop" else ""
                body = (f"entry:\n  product_change: {kind}\n{extra}"
                        f"  interest: {{events: [view, wishlist], within: 14d}}\n  key: g{i}\n")
        name = f"bench_gen_{i:02d}"
        texts.append((name, f"id: {name}\nname: Generated {i}\nkind: trigger\n"
                            f"audience: {{include_any: [{{all_customers: true}}]}}\n"
                            + body + steps))
    return texts


def reset_state(url: str) -> None:
    from retention import db
    with db.connect(url) as conn:
        conn.execute("truncate ops.chain_instances, ops.trigger_hits, ops.trigger_watermarks, "
                     "ops.trigger_health, ops.messages")
        conn.commit()
    with db.connect(url, autocommit=True) as conn:
        conn.execute("vacuum analyze ops.chain_instances")
        conn.execute("vacuum analyze ops.trigger_hits")
        conn.execute("vacuum analyze ops.messages")


def timed_run(url: str, names: list[str], campaigns: dict) -> dict:
    from retention.triggers.runner import run_triggers

    reset_state(url)
    t = time.perf_counter()
    result = run_triggers(START, END, url, triggers=names, campaigns=campaigns)
    total = time.perf_counter() - t
    moments = sum(r["new_moments"] for r in result["triggers"].values())
    started = sum(r["started"] for r in result["triggers"].values())
    planned = sum(c["planned"] for steps in result["steps"].values() for c in steps.values())
    per_trigger = {n: r.get("seconds", 0.0) for n, r in result["triggers"].items()}
    return {"total": total, "phases": result.get("seconds", {}), "moments": moments,
            "started": started, "planned": planned, "per_trigger": per_trigger}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--events-per-interval", type=int, default=None,
                        help="events per 15 minutes (default: 20,000 per million customers)")
    parser.add_argument("--repeat", type=int, default=1, help="alternating runs of each set")
    parser.add_argument("--keep-database", action="store_true")
    parser.add_argument("--database", help="reuse this database URL (kept; not populated)")
    parser.add_argument("--build-only", action="store_true",
                        help="build the shop, keep its database, run nothing")
    args = parser.parse_args()

    from retention import db
    from retention.campaigns.spec import load_campaign
    from retention.triggers.config import load_settings
    from retention.triggers.runner import definition_triggers

    per_interval = args.events_per_interval or max(200, args.customers * 20_000 // 1_000_000)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before: {load}; {os.cpu_count()} cores", flush=True)
    admin = name = None
    if args.database:
        url = args.database
        sizes = None
    else:
        server = (os.environ.get("RETENTION_TEST_DATABASE_URL")
                  or os.environ.get("RETENTION_DATABASE_URL") or db.database_url())
        admin, name, url = create_database(server, "bench_triggers")
        print(f"database {name}: {args.customers:,} customers, {per_interval:,} events per "
              "15 minutes ...", flush=True)
    try:
        if not args.database:
            t = time.perf_counter()
            sizes = populate(url, args.customers, per_interval)
            print(f"shop built in {time.perf_counter() - t:.0f} s", flush=True)
            for k, v in sizes["counts"].items():
                print(f"  {k}: {v:,}")
        if args.build_only:
            args.keep_database = True
            return 0
        settings = load_settings()
        shipped = [*settings.priority, *definition_triggers()]
        with tempfile.TemporaryDirectory(prefix="bench-campaigns-") as tmp:
            campaigns = {}
            for gen_name, text in generated_campaigns(TOTAL - len(shipped)):
                path = Path(tmp) / f"{gen_name}.yaml"
                path.write_text(text)
                campaigns[gen_name] = load_campaign(path)
            many = [*shipped, *campaigns]
            print(f"triggers: (a) {len(shipped)} shipped ({', '.join(shipped)}); "
                  f"(b) {len(many)}: those and {len(campaigns)} generated in {tmp}", flush=True)
            runs: dict[str, list[dict]] = {"a": [], "b": []}
            for r in range(args.repeat):
                for key, names in (("a", shipped), ("b", many)) if r % 2 == 0 else (
                        ("b", many), ("a", shipped)):
                    out = timed_run(url, names, campaigns)
                    runs[key].append(out)
                    print(f"  run {r + 1} ({key}, {len(names)} triggers): {out['total']:.1f} s, "
                          f"{out['moments']:,} moments, {out['started']:,} chains, "
                          f"{out['planned']:,} messages planned", flush=True)
    finally:
        if admin and not args.keep_database:
            drop_database(admin, name)
        elif admin:
            print(f"database kept: {url}", flush=True)

    def best(key: str) -> dict:
        return min(runs[key], key=lambda o: o["total"])

    a, b = best("a"), best("b")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n| triggers | run s | {' | '.join(k + ' s' for k in a['phases'])} | moments | "
          "chains | planned |")
    print("|---|---:|" + "---:|" * len(a["phases"]) + "---:|---:|---:|")
    for label, o, n in (("shipped", a, len(shipped)), ("60", b, len(many))):
        print(f"| {n} ({label}) | {o['total']:.1f} | "
              + " | ".join(f"{o['phases'].get(k, 0):.1f}" for k in a["phases"])
              + f" | {o['moments']:,} | {o['started']:,} | {o['planned']:,} |")
    ratio = b["total"] / a["total"]
    print(f"\nratio {len(many)} / {len(shipped)}: {ratio:.2f}x (goal <= {GOAL:g}x): "
          + ("met" if ratio <= GOAL else "NOT met"))
    slow = sorted(b["per_trigger"].items(), key=lambda kv: -kv[1])[:8]
    print("slowest triggers of the 60 (detect + record + health, s): "
          + ", ".join(f"{n} {s:.2f}" for n, s in slow))
    return 0


if __name__ == "__main__":
    sys.exit(main())
