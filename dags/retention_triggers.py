"""
### Trigger chains and lifecycle flows, every 15 minutes

Each run handles the events of its data interval (plus `lateness`, and any gap left by
runs that never happened) for every trigger in `include/campaigns/_triggers.yaml`:
abandoned cart, browse and search abandonment, wishlist reminder, price drop, back in
stock, category replenished, order cancelled for a stock-out, and the lifecycle flows
(welcome series, second-purchase nudge timed by the cohort norm, review request).

A trigger moment starts a chain (a campaign of `include/campaigns/<trigger>.yaml`) or
extends the customer's active chain on the same subject; before every step a chain
exits on purchase, on the action it asks for, or on unsubscribe; due steps go through the
campaign engine (consent, shared frequency caps, quiet hours, holdouts, channel
fallback) into `ops.messages` and out through the providers, exactly once. Per trigger
the run records chains started against the recent norm in `ops.trigger_health`; a
trigger that falls silent is flagged (a broken tracker looks like silence) and fails the
`check_health` task at once, which alerts the people on duty with the silent triggers'
notes (`retention_airflow.alerts`).

as_of is the data interval end, never the wall clock: re-running an interval plans and
sends nothing new. Logic: `plugins/retention/triggers/`.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import get_current_context, task
from airflow.timetables.interval import CronDataIntervalTimetable

from retention.config import settings
from retention_airflow.alerts import trigger_health_failure
from retention_airflow.dags import retention_dag
from retention_airflow.hooks import trigger_channels


def _interval():
    context = get_current_context()
    return context["data_interval_start"], context["data_interval_end"]



@retention_dag(
    "retention_triggers",
    schedule=CronDataIntervalTimetable(settings().triggers_schedule,
                                       timezone="UTC"),
    retry_delay=timedelta(minutes=1),
    tags=["triggers", "lifecycle"],
    doc_md=__doc__,
)
def retention_triggers():
    @task(execution_timeout=timedelta(minutes=14))
    def run_triggers() -> dict:
        from retention.triggers import format_report
        from retention.triggers import run_triggers as run

        start, end = _interval()
        result = run(start, end, channels=trigger_channels())
        print(format_report(result))
        return {name: {k: t[k] for k in ("started", "extended", "flagged", "note")}
                for name, t in result["triggers"].items()}

    @task
    def check_health(triggers: dict) -> None:
        flagged = {name: t["note"] for name, t in triggers.items() if t["flagged"]}
        if flagged:  # no retry: the counts of this interval are what they are
            raise trigger_health_failure(flagged)

    check_health(run_triggers())


retention_triggers()
