"""Backtested quality of churn risk and next-order timing: CDNOW and a generated shop.

    .venv/bin/python bench/bench_backtest.py [--customers 20000] [--seed 11] [--server URL]

CDNOW (tests/data/cdnow, 2,357 customers of the 1997 Q1 cohort, purchases to 1998-06-30):
`predict.backtest` as of 1998-06-30 with a 273-day horizon (the cutoff is 1997-09-30, the
end of the paper's 39-week calibration period) and with a 90-day one, both with the
30-day next-order window; and the paper's E[Y(39) | x=2, t_x=30.43, T=38.86] of the
weeks 1-39 fit.

Generated shop: `generate_shop(customers, seed, end=2026-10-31)` loaded into a fresh
database on the server (RETENTION_DATABASE_URL, else --server; dropped afterwards), built
by dbt as of its end, then `write_predictions` as of the end (its backtest: cutoff 90
days back), timed; the rows it keeps in ops.predicted_value_backtests are printed. The
generator's customers buy with a per-customer rate and drop out after an order with a
per-customer chance (docs/generator.md), so what they did after the cutoff is what the
generator planted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

END = datetime(2026, 10, 31, tzinfo=timezone.utc)


def _row(label: str, r) -> str:
    return (f"| {label} | {r.measure} | {r.cutoff:%Y-%m-%d} | {r.outcome_days:.0f} | "
            f"{r.customers:,} | {r.positives:,} | {r.auc:.3f} | {r.lift_quality:.3f} |")


HEADER = ("| data | measure | cutoff | window (days) | customers | with the outcome | AUC | "
          "lift quality |\n|---|---|---|---|---|---|---|---|")


def cdnow() -> None:
    from retention.warehouse import predict as P
    from retention_dev import samples
    from retention_dev.samples import CDNOW_DIR

    tx = samples.load_cdnow_transactions(CDNOW_DIR / "CDNOW_sample.txt")
    summary = P.rfm_summary(tx, "1997-09-30", 7.0, "customer_id", "date", "dollars")
    fit = P.fit_bgnbd(summary["frequency"], summary["recency"], summary["T"])
    value = float(fit.expected_purchases(39, 2, 30.43, 38.86))
    print(f"CDNOW weeks 1-39: r={fit.r:.4f} alpha={fit.alpha:.4f} a={fit.a:.4f} b={fit.b:.4f}; "
          f"E[Y(39) | x=2, t_x=30.43, T=38.86] = {value:.6f} (three decimals: {value:.3f})")
    print(HEADER)
    for horizon in (273, 90):
        bt_fit, results = P.backtest(tx, "1998-06-30", horizon_days=horizon,
                                     customer_col="customer_id", datetime_col="date")
        for r in results:
            print(_row(f"CDNOW, horizon {horizon} d", r))
        print(f"  (fit at the cutoff: r={bt_fit.r:.4f} alpha={bt_fit.alpha:.4f} "
              f"a={bt_fit.a:.4f} b={bt_fit.b:.4f})")


def generated(customers: int, seed: int, server: str) -> None:
    from bench_dispatch import create_database, drop_database
    from retention import db
    from retention.db.schema import ensure_schemas
    from retention.ingest.load import load_folder
    from retention.warehouse.build import build
    from retention.warehouse.predict import write_predictions
    from retention_dev.generate import generate_shop

    admin, name, url = create_database(server, prefix="bench_backtest")
    os.environ["RETENTION_DATABASE_URL"] = url
    try:
        with db.connect(url) as conn:
            ensure_schemas(conn)
            conn.commit()
        with tempfile.TemporaryDirectory() as folder:
            t = time.perf_counter()
            generate_shop(Path(folder), customers=customers, seed=seed, end=END)
            load_folder(Path(folder), url, loaded_at=END)
            print(f"generated and loaded {customers:,} customers in "
                  f"{time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        build(as_of=END, url=url)
        print(f"dbt build in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        result = write_predictions(url, END, run_id="bench")
        print(f"write_predictions (fit, score, publish, backtest) in "
              f"{time.perf_counter() - t:.1f} s: {result['customers']:,} customers, "
              f"{result['customers_with_purchases']:,} with purchases")
        with db.connect(url) as conn:
            rows = conn.execute(
                "select measure, cutoff, extract(epoch from outcome_window) / 86400, customers, "
                "positives, auc, lift_quality from ops.predicted_value_backtests "
                "order by measure").fetchall()
            bands = conn.execute(
                "select churn_risk, count(*) from marts.customer_predicted_value "
                "where churn_risk is not null group by 1 order by 1").fetchall()
        print(HEADER)
        for measure, cutoff, days, n, pos, auc, lift in rows:
            print(f"| generated shop, {customers:,} customers, seed {seed} | {measure} | "
                  f"{cutoff:%Y-%m-%d} | {days:.0f} | {n:,} | {pos:,} | {auc:.3f} | {lift:.3f} |")
        print("churn risk bands as of the end: "
              + ", ".join(f"{band} {count:,}" for band, count in bands))
        replenishment(url)
    finally:
        drop_database(admin, name)


def replenishment(url: str) -> None:
    """The shipped replenishment_due trigger over the 60 days after the data's end, in
    15-minute scans as the trigger run makes them (detection only: no chain starts, so
    reentry sees no earlier chain), and once over the whole range."""
    from datetime import timedelta

    from retention import db
    from retention.campaigns.spec import load_campaign
    from retention.triggers.config import TriggerSettings
    from retention.triggers.definitions import compile_definition

    compiled = compile_definition(load_campaign("replenishment_due").definition,
                                  "replenishment_due", TriggerSettings(), has_ropo=True)
    with db.connect(url) as conn:
        t = time.perf_counter()
        whole = conn.execute(f"select count(*), count(distinct customer_id) from "
                             f"({compiled.sql}) d", dict(compiled.params, lo=END,
                                                         hi=END + timedelta(days=60))).fetchone()
        once = time.perf_counter() - t
        step, scans, t = timedelta(minutes=15), 0, time.perf_counter()
        lo = END + timedelta(days=30)
        while lo < END + timedelta(days=31):
            conn.execute(f"select count(*) from ({compiled.sql}) d",
                         dict(compiled.params, lo=lo, hi=lo + step)).fetchone()
            lo, scans = lo + step, scans + 1
        per_scan = (time.perf_counter() - t) / scans
    print(f"replenishment_due over the 60 days after the end: {whole[0]:,} moments, "
          f"{whole[1]:,} customers ({once * 1000:.0f} ms); one 15-minute scan "
          f"{per_scan * 1000:.1f} ms (mean of {scans} over day 30)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--server", default=os.environ.get(
        "RETENTION_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--skip-shop", action="store_true", help="CDNOW only")
    args = parser.parse_args()
    cdnow()
    if not args.skip_shop:
        generated(args.customers, args.seed, args.server)


if __name__ == "__main__":
    main()
