"""
### Re-engagement sequence, daily

Customers whose silence since their last purchase exceeds `reengage_multiple` times their
own average gap between purchases (or the cohort norm, for one-time buyers) enter the
win-back sequence of `include/campaigns/reengagement.yaml`: a reminder, then a personal
offer with a promo code that expires, then a short request for feedback on why they left.
Each step goes on the channel where the customer engaged most (opens and clicks),
falling back to the next channel they have; the sequence ends at once on a purchase or an
unsubscribe. A campaign holdout measures what it wins back.

as_of is the data interval end; re-running a day plans and sends nothing new. Logic:
`plugins/retention/triggers/`.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import get_current_context, task
from airflow.timetables.interval import CronDataIntervalTimetable

from retention_airflow.dags import retention_dag
from retention_airflow.hooks import trigger_channels



@retention_dag(
    "retention_reengagement",
    schedule=CronDataIntervalTimetable("0 8 * * *", timezone="UTC"),  # after 09:00 in Kyiv
    retry_delay=timedelta(minutes=5),
    tags=["reengagement", "lifecycle"],
    doc_md=__doc__,
)
def retention_reengagement():
    @task
    def run_reengagement() -> dict:
        from retention.triggers import format_report
        from retention.triggers import run_reengagement as run

        result = run(get_current_context()["data_interval_end"], channels=trigger_channels())
        print(format_report(result))
        return {step: counts["planned"] + counts["sent"]
                for step, counts in result["steps"]["reengagement"].items()}

    run_reengagement()


retention_reengagement()
