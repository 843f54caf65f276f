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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from scipy import stats

from retention import db
from retention.config import settings

#: hours after a message within which a purchase is credited to it, per channel; the same
#: defaults as models/marts/message_attribution.sql
DEFAULT_WINDOW_HOURS: dict[str, float] = {"email": 72, "mobile_push": 24, "web_push": 24,
                                          "telegram": 48, "sms": 24, "viber": 24}
NOT_SIGNIFICANT = "not significant yet"


def attribution_windows() -> dict[str, float]:
    """Per-channel windows in hours: the defaults, overridden by RETENTION_ATTRIBUTION_WINDOWS
    (JSON, e.g. `{"email": 48}`), which models/marts/message_attribution.sql reads too, so
    attribution and uplift measure the same windows."""
    windows = dict(DEFAULT_WINDOW_HOURS)
    windows.update(settings().attribution_windows or {})
    return windows


@dataclass(frozen=True)
class ArmStats:
    """Sufficient statistics of one arm: members, converters, revenue and its squares."""

    name: str
    members: int
    converters: int
    revenue: float
    revenue_sq: float = 0.0

    @property
    def conversion_rate(self) -> float | None:
        return self.converters / self.members if self.members else None

    @property
    def revenue_per_member(self) -> float | None:
        return self.revenue / self.members if self.members else None

    @property
    def revenue_variance(self) -> float | None:
        """Sample variance of per-member revenue."""
        if self.members < 2:
            return None
        mean = self.revenue / self.members
        return max(0.0, (self.revenue_sq - self.members * mean * mean) / (self.members - 1))

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(conversion_rate=self.conversion_rate, revenue_per_member=self.revenue_per_member)
        return out


def pooled(name: str, arms: list[ArmStats]) -> ArmStats:
    return ArmStats(name, sum(a.members for a in arms), sum(a.converters for a in arms),
                    sum(a.revenue for a in arms), sum(a.revenue_sq for a in arms))


@dataclass(frozen=True)
class Difference:
    """`treatment` minus `control` for one metric, with its interval and test."""

    metric: str  # conversion_rate | revenue_per_member
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

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(significant=self.significant, verdict=self.verdict)
        return out


def proportion_difference(treatment: ArmStats, control: ArmStats,
                          confidence: float = 0.95) -> Difference | None:
    """Conversion rate difference: Wald interval, pooled two-proportion z-test."""
    if treatment.members == 0 or control.members == 0:
        return None
    p1, p0 = treatment.conversion_rate, control.conversion_rate
    n1, n0 = treatment.members, control.members
    diff = p1 - p0
    z = stats.norm.ppf(0.5 + confidence / 2)
    se = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    pooled_p = (treatment.converters + control.converters) / (n1 + n0)
    se_pooled = math.sqrt(pooled_p * (1 - pooled_p) * (1 / n1 + 1 / n0))
    if se_pooled > 0:
        p_value = float(2 * stats.norm.sf(abs(diff) / se_pooled))
    else:
        p_value = 1.0 if diff == 0 else 0.0
    return Difference("conversion_rate", treatment.name, control.name, p1, p0, diff,
                      diff - z * se, diff + z * se, p_value, confidence,
                      diff / p0 if p0 else None)


def mean_difference(treatment: ArmStats, control: ArmStats,
                    confidence: float = 0.95) -> Difference | None:
    """Revenue per member difference: Welch's t interval and test."""
    if treatment.members < 2 or control.members < 2:
        return None
    m1, m0 = treatment.revenue_per_member, control.revenue_per_member
    v1, v0 = treatment.revenue_variance, control.revenue_variance
    n1, n0 = treatment.members, control.members
    diff = m1 - m0
    se2 = v1 / n1 + v0 / n0
    if se2 <= 0:
        return Difference("revenue_per_member", treatment.name, control.name, m1, m0, diff,
                          diff, diff, 1.0 if diff == 0 else 0.0, confidence,
                          diff / m0 if m0 else None)
    se = math.sqrt(se2)
    df = se2 ** 2 / ((v1 / n1) ** 2 / (n1 - 1) + (v0 / n0) ** 2 / (n0 - 1))
    t = stats.t.ppf(0.5 + confidence / 2, df)
    p_value = float(2 * stats.t.sf(abs(diff) / se, df))
    return Difference("revenue_per_member", treatment.name, control.name, m1, m0, diff,
                      diff - t * se, diff + t * se, p_value, confidence,
                      diff / m0 if m0 else None)


def compare(treatment: ArmStats, control: ArmStats, confidence: float = 0.95) -> list[Difference]:
    return [d for d in (proportion_difference(treatment, control, confidence),
                        mean_difference(treatment, control, confidence)) if d is not None]


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

    @property
    def complete(self) -> bool:
        """False while the measurement window is still open at the as_of measured."""
        return self.measured_until >= self.window_end

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "campaign_id": self.campaign_id,
                "run_as_of": self.run_as_of, "window_end": self.window_end,
                "measured_until": self.measured_until, "complete": self.complete,
                "arms": {k: a.as_dict() for k, a in self.arms.items()},
                "holdout": [d.as_dict() for d in self.holdout],
                "ab": [d.as_dict() for d in self.ab]}


def _windows_sql(windows: dict[str, float]) -> tuple[str, dict]:
    params, rows = {}, []
    for i, (channel, hours) in enumerate(sorted(windows.items())):
        params[f"w_channel_{i}"], params[f"w_hours_{i}"] = channel, float(hours)
        rows.append(f"(%(w_channel_{i})s::text, %(w_hours_{i})s::float8)")
    return "values " + ", ".join(rows), params


def measure_runs(as_of: datetime, *, run_ids: list[str] | None = None,
                 started_from: datetime | None = None, started_before: datetime | None = None,
                 url: str | None = None, confidence: float = 0.95,
                 windows: dict[str, float] | None = None) -> list[RunUplift]:
    """Arms, holdout uplift and A/B differences for campaign runs, measured as of `as_of`.

    Runs are chosen by id, or by their as_of in [started_from, started_before). Purchases
    after `as_of` are not seen (CONTRACT.md: every metric is as of a timestamp).
    """
    windows = windows or attribution_windows()
    values, params = _windows_sql(windows)
    params.update(as_of=as_of, run_ids=run_ids, started_from=started_from,
                  started_before=started_before, default_hours=max(windows.values()))
    with db.connect(url) as conn:
        if conn.execute("select to_regclass('ops.campaign_runs') is null").fetchone()[0]:
            return []
        offline = ""
        if conn.execute("select to_regclass('marts.ropo_purchases') is not null").fetchone()[0]:
            offline = """union all
                select customer_id, purchased_at, total_amount from marts.ropo_purchases
                where customer_id is not null"""
        rows = conn.execute(f"""
            with windows (channel, hours) as ({values}),
            runs as (
              select run_id, campaign_id, as_of from ops.campaign_runs
              where (%(run_ids)s::text[] is null or run_id = any(%(run_ids)s::text[]))
                and (%(started_from)s::timestamptz is null or as_of >= %(started_from)s)
                and (%(started_before)s::timestamptz is null or as_of < %(started_before)s)
                and as_of <= %(as_of)s
            ),
            run_windows as (
              select m.run_id,
                     max(m.planned_at + make_interval(
                           secs => coalesce(w.hours, %(default_hours)s) * 3600)) as window_end
              from ops.messages m left join windows w on w.channel = m.channel
              where m.run_id in (select run_id from runs)
              group by m.run_id
            ),
            purchases (customer_id, purchased_at, revenue) as (
              select customer_id, ordered_at, total_amount from raw.orders
              where status in ('paid', 'delivered')
              {offline}
            ),
            members as (
              select am.run_id, am.variant, am.customer_id, r.as_of as start_at,
                     least(rw.window_end, %(as_of)s) as stop_at
              from ops.audience_members am
              join runs r on r.run_id = am.run_id
              join run_windows rw on rw.run_id = am.run_id
            ),
            outcomes as (
              select mb.run_id, mb.variant, mb.customer_id,
                     count(p.customer_id) > 0 as converted,
                     coalesce(sum(p.revenue), 0)::float8 as revenue
              from members mb
              left join purchases p on p.customer_id = mb.customer_id
                and p.purchased_at > mb.start_at and p.purchased_at <= mb.stop_at
              group by mb.run_id, mb.variant, mb.customer_id
            )
            select o.run_id, r.campaign_id, r.as_of, rw.window_end, o.variant, count(*),
                   count(*) filter (where o.converted), sum(o.revenue),
                   sum(o.revenue * o.revenue)
            from outcomes o
            join runs r on r.run_id = o.run_id
            join run_windows rw on rw.run_id = o.run_id
            group by 1, 2, 3, 4, 5
            order by r.as_of, o.run_id, o.variant""", params).fetchall()
    runs: dict[str, RunUplift] = {}
    for run_id, campaign_id, run_as_of, window_end, variant, n, conv, revenue, revenue_sq in rows:
        run_as_of = run_as_of.astimezone(timezone.utc)
        window_end = window_end.astimezone(timezone.utc)
        run = runs.setdefault(run_id, RunUplift(run_id, campaign_id, run_as_of, window_end,
                                                min(window_end, as_of.astimezone(timezone.utc)), {}))
        run.arms[variant] = ArmStats(variant, int(n), int(conv), float(revenue or 0),
                                     float(revenue_sq or 0))
    for run in runs.values():
        variants = sorted(v for v in run.arms if v != "holdout")
        if "holdout" in run.arms and variants:
            treated = pooled("treatment", [run.arms[v] for v in variants]) \
                if len(variants) > 1 else run.arms[variants[0]]
            run.holdout = compare(treated, run.arms["holdout"], confidence)
        for other in variants[1:]:
            run.ab.extend(compare(run.arms[other], run.arms[variants[0]], confidence))
    return list(runs.values())


def format_difference(d: Difference) -> str:
    """E.g. `+2.10 pp (95% CI +0.80 to +3.40), p = 0.002: significant: B beats A`."""
    if d.metric == "conversion_rate":
        unit, scale, digits = " pp", 100.0, 2
    else:
        unit, scale, digits = "", 1.0, 2
    level = f"{d.confidence * 100:.0f}%"
    return (f"{d.difference * scale:+.{digits}f}{unit} ({level} CI "
            f"{d.ci_low * scale:+.{digits}f} to {d.ci_high * scale:+.{digits}f}), "
            f"p = {d.p_value:.3f}: {d.verdict}")
