"""The quick start's first command, end to end on a small shop, twice, through Airflow.

`bin/demo` is `bin/setup` followed by `python -m retention_dev.demo`; this runs the latter
with a working folder, a warehouse database, an Airflow metadata database and a UI port of
its own, as a newcomer would: it brings the local Airflow up and triggers the story's DAG
runs through the REST API. Checked: every chapter prints its counts, the report is
written, every run of the story is green in Airflow, and a second demo (which runs the
sending DAGs' runs again and keeps the others) sends nothing again. Then headless Chromium
walks the UI as a marketer (tests/airflow_ui_browser.py): every DAG listed, the story's runs
green, Reports in the navigation, last week's report. Airflow is stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from airflow_ui_browser import browse_reports
from retention import db
from retention_dev.demo import SENDING_DAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(env: dict, port: int, metadata_db: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "retention_dev.demo", "--customers", "600",
                           "--seed", "7", "--port", str(port), "--metadata-database", metadata_db,
                           "--run-timeout", "900"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc.stdout


WAVE_COLUMNS = ("audience", "sent", "failed", "unknown", "holdout", "waiting", "suppressed")


def _wave(out: str, wave: str) -> dict[str, int]:
    """A row of the cascade's wave table."""
    m = re.search(rf"^\s+{wave}\s+" + r"\s+".join([r"([\d,]+)"] * len(WAVE_COLUMNS)), out, re.M)
    assert m, f"no {wave} wave line in:\n{out}"
    return dict(zip(WAVE_COLUMNS, (int(g.replace(",", "")) for g in m.groups())))


def _line(out: str, start: str) -> str:
    """The first output line that begins with `start`, its runs of spaces collapsed to one
    (the indent dropped)."""
    found = [line for line in (" ".join(raw.split()) + " " for raw in out.splitlines())
             if line.startswith(start)]
    assert found, f"no line {start!r} in:\n{out}"
    return found[0].rstrip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# the shop is generated from the seed, the arms are hashes, the simulated readers are
# digests of the message ids and the local stand-ins accept everything: the same numbers
# on every run
WAVES = {
    "email": dict(audience=251, sent=177, failed=0, unknown=0, holdout=52, waiting=0, suppressed=22),
    "mobile_push": dict(audience=73, sent=61, failed=0, unknown=0, holdout=0, waiting=0, suppressed=12),
    "web_push": dict(audience=26, sent=25, failed=0, unknown=0, holdout=0, waiting=0, suppressed=1),
    "telegram": dict(audience=16, sent=12, failed=0, unknown=0, holdout=0, waiting=0, suppressed=4),
}
LEDGER = (483, 360)  # ops.messages: rows, sent (the cascade, the trigger chains, re-engagement)
STORY = {  # DAG: the demo's run ids
    "retention_ingest": {"demo__2026-10-31T01:00"},
    "retention_dbt_build": {"demo__2026-10-26T07:00"},
    "weekly_promo_cascade": {"demo__2026-10-26T07:00"},
    "retention_triggers": {"demo__2026-10-30T12:00"},
    "retention_reengagement": {"demo__2026-10-30T12:00"},
    "retention_results": {"demo__2026-10-31T00:00"},
    "retention_weekly_report": {"demo__2026-11-02T08:00"},
}
REPORT_RUN = "demo__2026-11-02T08:00"


def _admin_password(home: Path) -> str:
    return json.loads((home / "airflow" / "simple_auth_manager_passwords.json")
                      .read_text())["admin"]


def _dag_ids(home: Path) -> list[str]:
    """Every DAG the deployment parsed, checked to come from every file of dags/."""
    from retention_airflow.client import AirflowClient
    from retention_airflow.local import LocalAirflow

    client = AirflowClient.local(LocalAirflow(home=home / "airflow"))
    dags = client.request("GET", "/dags", params={"limit": 1000}).json()["dags"]
    assert {Path(d["fileloc"]).name for d in dags} == {p.name for p in Path(ROOT, "dags")
                                                        .glob("*.py")}
    return [d["dag_id"] for d in dags]


def _runs(home: Path) -> dict[str, dict[str, str]]:
    """{dag: {run id: state}} of the story's DAGs, from the deployment's REST API."""
    from retention_airflow.client import AirflowClient
    from retention_airflow.local import LocalAirflow

    client = AirflowClient.local(LocalAirflow(home=home / "airflow"))
    return {dag: {r["dag_run_id"]: r["state"] for r in client.request(
        "GET", f"/dags/{dag}/dagRuns", params={"limit": 100}).json()["dag_runs"]}
        for dag in STORY}


@pytest.mark.scheduler
@pytest.mark.slow
@pytest.mark.xdist_group("serial")  # one after another: a real Airflow deployment
def test_quick_start_runs_through_airflow_and_is_idempotent(make_database, tmp_path):
    url = make_database("demo")
    metadata_db = sa.engine.make_url(make_database("airflow")).database
    home = tmp_path / "home"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RETENTION_", "AIRFLOW"))}
    env.update(RETENTION_DATABASE_URL=url, RETENTION_HOME=str(home),
               PYTHONPATH=os.path.join(ROOT, "plugins"))
    try:
        first = _demo(env, port, metadata_db)
        for heading in ("generate a sample shop", "local Airflow", "load through the contract",
                        "dbt build of the customer lifetime tables", "weekly promo cascade",
                        "trigger chains", "re-engagement sequence", "results back",
                        "weekly marketer report"):
            assert f"== {heading}" in first, heading
        assert "triggered through the REST API" in first
        # progress from the task instances, with their return values' counts
        assert _line(first, "weekly_promo_cascade start_run success").endswith(
            ": audience 326 (holdout 52)")
        assert _line(first, "retention_ingest check_quality running") == \
            "retention_ingest check_quality running"
        assert _line(first, "orders ") == "orders 1,379"
        assert _line(first, "data quality load-1").endswith(
            "passed (61 expectations, 0 critical failures, 0 warnings)")
        assert _line(first, "buyers ") == "buyers 364"
        assert _line(first, "rpr ") == "rpr 0.5742"
        assert _line(first, "dbt (every layer task): ") == (
            "dbt (every layer task): models 35, models_built 35, tests 85, unit_tests 0, "
            "failures 0, warnings 0, skipped 0")
        assert _line(first, "run weekly_promo@") == ("run weekly_promo@2026-10-26T07:00:00Z: "
                                                     "audience 326 (holdout 52)")
        for wave, expected in WAVES.items():
            got = _wave(first, wave)
            # every member a wave concerns has exactly one outcome
            assert got["audience"] == sum(v for k, v in got.items() if k != "audience"), (wave, got)
            assert got == expected, (wave, got)
        # the readers' events came in through the signed webhook before the next wave
        assert _line(first, "email readers") == (
            "email readers (simulated at the SendGrid stand-in, via the signed webhook): "
            "delivered 173, bounce 4, open 51, click 8, unsubscribe 0")
        # what the stand-ins accepted is what the ledger says was sent
        assert _line(first, "ledger, sent by channel:") == (
            "ledger, sent by channel: email 177, mobile_push 61, telegram 12, web_push 25")
        assert _line(first, "accepted on the wire in this run:") == (
            "accepted on the wire in this run: email 177, push 86, telegram 12")
        # the shop's own event fires a trigger that exists as a campaign file alone
        assert _line(first, "entered bonus_credited (definition): ") == (
            "entered bonus_credited (definition): 2 customer(s): c0000208, c0000349")
        assert _line(first, "bonus_credited.notice ") == (  # due, planned, sent, ...
            "bonus_credited.notice 2 0 2 0 0 0 0")
        assert _line(first, "reengagement.reminder ") == (  # due, planned, sent, ... by reason
            "reengagement.reminder 102 0 65 0 0 21 8 frequency cap: channel: 1, "
            "frequency cap: global: 2, no consent: 5")
        # the treated arms' results, and the holdout (sent nothing) beside them as the
        # control: 52 members, two of whom bought for 10,228, not added to the wave's 4 / 8,953
        assert _line(first, "weekly_promo.email ") == (
            "weekly_promo.email email 177 173 51 8 4 8,953 0 | 52 2 10,228")
        assert "every DAG run of the story is green" in first
        report = re.search(r"The weekly report: (\S+\.html)", first).group(1)
        assert Path(report).name == "weekly_report_2026-W44.html"
        html = open(report, encoding="utf-8").read()
        assert "<svg" in html and "weekly_promo" in html
        assert f"http://127.0.0.1:{port}/plugin/retention-reports/" in first
        assert "password is in" in first and "retention-dev airflow down" in first

        with db.connect(url) as conn:
            ledger = conn.execute("select count(*), count(*) filter (where status = 'sent') "
                                  "from ops.messages").fetchone()
        assert ledger == LEDGER, ledger

        second = _demo(env, port, metadata_db)
        assert "already running for the demo" in second
        # the sending runs run again; the others succeeded and are kept
        assert second.count("run exists from an earlier demo: replaced") == len(SENDING_DAGS)
        assert second.count("run exists from an earlier demo and succeeded: kept") == \
            len(STORY) - len(SENDING_DAGS)
        assert {wave: _wave(second, wave) for wave in WAVES} == WAVES
        assert "[frozen audience reused]" in second
        assert "accepted on the wire in this run: email 0, push 0, telegram 0" in second
        assert "accepted on the wire during this demo: email 0, push 0, telegram 0" in second
        with db.connect(url) as conn:
            again = conn.execute("select count(*), count(*) filter (where status = 'sent') "
                                 "from ops.messages").fetchone()
        assert again == ledger
        # the story is in Airflow: one run per chapter, each green, after both demos
        runs = _runs(home)
        assert {dag: set(r) for dag, r in runs.items()} == STORY, runs
        assert {state for r in runs.values() for state in r.values()} == {"success"}, runs
        # and a marketer sees it in the UI: every DAG, the story's runs green, the report
        browse_reports(f"http://127.0.0.1:{port}", _admin_password(home),
                       dag_ids=_dag_ids(home), green=STORY, report_run=REPORT_RUN,
                       week="2026-W44", shots=tmp_path / "screenshots")
    finally:
        subprocess.run([sys.executable, "-m", "retention_dev.cli", "airflow", "down"], env=env,
                       cwd=ROOT, capture_output=True, timeout=180)
