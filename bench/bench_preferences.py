"""Send-time optimisation and the best channel on a simulated history with planted
preferences (retention_dev.preference_sim): how often marts.customer_send_time and
marts.customer_channel_engagement recover each customer's planted favourite hour of the
week and channel, and the engagement difference of an optimal-time, best-channel step
against its control arm.

    .venv/bin/python bench/bench_preferences.py [--customers 5000] [--seed 7]
                                                [--loyalty 0.4 0.55 0.7] [--planted]
                                                [--server postgresql://postgres@127.0.0.1:5432/postgres]
                                                [--prefix bench_preferences]

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

`--planted`: the same on a generated shop whose ground truth the generator planted
(generate_shop(plant_preferences=True, hour_loyalty=...), loaded with load_folder): its
browse sessions in the favourite hour with chance hour_loyalty, its 12-week message history
on each channel the customer is subscribed to (retention_dev.planted_truth, the same
engagement model), both marts and what they are built from (customer_lifetime's RFM
segments) built with dbt as of the shop's end, 2026-10-31; the best channel is also
counted among the customers with at least two eligible channels (with one, it is the
planted one by construction); the step offers all six channels and is planned at
2026-10-31 10:00 UTC. Then the planted churn: BG/NBD fitted on the loaded paid and
delivered orders, the AUC of 1 - P(alive) for the planted drop-outs among the repeat
buyers (a one-time buyer may drop out too, which BG/NBD does not model: all buyers too).
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
         "int_send_time_customers_changed int_send_time_sessions int_send_time_signals "
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


def one(server: str, customers: int, seed: int, loyalty: float,
        prefix: str = "bench_preferences") -> dict:
    from bench_dispatch import create_database, drop_database

    from retention import db
    from retention.campaigns.engine import plan_step, start_run
    from retention.campaigns.policy import Policy
    from retention.campaigns.spec import parse_campaign
    from retention.db.schema import upgrade
    from retention.results.step_arms import measure_step_arms
    from retention.warehouse.build import build
    from retention_dev import preference_sim as sim

    admin, name, url = create_database(server, prefix=prefix)
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


def one_planted(server: str, customers: int, seed: int, loyalty: float,
                prefix: str = "bench_preferences") -> dict:
    import tempfile

    import numpy as np
    import pandas as pd
    from bench_dispatch import create_database, drop_database

    from retention import db
    from retention.campaigns.engine import plan_step, start_run
    from retention.campaigns.policy import Policy
    from retention.campaigns.spec import parse_campaign
    from retention.db.schema import upgrade
    from retention.ingest.load import load_folder
    from retention.results.step_arms import measure_step_arms
    from retention.warehouse import predict as P
    from retention.warehouse.build import build
    from retention_dev import planted_truth
    from retention_dev import preference_sim as sim
    from retention_dev.generate import DEFAULT_END, generate_shop

    step_at = DEFAULT_END + timedelta(hours=10)
    admin, name, url = create_database(server, prefix=prefix)
    try:
        with tempfile.TemporaryDirectory() as folder:
            upgrade(url)
            t = time.perf_counter()
            generate_shop(Path(folder), customers, seed=seed, plant_preferences=True,
                          hour_loyalty=loyalty)
            out = {"loyalty": loyalty, "generate_s": time.perf_counter() - t}
            t = time.perf_counter()
            load_folder(folder, url, loaded_at=DEFAULT_END, currency="UAH")
            out["load_s"] = time.perf_counter() - t
            truth = planted_truth.read_truth(folder)
        t = time.perf_counter()
        written = planted_truth.write_history(url, truth, DEFAULT_END, hour_loyalty=loyalty)
        out["history_s"], out["messages"] = time.perf_counter() - t, written["messages"]
        t = time.perf_counter()
        build(as_of=DEFAULT_END, url=url, select="+customer_send_time +customer_channel_engagement",
              indirect_selection="empty")
        out["build_s"] = time.perf_counter() - t
        for k in (1, 4, 8, 16):
            r = sim.recovery(url, truth, min_signals=k)["hour_of_week"]
            out[f"hour>={k}"] = (r.customers, r.rate)
        with db.connect(url) as conn:
            none = conn.execute("select customer_id, preferred_hour_of_week from "
                                "marts.customer_send_time where channel = 'any' "
                                "and signals = 0").fetchall()
            best = conn.execute(
                "select b.customer_id, b.channel, b.engaged, (select count(*) from "
                "marts.customer_channel_engagement e where e.customer_id = b.customer_id "
                "and e.is_eligible) from marts.customer_channel_engagement b "
                "where b.is_best").fetchall()
            purchases = pd.DataFrame(conn.execute(
                "select customer_id, ordered_at, total_amount::float8 from raw.orders "
                "where status in ('paid', 'delivered')").fetchall(),
                columns=["customer_id", "purchased_at", "revenue"])
        out["hour_no_history"] = (len(none), sum(truth[c].hour_of_week == h for c, h in none)
                                  / len(none) if none else float("nan"))
        for k in (0, 3, 6):
            for choice in (1, 2):
                rows = [(c, ch) for c, ch, e, n in best if e >= k and n >= choice]
                out[f"channel engaged>={k} eligible>={choice}"] = (
                    len(rows), sum(truth[c].channel == ch for c, ch in rows) / len(rows)
                    if rows else float("nan"))
        policy = Policy(global_cap=100, global_cap_days=7, channel_cap=100, channel_cap_days=7,
                        quiet_start=dtime(21), quiet_end=dtime(9),
                        default_timezone="Europe/Kyiv", global_holdout=0.0)
        campaign = parse_campaign(CAMPAIGN.replace(
            "[best, email, mobile_push, telegram]",
            "[best, email, mobile_push, web_push, telegram, sms, viber]"), "smart.yaml")
        run = start_run(campaign, step_at, url=url, policy=policy)
        t = time.perf_counter()
        plan_step(campaign, run, "s", url=url, policy=policy)
        out["plan_s"] = time.perf_counter() - t
        sim.respond(url, run.run_id, "s", truth)
        [arms] = [m for m in measure_step_arms(step_at + timedelta(days=3), run_ids=[run.run_id],
                                               url=url) if m.kind == "send_time"]
        [d] = [d for d in arms.differences if d.metric == "engagement_rate"]
        out["engagement"] = (arms.engaged["optimal"].members, d.treatment_value,
                             arms.engaged["default"].members, d.control_value, d.difference,
                             d.ci_low, d.ci_high)
        prediction = P.predict_customer_value(purchases, DEFAULT_END)
        scores = prediction.summary.join(prediction.scores)
        dropped = np.array([truth[c].churned_at is not None for c in scores.index])
        alive = scores["probability_alive"].to_numpy()
        repeat = (scores["frequency"] > 0).to_numpy()
        out["churn"] = (int(repeat.sum()), int(dropped[repeat].sum()),
                        P.ranking_quality(1 - alive[repeat], dropped[repeat],
                                          ~dropped[repeat])[0],
                        float(alive[repeat].sum()), int((~dropped[repeat]).sum()),
                        len(scores), P.ranking_quality(1 - alive, dropped, ~dropped)[0])
        return out
    finally:
        drop_database(admin, name)


def report_planted(customers: int, r: dict) -> None:
    print(f"\nplanted shop, hour loyalty {r['loyalty']}: {customers:,} customers generated in "
          f"{r['generate_s']:.1f} s, loaded in {r['load_s']:.1f} s, {r['messages']:,} messages "
          f"of history in {r['history_s']:.1f} s, marts built in {r['build_s']:.1f} s, step "
          f"planned in {r['plan_s']:.2f} s")
    print("| customers | n | planted recovered |\n|---|---|---|")
    for k in (1, 4, 8, 16):
        n, rate = r[f"hour>={k}"]
        print(f"| hour of week, >= {k} signals | {n:,} | {rate:.1%} |")
    n, rate = r["hour_no_history"]
    print(f"| hour of week, no signal (segment's hour) | {n:,} | {rate:.1%} |")
    for k in (0, 3, 6):
        for choice in (1, 2):
            n, rate = r[f"channel engaged>={k} eligible>={choice}"]
            print(f"| best channel, >= {k} engaged messages on it, >= {choice} eligible "
                  f"channels | {n:,} | {rate:.1%} |")
    n1, p1, n0, p0, diff, low, high = r["engagement"]
    print(f"engagement: optimal+best {p1:.3f} ({n1:,}), control {p0:.3f} ({n0:,}), "
          f"difference {diff:+.3f} [{low:+.3f}, {high:+.3f}]")
    repeat, dropped, auc, alive_sum, alive, buyers, auc_all = r["churn"]
    print(f"churn: {repeat:,} repeat buyers, {dropped:,} planted drop-outs, AUC of 1 - P(alive) "
          f"{auc:.3f}; sum of P(alive) {alive_sum:,.0f} against {alive:,} still buying; "
          f"all {buyers:,} buyers: AUC {auc_all:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--loyalty", type=float, nargs="+", default=[0.4, 0.55, 0.7])
    parser.add_argument("--planted", action="store_true",
                        help="a generated shop with a planted truth instead of preference_sim's")
    parser.add_argument("--server", default=os.environ.get(
        "RETENTION_BENCH_SERVER", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--prefix", default="bench_preferences",
                        help="name prefix of the scratch databases")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f}")
    for loyalty in args.loyalty:
        if args.planted:
            report_planted(args.customers, one_planted(args.server, args.customers, args.seed,
                                                       loyalty, args.prefix))
            continue
        r = one(args.server, args.customers, args.seed, loyalty, args.prefix)
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
