"""A warehouse the Airflow UI tests show reports of: the generated shop of the report tests
(campaigns and trigger chains in ISO week 2026-W43, results loaded, marts built), the
data-quality checkpoint's Data Docs under RETENTION_HOME, and the dbt docs of a private copy
of the dbt project (its `target/` is the test's own, not the checkout's)."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: a run of retention_weekly_report at this logical date reports on 2026-W43
REPORT_RUN_DATE = datetime(2026, 10, 26, 8, tzinfo=timezone.utc)
REPORT_NAME = "weekly_report_2026-W43.html"
CURRENCY = "UAH"


def copy_dbt_project(dest: Path) -> Path:
    shutil.copytree(ROOT / "dbt_project", dest,
                    ignore=shutil.ignore_patterns("target", "logs", "dbt_packages", ".user.yml"))
    return dest


def prepare_report_shop(make_database, home: Path, dbt_project: Path) -> str:
    """The shop's warehouse URL; Data Docs in `home`, dbt docs in `dbt_project`/target."""
    from retention.ingest.quality import run_checkpoint
    from retention.warehouse.dbt_tasks import generate_docs
    from test_results_report import END, made_shop

    with made_shop(make_database, "rt_uireports", RETENTION_CURRENCY=CURRENCY,
                   RETENTION_HOME=str(home), RETENTION_DBT_PROJECT_DIR=str(dbt_project)) as url:
        run_checkpoint(url, END)
        generate_docs(END, url)
    assert (home / "data_quality" / "data_docs" / "index.html").is_file()
    assert (dbt_project / "target" / "index.html").is_file()
    return url


def deployment_env(url: str, home: Path, dbt_project: Path) -> dict[str, str]:
    """The RETENTION_* settings the weekly report DAG's tasks and the reports app need."""
    return {"RETENTION_DATABASE_URL": url, "RETENTION_HOME": str(home),
            "RETENTION_CURRENCY": CURRENCY, "RETENTION_DBT_PROJECT_DIR": str(dbt_project)}
