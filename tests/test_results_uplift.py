"""Uplift: the statistics against scipy and simulation, and a generated campaign with a known
injected effect (part of it offline) measured through the real engine and PostgreSQL."""

from __future__ import annotations

import textwrap
from datetime import datetime, time, timedelta, timezone

import numpy as np
import pytest
from scipy import stats

from retention import db
from retention.results.uplift import (
    NOT_SIGNIFICANT, ArmStats, format_difference, mean_difference, measure_runs,
    proportion_difference,
)


def _arm(name: str, revenue: np.ndarray) -> ArmStats:
    return ArmStats(name, len(revenue), int((revenue > 0).sum()), float(revenue.sum()),
                    float((revenue ** 2).sum()))


@pytest.mark.unit
def test_welch_from_sums_equals_scipy_on_the_raw_values():
    rng = np.random.default_rng(7)
    a = np.where(rng.random(3000) < 0.1, rng.gamma(2.0, 50.0, 3000), 0.0)
    b = np.where(rng.random(2500) < 0.07, rng.gamma(2.0, 50.0, 2500), 0.0)
    d = mean_difference(_arm("B", a), _arm("A", b))
    ref = stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert d.difference == pytest.approx(a.mean() - b.mean())
    assert d.p_value == pytest.approx(ref.pvalue, rel=1e-6)
    assert (d.ci_low, d.ci_high) == (pytest.approx(ci.low, rel=1e-6), pytest.approx(ci.high, rel=1e-6))


@pytest.mark.unit
def test_two_proportion_z_test_equals_the_uncorrected_chi_square():
    treated, control = ArmStats("B", 1500, 150, 0.0), ArmStats("A", 1500, 118, 0.0)
    d = proportion_difference(treated, control)
    chi2 = stats.chi2_contingency([[150, 1350], [118, 1382]], correction=False)
    assert d.p_value == pytest.approx(chi2.pvalue, rel=1e-9)
    assert d.difference == pytest.approx(150 / 1500 - 118 / 1500)
    se = np.sqrt(0.1 * 0.9 / 1500 + (118 / 1500) * (1 - 118 / 1500) / 1500)
    assert d.ci_high - d.ci_low == pytest.approx(2 * 1.959964 * se, rel=1e-5)


@pytest.mark.unit
def test_conversion_interval_covers_the_true_effect_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    n, p0, p1 = 2000, 0.05, 0.08
    covered = 0
    for _ in range(400):
        d = proportion_difference(ArmStats("t", n, int(rng.binomial(n, p1)), 0.0),
                                  ArmStats("c", n, int(rng.binomial(n, p0)), 0.0))
        covered += d.covers(p1 - p0)
    assert 0.92 <= covered / 400 <= 0.98


@pytest.mark.unit
def test_wording_says_not_significant_yet_when_it_is_not():
    close = proportion_difference(ArmStats("B", 400, 42, 0.0), ArmStats("A", 400, 40, 0.0))
    clear = proportion_difference(ArmStats("B", 4000, 480, 0.0), ArmStats("A", 4000, 320, 0.0))
    assert close.verdict == NOT_SIGNIFICANT and "not significant yet" in format_difference(close)
    assert clear.verdict == "significant: B beats A"
    assert format_difference(clear).startswith("+4.00 pp (95% CI +2.")


# --- a generated campaign with a known injected effect ---------------------------------

AS_OF = datetime(2026, 11, 2, 7, 0, tzinfo=timezone.utc)
CAMPAIGN = textwrap.dedent("""\
    id: injected
    kind: promo
    audience:
      include_any:
        - all_customers: true
    steps:
      - {name: email, channel: email, template: weekly_promo}
    variants:
      - {name: A}
      - {name: B}
    holdout: 0.5
    """)
N = 6000
P_ONLINE = 0.06          # everyone buys online at this rate, campaign or not
P_OFFLINE_EXTRA = 0.04   # the campaign's effect: treated members also buy in a store
MEAN_REVENUE = 100.0


def _copy(conn, table: str, columns: str, rows: list[tuple]) -> None:
    with conn.cursor() as cur, cur.copy(f"copy {table} ({columns}) from stdin") as copy:
        for row in rows:
            copy.write_row(row)


@pytest.mark.slow
def test_uplift_of_a_generated_campaign_recovers_the_injected_effect(database_url, tmp_path):
    from retention.warehouse.build import build
    from retention.campaigns.engine import plan_step, start_run
    from retention.campaigns.policy import Policy
    from retention.campaigns.spec import parse_campaign

    policy = Policy(global_cap=10, global_cap_days=7, channel_cap=10, channel_cap_days=7,
                    quiet_start=time(23), quiet_end=time(6), default_timezone="UTC",
                    global_holdout=0.0)
    ids = [f"c{i:05d}" for i in range(N)]
    with db.connect(database_url) as conn:
        _copy(conn, "raw.customers", "customer_id, email, phone, created_at, timezone",
              [(c, f"{c}@example.com", f"+38050{i:07d}", datetime(2025, 1, 1, tzinfo=timezone.utc),
                "UTC") for i, c in enumerate(ids)])
        _copy(conn, "raw.channel_subscriptions", "customer_id, channel, address, subscribed_at",
              [(c, "email", f"{c}@example.com", datetime(2025, 1, 1, tzinfo=timezone.utc))
               for c in ids])
        conn.commit()
    campaign = parse_campaign(CAMPAIGN, "injected.yaml")
    run = start_run(campaign, AS_OF, policy=policy)
    plan_step(campaign, run, "email", policy=policy)
    with db.connect(database_url) as conn:
        arm = dict(conn.execute("select customer_id, variant from ops.audience_members"))
        conn.execute("update ops.messages set status = 'sent', sent_at = planned_at "
                     "where status = 'planned'")
        conn.commit()
    assert set(arm.values()) == {"A", "B", "holdout"}

    rng = np.random.default_rng(2026)
    orders, receipts = [], []
    for i, c in enumerate(ids):
        inside = AS_OF + timedelta(hours=float(rng.uniform(1, 70)))  # e-mail window: 72 h
        if rng.random() < P_ONLINE:
            orders.append((f"o{i}", c, inside, "paid", round(float(rng.gamma(2.0, MEAN_REVENUE / 2)), 2)))
        if arm[c] != "holdout" and rng.random() < P_OFFLINE_EXTRA:
            receipts.append((f"r{i}", "store1", inside, f"+38050{i:07d}",
                             round(float(rng.gamma(2.0, MEAN_REVENUE / 2)), 2)))
        # noise the measurement must ignore: before the run, after the window, not paid
        orders.append((f"before{i}", c, AS_OF - timedelta(days=3), "paid", 50.0))
        if arm[c] != "holdout":
            orders.append((f"late{i}", c, AS_OF + timedelta(days=10), "paid", 500.0))
        if i % 7 == 0:
            orders.append((f"cancelled{i}", c, inside, "cancelled", 80.0))
    with db.connect(database_url) as conn:
        _copy(conn, "raw.orders", "order_id, customer_id, ordered_at, status, total_amount", orders)
        _copy(conn, "raw.offline_receipts", "receipt_id, store_id, purchased_at, phone, total_amount",
              receipts)
        conn.commit()
    build(as_of=AS_OF + timedelta(days=20), url=database_url)  # ROPO matching: marts.ropo_purchases

    (result,) = measure_runs(AS_OF + timedelta(days=20), url=database_url)
    assert result.complete and result.window_end == AS_OF + timedelta(hours=72)
    true_rate_effect = (1 - (1 - P_ONLINE) * (1 - P_OFFLINE_EXTRA)) - P_ONLINE
    rate, revenue = result.holdout
    assert rate.metric == "conversion_rate" and rate.control == "holdout"
    assert rate.covers(true_rate_effect), format_difference(rate)
    assert rate.significant and rate.verdict == "significant: treatment beats holdout"
    assert revenue.metric == "revenue_per_member"
    assert revenue.covers(P_OFFLINE_EXTRA * MEAN_REVENUE), format_difference(revenue)
    assert revenue.ci_low > 0
    # A and B got the same message: no real difference, and the report must not claim one
    ab_rate, ab_revenue = result.ab
    assert (ab_rate.treatment, ab_rate.control) == ("B", "A")
    assert ab_rate.covers(0.0) and ab_rate.verdict == NOT_SIGNIFICANT
    assert ab_revenue.covers(0.0) and ab_revenue.verdict == NOT_SIGNIFICANT
    # measured too early, the window is still open and says so
    (early,) = measure_runs(AS_OF + timedelta(hours=24), url=database_url)
    assert not early.complete and early.measured_until == AS_OF + timedelta(hours=24)
