"""The Airflow UI in a browser: headless Chromium (Debian's package, driven by Playwright from
PyPI; no browser download) logs into the local Airflow that `retention airflow up` starts,
finds every DAG of dags/, sees the runs succeeded, opens the Reports view from the
navigation and the latest weekly report in it, and follows the report task's extra link.

Screenshots (the DAG list, the Reports view, the report) go to the test's temporary folder,
whose path the test prints; docs/airflow_dags.png, docs/airflow_reports.png and
docs/airflow_report.png are copies of them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest
import requests

from report_shop import (
    REPORT_NAME, REPORT_RUN_DATE, copy_dbt_project, deployment_env, prepare_report_shop,
)
from test_airflow_local import DAG_FILES, _cli, _deployment, _gone, _pids

pytestmark = [pytest.mark.scheduler, pytest.mark.xdist_group("serial")]

REPORT_DAG = "retention_weekly_report"
IN_UI = f"/plugin/retention-reports/retention/reports/{REPORT_NAME}"
VIEWPORT = {"width": 1440, "height": 900}
UI_TIMEOUT_MS = 60_000  # a loaded 2-core machine renders the UI slowly
#: run states that still change; anything else but success fails the check at once
UNFINISHED = {"Queued", "Running", "Scheduled", "Up For Retry", "Restarting", "Deferred"}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError("Chromium is not installed: apt-get install -y chromium (bin/setup does)")


# ---------------------------------------------------------------- steps in the UI, reusable

def sign_in(page, user: str, password: str) -> None:
    """Fill in the simple auth manager's login form the page shows, and send it."""
    page.locator("input[name=username]").fill(user)
    page.locator("input[name=password]").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url, timeout=UI_TIMEOUT_MS)


def log_in(page, base_url: str, user: str, password: str) -> None:
    """Open the UI and sign in."""
    from playwright.sync_api import expect

    page.goto(base_url + "/")
    sign_in(page, user, password)
    expect(page.get_by_role("link", name="Dags", exact=True).first).to_be_visible(
        timeout=UI_TIMEOUT_MS)


def assert_dags_listed(page, base_url: str, dag_ids: Iterable[str]) -> None:
    """The DAG list shows exactly these DAGs."""
    from playwright.sync_api import expect

    dag_ids = sorted(dag_ids)
    page.goto(base_url + "/dags")
    for dag_id in dag_ids:
        expect(page.get_by_role("link", name=dag_id, exact=True).first).to_be_visible(
            timeout=UI_TIMEOUT_MS)
    expect(page.get_by_text(f"{len(dag_ids)} Dags", exact=True)).to_be_visible()


def assert_runs_succeeded(page, base_url: str, dag_ids: Iterable[str],
                          timeout: float = 600.0) -> dict[str, list[str]]:
    """Each DAG's Runs page lists at least one run and every run's state is Success.

    Waits (up to `timeout` seconds per DAG, reloading) while a run is still queued or
    running; a failed run fails at once. Returns dag_id -> the states seen."""
    from playwright.sync_api import expect

    seen: dict[str, list[str]] = {}
    for dag_id in dag_ids:
        deadline = time.monotonic() + timeout
        while True:
            page.goto(f"{base_url}/dags/{quote(dag_id, safe='')}/runs")
            badges = page.locator("[data-testid=table-cell-state] [data-testid=state-badge]")
            expect(badges.first).to_be_visible(timeout=UI_TIMEOUT_MS)
            states = [s.strip() for s in badges.all_inner_texts()]
            if states and all(s == "Success" for s in states):
                seen[dag_id] = states
                break
            if set(states) - UNFINISHED - {"Success"} or time.monotonic() > deadline:
                raise AssertionError(f"{dag_id}: run states in the UI are {states}")
            page.wait_for_timeout(2000)
    return seen


def open_reports_view(page, base_url: str):
    """Click Reports in the navigation; return the view's frame."""
    from playwright.sync_api import expect

    page.goto(base_url + "/")
    page.get_by_role("link", name="Reports", exact=True).click()
    expect(page).to_have_url(base_url + "/plugin/retention-reports/retention/",
                             timeout=UI_TIMEOUT_MS)
    frame = page.frame_locator("iframe[title=Reports]")
    expect(frame.get_by_role("heading", name="Retention reports")).to_be_visible(
        timeout=UI_TIMEOUT_MS)
    return frame


# ---------------------------------------------------------------- the deployment

class _Api:
    def __init__(self, base_url: str, password: str) -> None:
        self.base_url = base_url
        self.http = requests.Session()
        self.http.trust_env = False
        token = self.http.post(f"{base_url}/auth/token", timeout=60,
                               json={"username": "admin", "password": password})
        assert token.status_code in (200, 201), token.text
        self.http.headers["Authorization"] = f"Bearer {token.json()['access_token']}"

    def __call__(self, method: str, path: str, **kwargs) -> dict:
        answer = self.http.request(method, f"{self.base_url}/api/v2{path}", timeout=60, **kwargs)
        assert answer.ok, f"{method} {path}: HTTP {answer.status_code} {answer.text[:500]}"
        return answer.json()

    def run_to_end(self, dag_id: str, logical_date, timeout: float = 900.0) -> str:
        """Unpause `dag_id`, trigger a run, wait until it ends; return its run id."""
        self("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        run_id = f"ui_test_{logical_date:%Y%m%dT%H%M}"
        self("POST", f"/dags/{dag_id}/dagRuns",
             json={"dag_run_id": run_id, "logical_date": logical_date.isoformat()})
        deadline = time.monotonic() + timeout
        while (state := self("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]) not in (
                "success", "failed"):
            assert time.monotonic() < deadline, f"{dag_id} {run_id} still {state}"
            time.sleep(2)
        tasks = self("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        assert state == "success", {t["task_id"]: t["state"] for t in tasks}
        return run_id


@pytest.fixture(scope="module")
def local_airflow(make_database, tmp_path_factory):
    """`retention airflow up` on a warehouse with a week of results, after one run of the
    weekly report DAG; the scheduler makes only the runs the test asks for."""
    tmp = tmp_path_factory.mktemp("ui")
    dbt_project = copy_dbt_project(tmp / "dbt_project")
    url = prepare_report_shop(make_database, tmp / "home", dbt_project)
    home, port, metadata_db, env = _deployment(make_database, url, tmp)
    assert home == tmp / "home"
    env.update(deployment_env(url, home, dbt_project))
    env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = "False"
    up = _cli(env, "up", "--port", str(port), "--metadata-database", metadata_db, timeout=600)
    started = _pids(home / "airflow" / "run")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        password = json.loads((home / "airflow" / "simple_auth_manager_passwords.json")
                              .read_text())["admin"]
        base_url = f"http://127.0.0.1:{port}"
        api = _Api(base_url, password)
        run_id = api.run_to_end(REPORT_DAG, REPORT_RUN_DATE)
        yield {"base_url": base_url, "password": password, "api": api, "run_id": run_id,
               "home": home}
    finally:
        _cli(env, "down", timeout=120)
        for pid in started.values():  # never leave a server behind, even when `down` failed
            if not _gone(pid):
                psutil.Process(pid).kill()


def test_a_marketer_reads_last_weeks_report_in_the_airflow_ui(local_airflow, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base_url, api = local_airflow["base_url"], local_airflow["api"]
    dags = api("GET", "/dags", params={"limit": 1000})["dags"]
    assert {Path(d["fileloc"]).name for d in dags} == DAG_FILES  # every file of dags/
    dag_ids = [d["dag_id"] for d in dags]
    links = api("GET", f"/dags/{REPORT_DAG}/dagRuns/{local_airflow['run_id']}/taskInstances/"
                       f"write_report/links")["extra_links"]
    assert links == {"Weekly report": base_url + IN_UI}
    shots = tmp_path / "screenshots"
    shots.mkdir()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            log_in(page, base_url, "admin", local_airflow["password"])

            assert_dags_listed(page, base_url, dag_ids)
            assert_runs_succeeded(page, base_url, [REPORT_DAG])
            # the list as a table: every DAG on one screen, with its latest run
            page.goto(base_url + "/dags")
            page.get_by_role("button", name="Show table view").click()
            row = page.get_by_role("row").filter(
                has=page.get_by_role("link", name=REPORT_DAG, exact=True))
            expect(row.get_by_role("link", name=REPORT_DAG, exact=True)).to_be_visible(
                timeout=UI_TIMEOUT_MS)
            expect(row.locator("[data-testid=state-badge]").first).to_be_visible()
            page.screenshot(path=shots / "airflow_dags.png")

            reports = open_reports_view(page, base_url)
            latest = reports.locator("#reports a.report").first
            expect(latest).to_have_text("Week 2026-W43")
            expect(reports.locator("#data-quality + p a")).to_have_attribute(
                "href", "data-docs/index.html")
            expect(reports.locator("#dbt-docs + p a")).to_have_attribute(
                "href", "dbt-docs/index.html")
            page.screenshot(path=shots / "airflow_reports.png")

            latest.click()
            expect(page).to_have_url(base_url + IN_UI, timeout=UI_TIMEOUT_MS)
            report = page.frame_locator("iframe[title=Reports]")
            expect(report.get_by_role("heading", level=1)).to_have_text(
                "Weekly retention report, 2026-W43", timeout=UI_TIMEOUT_MS)
            for section in ("summary", "cascade-funnel", "campaign-revenue"):
                expect(report.locator(f"#{section}")).to_be_visible()
            expect(report.locator("svg").first).to_be_visible()
            page.screenshot(path=shots / "airflow_report.png")

            # the report task's extra link, as the task instance page opens it
            page.goto(links["Weekly report"])
            expect(page.frame_locator("iframe[title=Reports]").get_by_role(
                "heading", level=1)).to_have_text("Weekly retention report, 2026-W43",
                                                  timeout=UI_TIMEOUT_MS)

            # a marketer who follows the e-mail's link while signed out: login, then the report
            fresh = browser.new_context(viewport=VIEWPORT).new_page()
            fresh.goto(f"{base_url}/retention/reports/{REPORT_NAME}")
            expect(fresh.locator("input[name=username]")).to_be_visible(timeout=UI_TIMEOUT_MS)
            sign_in(fresh, "admin", local_airflow["password"])
            expect(fresh).to_have_url(f"{base_url}/retention/reports/{REPORT_NAME}")
            expect(fresh.get_by_role("heading", level=1)).to_have_text(
                "Weekly retention report, 2026-W43", timeout=UI_TIMEOUT_MS)
        finally:
            browser.close()
    for name in ("airflow_dags.png", "airflow_reports.png", "airflow_report.png"):
        assert (shots / name).stat().st_size > 10_000, name
    print(f"\nscreenshots: {shots}")
