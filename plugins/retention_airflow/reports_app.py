"""The reports view of the Airflow UI: a FastAPI app the `retention_reports` plugin mounts on
the api-server at `/retention` (URL scheme: `report_link`).

* `/retention/` — the list: the kept weekly reports (RETENTION_HOME/reports, newest week
  first), the data-quality Data Docs (RETENTION_HOME/data_quality/data_docs, built by the
  ingest DAG's checkpoint) and the dbt docs of the last `dbt docs generate` (the dbt
  project's `target/`, the `dbt_docs` task of `retention_dbt_build`);
* `/retention/reports/weekly_report_<YYYY>-W<WW>.html` (and `.eml`, its e-mail version);
* `/retention/data-docs/<path>` — any file of the Data Docs site;
* `/retention/dbt-docs/index.html`, `manifest.json`, `catalog.json` — the dbt docs site.

Airflow does not authenticate a plugin's app, so this one does it with Airflow's own
dependencies: every route needs a user whom the configured auth manager authenticates from
the request (the UI's `_token` cookie, which the UI's frame sends, or an
`Authorization: Bearer` token) and who may read the DAG that produces what the route
serves (`retention_weekly_report`, `retention_ingest`, `retention_dbt_build`). Without a
token a browser is sent to Airflow's login page (and back here after it), any other
client gets 401; an expired token gets 401, a forged one 403. Files are served only from
inside their folder, after resolving links: a name that leads elsewhere is 404.
"""

from __future__ import annotations

import html
import re
from datetime import datetime, timezone
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import (
    FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response,
)

from retention_airflow.report_link import REPORT_NAME

REPORT_DAG = "retention_weekly_report"
DATA_DOCS_DAG = "retention_ingest"
DBT_DOCS_DAG = "retention_dbt_build"
DBT_DOCS_FILES = ("index.html", "manifest.json", "catalog.json")
REPORT_FILE = re.compile(r"weekly_report_(\d{4}-W\d{2})\.(html|eml)")
_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, no-cache",
            "Referrer-Policy": "same-origin"}


def reports_dir() -> Path:
    from retention.config import paths

    return paths().reports


def data_docs_dir() -> Path:
    from retention.config import paths

    return paths().data_quality / "data_docs"


def dbt_docs_dir() -> Path:
    from retention.warehouse.build import target_dir

    return target_dir()


def inside(root: Path, relative: str) -> Path | None:
    """The existing file `relative` below `root` once every link is resolved, else None
    (absolute names, `..` and links that leave `root` included)."""
    if not relative or "\x00" in relative or relative.startswith(("/", "\\")):
        return None
    try:
        base = root.resolve(strict=True)
        path = (base / relative).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(base) or not path.is_file():
        return None
    return path


def weekly_reports(root: Path | None = None) -> list[Path]:
    """The kept weekly reports (HTML), newest ISO week first."""
    root = root or reports_dir()
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if REPORT_NAME.fullmatch(p.name) and p.is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def _dag_reader(dag_id: str):
    """Airflow's own check: an authenticated user allowed to read `dag_id`."""
    from airflow.api_fastapi.core_api.security import requires_access_dag

    return Depends(requires_access_dag("GET", param_dag_id=dag_id))


def _file(path: Path | None, media_type: str | None = None) -> FileResponse:
    if path is None:
        raise HTTPException(status_code=404, detail="Not found")
    return FileResponse(path, media_type=media_type, headers=_HEADERS)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Retention reports</title>
<style>
 body {{ font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2933;
        margin: 24px; max-width: 960px; }}
 h1 {{ font-size: 22px; margin: 0 0 4px; }} h2 {{ font-size: 17px; margin: 28px 0 8px; }}
 table {{ border-collapse: collapse; width: 100%; }}
 th, td {{ text-align: left; padding: 6px 10px; border-bottom: 1px solid #e4e7eb; }}
 th {{ color: #52606d; font-weight: 600; }} a {{ color: #2f6db5; }}
 .muted {{ color: #7b8794; }}
</style></head>
<body>
<h1>Retention reports</h1>
<p class="muted">The weekly marketer reports and the pipeline's documentation, as kept by
the last runs of the retention DAGs.</p>
<h2 id="weekly-reports">Weekly reports</h2>
{reports}
<h2 id="data-quality">Data quality</h2>
{data_docs}
<h2 id="dbt-docs">Warehouse documentation</h2>
{dbt_docs}
</body></html>
"""


def _when(path: Path) -> str:
    moment = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _reports_table(reports: list[Path]) -> str:
    if not reports:
        return ('<p class="muted" id="no-reports">No weekly report yet: the '
                '<code>retention_weekly_report</code> DAG writes one each Monday.</p>')
    rows = []
    for path in reports:
        week = REPORT_FILE.fullmatch(path.name).group(1)
        eml = path.with_suffix(".eml")
        email = (f'<a href="reports/{html.escape(eml.name)}" download>e-mail version</a>'
                 if eml.is_file() else "")
        rows.append(f'<tr><td><a class="report" href="reports/{html.escape(path.name)}">'
                    f'Week {html.escape(week)}</a></td><td>{_when(path)}</td><td>{email}</td></tr>')
    return ('<table id="reports"><thead><tr><th>Report</th><th>Written</th><th></th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _docs_line(index: Path, href: str, title: str, missing: str) -> str:
    if not index.is_file():
        return f'<p class="muted">{missing}</p>'
    return (f'<p><a href="{href}">{title}</a> <span class="muted">(built {_when(index)})'
            f'</span></p>')


def create_app() -> FastAPI:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
    from airflow.api_fastapi.core_api.security import get_user

    # The app-wide dependency authenticates every route; the routes add the DAG read check.
    app = FastAPI(title="Retention reports", dependencies=[Depends(get_user)],
                  docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        """A browser page request without a valid session goes to Airflow's login page,
        which brings it back here; everything else gets the error as JSON."""
        accept = request.headers.get("accept", "")
        if exc.status_code == 401 and request.method == "GET" and "text/html" in accept:
            login = get_auth_manager().get_url_login(next_url=str(request.url))
            return RedirectResponse(login, status_code=303)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.get("/", response_class=HTMLResponse)
    def index(user=Depends(get_user)) -> HTMLResponse:
        def may_read(dag_id: str) -> bool:
            return get_auth_manager().is_authorized_dag(
                method="GET", details=DagDetails(id=dag_id), user=user)

        hidden = '<p class="muted">Not available to your Airflow role.</p>'
        page = _PAGE.format(
            reports=_reports_table(weekly_reports()) if may_read(REPORT_DAG) else hidden,
            data_docs=_docs_line(data_docs_dir() / "index.html", "data-docs/index.html",
                                 "Data Docs of the data-quality checkpoint",
                                 "No Data Docs yet: the ingest DAG's checkpoint builds them.")
            if may_read(DATA_DOCS_DAG) else hidden,
            dbt_docs=_docs_line(dbt_docs_dir() / "index.html", "dbt-docs/index.html",
                                "dbt docs of the last build",
                                "No dbt docs yet: the dbt build DAG's dbt_docs task writes them.")
            if may_read(DBT_DOCS_DAG) else hidden)
        return HTMLResponse(page, headers=_HEADERS)

    @app.get("/reports/{name}", dependencies=[_dag_reader(REPORT_DAG)])
    def report(name: str) -> FileResponse:
        match = REPORT_FILE.fullmatch(name)
        path = inside(reports_dir(), name) if match else None
        return _file(path, "message/rfc822" if match and match.group(2) == "eml" else None)

    @app.get("/data-docs/{relative:path}", dependencies=[_dag_reader(DATA_DOCS_DAG)])
    def data_docs(relative: str) -> FileResponse:
        return _file(inside(data_docs_dir(), relative))

    @app.get("/dbt-docs/{name}", dependencies=[_dag_reader(DBT_DOCS_DAG)])
    def dbt_docs(name: str) -> FileResponse:
        return _file(inside(dbt_docs_dir(), name) if name in DBT_DOCS_FILES else None)

    return app
