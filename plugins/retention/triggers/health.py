"""Trigger health: chains started per run against the trigger's recent norm.

A broken tracker looks like silence, not like an error: the abandoned-cart trigger just
starts nothing. Each run records, per trigger, the chains it started and extended and the
raw rows the trigger feeds on. The norm is the median rate (per hour) of the runs in the
last `health_days`, from the same hour of the day when there are enough of those (shops
are quiet at night; the median ignores a first run that caught up on a backlog). A run
is flagged when the norm expects at least `health_min_expected` chains, the count is at
most `health_max_ratio` of it, and a Poisson count that low has probability below
`health_p_value`.

Counts come from `ops.trigger_hits` rows of this interval, so re-running an interval
rewrites the same row.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import psycopg

from retention.triggers.config import TriggerSettings


def poisson_cdf(k: int, lam: float) -> float:
    """P(X <= k) for X ~ Poisson(lam)."""
    if lam <= 0:
        return 1.0
    total, term = 0.0, math.exp(-lam)
    for i in range(k + 1):
        if i:
            term *= lam / i
        total += term
    return min(total, 1.0)


def record_health(conn: psycopg.Connection, trigger: str, start: datetime, end: datetime,
                  source_rows: int | None, settings: TriggerSettings) -> dict:
    started, extended = conn.execute("""
        select count(distinct chain_id) filter (where outcome = 'started'),
               count(distinct chain_id) filter (where outcome = 'extended')
        from ops.trigger_hits where trigger = %s and run_end = %s""", (trigger, end)).fetchone()
    history = conn.execute("""
        select interval_start, interval_end, started from ops.trigger_health
        where trigger = %s and interval_end <= %s and interval_end > %s
        order by interval_end""", (trigger, start, start - timedelta(days=settings.health_days))
                           ).fetchall()
    hours = max((end - start).total_seconds() / 3600.0, 1e-9)
    same_hour = [h for h in history if h[1].hour == end.hour]
    basis = same_hour if len(same_hour) >= 3 else history
    expected = None
    if basis:
        rates = sorted(n / max((e - s).total_seconds() / 3600.0, 1e-9) for s, e, n in basis)
        mid = len(rates) // 2
        median = rates[mid] if len(rates) % 2 else (rates[mid - 1] + rates[mid]) / 2
        expected = median * hours
    flagged = bool(
        expected is not None and len(history) >= settings.health_min_history
        and expected >= settings.health_min_expected
        and started <= expected * settings.health_max_ratio
        and poisson_cdf(started, expected) < settings.health_p_value)
    note = None
    if flagged:
        note = (f"{trigger} started {started} chains where the last {settings.health_days:g} days "
                f"suggest {expected:.1f}"
                + ("; no source rows at all: is the tracker sending?" if source_rows == 0 else ""))
    conn.execute("""
        insert into ops.trigger_health (trigger, interval_start, interval_end, source_rows, started,
                                        extended, expected, history_runs, flagged, note)
        values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        on conflict (trigger, interval_end) do update set
          interval_start = excluded.interval_start, source_rows = excluded.source_rows,
          started = excluded.started, extended = excluded.extended, expected = excluded.expected,
          history_runs = excluded.history_runs, flagged = excluded.flagged, note = excluded.note
    """, (trigger, start, end, source_rows, started, extended, expected, len(history), flagged,
          note))
    return {"started": started, "extended": extended, "source_rows": source_rows,
            "expected": round(expected, 2) if expected is not None else None,
            "flagged": flagged, "note": note}
