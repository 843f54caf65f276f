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
    MIXING_SD, NOT_SIGNIFICANT, ArmStats, Cuped, compare, confidence_sequence, cuped_difference,
    cuped_fit, expected_splits, format_difference, mean_difference, measure_runs,
    proportion_difference, sample_ratio_test,
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


# --- sample ratio mismatch, CUPED, always-valid intervals: hand-worked numbers --------

@pytest.mark.unit
def test_sample_ratio_chi_square_by_hand():
    # 50/50 expected, 520 / 480 seen: chi2 = 20^2/500 + 20^2/500 = 1.6, 1 df,
    # p = 2 (1 - Phi(sqrt 1.6)) = 2 (1 - Phi(1.26491)) = 0.20590
    even = sample_ratio_test("A/B split", {"A": 520, "B": 480}, {"A": 1, "B": 1})
    assert (even.chi2, even.df) == (pytest.approx(1.6), 1)
    assert even.p_value == pytest.approx(0.20590, abs=5e-5)
    assert not even.mismatch and even.warning is None
    # a 5% global holdout of 10,000 is 500; 420 seen: chi2 = 80^2/500 + 80^2/9500
    # = 12.8 + 0.67368 = 13.47368, p = 2 (1 - Phi(3.67065)) = 0.000242 < 0.001
    short = sample_ratio_test("holdout split", {"global holdout": 420, "treated": 9580},
                              {"global holdout": 0.05, "treated": 0.95})
    assert short.chi2 == pytest.approx(13.47368, rel=1e-6)
    assert short.p_value == pytest.approx(0.000242, rel=2e-3)
    assert short.mismatch and short.warning.startswith("Sample ratio mismatch (p < 0.001)")
    assert "global holdout 420 (expected 500.0, 5.0%)" in short.warning
    # three cells, 2 df, where the chi-square tail is exp(-chi2 / 2): g = 5%, h = 10%:
    # expected 500, 950, 8,550; seen 480, 1,000, 8,520:
    # chi2 = 400/500 + 2500/950 + 900/8550 = 0.8 + 2.631579 + 0.105263 = 3.536842
    holdout, variants = expected_splits(
        {"kind": "promo", "holdout": 0.1, "variants": [{"name": "A"}, {"name": "B", "weight": 3}]},
        0.05)
    assert holdout == {"global holdout": 0.05, "campaign holdout": pytest.approx(0.095),
                       "treated": pytest.approx(0.855)}
    assert variants == {"A": 0.25, "B": 0.75}
    three = sample_ratio_test("holdout split", {"global holdout": 480, "campaign holdout": 1000,
                                                "treated": 8520}, holdout)
    assert (three.chi2, three.df) == (pytest.approx(3.536842, rel=1e-6), 2)
    assert three.p_value == pytest.approx(np.exp(-3.536842 / 2), rel=1e-6)  # 0.170614
    # a transactional campaign has no holdout: a holdout member is a mismatch outright
    none_held, _ = expected_splits({"kind": "transactional", "holdout": 0.2}, 0.05)
    assert none_held == {"global holdout": 0.0, "campaign holdout": 0.0, "treated": 1.0}
    assert sample_ratio_test("holdout split", {"treated": 1000}, none_held) is None
    broken = sample_ratio_test("holdout split", {"campaign holdout": 3, "treated": 997}, none_held)
    assert broken.mismatch and broken.p_value == 0.0
    # a 5% cell of 99 members expects 4.95 < 5: too few for the chi-square approximation
    assert sample_ratio_test("global", {"g": 1, "others": 98}, {"g": 0.05, "others": 0.95}) is None
    assert sample_ratio_test("global", {"g": 1, "others": 99}, {"g": 0.05, "others": 0.95}).p_value \
        == pytest.approx(2 * stats.norm.sf(4 / np.sqrt(5 * 0.95)))  # chi2 = 16/5 + 16/95


def _xy_arm(name: str, x: list[float], y: list[float]) -> ArmStats:
    x, y = np.array(x, float), np.array(y, float)
    return ArmStats(name, len(y), int((y > 0).sum()), y.sum(), (y * y).sum(), x.sum(),
                    (x * x).sum(), (x * y).sum())


@pytest.mark.unit
def test_cuped_theta_and_adjusted_means_by_hand():
    # X (pre-period revenue) 0, 10, 20, 30 in both arms; Y = 5 more in B than in A.
    b = _xy_arm("B", [0, 10, 20, 30], [5, 15, 35, 45])
    a = _xy_arm("A", [0, 10, 20, 30], [0, 10, 30, 40])
    # pooled: mean X 15, mean Y 22.5; sum dx^2 = 2 (225 + 25 + 25 + 225) = 1000,
    # sum dx dy = 700 + 700 = 1400, sum dy^2 = 1025 + 1025 = 2050
    fit = cuped_fit([b, a])
    assert fit.theta == pytest.approx(1.4) and fit.pre_mean == pytest.approx(15.0)
    assert fit.variance_reduction == pytest.approx(1400 ** 2 / (1000 * 2050))  # 0.956098
    # Y - 1.4 X: B 5, 1, 7, 3 (mean 4, variance 20/3); A 0, -4, 2, -2 (mean -1, 20/3);
    # the arms' X means equal the pooled one, so the adjusted means are the plain ones
    assert fit.adjusted(b) == (pytest.approx(25.0), pytest.approx(20 / 3))
    assert fit.adjusted(a) == (pytest.approx(20.0), pytest.approx(20 / 3))
    d = cuped_difference(b, a, fit)
    assert d.metric == "revenue_per_member_cuped" and d.difference == pytest.approx(5.0)
    # se^2 = 2 (20/3) / 4 = 10/3 against 2 (1000/3) / 4 = 500/3 unadjusted: 98% less;
    # Welch df = (10/3)^2 / (2 (5/3)^2 / 3) = 6, t(0.975, 6) = 2.446912
    assert d.variance_reduction == pytest.approx(0.98)
    half = 2.446912 * np.sqrt(10 / 3)
    assert (d.ci_low, d.ci_high) == (pytest.approx(5 - half, rel=1e-6),
                                     pytest.approx(5 + half, rel=1e-6))
    plain = mean_difference(b, a)
    assert plain.difference == pytest.approx(5.0) and plain.ci_high - plain.ci_low > 10 * half
    (_, revenue) = compare(b, a, cuped=fit)
    assert revenue.cuped == d and "CUPED variance 98% lower than unadjusted" in format_difference(d)
    # X out of balance: theta 2, pooled mean X 10; an arm with X 10, 20 and Y 30, 50 has
    # mean Y 40 - 2 (15 - 10) = 30 and Y - 2 X = 10, 10: no variance left
    assert Cuped(2.0, 10.0, 0.5, 4).adjusted(_xy_arm("T", [10, 20], [30, 50])) == (30.0, 0.0)
    # no pre-period revenue to learn from: no adjustment
    flat = cuped_fit([_xy_arm("B", [7, 7, 7], [1, 2, 3]), _xy_arm("A", [7, 7], [0, 4])])
    assert (flat.theta, flat.variance_reduction) == (0.0, 0.0)


@pytest.mark.unit
def test_confidence_sequence_width_by_hand():
    assert MIXING_SD == 0.05
    # 800 members an arm: n1 n0 / (n1 + n0) = 400, r = 0.05^2 * 400 = 1; V = 1:
    # half width sqrt((1 + 1) (ln 2 + 2 ln 20)) = sqrt(2 (0.693147 + 5.991465)) = 3.656395
    low, high, _ = confidence_sequence(0.0, 1.0, 800, 800, 0.95)
    assert (low, high) == (pytest.approx(-3.656395, rel=1e-6), pytest.approx(3.656395, rel=1e-6))
    low, high, _ = confidence_sequence(10.0, 4.0, 800, 800, 0.95)  # twice as wide at V = 4
    assert (low, high) == (pytest.approx(10 - 7.31279, rel=1e-5), pytest.approx(10 + 7.31279, rel=1e-5))
    # always-valid p = 1 / Lambda(0), Lambda(0) = sqrt(1 / 2) exp(D^2 / (4 V)): D = 2, V = 1:
    # 0.707107 e = 1.922116, p = 0.520258; and p = 0.05 exactly on the interval's edge
    assert confidence_sequence(2.0, 1.0, 800, 800)[2] == pytest.approx(0.520258, rel=1e-5)
    assert confidence_sequence(3.656395, 1.0, 800, 800)[2] == pytest.approx(0.05, rel=1e-5)
    assert confidence_sequence(0.1, 1.0, 800, 800)[2] == 1.0
    # the report's differences carry it: 1500 + 1500, se^2 as in the Wald interval
    d = proportion_difference(ArmStats("B", 1500, 150, 0.0), ArmStats("A", 1500, 118, 0.0))
    se2 = 0.1 * 0.9 / 1500 + (118 / 1500) * (1 - 118 / 1500) / 1500
    r = 0.05 ** 2 * 750
    half = np.sqrt(se2 * (1 + 1 / r) * (np.log(1 + r) + 2 * np.log(20)))
    assert (d.cs_low, d.cs_high) == (pytest.approx(d.difference - half),
                                     pytest.approx(d.difference + half))
    assert d.cs_low < d.ci_low and d.ci_high < d.cs_high
    assert "; always valid -" in format_difference(d)


@pytest.mark.unit
def test_always_valid_interval_survives_weekly_looks_where_the_fixed_one_does_not():
    """No effect, 20 looks as members arrive: the share of experiments whose interval
    ever excludes 0 is the false-positive rate of a marketer who stops at the first
    'significant' look."""
    rng = np.random.default_rng(5)
    sims, looks, per_look = 300, 20, 150
    y1 = np.where(rng.random((sims, looks * per_look)) < 0.1, rng.gamma(2.0, 50.0, (sims, looks * per_look)), 0.0)
    y0 = np.where(rng.random((sims, looks * per_look)) < 0.1, rng.gamma(2.0, 50.0, (sims, looks * per_look)), 0.0)
    fixed = always = 0
    for s in range(sims):
        fixed_hit = always_hit = False
        for k in range(1, looks + 1):
            n = k * per_look
            d = mean_difference(_arm("B", y1[s, :n]), _arm("A", y0[s, :n]))
            fixed_hit |= not d.covers(0.0)
            always_hit |= not d.covers_always_valid(0.0)
        fixed += fixed_hit
        always += always_hit
    assert fixed / sims > 0.12, fixed / sims  # peeking at the fixed interval: 2-5 times 5%
    assert always / sims <= 0.05, always / sims


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
    # each member's revenue in the window (Y) and in the 72 h before the run (X, CUPED's)
    y, x = dict.fromkeys(ids, 0.0), dict.fromkeys(ids, 0.0)
    for i, c in enumerate(ids):
        inside = AS_OF + timedelta(hours=float(rng.uniform(1, 70)))  # e-mail window: 72 h
        if rng.random() < P_ONLINE:
            amount = round(float(rng.gamma(2.0, MEAN_REVENUE / 2)), 2)
            orders.append((f"o{i}", c, inside, "paid", amount))
            y[c] += amount
            # a habit: who buys now bought about as much in the days before the run
            x[c] = round(amount * float(rng.uniform(0.5, 1.5)), 2)
            orders.append((f"pre{i}", c, AS_OF - timedelta(hours=float(rng.uniform(1, 70))),
                           "paid", x[c]))
        if arm[c] != "holdout" and rng.random() < P_OFFLINE_EXTRA:
            receipts.append((f"r{i}", "store1", inside, f"+38050{i:07d}",
                             round(float(rng.gamma(2.0, MEAN_REVENUE / 2)), 2)))
            y[c] += receipts[-1][-1]
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

    (result,) = measure_runs(AS_OF + timedelta(days=20), url=database_url, global_holdout=0.0)
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
    # the always-valid intervals hold the same truths, wider
    assert revenue.covers_always_valid(P_OFFLINE_EXTRA * MEAN_REVENUE)
    assert revenue.cs_low < revenue.ci_low and ab_revenue.covers_always_valid(0.0)
    # CUPED: theta and the adjusted means are those of the members' own X and Y
    ys, xs = np.array([y[c] for c in ids]), np.array([x[c] for c in ids])
    theta = np.cov(ys, xs)[0, 1] / xs.var(ddof=1)
    assert result.cuped.theta == pytest.approx(theta, rel=1e-6)
    assert result.cuped.variance_reduction == pytest.approx(np.corrcoef(ys, xs)[0, 1] ** 2,
                                                            rel=1e-6)
    treated = np.array([arm[c] != "holdout" for c in ids])
    adjusted = ys - theta * (xs - xs.mean())
    cuped = revenue.cuped
    assert cuped.difference == pytest.approx(adjusted[treated].mean() - adjusted[~treated].mean(),
                                             rel=1e-6)
    assert cuped.covers(P_OFFLINE_EXTRA * MEAN_REVENUE) and cuped.variance_reduction > 0.2
    assert cuped.ci_high - cuped.ci_low < revenue.ci_high - revenue.ci_low
    assert ab_revenue.cuped.covers(0.0)
    # sample ratios: 50% campaign holdout, A and B halves of the rest, as assigned
    srm = {t.split: t for t in result.srm}
    assert set(srm) == {"holdout split", "A/B split"} and not result.srm_warnings
    held = result.arms["holdout"].members
    assert srm["holdout split"].chi2 == pytest.approx(2 * (held - N / 2) ** 2 / (N / 2))
    # measured too early, the window is still open and says so
    (early,) = measure_runs(AS_OF + timedelta(hours=24), url=database_url, global_holdout=0.0)
    assert not early.complete and early.measured_until == AS_OF + timedelta(hours=24)
    # measured against the policy's 5% global holdout, which this run did not have
    (policy,) = measure_runs(AS_OF + timedelta(days=20), url=database_url, global_holdout=0.05)
    assert "global holdout 0 (expected" in policy.srm_warnings[0]
    # a tenth of the holdout lost from the ledger: the split no longer fits its shares
    with db.connect(database_url) as conn:
        conn.execute("delete from ops.audience_members where variant = 'holdout' "
                     "and customer_id < 'c00600'")
        conn.commit()
    (lost,) = measure_runs(AS_OF + timedelta(days=20), url=database_url, global_holdout=0.0)
    assert [t.split for t in lost.srm if t.mismatch] == ["holdout split"]
