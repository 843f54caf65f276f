"""Holdout uplift and A/B differences, with confidence intervals and plain verdicts.

The unit is the campaign run's frozen audience (`ops.audience_members`), by the arm each
member was hashed into: an A/B variant or `holdout` (the campaign's and the global
holdout). Every member counts, whether a message reached them or not (intention to treat),
so the arms stay comparable: a comparison of only the members who were sent something
would compare the reachable with everyone.

A member *converted* when they made a purchase (an online order `paid`/`delivered`, or an
offline receipt matched to them, CONTRACT.md section 2) after the run's start and within
its measurement window: from the run's as_of to the latest step's time plus that step's
channel attribution window (`attribution_windows()`), capped at the report's as_of.
Revenue per member counts all purchase revenue in the window, zeros included.

Statistics (two-sided, 95% by default):

* conversion rate: difference of proportions with a Wald interval (unpooled standard
  error) and a two-proportion z-test (pooled) for the p-value;
* revenue per member: Welch's t interval and test (unequal variances,
  Welch-Satterthwaite degrees of freedom), from per-arm sums and sums of squares.

A difference is "significant" when p < 1 - confidence; otherwise the verdict says
"not significant yet" (more members or a longer window may still settle it).

Sample ratio mismatch (SRM). Arms are assigned by hash (`campaigns.engine.start_run`):
a member is in the global holdout with probability g (the policy's `global_holdout`),
else in the campaign holdout with probability h (the spec's `holdout`), else in variant i
with probability w_i / sum(w) (the spec's variant weights); a transactional campaign has
no holdout. Each run gets two Pearson chi-square goodness-of-fit tests of the observed
counts against those shares: the holdout split (global holdout g, campaign holdout
(1 - g) h, treated (1 - g)(1 - h)) and, with more than one variant, the A/B split of the
treated members (w_i / sum(w)). chi2 = sum((O - E)^2 / E) with k - 1 degrees of freedom
over the k cells of positive expected share (a member in a cell of share 0 is a mismatch
outright); a split where a cell expects fewer than SRM_MIN_EXPECTED (5) members is too
small for the approximation and is not tested. p < SRM_ALPHA (0.001) is a warning: the
assignment or the data lost members unevenly, and the run's differences are not to be
trusted until that is explained.

CUPED (Deng, Xu, Kohavi and Walker 2013) on revenue per member. X is a member's purchase
revenue (the same purchases as Y) in the pre-period of equal length just before the
run's start: (start - L, start] where L = measured_until - start. Over all members of the
run (every arm pooled), theta = cov(Y, X) / var(X), and an arm's adjusted mean is
mean(Y) - theta (mean_arm(X) - mean_pooled(X)); its variance is the within-arm sample
variance of Y - theta X, var(Y) - 2 theta cov(X, Y) + theta^2 var(X). The adjusted
difference gets Welch's interval like the unadjusted one, which is reported beside it.
The run's variance reduction is 1 - var(Y - theta X) / var(Y) over the pooled members
(the squared correlation of X and Y); each comparison also carries its own,
1 - se_adjusted^2 / se^2.

Always-valid confidence intervals (a confidence sequence: Robbins' normal mixture, the
mixture sequential probability ratio test of Johari, Koomen, Pekelis and Walsh, "Always
valid inference", 2017/2022; Howard et al. 2021). With the estimated difference D, its
variance V (the same unpooled V as the fixed interval) and a normal mixing distribution
of variance tau^2 over the true difference d, the likelihood ratio

    Lambda(d) = sqrt(V / (V + tau^2)) * exp(tau^2 (D - d)^2 / (2 V (V + tau^2)))

is a nonnegative martingale under d, so by Ville's inequality the chance that it ever
reaches 1/alpha, at any look, is at most alpha. The interval is the d where it has not:

    D +- sqrt(V (1 + 1/r) (ln(1 + r) + 2 ln(1/alpha))),   r = tau^2 / V,

and the always-valid p-value is min(1, 1/Lambda(0)). The mixing standard deviation is
tau = MIXING_SD * sigma, sigma^2 = V n1 n0 / (n1 + n0) being the per-member variance
(the arms' variances weighted), so r = MIXING_SD^2 n1 n0 / (n1 + n0) depends on the
counts only: with MIXING_SD = 0.05 the 95% interval is narrowest against the fixed one
(about 1.55 times as wide) near n1 n0 / (n1 + n0) = 3,000 and at most twice as wide for
n1 n0 / (n1 + n0) from 300 to 1,000,000. A marketer may read it every week: the
chance that it ever excludes the true difference stays at most 1 - confidence. (V and
sigma are plug-in estimates, as in Johari et al.; the guarantee is asymptotic in that.)

The global control group: over a period's marketing runs, the distinct members in the
global holdout (`holdout_kind = 'global'`: no marketing message ever reaches them) against
an equal-sized sample of the others (the first by md5('global-sample:' || customer_id),
so the same members every time), their purchases from the first run's start to the
latest window end (capped at as_of), with CUPED and both intervals as above, and an SRM
test of the global share g among the period's members.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

from scipy import stats

from retention import db
from retention.config import settings

#: hours after a message within which a purchase is credited to it, per channel; the same
#: defaults as models/marts/message_attribution.sql
DEFAULT_WINDOW_HOURS: dict[str, float] = {"email": 72, "mobile_push": 24, "web_push": 24,
                                          "telegram": 48, "sms": 24, "viber": 24}
NOT_SIGNIFICANT = "not significant yet"
#: a sample ratio test with a p-value below this is a warning
SRM_ALPHA = 0.001
#: the smallest expected count of a cell for which the chi-square approximation is used
#: (Cochran's rule); a split with a smaller one is not tested
SRM_MIN_EXPECTED = 5.0
#: the always-valid intervals' mixing standard deviation, in per-member standard deviations
MIXING_SD = 0.05


def attribution_windows() -> dict[str, float]:
    """Per-channel windows in hours: the defaults, overridden by RETENTION_ATTRIBUTION_WINDOWS
    (JSON, e.g. `{"email": 48}`), which models/marts/message_attribution.sql reads too, so
    attribution and uplift measure the same windows."""
    windows = dict(DEFAULT_WINDOW_HOURS)
    windows.update(settings().attribution_windows or {})
    return windows


@dataclass(frozen=True)
class ArmStats:
    """Sufficient statistics of one arm: members, converters, revenue (Y) and its squares,
    and for CUPED the pre-period revenue (X), its squares and the products X Y."""

    name: str
    members: int
    converters: int
    revenue: float
    revenue_sq: float = 0.0
    pre_revenue: float = 0.0
    pre_revenue_sq: float = 0.0
    cross: float = 0.0

    @property
    def conversion_rate(self) -> float | None:
        return self.converters / self.members if self.members else None

    @property
    def revenue_per_member(self) -> float | None:
        return self.revenue / self.members if self.members else None

    @property
    def pre_revenue_per_member(self) -> float | None:
        return self.pre_revenue / self.members if self.members else None

    @property
    def revenue_variance(self) -> float | None:
        """Sample variance of per-member revenue."""
        return _variance(self.members, self.revenue, self.revenue_sq)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(conversion_rate=self.conversion_rate, revenue_per_member=self.revenue_per_member,
                   pre_revenue_per_member=self.pre_revenue_per_member)
        return out


def _covariance(n: int, sum_a: float, sum_b: float, sum_ab: float) -> float | None:
    """Sample covariance of a and b from their sums and the sum of their products."""
    return (sum_ab - sum_a * sum_b / n) / (n - 1) if n >= 2 else None


def _variance(n: int, total: float, total_sq: float) -> float | None:
    """Sample variance from the sum and the sum of squares (never below 0)."""
    return max(0.0, _covariance(n, total, total, total_sq)) if n >= 2 else None


def pooled(name: str, arms: list[ArmStats]) -> ArmStats:
    return ArmStats(name, sum(a.members for a in arms), sum(a.converters for a in arms),
                    sum(a.revenue for a in arms), sum(a.revenue_sq for a in arms),
                    sum(a.pre_revenue for a in arms), sum(a.pre_revenue_sq for a in arms),
                    sum(a.cross for a in arms))


@dataclass(frozen=True)
class Difference:
    """`treatment` minus `control` for one metric, with its interval and test, its
    always-valid interval and p-value, and for revenue per member its CUPED-adjusted
    counterpart (`cuped`, whose `variance_reduction` is 1 - se_adjusted^2 / se^2)."""

    metric: str  # conversion_rate | revenue_per_member | revenue_per_member_cuped
    treatment: str
    control: str
    treatment_value: float
    control_value: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float
    relative: float | None  # difference / control value
    cs_low: float | None = None
    cs_high: float | None = None
    always_valid_p: float | None = None
    variance_reduction: float | None = None
    cuped: Difference | None = None

    @property
    def significant(self) -> bool:
        return self.p_value < 1 - self.confidence

    @property
    def verdict(self) -> str:
        if not self.significant:
            return NOT_SIGNIFICANT
        better = self.treatment if self.difference > 0 else self.control
        worse = self.control if self.difference > 0 else self.treatment
        return f"significant: {better} beats {worse}"

    def covers(self, value: float) -> bool:
        return self.ci_low <= value <= self.ci_high

    def covers_always_valid(self, value: float) -> bool:
        return self.cs_low <= value <= self.cs_high

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(significant=self.significant, verdict=self.verdict,
                   cuped=self.cuped.as_dict() if self.cuped else None)
        return out


def confidence_sequence(difference: float, variance: float, n1: int, n0: int,
                        confidence: float = 0.95) -> tuple[float, float, float]:
    """The always-valid interval and p-value of a difference with estimated variance
    `variance` between arms of n1 and n0 members (the normal mixture of the module
    docstring, r = MIXING_SD^2 n1 n0 / (n1 + n0)): (low, high, p)."""
    if variance <= 0:
        return difference, difference, 1.0 if difference == 0 else 0.0
    alpha = 1 - confidence
    r = MIXING_SD ** 2 * n1 * n0 / (n1 + n0)
    half = math.sqrt(variance * (1 + 1 / r) * (math.log1p(r) + 2 * math.log(1 / alpha)))
    log_lambda0 = -0.5 * math.log1p(r) + r * difference ** 2 / (2 * variance * (1 + r))
    p = 1.0 if log_lambda0 <= 0 else math.exp(-log_lambda0)
    return difference - half, difference + half, p


def _with_sequence(d: Difference, variance: float, n1: int, n0: int) -> Difference:
    low, high, p = confidence_sequence(d.difference, variance, n1, n0, d.confidence)
    return replace(d, cs_low=low, cs_high=high, always_valid_p=p)


def proportion_difference(treatment: ArmStats, control: ArmStats,
                          confidence: float = 0.95) -> Difference | None:
    """Conversion rate difference: Wald interval, pooled two-proportion z-test."""
    if treatment.members == 0 or control.members == 0:
        return None
    p1, p0 = treatment.conversion_rate, control.conversion_rate
    n1, n0 = treatment.members, control.members
    diff = p1 - p0
    z = stats.norm.ppf(0.5 + confidence / 2)
    se2 = p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0
    se = math.sqrt(se2)
    pooled_p = (treatment.converters + control.converters) / (n1 + n0)
    se_pooled = math.sqrt(pooled_p * (1 - pooled_p) * (1 / n1 + 1 / n0))
    if se_pooled > 0:
        p_value = float(2 * stats.norm.sf(abs(diff) / se_pooled))
    else:
        p_value = 1.0 if diff == 0 else 0.0
    return _with_sequence(
        Difference("conversion_rate", treatment.name, control.name, p1, p0, diff,
                   diff - z * se, diff + z * se, p_value, confidence, diff / p0 if p0 else None),
        se2, n1, n0)


def _welch(metric: str, treatment: str, control: str, m1: float, m0: float, v1: float,
           v0: float, n1: int, n0: int, confidence: float) -> Difference:
    """Welch's t interval and test of m1 - m0, with the always-valid interval."""
    diff = m1 - m0
    se2 = v1 / n1 + v0 / n0
    relative = diff / m0 if m0 else None
    if se2 <= 0:
        return _with_sequence(Difference(metric, treatment, control, m1, m0, diff, diff, diff,
                                         1.0 if diff == 0 else 0.0, confidence, relative),
                              0.0, n1, n0)
    se = math.sqrt(se2)
    df = se2 ** 2 / ((v1 / n1) ** 2 / (n1 - 1) + (v0 / n0) ** 2 / (n0 - 1))
    t = stats.t.ppf(0.5 + confidence / 2, df)
    p_value = float(2 * stats.t.sf(abs(diff) / se, df))
    return _with_sequence(Difference(metric, treatment, control, m1, m0, diff, diff - t * se,
                                     diff + t * se, p_value, confidence, relative), se2, n1, n0)


def mean_difference(treatment: ArmStats, control: ArmStats,
                    confidence: float = 0.95) -> Difference | None:
    """Revenue per member difference: Welch's t interval and test."""
    if treatment.members < 2 or control.members < 2:
        return None
    return _welch("revenue_per_member", treatment.name, control.name,
                  treatment.revenue_per_member, control.revenue_per_member,
                  treatment.revenue_variance, control.revenue_variance,
                  treatment.members, control.members, confidence)


@dataclass(frozen=True)
class Cuped:
    """theta = cov(Y, X) / var(X) over the pooled members, the pooled mean of X, and the
    variance reduction 1 - var(Y - theta X) / var(Y) over them."""

    theta: float
    pre_mean: float
    variance_reduction: float
    members: int

    def adjusted(self, arm: ArmStats) -> tuple[float, float]:
        """The arm's adjusted mean, mean(Y) - theta (mean_arm(X) - pre_mean), and the
        sample variance of Y - theta X within the arm (members >= 2)."""
        n, theta = arm.members, self.theta
        var_y = _variance(n, arm.revenue, arm.revenue_sq)
        var_x = _variance(n, arm.pre_revenue, arm.pre_revenue_sq)
        cov = _covariance(n, arm.pre_revenue, arm.revenue, arm.cross)
        mean = arm.revenue / n - theta * (arm.pre_revenue / n - self.pre_mean)
        return mean, max(0.0, var_y - 2 * theta * cov + theta * theta * var_x)

    def as_dict(self) -> dict:
        return asdict(self)


def cuped_fit(arms: list[ArmStats]) -> Cuped | None:
    """CUPED's theta over the members of `arms` pooled; theta = 0 (no adjustment) when
    the pre-period revenue does not vary."""
    a = pooled("all", arms)
    n = a.members
    if n < 2:
        return None
    var_x = _variance(n, a.pre_revenue, a.pre_revenue_sq)
    var_y = _variance(n, a.revenue, a.revenue_sq)
    cov = _covariance(n, a.pre_revenue, a.revenue, a.cross)
    # a variance that is rounding error of the sums is no variance
    if var_x <= 1e-12 * (a.pre_revenue_sq / n):
        return Cuped(0.0, a.pre_revenue / n, 0.0, n)
    reduction = min(1.0, cov * cov / (var_x * var_y)) if var_y > 0 else 0.0
    return Cuped(cov / var_x, a.pre_revenue / n, reduction, n)


def cuped_difference(treatment: ArmStats, control: ArmStats, fit: Cuped,
                     confidence: float = 0.95) -> Difference | None:
    """The CUPED-adjusted revenue per member difference (Welch on the adjusted values);
    its `variance_reduction` is 1 - se_adjusted^2 / se_unadjusted^2."""
    if treatment.members < 2 or control.members < 2:
        return None
    (m1, v1), (m0, v0) = fit.adjusted(treatment), fit.adjusted(control)
    n1, n0 = treatment.members, control.members
    d = _welch("revenue_per_member_cuped", treatment.name, control.name, m1, m0, v1, v0,
               n1, n0, confidence)
    se2 = treatment.revenue_variance / n1 + control.revenue_variance / n0
    return replace(d, variance_reduction=1 - (v1 / n1 + v0 / n0) / se2 if se2 > 0 else None)


def compare(treatment: ArmStats, control: ArmStats, confidence: float = 0.95,
            cuped: Cuped | None = None) -> list[Difference]:
    """Conversion rate and revenue per member differences; with a CUPED fit the revenue
    difference carries its adjusted counterpart."""
    rate = proportion_difference(treatment, control, confidence)
    revenue = mean_difference(treatment, control, confidence)
    if revenue is not None and cuped is not None:
        revenue = replace(revenue, cuped=cuped_difference(treatment, control, cuped, confidence))
    return [d for d in (rate, revenue) if d is not None]


# --- sample ratio mismatch ------------------------------------------------------------

@dataclass(frozen=True)
class SampleRatio:
    """A chi-square goodness-of-fit test of a split's observed counts against the shares
    the assignment gives each cell: cells are (name, observed, expected share)."""

    split: str
    cells: tuple[tuple[str, int, float], ...]
    chi2: float
    df: int
    p_value: float

    @property
    def total(self) -> int:
        return sum(o for _, o, _ in self.cells)

    @property
    def mismatch(self) -> bool:
        return self.p_value < SRM_ALPHA

    def describe(self) -> str:
        """E.g. `holdout split: global holdout 420 (expected 500.0, 5.0%), treated 9,580
        (expected 9,500.0, 95.0%); chi-square 13.47, 1 df, p = 0.00024`."""
        cells = ", ".join(f"{name} {o:,} (expected {share * self.total:,.1f}, "
                          f"{share * 100:.1f}%)" for name, o, share in self.cells)
        return (f"{self.split}: {cells}; chi-square {self.chi2:.2f}, {self.df} df, "
                f"p = {self.p_value:.2g}")

    @property
    def warning(self) -> str | None:
        if not self.mismatch:
            return None
        return (f"Sample ratio mismatch (p < {SRM_ALPHA:g}) in the {self.describe()}. "
                "The arms are not the sizes the assignment gives them: members were lost or "
                "moved unevenly, and the differences measured on them are not to be trusted "
                "until that is explained.")

    def as_dict(self) -> dict:
        return {"split": self.split, "cells": [list(c) for c in self.cells], "chi2": self.chi2,
                "df": self.df, "p_value": self.p_value, "mismatch": self.mismatch}


def sample_ratio_test(split: str, observed: dict[str, int],
                      shares: dict[str, float]) -> SampleRatio | None:
    """Pearson's chi-square of `observed` counts against expected `shares` (normalised to
    sum 1) over the cells of positive share; a member in a cell of share 0 is a mismatch
    outright (p = 0). None when fewer than two cells can hold members, nobody is counted,
    or a cell expects fewer than SRM_MIN_EXPECTED members."""
    total_share = sum(v for v in shares.values() if v > 0)
    n = sum(observed.values())
    if n == 0 or total_share <= 0:
        return None
    names = list(shares) + [k for k in observed if k not in shares]
    cells = tuple((k, int(observed.get(k, 0)), max(0.0, shares.get(k, 0.0)) / total_share)
                  for k in names)
    positive = [c for c in cells if c[2] > 0]
    if any(o > 0 and share == 0 for _, o, share in cells):
        return SampleRatio(split, tuple(c for c in cells if c[1] or c[2]), math.inf,
                           max(1, len(positive)), 0.0)
    if len(positive) < 2 or min(s * n for _, _, s in positive) < SRM_MIN_EXPECTED:
        return None
    result = stats.chisquare([o for _, o, _ in positive], [s * n for _, _, s in positive])
    return SampleRatio(split, tuple(positive), float(result.statistic), len(positive) - 1,
                       float(result.pvalue))


def expected_splits(spec: dict, global_holdout: float) -> tuple[dict[str, float], dict[str, float]]:
    """The shares `campaigns.engine.start_run` assigns a run of campaign `spec` (its
    stored JSON): the holdout split (global holdout, campaign holdout, treated) and the
    treated members' split between the variants."""
    marketing = spec.get("kind") != "transactional"
    g = float(global_holdout) if marketing else 0.0
    h = float(spec.get("holdout") or 0.0) if marketing else 0.0
    holdout = {"global holdout": g, "campaign holdout": (1 - g) * h, "treated": (1 - g) * (1 - h)}
    variants = spec.get("variants") or [{"name": "A"}]
    total = sum(float(v.get("weight", 1)) for v in variants)
    return holdout, {v["name"]: float(v.get("weight", 1)) / total for v in variants}


def policy_global_holdout() -> float:
    from retention.campaigns.policy import load_policy

    return load_policy().global_holdout


# --- measurement ----------------------------------------------------------------------

@dataclass
class RunUplift:
    run_id: str
    campaign_id: str
    run_as_of: datetime
    window_end: datetime
    measured_until: datetime
    arms: dict[str, ArmStats]
    holdout: list[Difference] = field(default_factory=list)
    ab: list[Difference] = field(default_factory=list)
    #: the sample ratio tests: the holdout split, and the A/B split with several variants
    srm: list[SampleRatio] = field(default_factory=list)
    #: CUPED over all the run's members
    cuped: Cuped | None = None

    @property
    def complete(self) -> bool:
        """False while the measurement window is still open at the as_of measured."""
        return self.measured_until >= self.window_end

    @property
    def srm_warnings(self) -> list[str]:
        return [s.warning for s in self.srm if s.mismatch]

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "campaign_id": self.campaign_id,
                "run_as_of": self.run_as_of, "window_end": self.window_end,
                "measured_until": self.measured_until, "complete": self.complete,
                "arms": {k: a.as_dict() for k, a in self.arms.items()},
                "holdout": [d.as_dict() for d in self.holdout],
                "ab": [d.as_dict() for d in self.ab],
                "srm": [s.as_dict() for s in self.srm],
                "cuped": self.cuped.as_dict() if self.cuped else None}


def _windows_sql(windows: dict[str, float]) -> tuple[str, dict]:
    params, rows = {}, []
    for i, (channel, hours) in enumerate(sorted(windows.items())):
        params[f"w_channel_{i}"], params[f"w_hours_{i}"] = channel, float(hours)
        rows.append(f"(%(w_channel_{i})s::text, %(w_hours_{i})s::float8)")
    return "values " + ", ".join(rows), params


def _outcome_columns(start: str) -> str:
    """SQL: a member's `converted`, `revenue` (purchases after `start`, the run's start)
    and `pre_revenue` (before it, in the pre-period the purchases join already limits)."""
    return (f"count(p.customer_id) filter (where p.purchased_at > {start}) > 0 as converted, "
            f"coalesce(sum(p.revenue) filter (where p.purchased_at > {start}), 0)::float8 "
            f"as revenue, coalesce(sum(p.revenue) filter (where p.purchased_at <= {start}), "
            f"0)::float8 as pre_revenue")


def _purchases_sql(conn) -> str:
    """SQL of (customer_id, purchased_at, revenue): online orders paid or delivered and,
    once built, the offline receipts matched to a customer."""
    offline = ""
    if conn.execute("select to_regclass('marts.ropo_purchases') is not null").fetchone()[0]:
        offline = """union all
            select customer_id, purchased_at, total_amount from marts.ropo_purchases
            where customer_id is not null"""
    return f"""select customer_id, ordered_at, total_amount from raw.orders
              where status in ('paid', 'delivered')
              {offline}"""


#: the runs' windows: from each run's start to its latest message's time plus that
#: message's channel window
_RUN_WINDOWS_SQL = """
              select m.run_id,
                     max(m.planned_at + make_interval(
                           secs => coalesce(w.hours, %(default_hours)s) * 3600)) as window_end
              from ops.messages m left join windows w on w.channel = m.channel
              where m.run_id in (select run_id from runs)
              group by m.run_id"""


def _arm_row(name: str, row) -> ArmStats:
    n, conv, y, yy, x, xx, xy = row
    return ArmStats(name, int(n), int(conv), float(y or 0), float(yy or 0), float(x or 0),
                    float(xx or 0), float(xy or 0))


def _sum_arms(name: str, a: ArmStats | None, b: ArmStats) -> ArmStats:
    return b if a is None else pooled(name, [a, b])


def measure_runs(as_of: datetime, *, run_ids: list[str] | None = None,
                 started_from: datetime | None = None, started_before: datetime | None = None,
                 url: str | None = None, confidence: float = 0.95,
                 windows: dict[str, float] | None = None,
                 global_holdout: float | None = None) -> list[RunUplift]:
    """Arms, holdout uplift and A/B differences (with CUPED and always-valid intervals)
    and sample ratio tests for campaign runs, measured as of `as_of`.

    Runs are chosen by id, or by their as_of in [started_from, started_before). Purchases
    after `as_of` are not seen (CONTRACT.md: every metric is as of a timestamp). The
    global holdout share the SRM test expects is `global_holdout`, by default the contact
    policy's.
    """
    windows = windows or attribution_windows()
    if global_holdout is None:
        global_holdout = policy_global_holdout()
    values, params = _windows_sql(windows)
    params.update(as_of=as_of, run_ids=run_ids, started_from=started_from,
                  started_before=started_before, default_hours=max(windows.values()))
    with db.connect(url) as conn:
        if conn.execute("select to_regclass('ops.campaign_runs') is null").fetchone()[0]:
            return []
        rows = conn.execute(f"""
            with windows (channel, hours) as ({values}),
            runs as (
              select run_id, campaign_id, as_of from ops.campaign_runs
              where (%(run_ids)s::text[] is null or run_id = any(%(run_ids)s::text[]))
                and (%(started_from)s::timestamptz is null or as_of >= %(started_from)s)
                and (%(started_before)s::timestamptz is null or as_of < %(started_before)s)
                and as_of <= %(as_of)s
            ),
            run_windows as ({_RUN_WINDOWS_SQL}
            ),
            purchases (customer_id, purchased_at, revenue) as ({_purchases_sql(conn)}
            ),
            members as (
              select am.run_id, am.variant, am.holdout_kind, am.customer_id, r.as_of as start_at,
                     least(rw.window_end, %(as_of)s) as stop_at
              from ops.audience_members am
              join runs r on r.run_id = am.run_id
              join run_windows rw on rw.run_id = am.run_id
            ),
            outcomes as (
              select mb.run_id, mb.variant, mb.holdout_kind, mb.customer_id,
                     {_outcome_columns('mb.start_at')}
              from members mb
              left join purchases p on p.customer_id = mb.customer_id
                and p.purchased_at > mb.start_at - (mb.stop_at - mb.start_at)
                and p.purchased_at <= mb.stop_at
              group by mb.run_id, mb.variant, mb.holdout_kind, mb.customer_id
            )
            select o.run_id, r.campaign_id, r.as_of, rw.window_end, o.variant, o.holdout_kind,
                   count(*), count(*) filter (where o.converted), sum(o.revenue),
                   sum(o.revenue * o.revenue), sum(o.pre_revenue),
                   sum(o.pre_revenue * o.pre_revenue), sum(o.pre_revenue * o.revenue)
            from outcomes o
            join runs r on r.run_id = o.run_id
            join run_windows rw on rw.run_id = o.run_id
            group by 1, 2, 3, 4, 5, 6
            order by r.as_of, o.run_id, o.variant, o.holdout_kind""", params).fetchall()
        specs = dict(conn.execute("select run_id, spec from ops.campaign_runs where run_id = any(%s)",
                                  (sorted({r[0] for r in rows}),)).fetchall()) if rows else {}
    runs: dict[str, RunUplift] = {}
    kinds: dict[str, dict[str, int]] = {}
    for run_id, campaign_id, run_as_of, window_end, variant, kind, *sums in rows:
        run_as_of = run_as_of.astimezone(timezone.utc)
        window_end = window_end.astimezone(timezone.utc)
        run = runs.setdefault(run_id, RunUplift(run_id, campaign_id, run_as_of, window_end,
                                                min(window_end, as_of.astimezone(timezone.utc)), {}))
        run.arms[variant] = _sum_arms(variant, run.arms.get(variant), _arm_row(variant, sums))
        cell = ("treated" if variant != "holdout" else
                "global holdout" if kind == "global" else "campaign holdout")
        counts = kinds.setdefault(run_id, {})
        counts[cell] = counts.get(cell, 0) + int(sums[0])
    for run in runs.values():
        variants = sorted(v for v in run.arms if v != "holdout")
        run.cuped = cuped_fit(list(run.arms.values()))
        if "holdout" in run.arms and variants:
            treated = pooled("treatment", [run.arms[v] for v in variants]) \
                if len(variants) > 1 else run.arms[variants[0]]
            run.holdout = compare(treated, run.arms["holdout"], confidence, run.cuped)
        for other in variants[1:]:
            run.ab.extend(compare(run.arms[other], run.arms[variants[0]], confidence, run.cuped))
        holdout_shares, variant_shares = expected_splits(specs.get(run.run_id) or {},
                                                         global_holdout)
        tests = (sample_ratio_test("holdout split", kinds[run.run_id], holdout_shares),
                 sample_ratio_test("A/B split", {v: run.arms[v].members for v in variants},
                                   variant_shares) if variants else None)
        run.srm = [t for t in tests if t is not None]
    return list(runs.values())


@dataclass
class GlobalControl:
    """The global holdout of a period's marketing runs against an equal-sized sample of
    the other members (module docstring)."""

    started_from: datetime
    started_before: datetime
    measured_from: datetime
    measured_until: datetime
    population: int  # distinct members of the period's marketing runs
    holdout: ArmStats
    sample: ArmStats
    differences: list[Difference] = field(default_factory=list)
    srm: SampleRatio | None = None
    cuped: Cuped | None = None

    def as_dict(self) -> dict:
        return {"started_from": self.started_from, "started_before": self.started_before,
                "measured_from": self.measured_from, "measured_until": self.measured_until,
                "population": self.population, "holdout": self.holdout.as_dict(),
                "sample": self.sample.as_dict(),
                "differences": [d.as_dict() for d in self.differences],
                "srm": self.srm.as_dict() if self.srm else None,
                "cuped": self.cuped.as_dict() if self.cuped else None}


def measure_global_control(as_of: datetime, started_from: datetime, started_before: datetime,
                           *, url: str | None = None, confidence: float = 0.95,
                           windows: dict[str, float] | None = None,
                           global_holdout: float | None = None) -> GlobalControl | None:
    """The global control group of the marketing runs started in [started_from,
    started_before) (and by `as_of`): its members against as many of the runs' other
    members, sampled by hash, over the same window; None without a global holdout member.
    Conversion and revenue per member as in `measure_runs` (CUPED, both intervals), and
    an SRM test of the global share (`global_holdout`, by default the policy's)."""
    windows = windows or attribution_windows()
    if global_holdout is None:
        global_holdout = policy_global_holdout()
    values, params = _windows_sql(windows)
    params.update(as_of=as_of, started_from=started_from, started_before=started_before,
                  default_hours=max(windows.values()))
    with db.connect(url) as conn:
        if conn.execute("select to_regclass('ops.campaign_runs') is null").fetchone()[0]:
            return None
        rows = conn.execute(f"""
            with windows (channel, hours) as ({values}),
            runs as (
              select run_id, as_of from ops.campaign_runs
              where as_of >= %(started_from)s and as_of < %(started_before)s
                and as_of <= %(as_of)s and coalesce(spec ->> 'kind', '') <> 'transactional'
            ),
            run_windows as ({_RUN_WINDOWS_SQL}
            ),
            span as (
              select min(r.as_of) as start_at,
                     least(greatest(max(rw.window_end), min(r.as_of)), %(as_of)s) as stop_at
              from runs r join run_windows rw on rw.run_id = r.run_id
            ),
            population as (
              select am.customer_id,
                     coalesce(bool_or(am.holdout_kind = 'global'), false) as global_holdout
              from ops.audience_members am join runs r on r.run_id = am.run_id
              group by am.customer_id
            ),
            chosen as (
              select customer_id, true as global_holdout from population where global_holdout
              union all
              (select customer_id, false from population where not global_holdout
               order by md5('global-sample:' || customer_id), customer_id
               limit (select count(*) from population where global_holdout))
            ),
            purchases (customer_id, purchased_at, revenue) as ({_purchases_sql(conn)}
            ),
            outcomes as (
              select c.customer_id, c.global_holdout,
                     {_outcome_columns('s.start_at')}
              from chosen c cross join span s
              left join purchases p on p.customer_id = c.customer_id
                and p.purchased_at > s.start_at - (s.stop_at - s.start_at)
                and p.purchased_at <= s.stop_at
              group by c.customer_id, c.global_holdout
            )
            select 'arm', o.global_holdout, count(*), count(*) filter (where o.converted),
                   sum(o.revenue), sum(o.revenue * o.revenue), sum(o.pre_revenue),
                   sum(o.pre_revenue * o.pre_revenue), sum(o.pre_revenue * o.revenue),
                   null::timestamptz, null::timestamptz
            from outcomes o group by o.global_holdout
            union all
            select 'population', global_holdout, count(*), null, null, null, null, null, null,
                   (select start_at from span), (select stop_at from span)
            from population group by global_holdout""", params).fetchall()
    arms: dict[bool, ArmStats] = {}
    population: dict[bool, int] = {}
    span = (None, None)
    for kind, held, n, converted, *rest in rows:
        if kind == "arm":
            arms[held] = _arm_row("global holdout" if held else "treated sample",
                                  (n, converted, *rest[:5]))
        else:
            population[held], span = int(n), (rest[5], rest[6])
    if True not in arms or span[0] is None:
        return None
    holdout = arms[True]
    sample = arms.get(False, ArmStats("treated sample", 0, 0, 0.0))
    fit = cuped_fit([holdout, sample])
    return GlobalControl(
        started_from, started_before, span[0].astimezone(timezone.utc),
        span[1].astimezone(timezone.utc), sum(population.values()), holdout, sample,
        compare(sample, holdout, confidence, fit),
        sample_ratio_test("global holdout", {"global holdout": population.get(True, 0),
                                             "others": population.get(False, 0)},
                          {"global holdout": global_holdout, "others": 1 - global_holdout}),
        fit)


def format_difference(d: Difference) -> str:
    """E.g. `+2.10 pp (95% CI +0.80 to +3.40), p = 0.002: significant: B beats A; always
    valid +0.10 to +4.10` (the always-valid interval, good at any look)."""
    if d.metric == "conversion_rate":
        unit, scale, digits = " pp", 100.0, 2
    else:
        unit, scale, digits = "", 1.0, 2
    level = f"{d.confidence * 100:.0f}%"
    text = (f"{d.difference * scale:+.{digits}f}{unit} ({level} CI "
            f"{d.ci_low * scale:+.{digits}f} to {d.ci_high * scale:+.{digits}f}), "
            f"p = {d.p_value:.3f}: {d.verdict}")
    if d.cs_low is not None:
        text += (f"; always valid {d.cs_low * scale:+.{digits}f} to "
                 f"{d.cs_high * scale:+.{digits}f}")
    if d.variance_reduction is not None:
        if abs(d.variance_reduction) < 0.005:
            text += "; CUPED variance as unadjusted (pre-period revenue explains little)"
        else:
            text += (f"; CUPED variance {abs(d.variance_reduction) * 100:.0f}% "
                     f"{'lower' if d.variance_reduction > 0 else 'higher'} than unadjusted")
    return text
