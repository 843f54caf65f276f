"""The reports view of the Airflow UI (`retention_reports` plugin) on a real Airflow 3.3: the
weekly report DAG run for real, its "Weekly report" extra link read through the REST API,
and every route of the plugin's app behind Airflow's authentication, serving only files
inside its folders."""

from __future__ import annotations

import http.client
import secrets
import shutil
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import jwt
import pytest
import requests

from airflow_deployment import AirflowDeployment
from report_shop import (
    REPORT_NAME, REPORT_RUN_DATE, ROOT, copy_dbt_project, deployment_env, prepare_report_shop,
)

DAG = "retention_weekly_report"
IN_UI = f"/plugin/retention-reports/retention/reports/{REPORT_NAME}"


# ---------------------------------------------------------------- without Airflow running

@pytest.mark.unit
def test_inside_serves_only_files_below_the_folder(tmp_path):
    from retention_airflow.reports_app import inside

    root = tmp_path / "docs"
    (root / "static").mkdir(parents=True)
    (root / "index.html").write_text("site")
    (root / "static" / "app.css").write_text("css")
    (tmp_path / "secret.txt").write_text("secret")
    (root / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (root / "static" / "up").symlink_to(tmp_path)

    assert inside(root, "index.html") == (root / "index.html").resolve()
    assert inside(root, "static/app.css") == (root / "static" / "app.css").resolve()
    assert inside(root, "static/../index.html") == (root / "index.html").resolve()
    for name in ("../secret.txt", "static/../../secret.txt", "leak.txt", "static/up/secret.txt",
                 str(tmp_path / "secret.txt"), "/etc/passwd", "\\etc\\passwd", "", "static",
                 "missing.html", "index.html\x00.png"):
        assert inside(root, name) is None, name


@pytest.mark.unit
def test_the_email_link_and_the_extra_link_share_the_url_scheme(monkeypatch):
    """RETENTION_REPORT_BASE_URL=<airflow>/plugin/retention-reports/retention/reports makes the
    e-mailed report link to the page the task's extra link opens."""
    from retention.results.report_email import report_link
    from retention_airflow.report_link import report_url_in_ui

    base = "https://airflow.example"
    monkeypatch.setenv("RETENTION_REPORT_BASE_URL",
                       f"{base}/plugin/retention-reports/retention/reports")
    path = Path("/any/reports") / REPORT_NAME
    assert report_link(path) == report_url_in_ui(REPORT_NAME, base) == base + IN_UI
    with pytest.raises(ValueError):
        report_url_in_ui("../../airflow/secrets.json", base)


# ---------------------------------------------------------------- a real deployment

@pytest.fixture(scope="module")
def reports_airflow(make_database, tmp_path_factory):
    """A deployment with the weekly report DAG and the plugin, after one successful run of
    the DAG for 2026-W43; yields (deployment, run id, RETENTION_HOME, dbt project)."""
    tmp = tmp_path_factory.mktemp("reports")
    home, dbt_project = tmp / "home", copy_dbt_project(tmp / "dbt_project")
    url = prepare_report_shop(make_database, home, dbt_project)
    dags = tmp / "dags"
    dags.mkdir()
    shutil.copy(ROOT / "dags" / f"{DAG}.py", dags)
    with AirflowDeployment(dags, make_database("airflow"), deployment_env(url, home, dbt_project),
                           dag_ids=[DAG], home=tmp / "airflow") as af:
        run_id = af.trigger(DAG, logical_date=REPORT_RUN_DATE)
        state = af.wait(DAG, run_id, timeout=900)
        assert state == "success", af.report(DAG, run_id)
        yield af, run_id, home, dbt_project


def _token(af: AirflowDeployment) -> str:
    return af.client.http.headers["Authorization"].removeprefix("Bearer ")


def _resigned(token: str, key: str, **claims) -> str:
    """`token`'s claims with `claims` replaced, signed with `key` like Airflow signs."""
    header = jwt.get_unverified_header(token)
    payload = {**jwt.decode(token, options={"verify_signature": False}), **claims}
    return jwt.encode(payload, key, algorithm=header["alg"], headers={"kid": header.get("kid")})


def _http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def _protected(home: Path, dbt_project: Path) -> dict[str, Path | None]:
    """Every route of the app -> the file it serves (None: the list page)."""
    reports, docs = home / "reports", home / "data_quality" / "data_docs"
    some_docs_page = next(p for p in sorted(docs.rglob("*.html")) if p.name != "index.html")
    return {
        "/retention/": None,
        f"/retention/reports/{REPORT_NAME}": reports / REPORT_NAME,
        "/retention/reports/weekly_report_2026-W43.eml": reports / "weekly_report_2026-W43.eml",
        "/retention/data-docs/index.html": docs / "index.html",
        f"/retention/data-docs/{some_docs_page.relative_to(docs).as_posix()}": some_docs_page,
        "/retention/dbt-docs/index.html": dbt_project / "target" / "index.html",
        "/retention/dbt-docs/manifest.json": dbt_project / "target" / "manifest.json",
    }


@pytest.mark.scheduler
@pytest.mark.xdist_group("serial")
def test_report_task_links_to_its_report_in_the_ui(reports_airflow):
    af, run_id, home, _ = reports_airflow
    links = af.api("GET", f"/dags/{DAG}/dagRuns/{quote(run_id, safe='')}/taskInstances/"
                          f"write_report/links").json()
    assert links["extra_links"] == {"Weekly report": af.base_url + IN_UI}, links
    # the run wrote the report the link names, for the week before the run
    report = home / "reports" / REPORT_NAME
    assert "Results as of 2026-10-26 08:00 UTC" in report.read_text()
    # the page the link opens loads the report from the plugin's app
    answer = _http().get(af.base_url + IN_UI.removeprefix("/plugin/retention-reports"),
                         headers={"Authorization": f"Bearer {_token(af)}"}, timeout=60)
    assert answer.status_code == 200
    assert answer.content == report.read_bytes()
    # the other tasks have no such link
    other = af.api("GET", f"/dags/{DAG}/dagRuns/{quote(run_id, safe='')}/taskInstances/"
                          f"build_attribution/links").json()
    assert other["extra_links"] == {}


@pytest.mark.scheduler
@pytest.mark.xdist_group("serial")
def test_every_route_needs_an_airflow_user(reports_airflow):
    af, _, home, dbt_project = reports_airflow
    token = _token(af)
    secret = af.local.secret_settings()["AIRFLOW__API_AUTH__JWT_SECRET"]
    now = int(time.time())
    expired = _resigned(token, secret, iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    forged = _resigned(token, secrets.token_urlsafe(48))
    http = _http()
    routes = _protected(home, dbt_project)
    for path, served in routes.items():
        url = af.base_url + path
        # no credentials: 401 for an API client, Airflow's login page (and back) for a browser
        assert http.get(url, timeout=60).status_code == 401, path
        page = http.get(url, headers={"Accept": "text/html"}, allow_redirects=False, timeout=60)
        assert page.status_code == 303, path
        assert page.headers["location"] == "/auth/login?next=" + quote(url, safe=""), path
        # an expired token, a token signed with another key (header or cookie)
        answer = http.get(url, headers={"Authorization": f"Bearer {expired}"}, timeout=60)
        assert (answer.status_code, answer.json()) == (401, {"detail": "Token Expired"}), path
        for kwargs in ({"headers": {"Authorization": f"Bearer {forged}"}},
                       {"cookies": {"_token": forged}},
                       {"headers": {"Authorization": f"Bearer {token[:-4]}AAAA"}}):
            assert http.get(url, timeout=60, **kwargs).status_code == 403, (path, kwargs)
        # the user's token, as the API's header or as the UI's cookie
        for kwargs in ({"headers": {"Authorization": f"Bearer {token}"}},
                       {"cookies": {"_token": token}}):
            answer = http.get(url, timeout=60, **kwargs)
            assert answer.status_code == 200, (path, answer.text[:300])
            if served is not None:
                assert answer.content == served.read_bytes(), path
    # the list names the report and links both documentation sites
    index = http.get(af.base_url + "/retention/", cookies={"_token": token}, timeout=60).text
    assert f'href="reports/{REPORT_NAME}">Week 2026-W43</a>' in index
    assert 'href="data-docs/index.html"' in index and 'href="dbt-docs/index.html"' in index
    # the report is HTML, the e-mail version a MIME message; no content sniffing
    answer = http.get(af.base_url + f"/retention/reports/{REPORT_NAME}",
                      cookies={"_token": token}, timeout=60)
    assert answer.headers["content-type"].startswith("text/html")
    assert answer.headers["x-content-type-options"] == "nosniff"
    answer = http.get(af.base_url + "/retention/reports/weekly_report_2026-W43.eml",
                      cookies={"_token": token}, timeout=60)
    assert answer.headers["content-type"].startswith("message/rfc822")


def _raw_get(base_url: str, raw_path: str, token: str) -> tuple[int, bytes]:
    """GET with the path sent exactly as written (no client-side `..` normalisation)."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.putrequest("GET", raw_path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


@pytest.mark.scheduler
@pytest.mark.xdist_group("serial")
def test_no_file_outside_the_known_folders_is_served(reports_airflow):
    af, _, home, dbt_project = reports_airflow
    token = _token(af)
    marker = secrets.token_hex(16)
    (home / "outside.txt").write_text(marker)
    docs = home / "data_quality" / "data_docs"
    (docs / "leak.txt").symlink_to(home / "outside.txt")
    (home / "reports" / "notes.html").write_text(marker)
    (dbt_project / "target" / "notes.json").write_text(marker)
    attempts = [
        "/retention/data-docs/../../outside.txt",
        "/retention/data-docs/..%2F..%2Foutside.txt",
        "/retention/data-docs/%2e%2e/%2e%2e/outside.txt",
        "/retention/data-docs/..%5C..%5Coutside.txt",
        "/retention/data-docs/leak.txt",
        f"/retention/data-docs/{quote(str(home / 'outside.txt'))}",
        "/retention/data-docs//etc/passwd",
        "/retention/reports/..%2Foutside.txt",
        "/retention/reports/notes.html",
        "/retention/reports/../outside.txt",
        "/retention/dbt-docs/notes.json",
        "/retention/dbt-docs/..%2Fprofiles.yml",
        "/retention/dbt-docs/..%2F..%2Fhome%2Foutside.txt",
    ]
    for raw in attempts:
        status, body = _raw_get(af.base_url, raw, token)
        assert status in (400, 404), (raw, status, body[:200])
        assert marker.encode() not in body and b"root:" not in body, raw
    # the same client gets a file that is inside
    assert _raw_get(af.base_url, "/retention/data-docs/index.html", token)[0] == 200
