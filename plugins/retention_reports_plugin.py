"""The `retention_reports` Airflow plugin: the reports view in the Airflow UI's navigation.

Airflow loads every module of the plugins folder that `.airflowignore` does not exclude;
this is the one module it loads. It mounts the app of `retention_airflow.reports_app` on
the api-server at `/retention` and adds "Reports" to the UI's navigation, an external view
that shows `/retention/` inside the UI (`/plugin/retention-reports`). URL scheme and the
report task's extra link: `retention_airflow.report_link`.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from retention_airflow.report_link import URL_PREFIX, VIEW_ROUTE
from retention_airflow.reports_app import create_app


class RetentionReportsPlugin(AirflowPlugin):
    name = "retention_reports"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX,
                     "name": "Retention reports"}]
    external_views = [{"name": "Reports", "href": f"{URL_PREFIX.lstrip('/')}/",
                       "url_route": VIEW_ROUTE, "destination": "nav", "nav_top_level": True}]
