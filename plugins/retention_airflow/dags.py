"""What every retention DAG shares: a fixed start date with no catch-up (a missed interval
is picked up by the next run's own logic: triggers reach back over gaps, loads read what
landed), one active run at a time (runs of one DAG never overlap on the same tables), two
retries of each task, the `retention` tag, and the failure alert to the people on duty
(`retention_airflow.alerts`: after a task's last try, through the `retention_alerts_*`
connections)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import dag

from retention_airflow.alerts import on_failure

START_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")


def retention_dag(dag_id: str, *, schedule: Any, retry_delay: timedelta, tags: list[str],
                  doc_md: str | None, **kwargs: Any):
    """The `@dag` decorator with the shared settings; `tags` come after `retention`."""
    return dag(dag_id=dag_id, schedule=schedule, start_date=START_DATE, catchup=False,
               max_active_runs=1, default_args={"retries": 2, "retry_delay": retry_delay,
                             "on_failure_callback": on_failure()},
               tags=["retention", *tags], doc_md=doc_md, **kwargs)
