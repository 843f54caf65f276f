"""Fit the predicted-value models on a simulated population: seconds and peak memory.

    .venv/bin/python bench/bench_predict.py [--customers 1000000] [--seed 7] [--database]

Draws the customers from BG/NBD + Gamma-Gamma with the CDNOW parameters (weeks), first
purchases spread over two years before as_of, as a transaction log with timestamps; then
times each step of a real run on it: rfm_summary (log -> one row per customer),
aggregation (customers -> distinct (x, t_x, T) rows), the BG/NBD fit, the Gamma-Gamma
fit, and scoring (p_alive, 90/365-day purchases, order value, 12-month value). Peak
memory is the process's resident high-water mark within each step (reset between steps
through /proc/self/clear_refs, so it includes what the process already holds, e.g. the
simulated log), and the process peak overall. Fitted parameters are
printed next to the true ones.

With --database the same log is also written, in a fresh database on the configured
server (RETENTION_DATABASE_URL, else the embedded one; dropped afterwards), as
intermediate.int_purchases_unified with raw.customers, and write_predictions is timed end
to end (read by COPY, fit, score, replace the marts rows by COPY).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from retention.warehouse import predict as P  # noqa: E402
from retention_dev import samples  # noqa: E402

BGNBD = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
GAMMA_GAMMA = {"p": 6.25, "q": 3.74, "gamma": 15.44}
AS_OF = pd.Timestamp("2024-07-01", tz="UTC")


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Stages:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, str]] = []
        self.can_reset = _reset_peak()

    def run(self, name: str, fn, note=lambda result: ""):
        _reset_peak()
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        peak = _rss_mb("VmHWM") if self.can_reset else float("nan")
        self.rows.append((name, seconds, peak, note(result)))
        return result


def simulate_log(customers: int, seed: int) -> tuple[pd.DataFrame, samples.Simulated]:
    days_old = np.random.default_rng(seed + 1).integers(0, 2 * 365, customers)
    sim = samples.simulate(customers, BGNBD, GAMMA_GAMMA, T=days_old / 7.0, seed=seed,
                     transactions=True)
    log = sim.transactions
    first_day = AS_OF - pd.to_timedelta(days_old[log["customer"].to_numpy()], unit="D")
    purchased_at = (pd.DatetimeIndex(first_day)
                    + pd.to_timedelta(log["time"].to_numpy() * 7.0, unit="D"))
    frame = pd.DataFrame({"customer_id": log["customer"].to_numpy(),
                          "purchased_at": purchased_at, "revenue": log["value"].to_numpy()})
    return frame, sim


def time_write_predictions(log: pd.DataFrame, stages: Stages) -> None:
    import io

    import psycopg
    import sqlalchemy as sa

    from retention import db
    from retention.db.schema import ensure_schemas

    server = db.database_url()
    name = f"bench_predict_{uuid.uuid4().hex[:8]}"
    admin = sa.engine.make_url(server).set(database="postgres").render_as_string(False)
    url = sa.engine.make_url(server).set(database=name).render_as_string(False)
    with psycopg.connect(db.libpq_dsn(admin), autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    try:
        with db.connect(url) as conn:
            ensure_schemas(conn)
            conn.execute("create schema intermediate; create table "
                         "intermediate.int_purchases_unified (purchase_id text, source text, "
                         "customer_id text, purchased_at timestamptz, revenue numeric)")
            frame = pd.DataFrame({
                "purchase_id": np.arange(len(log)).astype(str), "source": "online",
                "customer_id": log["customer_id"].astype(str),
                "purchased_at": log["purchased_at"].dt.strftime("%Y-%m-%d %H:%M:%S.%f+00"),
                "revenue": log["revenue"].round(2)})
            for table, data in (("intermediate.int_purchases_unified", frame),
                                ("raw.customers (customer_id)",
                                 pd.DataFrame({"c": np.unique(frame["customer_id"])}))):
                buf = io.StringIO()
                data.to_csv(buf, index=False, header=False)
                with conn.cursor().copy(f"copy {table} from stdin with (format csv)") as copy:
                    copy.write(buf.getvalue())
            conn.commit()
        stages.run("write_predictions (database)",
                   lambda: P.write_predictions(url, AS_OF, run_id="bench"),
                   lambda r: f"{r['customers']:,} rows written, read+fit+score+COPY")
    finally:
        with psycopg.connect(db.libpq_dsn(admin), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--database", action="store_true",
                        help="also time write_predictions against a scratch database")
    args = parser.parse_args()

    stages = Stages()
    log, sim = stages.run("simulate (not part of a run)",
                          lambda: simulate_log(args.customers, args.seed),
                          lambda t: f"{len(t[0]):,} transactions")
    summary = stages.run("rfm_summary", lambda: P.rfm_summary(log, AS_OF),
                         lambda s: f"{len(s):,} customers")
    if not args.database:
        del log
    agg = stages.run("aggregation", lambda: P.aggregate(summary["frequency"], summary["recency"],
                                                        summary["T"]),
                     lambda a: f"{len(a):,} distinct (x, t_x, T)")
    bgnbd = stages.run("BG/NBD fit", lambda: P.fit_bgnbd(*agg.columns, weights=agg.weights),
                       lambda f: f"{f.iterations} iterations, converged={f.converged}")
    gamma_gamma = stages.run(
        "Gamma-Gamma fit",
        lambda: P.fit_gamma_gamma(summary["frequency"], summary["monetary_value"]),
        lambda f: f"{f.customers:,} repeat buyers, {f.distinct_rows:,} distinct, "
                  f"{f.iterations} iterations, converged={f.converged}")
    scores = stages.run("scoring", lambda: P.score_customers(summary, bgnbd, gamma_gamma),
                        lambda s: f"{len(s):,} customers scored")

    if args.database:
        time_write_predictions(log, stages)
        del log
    # the same customers in exact (not day-bucketed) time: what the estimator recovers
    # without the day bucketing of real data, which merges same-day purchases
    exact_bgnbd = P.fit_bgnbd(sim.frequency, sim.recency, sim.T)
    exact_gg = P.fit_gamma_gamma(sim.frequency, sim.monetary_value)

    fit_total = sum(seconds for name, seconds, _, _ in stages.rows[1:6])
    print(f"predicted value, {args.customers:,} customers (seed {args.seed}), "
          f"time unit 7 days")
    print()
    print(f"| {'step':<28} | {'seconds':>8} | {'peak RSS MB':>11} | notes")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 13}|{'-' * 40}")
    for name, seconds, peak, note in stages.rows:
        print(f"| {name:<28} | {seconds:8.2f} | {peak:11.0f} | {note}")
    print(f"| {'run total (after simulate)':<28} | {fit_total:8.2f} | "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:11.0f} | "
          "process peak RSS overall")
    print()
    print("| model | parameter | true | fitted (day buckets) | fitted (exact times) |")
    print("|---|---|---|---|---|")
    for name, value in BGNBD.items():
        print(f"| BG/NBD | {name} | {value} | {getattr(bgnbd, name):.4f} | "
              f"{getattr(exact_bgnbd, name):.4f} |")
    for name, value in GAMMA_GAMMA.items():
        print(f"| Gamma-Gamma | {name} | {value} | {getattr(gamma_gamma, name):.4f} | "
              f"{getattr(exact_gg, name):.4f} |")
    print()
    print(f"mean p_alive {scores['probability_alive'].mean():.3f}, "
          f"expected purchases next 365 days {scores['expected_purchases_365d'].sum():,.0f}, "
          f"predicted 12-month value {scores['predicted_value_12m'].sum():,.0f}")


if __name__ == "__main__":
    main()
