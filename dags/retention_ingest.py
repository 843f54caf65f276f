"""
### Ingest: shop files from the landing folder into `raw`, checked

Every hour this DAG loads the *ready* drops of the landing folder
(`RETENTION_LANDING_DIR`, default `RETENTION_HOME/landing`) through the contract
(CONTRACT.md sections 1 and 3), runs the Great Expectations checkpoint over the raw
tables, and marks the raw tables as updated Assets, which schedules the dbt build.

* A drop is a sub-folder of `incoming/` holding contract CSV/CSV.gz files and an empty
  `_SUCCESS` file written last by the shop's exporter; drops load in name order (name
  them by time, e.g. `2026-11-01T06`). A loaded drop moves to `loaded/`.
* Bad rows go to `ops.quarantine` with their reason; a broken file fails the task and
  changes nothing, and its drop stays in `incoming/` for a fix and a retry.
* The load's time is the run's data interval end, so a re-run quarantines the same rows.
* A failed data-quality check (an empty required table, a stale table) fails the run at
  once (a retry would check the same data) and no Asset event is emitted; the alert to
  the people on duty names the failed expectations (`retention_airflow.alerts`).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import task
from airflow.sdk.exceptions import AirflowSkipException

from retention.config import settings
from retention_airflow.alerts import quality_failure
from retention_airflow.assets import RAW_TABLES
from retention_airflow.run_context import run_as_of
from retention_airflow.dags import retention_dag


@retention_dag(
    "retention_ingest",
    schedule=settings().ingest_schedule,
    retry_delay=timedelta(minutes=1),
    tags=["ingest"],
    doc_md=__doc__,
)
def retention_ingest():
    @task
    def find_ready_drops() -> list[str]:
        from retention.ingest.landing import ready_drops

        drops = [str(p) for p in ready_drops()]
        if not drops:
            raise AirflowSkipException("no ready drop in the landing folder")
        return drops

    @task
    def load_drops(drops: list[str]) -> list[dict]:
        from retention.ingest.landing import load_drop

        return [load_drop(drop, loaded_at=run_as_of()) for drop in drops]

    @task(outlets=list(RAW_TABLES.values()))
    def check_quality(loads: list[dict]) -> dict:
        from retention.ingest.quality import run_checkpoint

        tables = sorted({t for load in loads for t in load["tables"]})
        report = run_checkpoint(None, as_of=run_as_of(), tables=tables,
                                load_id=loads[-1]["load_id"])
        if not report.success:
            raise quality_failure(report)  # no retry: the same data fails the same way
        return {"tables": tables, "loads": [load["load_id"] for load in loads]}

    check_quality(load_drops(find_ready_drops()))


retention_ingest()
