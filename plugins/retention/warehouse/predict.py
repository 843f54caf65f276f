"""Predicted customer value: BG/NBD for how many purchases, Gamma-Gamma for how much each.

The models (see docs/predicted_value.md for the formulas and the reproduced CDNOW numbers):

- BG/NBD (Fader, Hardie and Lee 2005, "Counting your customers the easy way"): while
  alive a customer buys as a Poisson process with rate lambda ~ Gamma(r, alpha); after
  each repeat purchase she drops out for good with probability p ~ Beta(a, b).
- Gamma-Gamma (Fader, Hardie and Lee 2005, "RFM and CLV"; Fader and Hardie, note 025):
  the value of each repeat purchase is Gamma(p, nu) with nu ~ Gamma(q, gamma) across
  customers, independent of the purchase process.

Both are fitted by maximum likelihood on log-parameters with L-BFGS-B and analytic
gradients, after collapsing the customers into sufficient statistics (unique
(x, t_x, T) triples, unique (x, mean value) pairs) with counts as weights: a million
customers is a few hundred thousand distinct rows, and the optimiser only ever sees those.

Inputs follow the standard definition (the one the `lifetimes` package and the papers use):
purchases are bucketed by UTC calendar day, several purchases on one day count as one
whose value is their sum; `frequency` is the number of days with a purchase after the
first one, `recency` the time from the first to the last such day, `T` the time from the
first day to the as_of day, `monetary_value` the mean value of the repeat days (0 when
there is none). Times are in the model's unit, `time_unit_days` days (7: weeks).

Only numpy, scipy and pandas at run time. `retention_dev.samples` draws simulated
customers and reads the CDNOW sample the tests reproduce the papers on.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize
from scipy.special import digamma, expit, gammaln, hyp2f1

#: Log-parameter bounds for the optimiser: every parameter stays within [1e-6, 1e6].
LOG_PARAM_BOUNDS = (math.log(1e-6), math.log(1e6))
DAYS_PER_YEAR = 365.0
DEFAULT_TIME_UNIT_DAYS = 7.0

PREDICTIONS_TABLE = "marts.customer_predicted_value"
FITS_TABLE = "marts.predicted_value_fits"
BACKTESTS_TABLE = "ops.predicted_value_backtests"

#: churn probability: the chance of no purchase in the next CHURN_HORIZON_DAYS days
CHURN_HORIZON_DAYS = 90.0
#: churn risk bands, highest first: a customer is in the first band whose lower bound her
#: churn probability reaches
CHURN_BANDS = (("high", 0.8), ("medium", 0.5), ("low", 0.0))
#: the out-of-time backtest fits as of as_of minus this many days and scores what followed
BACKTEST_HORIZON_DAYS = 90.0
#: the next-order backtest's outcome: a purchase within this many days after the cutoff
NEXT_ORDER_WINDOW_DAYS = 30.0
#: expected_next_order_at is NULL where the median wait is longer (or infinite: a fit
#: that expects no purchase at all)
NEXT_ORDER_MAX_DAYS = 36500.0


# --------------------------------------------------------------------------- inputs


def _utc_timestamp(value: Any) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _utc_naive(values: pd.Series) -> np.ndarray:
    """datetime64[ns] in UTC; naive input is taken as UTC already."""
    ts = pd.to_datetime(values, utc=True)
    return ts.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]")


def rfm_summary(
    transactions: pd.DataFrame,
    as_of: Any,
    time_unit_days: float = DEFAULT_TIME_UNIT_DAYS,
    customer_col: str = "customer_id",
    datetime_col: str = "purchased_at",
    monetary_col: str | None = "revenue",
    period: str = "D",
) -> pd.DataFrame:
    """One row per customer with a purchase at or before `as_of`, indexed by customer.

    Columns: purchases (raw count of transactions), frequency, recency, T, monetary_value
    (the last only with `monetary_col`). Transactions after `as_of` are ignored. `period`
    is the bucket in which purchases collapse into one ("D": UTC calendar day, the
    standard; any numpy datetime64 unit works), and `as_of` is floored to it as well, so
    a customer whose first purchase was on the as_of day has T = 0. A missing value counts
    as 0.
    """
    if time_unit_days <= 0:
        raise ValueError("time_unit_days must be positive")
    as_of_ts = _utc_timestamp(as_of)
    stamps = _utc_naive(transactions[datetime_col])
    keep = ~np.isnat(stamps) & (stamps <= as_of_ts.tz_convert(None).to_datetime64())
    frame = pd.DataFrame(
        {
            "customer": transactions[customer_col].to_numpy()[keep],
            "bucket": stamps[keep].astype(f"datetime64[{period}]"),
        }
    )
    if monetary_col is not None:
        frame["value"] = pd.to_numeric(transactions[monetary_col], errors="coerce").to_numpy(
            dtype=float)[keep]
    columns = ["purchases", "frequency", "recency", "T"] + (
        ["monetary_value"] if monetary_col is not None else [])
    if frame.empty:
        return pd.DataFrame(columns=columns).rename_axis(customer_col)

    aggs: dict[str, tuple[str, str]] = {"purchases": ("bucket", "size")}
    if monetary_col is not None:
        aggs["value"] = ("value", "sum")
    periods = frame.groupby(["customer", "bucket"], sort=True).agg(**aggs).reset_index()
    per_customer = periods.groupby("customer", sort=False)
    first = per_customer["bucket"].transform("min").to_numpy()
    is_first = periods["bucket"].to_numpy() == first

    one_day = np.timedelta64(1, "D")
    summary = per_customer.agg(
        purchases=("purchases", "sum"),
        periods=("bucket", "size"),
        first=("bucket", "min"),
        last=("bucket", "max"),
    )
    end = np.datetime64(as_of_ts.tz_convert(None).to_datetime64(), period)
    first_days = summary["first"].to_numpy().astype(f"datetime64[{period}]")
    last_days = summary["last"].to_numpy().astype(f"datetime64[{period}]")
    out = pd.DataFrame(index=summary.index.rename(customer_col))
    out["purchases"] = summary["purchases"].astype("int64")
    out["frequency"] = (summary["periods"] - 1).astype("int64")
    out["recency"] = (last_days - first_days) / one_day / time_unit_days
    out["T"] = (end - first_days) / one_day / time_unit_days
    if monetary_col is not None:
        repeat_value = periods.loc[~is_first].groupby("customer", sort=False)["value"].sum()
        repeat_value = repeat_value.reindex(out.index, fill_value=0.0).to_numpy()
        freq = out["frequency"].to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            out["monetary_value"] = np.where(freq > 0, repeat_value / np.maximum(freq, 1), 0.0)
    return out


# ---------------------------------------------------------------- sufficient statistics


@dataclass(frozen=True)
class Aggregated:
    """Distinct rows of the columns given, their counts, and the map back to the input."""

    columns: tuple[np.ndarray, ...]
    weights: np.ndarray
    inverse: np.ndarray

    def __len__(self) -> int:
        return len(self.weights)


def aggregate(*columns: Any) -> Aggregated:
    """Collapse customers with identical statistics into one weighted row (rows keep
    the order of their first occurrence)."""
    arrays = [np.asarray(c, dtype=float) for c in columns]
    n = len(arrays[0])
    if n == 0:
        return Aggregated(tuple(np.empty(0) for _ in arrays), np.empty(0), np.empty(0, int))
    # hash-factorise column by column, folding the codes into one key that stays < n
    key, _ = pd.factorize(arrays[0], use_na_sentinel=False)
    for column in arrays[1:]:
        codes, uniques = pd.factorize(column, use_na_sentinel=False)
        key, _ = pd.factorize(key.astype(np.int64) * len(uniques) + codes)
    groups = int(key.max()) + 1
    first = np.empty(groups, dtype=np.int64)
    first[key[::-1]] = np.arange(n - 1, -1, -1)  # the last write wins: first occurrence
    weights = np.bincount(key, minlength=groups).astype(float)
    return Aggregated(tuple(a[first] for a in arrays), weights, key)


def _minimize(objective, start: np.ndarray) -> optimize.OptimizeResult:
    bounds = [LOG_PARAM_BOUNDS] * len(start)
    return optimize.minimize(
        objective, np.clip(start, *LOG_PARAM_BOUNDS), jac=True, method="L-BFGS-B",
        bounds=bounds, options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9},
    )


def _converged(result: optimize.OptimizeResult) -> bool:
    """L-BFGS-B's own verdict, or a line search that stalled on rounding noise at a point
    whose gradient (of the per-customer objective) is already negligible."""
    return bool(result.success) or float(np.max(np.abs(result.jac))) < 1e-6


# ------------------------------------------------------------------------------- BG/NBD


class _BGNBDLikelihood:
    """The weighted BG/NBD log-likelihood and its gradient wrt the log-parameters.

    Every term that depends on x alone (the gamma functions and their digammas) is
    computed once per distinct x and summed with that x's total weight, so a row costs
    two logarithms and a logaddexp. No BLAS call sits on the hot path: a threaded BLAS
    on a shared two-core machine costs more in spinning than it saves.
    """

    def __init__(self, x, tx, T, w):
        self.x, self.tx, self.T, self.w = x, tx, T, w
        self.ux, self.xi = np.unique(x, return_inverse=True)
        self.wu = np.bincount(self.xi, weights=w, minlength=len(self.ux))
        self.total = float(w.sum())
        self.repeat = x > 0
        self.uxm1 = np.maximum(self.ux, 1.0) - 1.0

    def __call__(self, params, want_grad: bool = False):
        r, alpha, a, b = params
        ux, wu, xi, w = self.ux, self.wu, self.xi, self.w
        log_b_xm1 = np.log(b + self.uxm1)
        per_x = (gammaln(r + ux) - gammaln(r) + r * math.log(alpha) + gammaln(a + b)
                 + gammaln(b + ux) - gammaln(b) - gammaln(a + b + ux))
        log_alpha_T = np.log(alpha + self.T)
        log_alpha_tx = np.log(alpha + self.tx)
        rx = r + self.x
        a3 = -rx * log_alpha_T
        a4 = np.where(self.repeat, math.log(a) - log_b_xm1[xi] - rx * log_alpha_tx, -np.inf)
        mix = np.logaddexp(a3, a4)
        ll = float((wu * per_x).sum() + (w * mix).sum())
        if not want_grad:
            return ll
        w4 = w * np.exp(a4 - mix)  # weight of the "dropped out after the last purchase" branch
        w3 = w - w4
        dg_ab, dg_abx = digamma(a + b), digamma(a + b + ux)
        d_r = ((wu * (digamma(r + ux) - digamma(r) + math.log(alpha))).sum()
               - (w3 * log_alpha_T).sum() - (w4 * log_alpha_tx).sum())
        d_alpha = (r / alpha * self.total
                   - (rx * (w3 / (alpha + self.T) + w4 / (alpha + self.tx))).sum())
        w4_by_x = np.bincount(xi, weights=w4, minlength=len(ux))
        d_a = (wu * (dg_ab - dg_abx)).sum() + w4_by_x.sum() / a
        d_b = ((wu * (dg_ab + digamma(b + ux) - digamma(b) - dg_abx)).sum()
               - (w4_by_x / (b + self.uxm1)).sum())
        return ll, np.array([d_r * r, d_alpha * alpha, d_a * a, d_b * b])


def bgnbd_log_likelihood(params, frequency, recency, T, weights=None) -> float:
    """Total BG/NBD log-likelihood of (r, alpha, a, b) on the customers given."""
    x, tx, t = (np.asarray(v, dtype=float) for v in (frequency, recency, T))
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    return _BGNBDLikelihood(x, tx, t, w)(np.asarray(params, dtype=float))


@dataclass(frozen=True)
class BGNBDFit:
    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    customers: int
    distinct_rows: int
    converged: bool
    iterations: int
    message: str

    @property
    def params(self) -> dict[str, float]:
        return {"r": self.r, "alpha": self.alpha, "a": self.a, "b": self.b}

    def probability_alive(self, frequency, recency, T) -> np.ndarray:
        """P(alive at T | x, t_x, T); 1 for a customer without a repeat purchase (the
        model lets customers drop out only right after a repeat purchase)."""
        x, tx, t = (np.asarray(v, dtype=float) for v in (frequency, recency, T))
        log_odds_dead = (math.log(self.a) - np.log(self.b + np.maximum(x, 1.0) - 1.0)
                         + (self.r + x) * (np.log(self.alpha + t) - np.log(self.alpha + tx)))
        return np.where(x > 0, expit(-log_odds_dead), 1.0)

    def expected_purchases(self, t, frequency, recency, T) -> np.ndarray:
        """E[purchases in (T, T + t] | x, t_x, T], equation (10) of the paper.

        The Gauss hypergeometric term is evaluated after Euler's transformation,
        (1-z)^(r+x) 2F1(r+x, b+x; c; z) = (1-z)^(a-1) 2F1(a+b-1-r, a-1; c; z), whose
        parameters stay small for heavy buyers, so it neither overflows nor needs the
        fallback lifetimes has.
        """
        x, tx, age = (np.asarray(v, dtype=float) for v in (frequency, recency, T))
        t = np.asarray(t, dtype=float)
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        c = a + b + x - 1.0
        one_minus_z = (alpha + age) / (alpha + age + t)
        hyp = hyp2f1(a + b - 1.0 - r, a - 1.0, c, 1.0 - one_minus_z)
        remaining = 1.0 - one_minus_z ** (a - 1.0) * hyp
        return c / (a - 1.0) * remaining * self.probability_alive(x, tx, age)

    def probability_purchase(self, t, frequency, recency, T) -> np.ndarray:
        """P(at least one purchase in (T, T + t] | x, t_x, T).

        A customer alive at T buys next after an exponential wait whose rate has the
        posterior Gamma(r + x, alpha + T) (she can only drop out right after a purchase),
        so P(no purchase in t | alive) = ((alpha + T) / (alpha + T + t))^(r + x); times
        P(alive)."""
        x, tx, age = (np.asarray(v, dtype=float) for v in (frequency, recency, T))
        t = np.asarray(t, dtype=float)
        quiet_if_alive = np.exp(-(self.r + x) * np.log1p(t / (self.alpha + age)))
        return self.probability_alive(x, tx, age) * (1.0 - quiet_if_alive)

    def median_time_to_next_purchase(self, frequency, T) -> np.ndarray:
        """The wait after T by which a customer who is alive has even odds of having
        bought again: (alpha + T)(2^(1 / (r + x)) - 1), in the model's time unit. It
        does not depend on recency: while alive, purchases are a Poisson process."""
        x, age = (np.asarray(v, dtype=float) for v in (frequency, T))
        with np.errstate(over="ignore"):  # r + x near 0: no purchase expected, ever (inf)
            return (self.alpha + age) * np.expm1(math.log(2.0) / (self.r + x))

    def expected_purchases_new_customer(self, t) -> np.ndarray:
        """E[X(t)]: repeat purchases in (0, t] of a customer who first bought at 0."""
        t = np.asarray(t, dtype=float)
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        z = t / (alpha + t)
        return (a + b - 1.0) / (a - 1.0) * (
            1.0 - (alpha / (alpha + t)) ** r * hyp2f1(r, b, a + b - 1.0, z))


def fit_bgnbd(frequency, recency, T, weights=None) -> BGNBDFit:
    """Maximum-likelihood BG/NBD fit; customers are aggregated first unless `weights`
    is given (then the rows are taken as already distinct)."""
    if weights is None:
        agg = aggregate(frequency, recency, T)
        (x, tx, t), w = agg.columns, agg.weights
    else:
        x, tx, t = (np.asarray(v, dtype=float) for v in (frequency, recency, T))
        w = np.asarray(weights, dtype=float)
    if len(x) == 0:
        raise ValueError("no customers to fit")
    if np.any(x < 0) or np.any(tx < 0) or np.any(tx > t + 1e-9) or np.any((x == 0) & (tx != 0)):
        raise ValueError("need 0 <= recency <= T, and recency 0 where frequency is 0")
    likelihood = _BGNBDLikelihood(x, tx, t, w)
    total = likelihood.total

    def objective(log_params):
        ll, grad = likelihood(np.exp(log_params), want_grad=True)
        return -ll / total, -grad / total

    # alpha is the inverse of a purchase rate in model time units: start it at the
    # population's observed time per repeat purchase so the scale of T does not matter.
    rate = max(float((w * x).sum()), 1.0) / max(float((w * t).sum()), 1e-9)
    start = np.log([1.0, 1.0 / rate, 1.0, 1.0])
    result = _minimize(objective, start)
    r, alpha, a, b = np.exp(result.x)
    return BGNBDFit(
        r=float(r), alpha=float(alpha), a=float(a), b=float(b),
        log_likelihood=float(-result.fun * total), customers=int(round(total)),
        distinct_rows=len(x), converged=_converged(result), iterations=int(result.nit),
        message=str(result.message),
    )


# -------------------------------------------------------------------------- Gamma-Gamma


class _GammaGammaLikelihood:
    """The weighted Gamma-Gamma log-likelihood and its gradient wrt the log-parameters
    (terms in x alone computed once per distinct x, as for BG/NBD)."""

    def __init__(self, x, m, w):
        self.x, self.m, self.w = x, m, w
        self.ux, self.xi = np.unique(x, return_inverse=True)
        self.wu = np.bincount(self.xi, weights=w, minlength=len(self.ux))
        self.total = float(w.sum())
        self.sum_w_log_m = float((w * np.log(m)).sum())
        self.wx_log_xm = float((w * x * (np.log(x) + np.log(m))).sum())

    def __call__(self, params, want_grad: bool = False):
        p, q, v = params
        ux, wu, x, w = self.ux, self.wu, self.x, self.w
        pux = p * ux
        log_xm_v = np.log(x * self.m + v)
        ll = float((wu * (gammaln(pux + q) - gammaln(pux) - gammaln(q))).sum()
                   + q * math.log(v) * self.total + p * self.wx_log_xm - self.sum_w_log_m
                   - (w * (p * x + q) * log_xm_v).sum())
        if not want_grad:
            return ll
        dg = digamma(pux + q)
        d_p = ((wu * ux * (dg - digamma(pux))).sum() + self.wx_log_xm
               - (w * x * log_xm_v).sum())
        d_q = (wu * (dg - digamma(q))).sum() + math.log(v) * self.total - (w * log_xm_v).sum()
        d_v = q / v * self.total - (w * (p * x + q) / (x * self.m + v)).sum()
        return ll, np.array([d_p * p, d_q * q, d_v * v])


def gamma_gamma_log_likelihood(params, frequency, monetary_value, weights=None) -> float:
    """Total Gamma-Gamma log-likelihood of (p, q, gamma) on repeat buyers (x > 0, m > 0)."""
    x, m = (np.asarray(v, dtype=float) for v in (frequency, monetary_value))
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    return _GammaGammaLikelihood(x, m, w)(np.asarray(params, dtype=float))


@dataclass(frozen=True)
class GammaGammaFit:
    p: float
    q: float
    gamma: float
    log_likelihood: float
    customers: int
    distinct_rows: int
    converged: bool
    iterations: int
    message: str

    @property
    def params(self) -> dict[str, float]:
        return {"p": self.p, "q": self.q, "gamma": self.gamma}

    @property
    def population_mean(self) -> float:
        """E[value of a purchase] across customers: p gamma / (q - 1); NaN when q <= 1
        (the fitted spend distribution then has no mean)."""
        return self.p * self.gamma / (self.q - 1.0) if self.q > 1.0 else float("nan")

    def expected_avg_order_value(self, frequency, monetary_value) -> np.ndarray:
        """E[value of a purchase | x repeat purchases of mean value m]: a weighted mean of
        the population mean and the customer's own, with weight p x / (p x + q - 1)."""
        x = np.asarray(frequency, dtype=float)
        m = np.where(x > 0, np.asarray(monetary_value, dtype=float), 0.0)
        if self.q <= 1.0:
            return np.full(x.shape, np.nan)
        return (self.p * (self.gamma + x * m)) / (self.p * x + self.q - 1.0)


def fit_gamma_gamma(frequency, monetary_value, weights=None) -> GammaGammaFit:
    """Maximum-likelihood Gamma-Gamma fit on repeat buyers: rows with frequency > 0 and a
    positive mean repeat value (a zero value has no likelihood under the model)."""
    x = np.asarray(frequency, dtype=float)
    m = np.asarray(monetary_value, dtype=float)
    w_in = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    use = (x > 0) & (m > 0) & np.isfinite(m)
    if weights is None:
        agg = aggregate(x[use], m[use])
        (x, m), w = agg.columns, agg.weights
    else:
        x, m, w = x[use], m[use], w_in[use]
    if len(x) == 0:
        raise ValueError("no repeat buyers with a positive value to fit")
    likelihood = _GammaGammaLikelihood(x, m, w)
    total = likelihood.total

    def objective(log_params):
        ll, grad = likelihood(np.exp(log_params), want_grad=True)
        return -ll / total, -grad / total

    mean_value = float((w * m).sum() / total)
    start = np.log([1.0, 2.0, mean_value])
    result = _minimize(objective, start)
    p, q, v = np.exp(result.x)
    return GammaGammaFit(
        p=float(p), q=float(q), gamma=float(v), log_likelihood=float(-result.fun * total),
        customers=int(round(total)), distinct_rows=len(x), converged=_converged(result),
        iterations=int(result.nit), message=str(result.message),
    )


# ------------------------------------------------------------------------------ scoring


def score_customers(
    summary: pd.DataFrame,
    bgnbd: BGNBDFit,
    gamma_gamma: GammaGammaFit | None,
    time_unit_days: float = DEFAULT_TIME_UNIT_DAYS,
    annual_discount_rate: float = 0.0,
) -> pd.DataFrame:
    """Per-customer predictions for an `rfm_summary` frame (same index).

    probability_alive, expected_purchases_90d, expected_purchases_365d,
    expected_avg_order_value (NaN without a Gamma-Gamma fit), predicted_value_12m,
    expected_purchases_30d, churn_probability (no purchase in the next
    CHURN_HORIZON_DAYS days), churn_risk (CHURN_BANDS), days_to_next_order (the median
    wait for the next purchase of a customer who is alive, in days).
    The 12-month value is expected purchases in the next 365 days times the expected
    order value; with `annual_discount_rate` d > 0 each month's expected purchases are
    discounted by (1 + d)^(month / 12) instead (d = 0 gives the plain product).
    """
    agg = aggregate(summary["frequency"], summary["recency"], summary["T"])
    x, tx, t = agg.columns
    inv = agg.inverse
    horizon_90 = 90.0 / time_unit_days
    horizon_365 = DAYS_PER_YEAR / time_unit_days
    out = pd.DataFrame(index=summary.index)
    out["probability_alive"] = bgnbd.probability_alive(x, tx, t)[inv]
    out["expected_purchases_90d"] = bgnbd.expected_purchases(horizon_90, x, tx, t)[inv]
    purchases_365 = bgnbd.expected_purchases(horizon_365, x, tx, t)
    out["expected_purchases_365d"] = purchases_365[inv]
    if gamma_gamma is None:
        aov = np.full(len(summary), np.nan)
    else:
        aov = gamma_gamma.expected_avg_order_value(
            summary["frequency"].to_numpy(), summary["monetary_value"].to_numpy())
    out["expected_avg_order_value"] = aov
    value_purchases = (_purchases_for_value(bgnbd, x, tx, t, time_unit_days,
                                            annual_discount_rate)
                       if annual_discount_rate else purchases_365)
    out["predicted_value_12m"] = value_purchases[inv] * aov
    out["expected_purchases_30d"] = bgnbd.expected_purchases(30.0 / time_unit_days, x, tx,
                                                             t)[inv]
    churn = 1.0 - bgnbd.probability_purchase(CHURN_HORIZON_DAYS / time_unit_days, x, tx, t)
    out["churn_probability"] = churn[inv]
    out["churn_risk"] = churn_risk_band(churn)[inv]
    out["days_to_next_order"] = (bgnbd.median_time_to_next_purchase(x, t)
                                 * time_unit_days)[inv]
    return out


def churn_risk_band(churn_probability) -> np.ndarray:
    """The CHURN_BANDS label of each churn probability (None where it is NaN)."""
    p = np.asarray(churn_probability, dtype=float)
    out = np.full(p.shape, None, dtype=object)
    for label, lower in reversed(CHURN_BANDS):
        out[p >= lower] = label
    return out


# ----------------------------------------------------------------------------- backtest


def ranking_quality(score, positives, negatives) -> tuple[float, float]:
    """AUC and lift quality of `score` for a yes/no outcome, rows weighted.

    `positives` / `negatives`: per row, how many customers with that score had / had not
    the outcome (labels 0/1: positives = labels, negatives = 1 - labels). AUC is the
    chance that a customer with the outcome scores above one without (ties count half).
    Lift quality is the area between the cumulative gains curve (share of the outcome
    found against share of customers taken, best scores first; tied scores taken
    together, so the curve is straight across them) and the diagonal of a random order,
    over the same area of a perfect order: 0 random, 1 perfect. It equals 2 AUC - 1;
    both are computed here, each from its own definition. NaN when every customer has
    the outcome or none has; rows with a NaN score are left out.
    """
    s = np.asarray(score, dtype=float)
    pos = np.asarray(positives, dtype=float)
    neg = np.asarray(negatives, dtype=float)
    keep = np.isfinite(s)
    s, pos, neg = s[keep], pos[keep], neg[keep]
    total_p, total_n = float(pos.sum()), float(neg.sum())
    if total_p <= 0 or total_n <= 0:
        return float("nan"), float("nan")
    order = np.argsort(-s, kind="stable")
    s, pos, neg = s[order], pos[order], neg[order]
    _, start = np.unique(-s, return_index=True)  # tie groups, best score first
    p_group, n_group = np.add.reduceat(pos, start), np.add.reduceat(neg, start)
    n_below = total_n - np.cumsum(n_group)
    auc = float((p_group * (n_below + 0.5 * n_group)).sum() / (total_p * total_n))
    taken = np.concatenate([[0.0], np.cumsum(p_group + n_group)]) / (total_p + total_n)
    found = np.concatenate([[0.0], np.cumsum(p_group)]) / total_p
    area = float((np.diff(taken) * (found[1:] + found[:-1]) / 2.0).sum())
    base_rate = total_p / (total_p + total_n)
    perfect = 1.0 - base_rate / 2.0
    return auc, (area - 0.5) / (perfect - 0.5)


@dataclass(frozen=True)
class BacktestResult:
    """One measure of an out-of-time backtest: fitted as of `cutoff`, the customers who
    had bought by then scored, and the outcome read from (cutoff, cutoff + window]."""

    measure: str  # churn_risk | next_order
    cutoff: datetime
    outcome_days: float
    customers: int
    positives: int  # customers with the outcome
    auc: float
    lift_quality: float


def backtest_statistics(frequency, recency_days, age_days, customers, ordered_in_horizon,
                        ordered_in_window, *, cutoff: datetime,
                        horizon_days: float = BACKTEST_HORIZON_DAYS,
                        window_days: float = NEXT_ORDER_WINDOW_DAYS,
                        time_unit_days: float = DEFAULT_TIME_UNIT_DAYS,
                        ) -> tuple[BGNBDFit, list[BacktestResult]]:
    """The backtest on distinct (x, t_x, T) rows as of the cutoff (times in days), with
    per row the customers and how many of them bought within `horizon_days` and within
    `window_days` after the cutoff.

    churn_risk: the score is the churn probability over the horizon, the outcome no
    purchase in it. next_order: the score is how soon the next purchase is expected
    (minus the median wait), the outcome a purchase within the window.
    """
    x = np.asarray(frequency, dtype=float)
    tx = np.asarray(recency_days, dtype=float) / time_unit_days
    t = np.asarray(age_days, dtype=float) / time_unit_days
    n = np.asarray(customers, dtype=float)
    in_horizon = np.asarray(ordered_in_horizon, dtype=float)
    in_window = np.asarray(ordered_in_window, dtype=float)
    fit = fit_bgnbd(x, tx, t, weights=n)
    churn = 1.0 - fit.probability_purchase(horizon_days / time_unit_days, x, tx, t)
    soon = -fit.median_time_to_next_purchase(x, t)
    results = []
    for measure, score, positives, days in (
            ("churn_risk", churn, n - in_horizon, horizon_days),
            ("next_order", soon, in_window, window_days)):
        auc, lift = ranking_quality(score, positives, n - positives)
        results.append(BacktestResult(measure, cutoff, float(days), int(round(n.sum())),
                                      int(round(positives.sum())), auc, lift))
    return fit, results


def backtest(transactions: pd.DataFrame, as_of: Any,
             horizon_days: float = BACKTEST_HORIZON_DAYS,
             window_days: float = NEXT_ORDER_WINDOW_DAYS,
             time_unit_days: float = DEFAULT_TIME_UNIT_DAYS,
             customer_col: str = "customer_id",
             datetime_col: str = "purchased_at") -> tuple[BGNBDFit, list[BacktestResult]]:
    """Out-of-time backtest on a transaction log: fit as of `as_of` minus `horizon_days`
    (the cutoff), score the customers who had bought by then, and read the outcome from
    the purchases in (cutoff, as_of] (backtest_statistics). Nothing after as_of is read.
    """
    if not 0 < window_days <= horizon_days:
        raise ValueError("need 0 < window_days <= horizon_days")
    as_of_ts = _utc_timestamp(as_of)
    cutoff = as_of_ts - pd.Timedelta(days=horizon_days)
    summary = rfm_summary(transactions, cutoff, 1.0, customer_col, datetime_col, None)
    if summary.empty:
        raise ValueError(f"no purchase at or before the cutoff {cutoff.isoformat()}")
    stamps = _utc_naive(transactions[datetime_col])
    after = (~np.isnat(stamps) & (stamps > cutoff.tz_convert(None).to_datetime64())
             & (stamps <= as_of_ts.tz_convert(None).to_datetime64()))
    first_after = pd.Series(stamps[after]).groupby(
        transactions[customer_col].to_numpy()[after]).min()
    first_after = first_after.reindex(summary.index)
    window_end = (cutoff + pd.Timedelta(days=window_days)).tz_convert(None).to_datetime64()
    frame = pd.DataFrame({
        "x": summary["frequency"].to_numpy(), "tx": summary["recency"].to_numpy(),
        "t": summary["T"].to_numpy(), "n": 1.0,
        "h": first_after.notna().to_numpy(dtype=float),
        "w": (first_after.to_numpy() <= window_end).astype(float)})
    grouped = frame.groupby(["x", "tx", "t"], sort=False).sum().reset_index()
    return backtest_statistics(grouped["x"], grouped["tx"], grouped["t"], grouped["n"],
                               grouped["h"], grouped["w"], cutoff=cutoff.to_pydatetime(),
                               horizon_days=horizon_days, window_days=window_days,
                               time_unit_days=time_unit_days)


@dataclass(frozen=True)
class Prediction:
    summary: pd.DataFrame  # rfm_summary columns
    scores: pd.DataFrame  # score_customers columns, same index
    bgnbd: BGNBDFit
    gamma_gamma: GammaGammaFit | None
    time_unit_days: float


def predict_customer_value(
    transactions: pd.DataFrame,
    as_of: Any,
    time_unit_days: float = DEFAULT_TIME_UNIT_DAYS,
    customer_col: str = "customer_id",
    datetime_col: str = "purchased_at",
    monetary_col: str = "revenue",
    annual_discount_rate: float = 0.0,
) -> Prediction:
    """rfm_summary, both fits and the scores, from a transaction log, as of `as_of`.

    Gamma-Gamma is skipped (None; order values NaN) when no customer has a repeat
    purchase with a positive value.
    """
    summary = rfm_summary(transactions, as_of, time_unit_days, customer_col, datetime_col,
                          monetary_col)
    bgnbd = fit_bgnbd(summary["frequency"], summary["recency"], summary["T"])
    repeat = (summary["frequency"] > 0) & (summary["monetary_value"] > 0)
    gamma_gamma = (fit_gamma_gamma(summary["frequency"], summary["monetary_value"])
                   if repeat.any() else None)
    scores = score_customers(summary, bgnbd, gamma_gamma, time_unit_days,
                             annual_discount_rate)
    return Prediction(summary, scores, bgnbd, gamma_gamma, time_unit_days)


# ----------------------------------------------------------------------------- database

PREDICTION_COLUMNS = (
    "customer_id", "as_of", "purchases", "frequency", "recency", "age", "time_unit",
    "probability_alive", "expected_purchases_90d", "expected_purchases_365d",
    "expected_avg_order_value", "predicted_value_12m", "expected_purchases_30d",
    "churn_probability", "churn_risk", "expected_next_order_at", "predicted_value_rank",
)

PURCHASES_RELATION = "intermediate.int_purchases_unified"

# rfm_summary's definition, set-wise and server-side (UTC calendar days, purchases at or
# before as_of), so that a million customers never cross the wire: Python only reads the
# distinct (x, t_x, T) and (x, mean value) rows it fits on, and sends back one prediction
# per distinct (x, t_x, T). tests/test_predict.py checks both paths give the same rows.
RFM_SQL = """
create temp table {table} on commit drop as
with days as (
  select customer_id,
         (purchased_at at time zone 'UTC')::date as day,
         count(*) as purchases,
         sum(coalesce(revenue, 0))::float8 as value
  from {purchases}
  where customer_id is not null and purchased_at <= {as_of}
  group by 1, 2
), flagged as (
  select *, day = min(day) over (partition by customer_id) as is_first from days
)
select customer_id,
       sum(purchases)::integer as purchases,
       (count(*) - 1)::integer as frequency,
       max(day) - min(day) as recency_days,
       ({as_of} at time zone 'UTC')::date - min(day) as age_days,
       coalesce(sum(value) filter (where not is_first) / nullif(count(*) - 1, 0), 0)
         as monetary_value
from flagged
group by customer_id
"""

# predicted_value_rank: the share of the as_of's customers with a predicted value whose
# value is at most hers (cume_dist; the top quarter is rank > 0.75)
INSERT_SQL = """
insert into {table} ({columns})
select s.*, case when s.value_12m is not null then
         cume_dist() over (partition by s.value_12m is null order by s.value_12m) end
from (
  select c.customer_id, {as_of}, coalesce(r.purchases, 0), r.frequency,
         r.recency_days / {unit_days}, r.age_days / {unit_days}, {unit},
         p.probability_alive, p.expected_purchases_90d, p.expected_purchases_365d,
         aov.value, p.value_purchases * aov.value as value_12m, p.expected_purchases_30d,
         p.churn_probability,
         case when p.churn_probability >= {high} then 'high'
              when p.churn_probability >= {medium} then 'medium'
              when p.churn_probability is not null then 'low' end,
         case when p.next_order_days <= {max_days}
              then {as_of} + make_interval(secs => p.next_order_days * 86400.0) end
  from raw.customers c
  left join _pv_rfm r on r.customer_id = c.customer_id
  left join _pv_predictions p
    on p.frequency = r.frequency and p.recency_days = r.recency_days
    and p.age_days = r.age_days
  cross join lateral (select {aov} as value) aov
) s
"""

# the backtest's statistics: rfm as of the cutoff (_pv_rfm_cutoff) and, per distinct
# (x, t_x, T), how many customers bought in (cutoff, as_of] and in (cutoff, window end]
BACKTEST_SQL = """
copy (
  select r.frequency, r.recency_days, r.age_days, count(*),
         count(n.first_at), count(*) filter (where n.first_at <= {window_end})
  from _pv_rfm_cutoff r
  left join (select customer_id, min(purchased_at) as first_at from {purchases}
             where customer_id is not null and purchased_at > {cutoff}
               and purchased_at <= {as_of}
             group by customer_id) n on n.customer_id = r.customer_id
  group by 1, 2, 3
) to stdout with (format csv)
"""


def _copy_out(conn, query) -> io.BytesIO:
    buf = io.BytesIO()
    with conn.cursor().copy(query) as copy:
        for chunk in copy:
            buf.write(chunk)
    buf.seek(0)
    return buf


def _binary_copy(columns: list[tuple[np.ndarray, str]]) -> bytes:
    """A PostgreSQL binary COPY payload for non-null int4 ('i') and float8 ('f') columns,
    built in numpy: no per-value text formatting."""
    n = len(columns[0][0])
    fields = [("count", ">i2")]
    for i, (_, kind) in enumerate(columns):
        fields += [(f"len{i}", ">i4"), (f"val{i}", ">i4" if kind == "i" else ">f8")]
    records = np.empty(n, dtype=np.dtype(fields))
    records["count"] = len(columns)
    for i, (values, kind) in enumerate(columns):
        records[f"len{i}"] = 4 if kind == "i" else 8
        records[f"val{i}"] = values
    header = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
    return header + records.tobytes() + b"\xff\xff"


def _purchases_for_value(bgnbd: BGNBDFit, x, tx, t, time_unit_days: float,
                         annual_discount_rate: float) -> np.ndarray:
    """Expected purchases in the next 365 days, each month's discounted by
    (1 + d)^(month / 12) when d > 0."""
    horizon = DAYS_PER_YEAR / time_unit_days
    if not annual_discount_rate:
        return bgnbd.expected_purchases(horizon, x, tx, t)
    months = np.arange(1, 13)
    cumulative = np.stack([bgnbd.expected_purchases(horizon * k / 12.0, x, tx, t)
                           for k in months])
    per_month = np.diff(np.vstack([np.zeros_like(np.asarray(x, dtype=float)), cumulative]),
                        axis=0)
    factors = (1.0 + annual_discount_rate) ** (-months / 12.0)
    return (factors[:, None] * per_month).sum(axis=0)


def _fit_row(model: str, fit, as_of: datetime, run_id: str | None, unit: timedelta) -> tuple:
    return (as_of, model, json.dumps(fit.params), fit.log_likelihood, fit.customers,
            fit.converged, as_of, run_id, unit, fit.distinct_rows, fit.iterations, fit.message)


def write_predictions(
    url: str | None,
    as_of: Any,
    run_id: str | None = None,
    *,
    time_unit_days: float = DEFAULT_TIME_UNIT_DAYS,
    annual_discount_rate: float = 0.0,
    backtest_horizon_days: float = BACKTEST_HORIZON_DAYS,
    next_order_window_days: float = NEXT_ORDER_WINDOW_DAYS,
) -> dict[str, Any]:
    """Fit both models on the purchases up to `as_of` and publish the predictions.

    Reads intermediate.int_purchases_unified (purchases at or before as_of: the
    contract's "data after as_of is ignored") and raw.customers. In one transaction it
    replaces the rows of `as_of` in marts.customer_predicted_value (one per customer of
    raw.customers; purchases 0 and every model column NULL for a customer without a
    purchase) and in marts.predicted_value_fits (one per model fitted; Gamma-Gamma only
    when some customer has a repeat purchase of positive value), and the rows of `as_of`
    in ops.predicted_value_backtests: the out-of-time backtest (`backtest`) with the
    cutoff as_of minus `backtest_horizon_days`, one row per measure (none when nobody had
    bought by the cutoff). Re-running for the same as_of gives the same rows. Returns a
    summary of the run. `url` None: the configured database.
    """
    from psycopg import sql

    from retention import db
    from retention.db.schema import ensure_schemas

    as_of_ts = _utc_timestamp(as_of)
    as_of_dt = as_of_ts.to_pydatetime()
    unit = timedelta(days=time_unit_days)
    as_of_sql = sql.Literal(as_of_dt)
    with db.connect(url) as conn:
        ensure_schemas(conn)
        conn.commit()
        if conn.execute("select to_regclass(%s)", (PURCHASES_RELATION,)).fetchone()[0] is None:
            raise LookupError(f"{PURCHASES_RELATION} does not exist: build the dbt models "
                              "before predicting customer value")
        # one run per as_of at a time; different as_of values proceed in parallel
        conn.execute("select pg_advisory_xact_lock(hashtext('retention.warehouse.predict'), "
                     "hashtext(%s))", (as_of_ts.isoformat(),))
        conn.execute(sql.SQL(RFM_SQL).format(table=sql.SQL("_pv_rfm"),
                                             purchases=sql.SQL(PURCHASES_RELATION),
                                             as_of=as_of_sql))
        triples = pd.read_csv(_copy_out(conn, (
            "copy (select frequency, recency_days, age_days, count(*) from _pv_rfm "
            "group by 1, 2, 3) to stdout with (format csv)")),
            header=None, names=["x", "recency_days", "age_days", "customers"], dtype="int64")
        pairs = pd.read_csv(_copy_out(conn, (
            "copy (select frequency, monetary_value, count(*) from _pv_rfm "
            "where frequency > 0 and monetary_value > 0 group by 1, 2) "
            "to stdout with (format csv)")),
            header=None, names=["x", "m", "customers"],
            dtype={"x": "int64", "m": float, "customers": "int64"})

        bgnbd = gamma_gamma = None
        conn.execute("create temp table _pv_predictions (frequency integer, "
                     "recency_days integer, age_days integer, probability_alive float8, "
                     "expected_purchases_90d float8, expected_purchases_365d float8, "
                     "value_purchases float8, expected_purchases_30d float8, "
                     "churn_probability float8, next_order_days float8) on commit drop")
        if len(triples):
            x = triples["x"].to_numpy(dtype=float)
            tx = triples["recency_days"].to_numpy() / time_unit_days
            t = triples["age_days"].to_numpy() / time_unit_days
            bgnbd = fit_bgnbd(x, tx, t, weights=triples["customers"].to_numpy(dtype=float))
            payload = _binary_copy([
                (triples["x"].to_numpy(), "i"),
                (triples["recency_days"].to_numpy(), "i"),
                (triples["age_days"].to_numpy(), "i"),
                (bgnbd.probability_alive(x, tx, t), "f"),
                (bgnbd.expected_purchases(90.0 / time_unit_days, x, tx, t), "f"),
                (bgnbd.expected_purchases(DAYS_PER_YEAR / time_unit_days, x, tx, t), "f"),
                (_purchases_for_value(bgnbd, x, tx, t, time_unit_days,
                                      annual_discount_rate), "f"),
                (bgnbd.expected_purchases(30.0 / time_unit_days, x, tx, t), "f"),
                (1.0 - bgnbd.probability_purchase(CHURN_HORIZON_DAYS / time_unit_days,
                                                  x, tx, t), "f"),
                (bgnbd.median_time_to_next_purchase(x, t) * time_unit_days, "f"),
            ])
            with conn.cursor().copy("copy _pv_predictions from stdin with (format binary)"
                                    ) as copy:
                copy.write(payload)
        if len(pairs):
            gamma_gamma = fit_gamma_gamma(pairs["x"], pairs["m"],
                                          weights=pairs["customers"].to_numpy(dtype=float))

        if gamma_gamma is not None and gamma_gamma.q > 1.0:
            g_p, g_q, g_gamma = (sql.Literal(v) for v in
                                 (gamma_gamma.p, gamma_gamma.q, gamma_gamma.gamma))
            aov = sql.SQL(
                "case when r.customer_id is not null then ({p}::float8 * ({g}::float8 "
                "+ r.frequency * r.monetary_value)) / ({p}::float8 * r.frequency "
                "+ {q}::float8 - 1) end").format(p=g_p, q=g_q, g=g_gamma)
        else:
            aov = sql.SQL("null::float8")
        conn.execute(f"delete from {PREDICTIONS_TABLE} where as_of = %s", (as_of_dt,))
        inserted = conn.execute(sql.SQL(INSERT_SQL).format(
            table=sql.SQL(PREDICTIONS_TABLE),
            columns=sql.SQL(", ").join(map(sql.Identifier, PREDICTION_COLUMNS)),
            as_of=as_of_sql, unit_days=sql.Literal(float(time_unit_days)),
            unit=sql.Literal(unit), aov=aov,
            max_days=sql.Literal(NEXT_ORDER_MAX_DAYS),
            high=sql.Literal(dict(CHURN_BANDS)["high"]),
            medium=sql.Literal(dict(CHURN_BANDS)["medium"]),
        )).rowcount
        with_purchases = conn.execute(
            f"select count(*) from {PREDICTIONS_TABLE} where as_of = %s and purchases > 0",
            (as_of_dt,)).fetchone()[0]

        conn.execute(f"delete from {FITS_TABLE} where as_of = %s", (as_of_dt,))
        fit_rows = [_fit_row(name, fit, as_of_dt, run_id, unit)
                    for name, fit in (("bgnbd", bgnbd), ("gamma_gamma", gamma_gamma))
                    if fit is not None]
        if fit_rows:
            with conn.cursor().copy(
                f"copy {FITS_TABLE} (as_of, model, params, log_likelihood, customers, "
                "converged, fitted_for, run_id, time_unit, distinct_rows, iterations, message) "
                "from stdin"
            ) as copy:
                for row in fit_rows:
                    copy.write_row(row)
        backtest_fit, backtests = _write_backtest(
            conn, as_of_ts, run_id, time_unit_days, backtest_horizon_days,
            next_order_window_days)
        conn.commit()

    return {
        "as_of": as_of_ts.isoformat(),
        "run_id": run_id,
        "customers": int(inserted),
        "customers_with_purchases": int(with_purchases),
        "time_unit_days": time_unit_days,
        "bgnbd": None if bgnbd is None else asdict(bgnbd),
        "gamma_gamma": None if gamma_gamma is None else asdict(gamma_gamma),
        "backtest": {"bgnbd": None if backtest_fit is None else backtest_fit.params,
                     **{b.measure: {**asdict(b), "cutoff": b.cutoff.isoformat(),
                                    "auc": _finite(b.auc),
                                    "lift_quality": _finite(b.lift_quality)}
                        for b in backtests}},
    }


def _finite(value: float) -> float | None:
    """None for NaN (JSON, e.g. an Airflow XCom, has no NaN)."""
    return None if math.isnan(value) else value


def _write_backtest(conn, as_of_ts: pd.Timestamp, run_id: str | None,
                    time_unit_days: float, horizon_days: float, window_days: float,
                    ) -> tuple[BGNBDFit | None, list[BacktestResult]]:
    """Replace the as_of's rows of BACKTESTS_TABLE with the backtest fitted as of as_of
    minus `horizon_days` (in the caller's transaction)."""
    from psycopg import sql

    if not 0 < window_days <= horizon_days:
        raise ValueError("need 0 < next_order_window_days <= backtest_horizon_days")
    as_of_dt = as_of_ts.to_pydatetime()
    cutoff = (as_of_ts - pd.Timedelta(days=horizon_days)).to_pydatetime()
    window_end = cutoff + timedelta(days=window_days)
    conn.execute(f"delete from {BACKTESTS_TABLE} where as_of = %s", (as_of_dt,))
    conn.execute(sql.SQL(RFM_SQL).format(table=sql.SQL("_pv_rfm_cutoff"),
                                         purchases=sql.SQL(PURCHASES_RELATION),
                                         as_of=sql.Literal(cutoff)))
    rows = pd.read_csv(_copy_out(conn, sql.SQL(BACKTEST_SQL).format(
        purchases=sql.SQL(PURCHASES_RELATION), cutoff=sql.Literal(cutoff),
        as_of=sql.Literal(as_of_dt), window_end=sql.Literal(window_end))),
        header=None, names=["x", "recency_days", "age_days", "n", "h", "w"], dtype="int64")
    if rows.empty:
        return None, []
    fit, results = backtest_statistics(
        rows["x"], rows["recency_days"], rows["age_days"], rows["n"], rows["h"], rows["w"],
        cutoff=cutoff, horizon_days=horizon_days, window_days=window_days,
        time_unit_days=time_unit_days)
    with conn.cursor() as cur:
        cur.executemany(
            f"insert into {BACKTESTS_TABLE} (as_of, measure, cutoff, outcome_window, "
            "customers, positives, auc, lift_quality, params, run_id) "
            "values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [(as_of_dt, b.measure, b.cutoff, timedelta(days=b.outcome_days), b.customers,
              b.positives, _finite(b.auc), _finite(b.lift_quality),
              json.dumps(fit.params), run_id) for b in results])
    return fit, results
