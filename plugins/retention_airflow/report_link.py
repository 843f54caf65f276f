"""Where the reports are in the Airflow UI, and the "Weekly report" extra link of the task
that writes one.

The `retention_reports` plugin (`plugins/retention_reports_plugin.py`, app in
`reports_app`) serves the kept files under `URL_PREFIX` of the Airflow api-server and
shows them in the UI's navigation as the external view `VIEW_ROUTE`:

* `<airflow>/plugin/retention-reports` — the view: the list of weekly reports, the
  data-quality Data Docs and the dbt docs, inside the Airflow UI;
* `<airflow>/plugin/retention-reports/retention/reports/weekly_report_<YYYY>-W<WW>.html` —
  one report inside the UI (the UI loads `/retention/reports/<name>` into its frame);
* `<airflow>/retention/reports/weekly_report_<YYYY>-W<WW>.html` — the same file alone.

So `RETENTION_REPORT_BASE_URL=<airflow>/plugin/retention-reports/retention/reports` makes the
e-mailed report link to the full report in the Airflow UI (`report_email.report_link`).

Airflow 3 computes a task's extra links in the task's own process once it has run and keeps
them as XComs; the api-server only reads them. `WeeklyReportOperator` is a
`PythonOperator` whose callable returns the report's path; its `WeeklyReportLink` turns that
path into the in-UI URL, on `[api] base_url`.
"""

from __future__ import annotations

import re
from pathlib import PurePath

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import BaseOperatorLink

URL_PREFIX = "/retention"
VIEW_ROUTE = "retention-reports"
REPORT_NAME = re.compile(r"weekly_report_\d{4}-W\d{2}\.html")


def report_path_in_ui(name: str) -> str:
    """The in-UI path of the report file `name` (a weekly_report_<week>.html)."""
    if not REPORT_NAME.fullmatch(name):
        raise ValueError(f"not a weekly report file name: {name!r}")
    return f"/plugin/{VIEW_ROUTE}{URL_PREFIX}/reports/{name}"


def report_url_in_ui(name: str, base_url: str | None = None) -> str:
    """`report_path_in_ui` on the Airflow UI's address (`[api] base_url`; relative when unset)."""
    if base_url is None:
        from airflow.configuration import conf

        base_url = conf.get("api", "base_url", fallback="") or ""
    return base_url.rstrip("/") + report_path_in_ui(name)


class WeeklyReportLink(BaseOperatorLink):
    """The report the task wrote (its return value, a path), in the Airflow UI."""

    name = "Weekly report"

    def get_link(self, operator, *, ti_key) -> str:
        from airflow.sdk.execution_time.xcom import XCom  # the configured XCom backend

        path = XCom.get_value(ti_key=ti_key, key="return_value")
        return report_url_in_ui(PurePath(path).name) if path else ""


class WeeklyReportOperator(PythonOperator):
    """A PythonOperator whose callable returns the path of the weekly report it wrote."""

    operator_extra_links = (WeeklyReportLink(),)
