"""Cohort norms: how many days a first-purchase cohort usually takes to buy again.

The second-purchase nudge is timed by it and the re-engagement sequence uses it as the
expected gap of one-time buyers. Read from the marts when they are built
(`marts.cohort_retention.median_days_to_second_purchase`, else
`marts.customer_lifetime.days_to_second_purchase`), else computed from raw orders up to
as_of (the marts are as of their last build; raw is as of this run).

A cohort (customers whose first purchase falls in one calendar month, UTC) with fewer
than `cohort_min_repeaters` second purchases borrows the repeater-weighted norm of the
twelve cohorts before it (a cohort that is still young has only its fastest repeaters);
when those have too few as well, the configured default applies.
"""

from __future__ import annotations

from datetime import date, datetime

import psycopg

from retention.triggers.config import TriggerSettings

_FROM_LIFETIME = """
    select date_trunc('month', first_purchase_at at time zone 'UTC')::date as cohort,
           percentile_cont(0.5) within group (order by days_to_second_purchase)
             filter (where days_to_second_purchase is not null) as median_days,
           count(days_to_second_purchase) as repeaters
    from marts.customer_lifetime
    where first_purchase_at is not null and first_purchase_at <= %(as_of)s
      and (second_purchase_at is null or second_purchase_at <= %(as_of)s)
    group by 1
"""

_FROM_RAW = """
    with numbered as (
      select customer_id, ordered_at,
             row_number() over (partition by customer_id order by ordered_at, order_id) as rn
      from raw.orders
      where status in ('paid', 'delivered') and ordered_at <= %(as_of)s
    ), firsts as (
      select customer_id, min(ordered_at) filter (where rn = 1) as first_at,
             min(ordered_at) filter (where rn = 2) as second_at
      from numbered where rn <= 2 group by customer_id
    )
    select date_trunc('month', first_at at time zone 'UTC')::date as cohort,
           percentile_cont(0.5) within group (
             order by extract(epoch from second_at - first_at) / 86400.0)
             filter (where second_at is not null) as median_days,
           count(second_at) as repeaters
    from firsts group by 1
"""


def _has_columns(conn: psycopg.Connection, table: str, columns: tuple[str, ...]) -> bool:
    found = {r[0] for r in conn.execute(
        "select column_name from information_schema.columns "
        "where table_schema = 'marts' and table_name = %s", (table,)).fetchall()}
    return set(columns) <= found


def cohort_medians(conn: psycopg.Connection,
                   as_of: datetime) -> tuple[dict[date, tuple[float | None, int]], str]:
    """cohort month -> (median days to second purchase, second purchases), and the source:
    marts.cohort_retention, else marts.customer_lifetime, else raw orders up to as_of."""
    if _has_columns(conn, "cohort_retention", ("cohort_month", "median_days_to_second_purchase",
                                                "second_purchase_customers")):
        sql, source = ("select cohort_month, median_days_to_second_purchase, "
                       "second_purchase_customers from marts.cohort_retention",
                       "marts.cohort_retention")
    elif _has_columns(conn, "customer_lifetime", ("first_purchase_at", "second_purchase_at",
                                                   "days_to_second_purchase")):
        sql, source = _FROM_LIFETIME, "marts.customer_lifetime"
    else:
        sql, source = _FROM_RAW, "raw.orders"
    counts: dict[date, tuple[float, int]] = {}
    params = {"as_of": as_of} if "%(as_of)s" in sql else None
    for cohort, median, n in conn.execute(sql, params).fetchall():
        if cohort is None:
            continue
        key = cohort if type(cohort) is date else cohort.date()
        counts[key] = (float(median) if median is not None else None, int(n or 0))
    return counts, source


def _month_index(d: date) -> int:
    return d.year * 12 + d.month - 1


def cohort_norms(conn: psycopg.Connection, as_of: datetime,
                 settings: TriggerSettings) -> tuple[dict[str, float], float, str]:
    """cohort month ('YYYY-MM-01') -> usual days to a second purchase, with borrowing;
    the default for a month with no data at all; the source."""
    medians, source = cohort_medians(conn, as_of)
    months = sorted(medians)
    current = date(as_of.year, as_of.month, 1)
    if current not in medians:
        months.append(current)
    norms: dict[str, float] = {}
    for month in months:
        median, n = medians.get(month, (None, 0))
        if median is not None and n >= settings.cohort_min_repeaters:
            norms[month.isoformat()] = median
            continue
        idx = _month_index(month)
        pool = [(m, c) for m, c in medians.items()
                if idx - 12 <= _month_index(m) < idx and c[0] is not None and c[1] > 0]
        weight = sum(c[1] for _, c in pool)
        if weight >= settings.cohort_min_repeaters:
            norms[month.isoformat()] = sum(c[0] * c[1] for _, c in pool) / weight
    default = settings.second_purchase_default_days
    if norms:
        default = norms.get(current.isoformat(), default)
    return norms, default, source


def nudge_days(norm: float, settings: TriggerSettings) -> float:
    """When the nudge goes: a share of the cohort norm, within the configured bounds."""
    return min(max(norm * settings.second_purchase_factor, settings.second_purchase_min_days),
               settings.second_purchase_max_days)
