"""The Airflow UI in a browser: headless Chromium (Debian's package, driven by Playwright from
PyPI; no browser download) logs into a local Airflow, finds every DAG of dags/, sees the
runs succeeded, opens the Reports view from the navigation and the latest weekly report in
it, and follows the report task's extra link (`browse_reports`).

The walk runs in tests/test_demo.py on the quick start's own Airflow, after both demos, so
it sees the story's runs green. Screenshots (the DAG list, the Reports view, the report) go
to that test's temporary folder, whose path it prints; docs/airflow_dags.png,
docs/airflow_reports.png and docs/airflow_report.png are copies of them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

import requests

REPORT_DAG = "retention_weekly_report"
VIEWPORT = {"width": 1440, "height": 900}
UI_TIMEOUT_MS = 60_000  # a loaded 2-core machine renders the UI slowly
#: run states that still change; anything else but success fails the check at once
UNFINISHED = {"Queued", "Running", "Scheduled", "Up For Retry", "Restarting", "Deferred"}


def chromium() -> str:
    """The Chromium on PATH (Debian's package)."""
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


# ---------------------------------------------------------------- the walk through the UI

def browse_reports(base_url: str, password: str, *, dag_ids: Iterable[str],
                   green: Iterable[str], report_run: str, week: str, shots: Path) -> None:
    """A marketer in the Airflow UI of a deployment after its runs: logs in, sees exactly
    `dag_ids` listed and every run of the `green` DAGs succeeded, opens Reports from the
    navigation and the report of `week` (the newest), follows the extra link of
    `retention_weekly_report`'s `write_report` in run `report_run`, and opens the report's
    e-mail link signed out (login, then the report). Screenshots of the DAG list, the
    Reports view and the report go to `shots`."""
    from playwright.sync_api import expect, sync_playwright

    name = f"weekly_report_{week}.html"
    in_ui = f"/plugin/retention-reports/retention/reports/{name}"
    heading = f"Weekly retention report, {week}"
    http = requests.Session()
    http.trust_env = False
    token = http.post(f"{base_url}/auth/token", timeout=60,
                      json={"username": "admin", "password": password})
    assert token.status_code in (200, 201), token.text
    http.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
    links = http.get(f"{base_url}/api/v2/dags/{REPORT_DAG}/dagRuns/{quote(report_run, safe='')}"
                     f"/taskInstances/write_report/links", timeout=60)
    assert links.ok, links.text
    assert links.json()["extra_links"] == {"Weekly report": base_url + in_ui}
    shots.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            log_in(page, base_url, "admin", password)

            assert_dags_listed(page, base_url, dag_ids)
            assert_runs_succeeded(page, base_url, green)
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
            expect(latest).to_have_text(f"Week {week}")
            expect(reports.locator("#data-quality + p a")).to_have_attribute(
                "href", "data-docs/index.html")
            expect(reports.locator("#dbt-docs + p a")).to_have_attribute(
                "href", "dbt-docs/index.html")
            page.screenshot(path=shots / "airflow_reports.png")

            latest.click()
            expect(page).to_have_url(base_url + in_ui, timeout=UI_TIMEOUT_MS)
            report = page.frame_locator("iframe[title=Reports]")
            expect(report.get_by_role("heading", level=1)).to_have_text(
                heading, timeout=UI_TIMEOUT_MS)
            for section in ("summary", "cascade-funnel", "campaign-revenue"):
                expect(report.locator(f"#{section}")).to_be_visible()
            expect(report.locator("svg").first).to_be_visible()
            page.screenshot(path=shots / "airflow_report.png")

            # the report task's extra link, as the task instance page opens it
            page.goto(base_url + in_ui)
            expect(page.frame_locator("iframe[title=Reports]").get_by_role(
                "heading", level=1)).to_have_text(heading, timeout=UI_TIMEOUT_MS)

            # a marketer who follows the e-mail's link while signed out: login, then the report
            fresh = browser.new_context(viewport=VIEWPORT).new_page()
            fresh.goto(f"{base_url}/retention/reports/{name}")
            expect(fresh.locator("input[name=username]")).to_be_visible(timeout=UI_TIMEOUT_MS)
            sign_in(fresh, "admin", password)
            expect(fresh).to_have_url(f"{base_url}/retention/reports/{name}")
            expect(fresh.get_by_role("heading", level=1)).to_have_text(
                heading, timeout=UI_TIMEOUT_MS)
        finally:
            browser.close()
    for shot in ("airflow_dags.png", "airflow_reports.png", "airflow_report.png"):
        assert (shots / shot).stat().st_size > 10_000, shot
    print(f"\nscreenshots: {shots}")
