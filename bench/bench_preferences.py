"""Send-time optimisation and the best channel on a simulated history with planted
preferences (retention_dev.preference_sim): how often marts.customer_send_time and
marts.customer_channel_engagement recover each customer's planted favourite hour of the
week and channel, and the engagement difference of an optimal-time, best-channel step
against its control arm.

    .venv/bin/python bench/bench_preferences.py [--customers 5000] [--seed 7]
                                                [--loyalty 0.4 0.55 0.7]
                                                [--server postgresql://postgres@127.0.0.1:5432/postgres]

Per hour loyalty (the share of a customer's opens and sessions that fall in their
favourite hour; the rest are spread over the 72 hours after a send or over the whole
period), a new database on `--server`: the simulated customers (12 weeks of one message
a week on each of e-mail, push and Telegram; activity 0.1-1, a third reading mail through
a privacy proxy whose machine opens are flagged), the two marts built with dbt as of
2026-11-02, then the recovery rates by the customer's signals (`any` row) and by the
engaged messages behind the best channel; then a step `channel: [best, email,
mobile_push, telegram]`, `send_time: optimal`, control 0.5, planned at 2026-11-02 10:00
UTC, answered by the simulated customers (open probability 0.15, plus 0.25 on the
favourite channel, plus 0.25 in the favourite hour), measured by
retention.results.step_arms.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from datetime import datetime, time as dtime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

AS_OF = datetime(2026, 11, 2, tzinfo=timezone.utc)
STEP_AT = AS_OF + timedelta(hours=10)
MARTS = ("stg_customers stg_events stg_ops_messages stg_ops_message_events "
         "customer_send_time customer_channel_engagement")
CAMPAIGN = textwrap.dedent("""\
    id: smart
    kind: promo
    audience:
      include_any:
        - all_customers: true
    steps:
      - {name: s, channel: [best, email, mobile_push, telegram], template: t,
         send_time: optimal, control: 0.5}
    """)


def one(server: str, customers: int, seed: int, loyalty: float) -> dict:
    from bench_dispatch import create_database, drop_database

    from retention import db
    from retention.campaigns.engine import plan_step, start_run
    from retention.campaigns.policy import Policy
    from retention.campaigns.spec import parse_campaign
    from retention.db.schema import upgrade
    from retention.results.step_arms import measure_step_arms
    from retention.warehouse.build import build
    from retention_dev import preference_sim as sim

    admin, name, url = create_database(server, prefix="bench_preferences")
    try:
        upgrade(url)
        t = time.perf_counter()
        truth = sim.plant(url, AS_OF, customers=customers, seed=seed, hour_loyalty=loyalty)
        planted = time.perf_counter() - t
        t = time.perf_counter()
        build(as_of=AS_OF, url=url, select=MARTS, indirect_selection="cautious")
        built = time.perf_counter() - t
        out = {"loyalty": loyalty, "plant_s": planted, "build_s": built}
        for k in (1, 4, 8, 16):
            r = sim.recovery(url, truth, min_signals=k)["hour_of_week"]
            out[f"hour>={k}"] = (r.customers, r.rate)
        with db.connect(url) as conn:
            none = conn.execute("select customer_id, preferred_hour_of_week from "
                                "marts.customer_send_time where channel = 'any' "
                                "and signals = 0").fetchall()
            best = conn.execute("select customer_id, channel, engaged from "
                                "marts.customer_channel_engagement where is_best").fetchall()
        out["hour_no_history"] = (len(none), sum(truth[c].hour_of_week == h for c, h in none)
                                  / len(none) if none else float("nan"))
        for k in (0, 3, 6):
            rows = [(c, ch) for c, ch, e in best if e >= k]
            out[f"channel engaged>={k}"] = (len(rows), sum(truth[c].channel == ch
                                                           for c, ch in rows) / len(rows))
        policy = Policy(global_cap=100, global_cap_days=7, channel_cap=100, channel_cap_days=7,
                        quiet_start=dtime(21), quiet_end=dtime(9),
                        default_timezone="Europe/Kyiv", global_holdout=0.0)
        campaign = parse_campaign(CAMPAIGN, "smart.yaml")
        run = start_run(campaign, STEP_AT, url=url, policy=policy)
        t = time.perf_counter()
        plan_step(campaign, run, "s", url=url, policy=policy)
        out["plan_s"] = time.perf_counter() - t
        sim.respond(url, run.run_id, "s", truth)
        [arms] = [m for m in measure_step_arms(STEP_AT + timedelta(days=3), run_ids=[run.run_id],
                                               url=url) if m.kind == "send_time"]
        [d] = [d for d in arms.differences if d.metric == "engagement_rate"]
        out["engagement"] = (arms.engaged["optimal"].members, d.treatment_value,
                             arms.engaged["default"].members, d.control_value, d.difference,
                             d.ci_low, d.ci_high)
        return out
    finally:
        drop_database(admin, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--loyalty", type=float, nargs="+", default=[0.4, 0.55, 0.7])
    parser.add_argument("--server", default=os.environ.get(
        "RETENTION_BENCH_SERVER", "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = parser.parse_args()
    for loyalty in args.loyalty:
        r = one(args.server, args.customers, args.seed, loyalty)
        print(f"\nhour loyalty {loyalty}: {args.customers:,} customers, planted in "
              f"{r['plant_s']:.1f} s, marts built in {r['build_s']:.1f} s, "
              f"step planned in {r['plan_s']:.2f} s")
        print("| customers | n | planted recovered |\n|---|---|---|")
        for k in (1, 4, 8, 16):
            n, rate = r[f"hour>={k}"]
            print(f"| hour of week, >= {k} signals | {n:,} | {rate:.1%} |")
        n, rate = r["hour_no_history"]
        print(f"| hour of week, no signal (segment's hour) | {n:,} | {rate:.1%} |")
        for k in (0, 3, 6):
            n, rate = r[f"channel engaged>={k}"]
            print(f"| best channel, >= {k} engaged messages on it | {n:,} | {rate:.1%} |")
        n1, p1, n0, p0, diff, low, high = r["engagement"]
        print(f"engagement: optimal+best {p1:.3f} ({n1:,}), control {p0:.3f} ({n0:,}), "
              f"difference {diff:+.3f} [{low:+.3f}, {high:+.3f}]")


if __name__ == "__main__":
    main()
