"""What a task reads from its Airflow run context."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import get_current_context


def run_as_of() -> datetime:
    """The run's as-of time: the data interval end, else the logical date, else (a manual
    run without a data interval) the time the run was queued to run after."""
    context = get_current_context()
    return (context.get("data_interval_end") or context.get("logical_date")
            or context["dag_run"].run_after)
