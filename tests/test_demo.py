"""The quick start's first command, end to end on a small shop, twice.

`bin/demo` is `bin/setup` followed by `python -m retention.demo`; this runs the latter in
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
    proc = subprocess.run([sys.executable, "-m", "retention.demo", "--customers", "600",
                           "--seed", "5"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _wave(out: str, wave: str) -> list[int]:
    m = re.search(rf"^\s+{wave}\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)", out, re.M)
    assert m, f"no {wave} wave line in:\n{out}"
    return [int(g.replace(",", "")) for g in m.groups()]


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
    audience, sent, failed = _wave(first, "email")
    assert sent > 0 and failed == 0 and audience >= sent
    assert _wave(first, "mobile_push")[1] > 0
    wire = re.search(r"accepted on the wire in this run: email ([\d,]+), push ([\d,]+)", first)
    assert wire and int(wire.group(1).replace(",", "")) == sent
    report = re.search(r"The weekly report: (\S+\.html)", first).group(1)
    html = open(report, encoding="utf-8").read()
    assert "<svg" in html and "weekly_promo" in html

    with db.connect(url) as conn:
        ledger = conn.execute("select count(*), count(*) filter (where status = 'sent') "
                              "from ops.messages").fetchone()
    assert ledger[1] > sent  # the cascade's other waves, trigger chains, re-engagement

    second = _demo(env)
    assert _wave(second, "email") == [audience, sent, failed]
    assert "[frozen audience reused]" in second
    assert "accepted on the wire in this run: email 0, push 0, telegram 0" in second
    with db.connect(url) as conn:
        again = conn.execute("select count(*), count(*) filter (where status = 'sent') "
                             "from ops.messages").fetchone()
    assert again == ledger
