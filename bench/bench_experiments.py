"""The experiment statistics of `retention.results.uplift` on a generated shop: sample
ratio tests, CUPED's variance reduction, the always-valid intervals against the fixed
ones, the global control group, and what the CUPED pre-period join costs.

    .venv/bin/python bench/bench_experiments.py [--customers 20000] [--seed 11]
                                                [--server postgresql://postgres@127.0.0.1:5432/postgres]
                                                [--results bench/RESULTS.md] [--keep]

A generated shop (data ending 2026-10-31) is loaded into a new database on `--server` and
built; the shipped campaigns weekly_promo (Mondays 07:00, four steps, A/B 1:1, 10%
holdout) and smartphone_accessories (Thursdays 08:00, 10% holdout) are started and
planned for the four weeks from 2026-09-28, with the policy's 5% global holdout, and
their messages marked sent. The generator's purchases do not depend on the messages, so
every true difference is 0. Measured as of 2026-10-31: per run, the arms, the SRM
p-values, CUPED's theta and variance reduction (pooled 1 - var(Y - theta X) / var(Y),
and per comparison 1 - se_adjusted^2 / se^2), the widths of the fixed, always-valid and
CUPED intervals; the global control group of each week; and, as a diagnostic outside the
product, the squared correlation of Y with the revenue of pre-periods 1, 4 and 12 times
the run's window (CUPED uses 1). The time of `measure_runs` for all the runs is taken
against the former uplift module (before CUPED; from git), alternated, median of 5.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

END = datetime(2026, 10, 31, tzinfo=timezone.utc)
MONDAYS = [datetime(2026, 9, 28, 7, tzinfo=timezone.utc) + timedelta(days=7 * i) for i in range(4)]
#: the uplift module before CUPED, SRM and the always-valid intervals
FORMER = "7099c26"


def make_shop(url: str, customers: int, seed: int) -> dict:
    from retention import db
    from retention.campaigns.engine import plan_step, start_run
    from retention.campaigns.spec import load_campaign
    from retention.db.schema import ensure_schemas
    from retention.ingest.load import load_folder
    from retention.warehouse.build import build
    from retention_dev.generate import generate_shop

    took = {}
    with db.connect(url) as conn:
        ensure_schemas(conn)
        conn.commit()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        generate_shop(Path(folder), customers=customers, seed=seed, end=END)
        load_folder(folder, url, loaded_at=END)
    took["generate and load"] = time.perf_counter() - t
    t = time.perf_counter()
    build(as_of=END, url=url)
    took["build"] = time.perf_counter() - t
    t = time.perf_counter()
    for monday in MONDAYS:
        for campaign_id, start in (("weekly_promo", monday),
                                   ("smartphone_accessories", monday + timedelta(days=3, hours=1))):
            campaign = load_campaign(campaign_id)
            run = start_run(campaign, start, url=url)
            for step in campaign.steps:
                plan_step(campaign, run, step.name, url=url)
                with db.connect(url) as conn:
                    conn.execute("update ops.messages set status = 'sent', "
                                 "sent_at = greatest(not_before, planned_at) "
                                 "where run_id = %s and step = %s and status = 'planned'",
                                 (run.run_id, step.name))
                    conn.commit()
    took["campaign runs"] = time.perf_counter() - t
    return took


def pre_period_r2(url: str, factors: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """Per run: the squared correlation of each member's revenue in the run's window (Y)
    with their revenue in the k windows before it (X_k), for each k in `factors`."""
    from retention import db
    from retention.results.uplift import _purchases_sql, attribution_windows, _windows_sql, \
        _RUN_WINDOWS_SQL

    values, params = _windows_sql(attribution_windows())
    params.update(as_of=END, default_hours=max(attribution_windows().values()))
    cols = ", ".join(f"coalesce(sum(p.revenue) filter (where p.purchased_at <= mb.start_at and "
                     f"p.purchased_at > mb.start_at - {k} * (mb.stop_at - mb.start_at)), 0) as x{k}"
                     for k in factors)
    corr = ", ".join(f"power(corr(y, x{k}), 2)" for k in factors)
    with db.connect(url) as conn:
        rows = conn.execute(f"""
            with windows (channel, hours) as ({values}),
            runs as (select run_id, as_of from ops.campaign_runs),
            run_windows as ({_RUN_WINDOWS_SQL}),
            purchases (customer_id, purchased_at, revenue) as ({_purchases_sql(conn)}),
            members as (
              select am.run_id, am.customer_id, r.as_of as start_at,
                     least(rw.window_end, %(as_of)s) as stop_at
              from ops.audience_members am join runs r using (run_id)
              join run_windows rw using (run_id)
            ),
            xy as (
              select mb.run_id, mb.customer_id,
                     coalesce(sum(p.revenue) filter (where p.purchased_at > mb.start_at), 0) as y,
                     {cols}
              from members mb left join purchases p on p.customer_id = mb.customer_id
                and p.purchased_at > mb.start_at - {max(factors)} * (mb.stop_at - mb.start_at)
                and p.purchased_at <= mb.stop_at
              group by 1, 2
            )
            select run_id, {corr} from xy group by run_id order by run_id""", params).fetchall()
    return {r[0]: {k: float(v or 0) for k, v in zip(factors, r[1:])} for r in rows}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def former_module():
    source = subprocess.run(["git", "show", f"{FORMER}:plugins/retention/results/uplift.py"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("uplift_former", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, "uplift_former.py", "exec"), module.__dict__)
    return module


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--server", default=os.environ.get(
        "RETENTION_BENCH_SERVER", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--results")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--reuse", help="the URL of a database a --keep run left (no new shop)")
    args = parser.parse_args()

    from bench_dispatch import create_database, drop_database
    from retention.results import uplift

    if args.reuse:
        admin, name, url = None, None, args.reuse
    else:
        admin, name, url = create_database(args.server, prefix="bench_experiments")
    os.environ["RETENTION_DATABASE_URL"] = url
    lines = []
    out = lines.append
    try:
        took = {} if args.reuse else make_shop(url, args.customers, args.seed)
        runs = uplift.measure_runs(END, url=url)
        out(f"{args.customers:,} customers, seed {args.seed}; " + ", ".join(
            f"{k} {v:.0f} s" for k, v in took.items()) + f"; {len(runs)} runs measured as of "
            f"{END:%Y-%m-%d}")
        out("")
        out("| run | arms (members) | SRM p: holdout split / A/B split | theta | CUPED "
            "variance reduction (pooled) | comparison | CUPED se^2 reduction | fixed 95% CI width "
            "| always-valid width | CUPED CI width |")
        out("|---|---|---|---|---|---|---|---|---|---|")
        reductions, ratios = [], []
        for run in runs:
            srm = {t.split: t.p_value for t in run.srm}
            arms = ", ".join(f"{k} {a.members:,}" for k, a in sorted(run.arms.items()))
            for d in [d for d in run.holdout + run.ab if d.metric == "revenue_per_member"]:
                c = d.cuped
                if d.ci_high > d.ci_low:  # somebody bought
                    reductions.append(c.variance_reduction)
                    ratios.append((d.cs_high - d.cs_low) / (d.ci_high - d.ci_low))
                out(f"| {run.campaign_id} {run.run_as_of:%m-%d} | {arms} | "
                    f"{srm.get('holdout split', float('nan')):.3g} / "
                    f"{srm.get('A/B split', float('nan')):.3g} | {run.cuped.theta:.3f} | "
                    f"{run.cuped.variance_reduction * 100:.1f}% | {d.treatment} vs {d.control} | "
                    f"{_pct(c.variance_reduction)} | {d.ci_high - d.ci_low:.2f} | "
                    f"{d.cs_high - d.cs_low:.2f} | {c.ci_high - c.ci_low:.2f} |")
        out("")
        out(f"CUPED se^2 reduction per revenue comparison: median "
            f"{statistics.median(reductions) * 100:.1f}%, range {min(reductions) * 100:.1f}% to "
            f"{max(reductions) * 100:.1f}%; always-valid / fixed width: "
            f"{min(ratios):.2f} to {max(ratios):.2f}")
        flagged = [(r.campaign_id, t.split, t.p_value) for r in runs for t in r.srm if t.mismatch]
        all_p = [t.p_value for r in runs for t in r.srm]
        out(f"SRM: {len(all_p)} tests, smallest p {min(all_p):.3g}, flagged (p < 0.001): "
            f"{flagged or 'none'}")
        covered = sum(d.covers(0.0) for r in runs for d in r.holdout + r.ab)
        covered_av = sum(d.covers_always_valid(0.0) for r in runs for d in r.holdout + r.ab)
        total = sum(len(r.holdout + r.ab) for r in runs)
        out(f"true difference 0 (the generator ignores messages): fixed intervals cover it "
            f"{covered}/{total}, always-valid {covered_av}/{total}")
        out("")
        out("| week | global holdout members / population | SRM p | conversion diff (95% CI) "
            "| revenue per member diff (95% CI) | CUPED (95% CI), se^2 reduction | theta, pooled "
            "reduction |")
        out("|---|---|---|---|---|---|---|")
        for monday in MONDAYS:
            ws = monday.replace(hour=0)
            gc = uplift.measure_global_control(END, ws, ws + timedelta(days=7), url=url)
            if gc is None:
                continue
            rate, rev = gc.differences
            out(f"| {ws:%Y-%m-%d} | {gc.holdout.members:,} / {gc.population:,} | "
                f"{gc.srm.p_value:.3g} | {rate.difference * 100:+.2f} pp ({rate.ci_low * 100:+.2f} "
                f"to {rate.ci_high * 100:+.2f}) | {rev.difference:+.1f} ({rev.ci_low:+.1f} to "
                f"{rev.ci_high:+.1f}) | {rev.cuped.difference:+.1f} ({rev.cuped.ci_low:+.1f} to "
                f"{rev.cuped.ci_high:+.1f}), {_pct(rev.cuped.variance_reduction)} | "
                f"{gc.cuped.theta:.3f}, {gc.cuped.variance_reduction * 100:.1f}% |")
        out("")
        r2 = pre_period_r2(url, (1, 4, 12))
        names = {r.run_id: f"{r.campaign_id} {r.run_as_of:%m-%d}" for r in runs}
        out("Diagnostic, squared correlation of Y with pre-period revenue of 1 / 4 / 12 windows: "
            + "; ".join(f"{names.get(k, k)} {v[1] * 100:.1f}% / {v[4] * 100:.1f}% / "
                        f"{v[12] * 100:.1f}%" for k, v in r2.items()))
        former = former_module()
        times = {"former": [], "now": []}
        for _ in range(5):
            for label, module in (("former", former), ("now", uplift)):
                t = time.perf_counter()
                module.measure_runs(END, url=url)
                times[label].append(time.perf_counter() - t)
        out(f"measure_runs of the {len(runs)} runs, median of 5 alternated: former "
            f"{statistics.median(times['former']):.2f} s, now {statistics.median(times['now']):.2f} s")
    finally:
        if args.keep or args.reuse:
            print(f"kept database {url}", file=sys.stderr)
        else:
            drop_database(admin, name)
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(args.results, "a") as fh:
            fh.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
