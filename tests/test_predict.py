"""Predicted customer value: the published CDNOW fits, the model's properties, the marts.

The CDNOW sample (tests/data/cdnow) is read with retention_dev.samples and summarised with
the product's rfm_summary, so the paper's numbers check the whole chain.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from scipy import optimize

from retention import db
from retention.warehouse import predict as P
from retention_dev import samples
from retention_dev.samples import CDNOW_DIR

UTC = timezone.utc
CDNOW_CALIBRATION_END = "1997-09-30"  # end of week 39: the paper's calibration period
@pytest.fixture(scope="module")
def cdnow_summary() -> pd.DataFrame:
    transactions = samples.load_cdnow_transactions(CDNOW_DIR / "CDNOW_sample.txt")
    return P.rfm_summary(transactions, CDNOW_CALIBRATION_END, time_unit_days=7.0,
                         customer_col="customer_id", datetime_col="date",
                         monetary_col="dollars")


@pytest.fixture(scope="module")
def cdnow_bgnbd(cdnow_summary) -> P.BGNBDFit:
    return P.fit_bgnbd(cdnow_summary["frequency"], cdnow_summary["recency"],
                       cdnow_summary["T"])


# ------------------------------------------------------------------------- CDNOW paper


@pytest.mark.unit
def test_cdnow_loader_reads_the_sample():
    tx = samples.load_cdnow_transactions(CDNOW_DIR / "CDNOW_sample.txt")
    assert len(tx) == 6919
    assert tx["customer_id"].nunique() == 2357
    first = tx.iloc[0]
    assert (first["customer_id"], first["master_id"], first["cds"]) == (1, 4, 2)
    assert first["date"] == pd.Timestamp("1997-01-01") and first["dollars"] == 29.33
    assert tx["date"].min() == pd.Timestamp("1997-01-01")
    assert tx["date"].max() == pd.Timestamp("1998-06-30")


@pytest.mark.unit
def test_rfm_summary_matches_the_published_cdnow_summary(cdnow_summary):
    published = pd.read_csv(CDNOW_DIR / "cdnow_customers_summary_with_transactions.csv",
                            index_col="ID")
    ours = cdnow_summary.reindex(published.index)
    assert len(cdnow_summary) == 2357 and ours.notna().all().all()
    assert (ours["frequency"] == published["x"]).all()
    np.testing.assert_allclose(ours["recency"].round(2), published["t_x"], atol=1e-9)
    np.testing.assert_allclose(ours["T"].round(2), published["T"], atol=1e-9)
    np.testing.assert_allclose(ours["monetary_value"], published["zbar"], atol=0.005 + 1e-9)
    assert (ours["purchases"] >= ours["frequency"] + 1).all()


@pytest.mark.unit
def test_bgnbd_reproduces_the_paper_on_cdnow_weeks_1_to_39(cdnow_bgnbd):
    fit = cdnow_bgnbd
    assert fit.converged and fit.customers == 2357
    assert fit.distinct_rows < fit.customers  # the optimiser saw sufficient statistics
    for name, published in {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}.items():
        assert round(getattr(fit, name), 3) == published, name
    assert abs(fit.log_likelihood - (-9582.4)) <= 0.1


@pytest.mark.unit
def test_bgnbd_expectations_match_the_paper_spreadsheet(cdnow_bgnbd):
    # Fader, Hardie and Lee (2005): customer with x=2, t_x=30.43, T=38.86 over 39 weeks.
    assert round(float(cdnow_bgnbd.expected_purchases(39, 2, 30.43, 38.86)), 3) == 1.226
    times = np.array([0.1429, 1.0, 3.00, 31.8571, 32.00, 78.00])
    np.testing.assert_allclose(cdnow_bgnbd.expected_purchases_new_customer(times),
                               [0.0078, 0.0532, 0.1506, 1.0405, 1.0437, 1.8576], atol=1e-3)


@pytest.mark.unit
def test_gamma_gamma_reproduces_the_note_on_cdnow(cdnow_summary):
    fit = P.fit_gamma_gamma(cdnow_summary["frequency"], cdnow_summary["monetary_value"])
    assert fit.converged and fit.customers == 946
    assert abs(fit.p - 6.25) <= 0.01
    assert abs(fit.q - 3.74) <= 0.01
    assert abs(fit.gamma - 15.44) <= 0.01
    # a customer's expected order value shrinks from her own mean toward the population's
    own = np.array([10.0, 100.0])
    expected = fit.expected_avg_order_value([5, 5], own)
    assert own[0] < expected[0] < fit.population_mean < expected[1] < own[1]
    assert fit.expected_avg_order_value([0], [0.0])[0] == pytest.approx(fit.population_mean)


# --------------------------------------------------------------------- model properties


@pytest.mark.unit
def test_probability_alive_properties(cdnow_bgnbd):
    fit = cdnow_bgnbd
    # BG/NBD lets a customer drop out only right after a repeat purchase: no repeat, alive
    assert fit.probability_alive([0, 0], [0.0, 0.0], [1.0, 38.0]).tolist() == [1.0, 1.0]
    recency = np.linspace(1.0, 38.0, 12)
    by_recency = fit.probability_alive(np.full(12, 3), recency, np.full(12, 38.0))
    assert np.all(np.diff(by_recency) > 0)  # a more recent last purchase: likelier alive
    by_age = fit.probability_alive(np.full(5, 3), np.full(5, 10.0), np.linspace(10, 60, 5))
    assert np.all(np.diff(by_age) < 0)  # silence since then: less likely
    assert np.all((by_recency > 0) & (by_recency < 1))
    # at the same recency gap, the heavier buyer who went quiet is the likelier lost
    assert fit.probability_alive(10, 20.0, 38.0) < fit.probability_alive(1, 20.0, 38.0)


@pytest.mark.unit
def test_expected_purchases_grow_with_horizon_and_vanish_for_the_lost(cdnow_bgnbd):
    fit = cdnow_bgnbd
    horizons = np.array([1.0, 13.0, 52.0, 104.0])
    values = fit.expected_purchases(horizons, 4, 30.0, 38.0)
    assert np.all(np.diff(values) > 0) and values[0] > 0
    # heavy buyer whose last purchase was long ago: almost surely gone, expects ~nothing
    assert fit.expected_purchases(52.0, 40, 1.0, 38.0) < 1e-6
    # numerically safe for extreme histories (Euler-transformed hypergeometric term)
    extreme = fit.expected_purchases(52.0, np.array([500.0, 2000.0]), np.array([38.0, 38.0]),
                                     np.array([38.0, 38.0]))
    assert np.all(np.isfinite(extreme)) and np.all(extreme > 0)


@pytest.mark.unit
def test_aggregated_likelihood_equals_the_per_customer_sum(cdnow_summary):
    params = np.array([0.3, 5.0, 0.9, 2.0])
    s = cdnow_summary
    agg = P.aggregate(s["frequency"], s["recency"], s["T"])
    assert len(agg) < len(s) and agg.weights.sum() == len(s)
    full = P.bgnbd_log_likelihood(params, s["frequency"], s["recency"], s["T"])
    weighted = P.bgnbd_log_likelihood(params, *agg.columns, weights=agg.weights)
    assert weighted == pytest.approx(full, rel=1e-12)
    for column, distinct in zip(("frequency", "recency", "T"), agg.columns):
        np.testing.assert_array_equal(distinct[agg.inverse], s[column].to_numpy(dtype=float))


@pytest.mark.unit
@pytest.mark.parametrize("model", ["bgnbd", "gamma_gamma"])
def test_analytic_gradient_matches_finite_differences(cdnow_summary, model):
    s = cdnow_summary
    if model == "bgnbd":
        x, tx, t = (s[c].to_numpy(dtype=float) for c in ("frequency", "recency", "T"))
        lik = P._BGNBDLikelihood(x, tx, t, np.ones_like(x))
        point = np.log([0.3, 5.0, 0.9, 2.0])
    else:
        repeat = s[s["frequency"] > 0]
        x, m = repeat["frequency"].to_numpy(dtype=float), repeat["monetary_value"].to_numpy()
        lik = P._GammaGammaLikelihood(x, m, np.ones_like(x))
        point = np.log([5.0, 3.0, 12.0])
    error = optimize.check_grad(lambda th: lik(np.exp(th)),
                                lambda th: lik(np.exp(th), want_grad=True)[1], point,
                                epsilon=1e-6)
    scale = np.abs(lik(np.exp(point), want_grad=True)[1]).max()
    assert error / scale < 1e-4


@pytest.mark.unit
def test_simulated_population_is_recovered():
    true = {"r": 0.25, "alpha": 4.0, "a": 0.8, "b": 2.5}
    spend = {"p": 6.0, "q": 4.0, "gamma": 15.0}
    ages = np.random.default_rng(7).integers(10 * 7, 78 * 7, 20_000) / 7.0
    sim = samples.simulate(20_000, true, spend, T=ages, seed=11)
    # time recorded in whole days, as real data is: many customers share statistics
    recency = np.floor(sim.recency * 7.0) / 7.0
    fit = P.fit_bgnbd(sim.frequency, recency, sim.T)
    assert fit.converged
    for name, value in true.items():
        assert getattr(fit, name) == pytest.approx(value, rel=0.15), name
    # likelihood-ratio check: the truth lies inside the 99.9% region of the estimate
    at_truth = P.bgnbd_log_likelihood(list(true.values()), sim.frequency, recency, sim.T)
    assert 0 <= 2 * (fit.log_likelihood - at_truth) < 18.47
    gg = P.fit_gamma_gamma(sim.frequency, sim.monetary_value)
    assert gg.converged
    for name, value in spend.items():
        assert getattr(gg, name) == pytest.approx(value, rel=0.15), name


@pytest.mark.unit
def test_simulated_transaction_log_round_trips_through_rfm_summary():
    sim = samples.simulate(2_000, {"r": 0.5, "alpha": 3.0, "a": 0.8, "b": 2.5},
                     {"p": 6.0, "q": 4.0, "gamma": 15.0}, T=30.0, seed=3, transactions=True)
    log = sim.transactions
    as_of = pd.Timestamp("2024-07-01", tz="UTC")
    # times rounded to whole days so rfm_summary's day buckets see exactly these points
    days = np.round(log["time"].to_numpy() * 7.0)
    first = as_of - pd.Timedelta(days=30 * 7)
    frame = pd.DataFrame({"customer_id": log["customer"].astype(str),
                          "purchased_at": first + pd.to_timedelta(days, unit="D"),
                          "revenue": log["value"]})
    summary = P.rfm_summary(frame, as_of)
    assert len(summary) == 2_000 and (summary["T"] == 30.0).all()
    per_day = frame.groupby(["customer_id", "purchased_at"]).size().groupby(level=0).size()
    assert (summary["frequency"] == per_day.reindex(summary.index) - 1).all()
    assert summary["purchases"].sum() == len(frame)


# ------------------------------------------------------------- churn risk, next order


@pytest.mark.unit
def test_purchase_probability_and_next_order_wait_by_hand():
    # r=2, alpha=3, a=b=1; x=1, t_x=1, T=5, next t=8 (time units):
    # P(alive) = 1 / (1 + 1/1 * (8/4)^3) = 1/9; P(quiet for 8 | alive) = (8/16)^3 = 1/8
    fit = P.BGNBDFit(r=2.0, alpha=3.0, a=1.0, b=1.0, log_likelihood=0.0, customers=0,
                     distinct_rows=0, converged=True, iterations=0, message="")
    assert fit.probability_alive(1, 1.0, 5.0) == pytest.approx(1 / 9)
    assert fit.probability_purchase(8.0, 1, 1.0, 5.0) == pytest.approx(1 / 9 * (1 - 1 / 8))
    # the median wait of the alive: (alpha + T)(2^(1/(r+x)) - 1) = 8 (2^(1/3) - 1)
    assert fit.median_time_to_next_purchase(1, 5.0) == pytest.approx(2.0793684)
    # no repeat purchase: alive for sure, (3/11)^2 chance of no purchase in 8
    assert fit.probability_purchase(8.0, 0, 0.0, 0.0) == pytest.approx(1 - (3 / 11) ** 2)
    # at the median wait an alive customer has even odds of having bought
    t_med = fit.median_time_to_next_purchase(4, 20.0)
    assert fit.probability_purchase(t_med, 4, 20.0, 20.0) == pytest.approx(
        0.5 * fit.probability_alive(4, 20.0, 20.0))


@pytest.mark.unit
def test_scores_carry_churn_risk_and_the_next_order(cdnow_summary, cdnow_bgnbd):
    scores = P.score_customers(cdnow_summary, cdnow_bgnbd, None, time_unit_days=7.0)
    one = cdnow_summary.loc[1, ["frequency", "recency", "T"]].to_numpy(dtype=float)
    assert scores.loc[1, "churn_probability"] == pytest.approx(
        1 - cdnow_bgnbd.probability_purchase(90 / 7, *one))
    assert scores.loc[1, "expected_purchases_30d"] == pytest.approx(
        cdnow_bgnbd.expected_purchases(30 / 7, *one))
    assert scores.loc[1, "days_to_next_order"] == pytest.approx(
        7 * cdnow_bgnbd.median_time_to_next_purchase(one[0], one[2]))
    churn = scores["churn_probability"]
    assert churn.between(0, 1).all()
    assert (scores.loc[churn >= 0.8, "churn_risk"] == "high").all()
    assert (scores.loc[(churn >= 0.5) & (churn < 0.8), "churn_risk"] == "medium").all()
    assert (scores.loc[churn < 0.5, "churn_risk"] == "low").all()
    assert set(scores["churn_risk"]) == {"high", "medium", "low"}
    assert (scores["expected_purchases_30d"] <= scores["expected_purchases_90d"]).all()
    assert P.churn_risk_band([0.8, 0.79, 0.5, 0.49, np.nan]).tolist() == [
        "high", "medium", "medium", "low", None]


@pytest.mark.unit
def test_probability_alive_against_the_planted_churn_dates():
    """Simulated customers whose drop-out is planted (dropped_at): among the repeat buyers
    (the others cannot have dropped out) the fitted model's P(alive) adds up to the
    number still alive, and ranks the dropped out as the likelier lost."""
    true = {"r": 0.25, "alpha": 4.0, "a": 0.8, "b": 2.5}
    ages = np.random.default_rng(7).integers(10 * 7, 78 * 7, 20_000) / 7.0
    sim = samples.simulate(20_000, true, None, T=ages, seed=11)
    dropped = ~np.isnan(sim.dropped_at)
    assert (sim.dropped_at[dropped] == sim.recency[dropped]).all()  # after her last purchase
    assert not dropped[sim.frequency == 0].any()
    recency = np.floor(sim.recency * 7.0) / 7.0
    fit = P.fit_bgnbd(sim.frequency, recency, sim.T)
    repeat = sim.frequency > 0
    alive = fit.probability_alive(sim.frequency, recency, sim.T)[repeat]
    spread = np.sqrt((alive * (1 - alive)).sum())
    assert abs(alive.sum() - (~dropped[repeat]).sum()) < 4 * spread
    auc, lift = P.ranking_quality(1 - alive, dropped[repeat], ~dropped[repeat])
    assert auc > 0.75 and lift == pytest.approx(2 * auc - 1)
    churn = 1 - fit.probability_purchase(90 / 7, sim.frequency, recency, sim.T)
    high = P.churn_risk_band(churn) == "high"
    assert dropped[high & repeat].mean() > 2 * dropped[~high & repeat].mean()


@pytest.mark.unit
def test_ranking_quality_by_hand():
    # positives score 0.9 and 0.7, negatives 0.8 and 0.6: 3 of 4 pairs in order
    auc, lift = P.ranking_quality([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], [0, 1, 0, 1])
    assert (auc, lift) == (pytest.approx(0.75), pytest.approx(0.5))
    # gains curve (0,0) (.25,.5) (.5,.5) (.75,1) (1,1): area .625, perfect .75, random .5
    # ties count half and the curve runs straight across them: scores 1, 1, 0 with the
    # outcome on one of the tied -> AUC (0.5 + 1) / 2; area 2/3, perfect 5/6
    auc, lift = P.ranking_quality([1.0, 1.0, 0.0], [1, 0, 0], [0, 1, 1])
    assert (auc, lift) == (pytest.approx(0.75), pytest.approx(0.5))
    assert P.ranking_quality([3, 2, 1], [1, 1, 0], [0, 0, 1]) == (1.0, pytest.approx(1.0))
    assert P.ranking_quality([1, 1], [1, 1], [1, 1]) == (0.5, pytest.approx(0.0))
    assert P.ranking_quality([1, 2, 3], [0, 1, 1], [0, 0, 0])[0] != P.ranking_quality(
        [1, 2, 3], [0, 1, 1], [0, 0, 0])[0]  # NaN: nobody without the outcome
    # weighted rows equal the customers spelled out, and lift quality = 2 AUC - 1
    rng = np.random.default_rng(3)
    score = rng.integers(0, 6, 40).astype(float)
    pos, neg = rng.integers(0, 4, 40), rng.integers(0, 4, 40)
    spelled = (np.repeat(score, pos + neg),
               np.concatenate([np.r_[np.ones(p), np.zeros(n)] for p, n in zip(pos, neg)]))
    weighted = P.ranking_quality(score, pos, neg)
    assert P.ranking_quality(spelled[0], spelled[1], 1 - spelled[1]) == (
        pytest.approx(weighted[0]), pytest.approx(weighted[1]))
    assert weighted[1] == pytest.approx(2 * weighted[0] - 1)


@pytest.mark.unit
def test_backtest_on_cdnow_fits_at_the_cutoff_and_reads_nothing_after_as_of():
    tx = samples.load_cdnow_transactions(CDNOW_DIR / "CDNOW_sample.txt")
    # 39 weeks back from the end of week 78: the paper's calibration period
    as_of = pd.Timestamp("1998-06-30", tz="UTC")
    fit, results = P.backtest(tx, as_of, horizon_days=273, customer_col="customer_id",
                              datetime_col="date")
    for name, published in {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}.items():
        assert round(getattr(fit, name), 3) == published, name
    churn, timing = results
    assert (churn.measure, timing.measure) == ("churn_risk", "next_order")
    assert churn.cutoff == datetime(1997, 9, 30, tzinfo=UTC)
    assert churn.customers == timing.customers == 2357
    ordered = tx[(tx["date"] > "1997-09-30") & (tx["date"] <= "1998-06-30")]["customer_id"]
    assert churn.positives == 2357 - ordered.nunique()
    early = tx[(tx["date"] > "1997-09-30") & (tx["date"] <= "1997-10-30")]["customer_id"]
    assert timing.positives == early.nunique() and timing.outcome_days == 30
    for r in results:
        assert 0.7 < r.auc < 1 and r.lift_quality == pytest.approx(2 * r.auc - 1)
    # a purchase after as_of changes nothing
    late = pd.DataFrame({"customer_id": [1, 2], "date": pd.to_datetime(["1998-07-01"] * 2),
                         "dollars": [10.0, 10.0]})
    _, again = P.backtest(pd.concat([tx, late]), as_of, horizon_days=273,
                          customer_col="customer_id", datetime_col="date")
    assert again == results
    with pytest.raises(ValueError, match="window_days"):
        P.backtest(tx, as_of, horizon_days=20, window_days=30, customer_col="customer_id",
                   datetime_col="date")


# ------------------------------------------------------------------------- rfm_summary


@pytest.mark.unit
def test_rfm_summary_definitions():
    t = pd.Timestamp
    tx = pd.DataFrame({
        "customer_id": ["a", "a", "a", "a", "b", "c", "c"],
        "purchased_at": [
            t("2024-01-01 09:00", tz="UTC"), t("2024-01-01 18:00", tz="UTC"),  # one day
            t("2024-01-15 10:00", tz="UTC"),
            t("2024-03-01 10:00", tz="UTC"),  # after as_of: ignored
            t("2024-01-29 23:30", tz="UTC"),
            # 2024-01-02 01:00 in Berlin is 2024-01-02 00:00 UTC; 2024-01-08 23:00 UTC
            t("2024-01-02 01:00", tz="Europe/Berlin"), t("2024-01-08 23:00"),
        ],
        "revenue": [10.0, 5.0, 30.0, 1000.0, 7.0, 20.0, None],
    })
    s = P.rfm_summary(tx, t("2024-01-29 12:00", tz="UTC"), time_unit_days=1.0)
    assert list(s.columns) == ["purchases", "frequency", "recency", "T", "monetary_value"]
    a, c = s.loc["a"], s.loc["c"]
    assert (a["purchases"], a["frequency"], a["recency"], a["T"]) == (3, 1, 14.0, 28.0)
    assert a["monetary_value"] == 30.0  # the first day (10 + 5) is not a repeat
    assert "b" not in s.index  # only purchased after as_of (12:00 that day)
    assert (c["frequency"], c["recency"], c["T"], c["monetary_value"]) == (1, 6.0, 27.0, 0.0)
    weeks = P.rfm_summary(tx, t("2024-01-29 12:00", tz="UTC"))
    assert weeks.loc["a", "T"] == pytest.approx(4.0) and weeks.loc["a", "recency"] == 2.0
    nothing = P.rfm_summary(tx, "2023-12-31")
    assert nothing.empty and "frequency" in nothing.columns


@pytest.mark.unit
def test_scoring_uses_days_converted_to_time_units_and_discounts(cdnow_summary, cdnow_bgnbd):
    gg = P.fit_gamma_gamma(cdnow_summary["frequency"], cdnow_summary["monetary_value"])
    scores = P.score_customers(cdnow_summary, cdnow_bgnbd, gg, time_unit_days=7.0)
    one = cdnow_summary.loc[[1]]
    assert scores.loc[1, "expected_purchases_365d"] == pytest.approx(
        cdnow_bgnbd.expected_purchases(365 / 7, *one[["frequency", "recency", "T"]].iloc[0]))
    assert scores.loc[1, "expected_purchases_90d"] == pytest.approx(
        cdnow_bgnbd.expected_purchases(90 / 7, *one[["frequency", "recency", "T"]].iloc[0]))
    np.testing.assert_allclose(
        scores["predicted_value_12m"],
        scores["expected_purchases_365d"] * scores["expected_avg_order_value"])
    discounted = P.score_customers(cdnow_summary, cdnow_bgnbd, gg, 7.0,
                                   annual_discount_rate=0.10)
    ratio = discounted["predicted_value_12m"] / scores["predicted_value_12m"]
    assert ratio.between(1 / 1.10, 1.0).all() and ratio.max() < 1.0
    assert scores.notna().all().all()


# ------------------------------------------------------------------------------ marts

PURCHASES_DDL = """
create schema if not exists intermediate;
create table intermediate.int_purchases_unified (
  purchase_id text primary key,
  source text not null,
  customer_id text,
  purchased_at timestamptz not null,
  revenue numeric
);
"""

AS_OF = datetime(2024, 7, 1, tzinfo=UTC)


@pytest.fixture()
def shop(database_url):
    """raw.customers (300 buyers simulated from BG/NBD + Gamma-Gamma, 5 who never
    bought) and intermediate.int_purchases_unified (built by dbt in the pipeline)."""
    sim = samples.simulate(300, {"r": 0.8, "alpha": 6.0, "a": 0.8, "b": 2.5},
                     {"p": 6.0, "q": 4.0, "gamma": 150.0},
                     T=np.random.default_rng(1).uniform(5, 52, 300), seed=5, transactions=True)
    log = sim.transactions
    first = AS_OF - pd.to_timedelta(sim.T[log["customer"]] * 7, unit="D")
    purchased = (pd.DatetimeIndex(first)
                 + pd.to_timedelta(log["time"].to_numpy() * 7, unit="D")).floor("us")
    rows = [(f"p{i}", "online" if i % 3 else "offline", f"c{c:03d}", ts.to_pydatetime(),
             round(float(v), 2))
            for i, (c, ts, v) in enumerate(zip(log["customer"], purchased, log["value"]))]
    rows.append(("late", "online", "c000", AS_OF + timedelta(days=1), 9999.0))  # ignored
    rows.append(("free", "offline", "c001", AS_OF - timedelta(days=3), None))
    berlin = timezone(timedelta(hours=2))  # 00:30 in Berlin is the previous UTC day
    rows.append(("tz", "online", "c002", datetime(2024, 6, 20, 0, 30, tzinfo=berlin), 12.5))
    customers = [f"c{c:03d}" for c in range(300)] + [f"n{i}" for i in range(5)]
    with db.connect(database_url) as conn:
        conn.execute(PURCHASES_DDL)
        with conn.cursor().copy("copy raw.customers (customer_id) from stdin") as copy:
            for cid in customers:
                copy.write_row((cid,))
        with conn.cursor().copy("copy intermediate.int_purchases_unified from stdin") as copy:
            for row in rows:
                copy.write_row(row)
        conn.commit()
    return database_url


def _table(url, sql):
    with db.connect(url) as conn:
        cur = conn.execute(sql)
        names = [d.name for d in cur.description]
        return pd.DataFrame(cur.fetchall(), columns=names)


def test_write_predictions_one_row_per_customer_and_idempotent(shop):
    result = P.write_predictions(shop, AS_OF, run_id="run-1")
    assert result["customers"] == 305 and result["customers_with_purchases"] == 300
    assert result["bgnbd"]["converged"] and result["gamma_gamma"] is not None

    query = ("select * from marts.customer_predicted_value "
             "order by as_of, customer_id")
    first = _table(shop, query)
    assert len(first) == 305 and first["customer_id"].is_unique
    assert (first["as_of"] == AS_OF).all()
    assert (first["time_unit"] == timedelta(days=7)).all()

    never = first[first["customer_id"].str.startswith("n")]
    assert (never["purchases"] == 0).all()
    model_columns = ["frequency", "recency", "age", "probability_alive",
                     "expected_purchases_90d", "expected_purchases_365d",
                     "expected_avg_order_value", "predicted_value_12m"]
    assert never[model_columns].isna().all().all()
    buyers = first[first["customer_id"].str.startswith("c")].set_index("customer_id")
    assert buyers[model_columns].notna().all().all()
    assert buyers["probability_alive"].between(0, 1).all()
    assert (buyers["expected_purchases_365d"] >= buyers["expected_purchases_90d"]).all()

    # the set-wise SQL path agrees with rfm_summary + score_customers in memory
    purchases = _table(shop, "select customer_id, purchased_at, revenue::float8 as revenue "
                             "from intermediate.int_purchases_unified")
    direct = P.predict_customer_value(purchases, AS_OF)
    expected = direct.summary.join(direct.scores).rename(columns={"T": "age"})
    expected = expected.reindex(buyers.index)
    assert (buyers["purchases"] == expected["purchases"]).all()
    assert (buyers["frequency"] == expected["frequency"]).all()
    for column in ["recency", "age"]:
        np.testing.assert_allclose(buyers[column], expected[column], rtol=1e-12)
    # the fits see the same statistics up to the last bits of summed money (numeric in
    # SQL, float in pandas), so they agree to the optimiser's tolerance
    for column in ["probability_alive", "expected_purchases_90d", "expected_purchases_365d",
                   "expected_avg_order_value", "predicted_value_12m"]:
        np.testing.assert_allclose(buyers[column], expected[column], rtol=1e-6,
                                   err_msg=column)
    for column in ["expected_purchases_30d", "churn_probability"]:
        np.testing.assert_allclose(buyers[column], expected[column], rtol=1e-6,
                                   err_msg=column)
    assert (buyers["churn_risk"] == expected["churn_risk"]).all()
    waited = (buyers["expected_next_order_at"] - AS_OF).dt.total_seconds() / 86400
    np.testing.assert_allclose(waited, expected["days_to_next_order"], rtol=1e-6)
    assert never[["expected_purchases_30d", "churn_probability", "churn_risk",
                  "expected_next_order_at", "predicted_value_rank"]].isna().all().all()
    # rank: the share of valued customers at or below her value; the top is 1
    values = buyers["predicted_value_12m"]
    rank = values.apply(lambda v: (values <= v).mean())
    np.testing.assert_allclose(buyers["predicted_value_rank"], rank, rtol=1e-12)
    # the backtest: fitted 90 days back, the same as on the transactions in memory
    fit, backtests = P.backtest(purchases, AS_OF)
    kept = _table(shop, "select * from ops.predicted_value_backtests order by measure")
    assert kept["measure"].tolist() == ["churn_risk", "next_order"]
    assert (kept["cutoff"] == AS_OF - timedelta(days=90)).all()
    assert kept["outcome_window"].tolist() == [timedelta(days=90), timedelta(days=30)]
    assert (kept["run_id"] == "run-1").all()
    for row, b in zip(kept.itertuples(), backtests):
        assert (row.customers, row.positives) == (b.customers, b.positives)
        assert 0 < row.positives < row.customers
        assert row.auc == pytest.approx(b.auc, rel=1e-6)
        assert row.lift_quality == pytest.approx(b.lift_quality, rel=1e-6)
        assert row.params["r"] == pytest.approx(fit.r, rel=1e-6)
    assert result["backtest"]["churn_risk"]["auc"] == pytest.approx(backtests[0].auc)
    assert result["bgnbd"]["r"] == pytest.approx(direct.bgnbd.r, rel=1e-6)
    assert result["gamma_gamma"]["p"] == pytest.approx(direct.gamma_gamma.p, rel=1e-6)
    late = _table(shop, "select max(revenue) as m from intermediate.int_purchases_unified")
    assert late["m"][0] == 9999 and buyers["expected_avg_order_value"].max() < 9999

    fits = _table(shop, "select * from marts.predicted_value_fits order by model")
    assert fits["model"].tolist() == ["bgnbd", "gamma_gamma"]
    assert (fits["as_of"] == AS_OF).all() and (fits["fitted_for"] == AS_OF).all()
    assert (fits["run_id"] == "run-1").all()
    assert set(fits.loc[0, "params"]) == {"r", "alpha", "a", "b"}
    assert fits.loc[0, "customers"] == 300
    assert fits.loc[0, "params"]["r"] == pytest.approx(result["bgnbd"]["r"])

    # a re-run for the same as_of replaces, never duplicates; another as_of adds
    P.write_predictions(shop, AS_OF, run_id="run-2")
    again = _table(shop, query)
    pd.testing.assert_frame_equal(first, again)
    refits = _table(shop, "select model, run_id, log_likelihood from marts.predicted_value_fits")
    assert len(refits) == 2 and (refits["run_id"] == "run-2").all()

    earlier = AS_OF - timedelta(days=28)
    P.write_predictions(shop, earlier)
    counts = _table(shop, "select as_of, count(*) as n from marts.customer_predicted_value "
                          "group by as_of order by as_of")
    assert counts["n"].tolist() == [305, 305]
    assert _table(shop, "select count(*) as n from marts.predicted_value_fits")["n"][0] == 4
    assert _table(shop, "select count(*) as n from ops.predicted_value_backtests"
                  )["n"][0] == 4


def test_write_predictions_without_purchases_writes_unmodelled_rows(database_url):
    with db.connect(database_url) as conn:
        conn.execute(PURCHASES_DDL)
        conn.execute("insert into raw.customers (customer_id) values ('x1'), ('x2')")
        conn.commit()
    result = P.write_predictions(database_url, "2024-01-01T00:00:00Z")
    assert result["bgnbd"] is None and result["customers"] == 2
    rows = _table(database_url, "select * from marts.customer_predicted_value")
    assert rows["purchases"].tolist() == [0, 0] and rows["probability_alive"].isna().all()
    fits = _table(database_url, "select count(*) as n from marts.predicted_value_fits")
    assert fits["n"][0] == 0


def test_write_predictions_when_nobody_bought_twice(database_url):
    """One purchase each: the fit expects (almost) no purchase ever; the run still
    publishes every row, and no next-order date lies beyond NEXT_ORDER_MAX_DAYS."""
    with db.connect(database_url) as conn:
        conn.execute(PURCHASES_DDL)
        for i, days in enumerate((200, 120, 30, 5)):
            conn.execute("insert into raw.customers (customer_id) values (%s)", (f"o{i}",))
            conn.execute("insert into intermediate.int_purchases_unified values "
                         "(%s, 'online', %s, %s, 10)", (f"p{i}", f"o{i}",
                                                        AS_OF - timedelta(days=days)))
        conn.commit()
    result = P.write_predictions(database_url, AS_OF)
    assert result["customers"] == 4 and result["bgnbd"] is not None
    rows = _table(database_url, "select churn_risk, expected_next_order_at "
                                "from marts.customer_predicted_value")
    assert rows["churn_risk"].notna().all()
    dates = rows["expected_next_order_at"].dropna()
    assert (dates <= AS_OF + timedelta(days=P.NEXT_ORDER_MAX_DAYS)).all()
    kept = _table(database_url, "select measure, customers, auc from ops.predicted_value_backtests "
                                "order by measure")
    assert kept["customers"].tolist() == [2, 2]  # bought by the cutoff, 90 days back
    assert kept["auc"].isna().all()  # nobody bought after it: no ranking to judge
    json.dumps(result, allow_nan=False, default=str)  # fits a strict JSON XCom
    assert result["backtest"]["churn_risk"]["auc"] is None


def test_write_predictions_names_the_missing_purchases_relation(database_url):
    with pytest.raises(LookupError, match="intermediate.int_purchases_unified"):
        P.write_predictions(database_url, AS_OF)
