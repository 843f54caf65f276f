"""
### Weekly marketer report

Mondays at 08:00 UTC, an hour after the weekly promo cascade starts
(`RETENTION_REPORT_SCHEDULE`), for the ISO week that has just ended:

1. `load_results`: webhook batches still in the landing folder and the send results of
   push and Telegram into `ops.message_events` (as the `retention_results` DAG does);
2. `build_attribution`: `marts.message_attribution` and `marts.campaign_results` as of
   the run's time, so the report sees every event and purchase until then;
3. `write_report`: the self-contained HTML report (inline SVG charts) of the week:
   cascade funnel by wave and channel, each campaign's revenue online and offline,
   A/B and holdout results with 95% intervals ("not significant yet" where they are
   not), trigger chain revenue and its share of retention revenue, cohort retention
   curves and new-customer 30-day RPR, ROPO share of offline revenue. It is kept as
   `RETENTION_HOME/reports/weekly_report_<YYYY>-W<WW>.html`; the task's "Weekly report"
   extra link opens it in the Airflow UI (the Reports view of the `retention_reports` plugin);
4. `send_report`: e-mails it through the e-mail channel to `RETENTION_REPORT_RECIPIENTS`
   (comma-separated; none: the step is skipped), once per recipient and week
   (`ops.report_deliveries`), so a retry does not send it twice.

The same report from the command line: `retention report [--week 2026-W45]`.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import task
from airflow.sdk.exceptions import AirflowSkipException

from retention.config import settings
from retention_airflow.run_context import run_as_of
from retention_airflow.dags import retention_dag
from retention_airflow.report_link import WeeklyReportOperator


def _write_report(built: dict) -> str:
    from retention.results.report import previous_week, write_report as write

    as_of = run_as_of()
    return str(write(previous_week(as_of), as_of=as_of))


@retention_dag(
    "retention_weekly_report",
    schedule=settings().report_schedule,
    retry_delay=timedelta(minutes=5),
    tags=["results", "report"],
    doc_md=__doc__,
)
def retention_weekly_report():
    @task
    def load_results() -> dict:
        from retention.results.pipeline import load_results as load

        return load(as_of=run_as_of())

    @task
    def build_attribution(loaded: dict) -> dict:
        from retention.results.pipeline import build_attribution as build

        return build(run_as_of())

    @task
    def send_report(path: str) -> dict:
        from retention.results.report import configured_recipients, send_report as send

        recipients = configured_recipients()
        if not recipients:
            raise AirflowSkipException("RETENTION_REPORT_RECIPIENTS is empty: report kept, not sent")
        from retention_airflow.hooks import channels_for  # the retention_sendgrid connection

        return send(path, recipients, channels_for(["email"])["email"])

    # an operator rather than @task: its class carries the extra link
    written = WeeklyReportOperator(task_id="write_report", python_callable=_write_report,
                                   op_args=[build_attribution(load_results())])
    send_report(written.output)


retention_weekly_report()
