"""
### Results back: provider events and attribution

Every hour (`RETENTION_RESULTS_SCHEDULE`), as of the run's data interval end:

1. `load_results`: SendGrid Event Webhook batches still waiting in the webhook landing
   folder (`RETENTION_WEBHOOK_DIR`, default `RETENTION_HOME/webhooks/incoming`) go into
   `ops.message_events`, deduplicated on `sg_event_id`, with unsubscribes, spam reports
   and hard bounces written to `ops.consent_changes`. The receiver
   (`python -m retention.results.receiver`) lands every batch there durably and ingests
   it at once, so this step only catches what it could not ingest (database down). Then
   the send results of push, Telegram, SMS and Viber become `delivered` / `failed` events.
2. `build_attribution`: dbt rebuilds `marts.message_attribution` (last touch within each
   channel's window, offline receipts included, holdout counterfactuals) and
   `marts.campaign_results` over the purchases of the last `retention_dbt_build` run (which
   rebuilds them too after every ingest), so the marts follow new events and sends within
   the hour; both Assets are marked updated.

Both steps are idempotent: a re-run for the same interval writes the same rows.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import task

from retention.config import settings
from retention_airflow.assets import MARTS
from retention_airflow.run_context import run_as_of
from retention_airflow.dags import retention_dag



@retention_dag(
    "retention_results",
    schedule=settings().results_schedule,
    retry_delay=timedelta(minutes=2),
    tags=["results"],
    doc_md=__doc__,
)
def retention_results():
    @task
    def load_results() -> dict:
        from retention.results.pipeline import load_results as load

        return load(as_of=run_as_of())

    @task(outlets=[MARTS["message_attribution"], MARTS["campaign_results"]])
    def build_attribution(loaded: dict) -> dict:
        from retention.results.pipeline import build_attribution as build

        # purchases come with the dbt build after each ingest; here new events and sends
        return build(run_as_of(), with_parents=False)

    build_attribution(load_results())


retention_results()
