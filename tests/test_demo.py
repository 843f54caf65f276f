"""The quick start's first command, end to end on a small shop, twice.

`bin/demo` is `bin/setup` followed by `python -m retention_dev.demo`; this runs the latter in
a fresh database and working folder, so the README's promise is checked at every commit:
every step prints its counts, the report is written, and a second run sends nothing again.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from retention import db

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(env: dict) -> str:
    proc = subprocess.run([sys.executable, "-m", "retention_dev.demo", "--customers", "600",
                           "--seed", "5"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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


# the shop is generated from the seed, the arms are hashes, the simulated readers are
# seeded and the local stand-ins accept everything: the same numbers on every run
WAVES = {
    "email": dict(audience=245, sent=171, failed=0, unknown=0, holdout=52, waiting=0, suppressed=22),
    "mobile_push": dict(audience=82, sent=74, failed=0, unknown=0, holdout=0, waiting=0, suppressed=8),
    "web_push": dict(audience=35, sent=26, failed=0, unknown=0, holdout=0, waiting=0, suppressed=9),
    "telegram": dict(audience=13, sent=11, failed=0, unknown=0, holdout=0, waiting=0, suppressed=2),
}
LEDGER = (483, 364)  # ops.messages: rows, sent (the cascade, the trigger chains, re-engagement)


def test_quick_start_runs_everything_and_is_idempotent(make_database, tmp_path):
    url = make_database("demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RETENTION_", "AIRFLOW_CONN_"))}
    env.update(RETENTION_DATABASE_URL=url, RETENTION_HOME=str(tmp_path / "home"),
               PYTHONPATH=os.path.join(ROOT, "plugins"))

    first = _demo(env)
    for heading in ("load through the contract", "data quality checkpoint", "dbt build as of",
                    "predicted customer value", "weekly promo cascade", "trigger chains",
                    "re-engagement sequence", "results back", "weekly marketer report"):
        assert f"== {heading}" in first, heading
    assert _line(first, "orders ") == "orders 1,257"
    assert _line(first, "events ") == "events 15,405"
    assert _line(first, "data quality load-1").endswith(
        "passed (61 expectations, 0 critical failures, 0 warnings)")
    assert _line(first, "buyers ") == "buyers 379"
    assert _line(first, "rpr ") == "rpr 0.5884"
    assert _line(first, "dbt: ") == ("dbt: models 28, models_built 28, tests 209, unit_tests 0, "
                                     "failures 0, warnings 0, skipped 0")
    assert _line(first, "run weekly_promo@") == ("run weekly_promo@2026-10-26T07:00:00Z: "
                                                 "audience 327 (holdout 52)")
    for wave, expected in WAVES.items():
        got = _wave(first, wave)
        # every member a wave concerns has exactly one outcome
        assert got["audience"] == sum(v for k, v in got.items() if k != "audience"), (wave, got)
        assert got == expected, (wave, got)
    assert _line(first, "email readers") == (
        "email readers (simulated, via the signed webhook): delivered 168, bounce 3, open 58, "
        "click 11, unsubscribe 0; 0 duplicate events ignored")
    # what the stand-ins accepted is what the ledger says was sent
    assert _line(first, "ledger, sent by channel:") == (
        "ledger, sent by channel: email 171, mobile_push 74, telegram 11, web_push 26")
    assert _line(first, "accepted on the wire in this run:") == (
        "accepted on the wire in this run: email 171, push 100, telegram 11")
    assert _line(first, "reengagement.reminder ") == (  # due, planned, sent, ... by reason
        "reengagement.reminder 109 0 67 0 0 18 6 frequency cap: global: 1, no consent: 5")
    assert _line(first, "weekly_promo.email ") == "weekly_promo.email email 171 168 58 11 6 26,532 0"
    report = re.search(r"The weekly report: (\S+\.html)", first).group(1)
    html = open(report, encoding="utf-8").read()
    assert "<svg" in html and "weekly_promo" in html

    with db.connect(url) as conn:
        ledger = conn.execute("select count(*), count(*) filter (where status = 'sent') "
                              "from ops.messages").fetchone()
    assert ledger == LEDGER, ledger

    second = _demo(env)
    assert {wave: _wave(second, wave) for wave in WAVES} == WAVES
    assert "[frozen audience reused]" in second
    assert "accepted on the wire in this run: email 0, push 0, telegram 0" in second
    with db.connect(url) as conn:
        again = conn.execute("select count(*), count(*) filter (where status = 'sent') "
                             "from ops.messages").fetchone()
    assert again == ledger
