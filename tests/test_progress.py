"""Progress of long work (`retention.progress`) and the command line's answer when the
warehouse cannot be reached: plain lines in logs, a bar on a terminal, wired into the dbt
build (its events), a campaign's steps (the dispatcher's batches) and a load (the
server's COPY progress), each run for real."""

from __future__ import annotations

import io
import os
import re
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from retention.progress import Progress, human_seconds

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.unit
def test_plain_lines_at_most_every_interval_with_rate_and_time_left():
    clock, out = Clock(), io.StringIO()
    bar = Progress("load", 1_172_135, "rows", mode="auto", interval=2, stream=out, clock=clock)
    assert bar.mode == "lines"  # not a terminal
    clock.now = 1.0
    bar.update(50_000)
    assert out.getvalue() == ""  # 1 s since the start: too early
    clock.now = 2.0
    bar.update(70_000)
    assert out.getvalue() == "load: rows 120,000/1,172,135 (10%) 60,000 rows/s, 18 s left\n"
    clock.now = 3.5
    bar.update(100_000)
    assert out.getvalue().count("\n") == 1  # 1.5 s since the last line
    clock.now = 4.0
    bar.update(0)
    assert out.getvalue().splitlines()[-1] == \
        "load: rows 220,000/1,172,135 (19%) 55,000 rows/s, 17 s left"
    clock.now = 130.0
    bar.update(952_135)  # at the total: no periodic line, the last one follows
    assert out.getvalue().count("\n") == 2
    bar.close()
    bar.close()
    assert out.getvalue().splitlines()[2:] == [
        "load: rows 1,172,135/1,172,135 (100%) in 2 min 10 s, 9,016 rows/s"]


@pytest.mark.unit
def test_bytes_the_total_learned_late_and_a_failed_end():
    clock, out = Clock(), io.StringIO()
    bar = Progress("load orders.csv", None, "B", mode="lines", interval=0, stream=out, clock=clock)
    clock.now = 30.0  # preparation (dbt's parse, say) before the total is known
    bar.set_total(450_000_000)
    clock.now = 32.0
    bar.set_done(120_000_000)
    assert out.getvalue() == "load orders.csv: 120.0 MB/450.0 MB (27%) 60.0 MB/s, 6 s left\n"
    bar.describe("load events.csv")
    with pytest.raises(RuntimeError), bar:
        raise RuntimeError("the error tells the rest")
    assert out.getvalue().count("\n") == 1  # no summary line for work that failed
    assert human_seconds(3725) == "1 h 2 min"


@pytest.mark.unit
def test_updates_from_many_threads_all_count():
    bar = Progress("send", 8_000, "messages", mode="lines", interval=3600, stream=io.StringIO())
    threads = [threading.Thread(target=lambda: [bar.update(1) for _ in range(1000)])
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bar.done == 8_000


@pytest.mark.unit
def test_a_terminal_gets_a_live_bar():
    out = Terminal()
    with Progress("build", 4, "nodes", mode="auto", stream=out) as bar:
        assert bar.mode == "bar"
        bar.update(4)
    text = out.getvalue()
    assert "\r" in text and "build" in text and "4/4" in text and "nodes" in text


def _cli_env(home: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RETENTION_", "AIRFLOW_CONN_")) and k != "DATABASE_URL"}
    env.update(RETENTION_HOME=str(home), RETENTION_DATABASE_URL=url,
               PYTHONPATH=str(ROOT / "plugins"))
    return env


@pytest.mark.unit
def test_an_unreachable_warehouse_is_one_line_naming_it_without_the_password(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        password = secrets.token_urlsafe(12)
        url = f"postgresql://retention:{password}@127.0.0.1:{port}/warehouse"
        folder = tmp_path / "shop"
        folder.mkdir()
        (folder / "customers.csv").write_text("customer_id,email,created_at\n"
                                              "c1,a@example.com,2026-10-01T00:00:00Z\n")
        expected = (f"retention: cannot reach the warehouse at "
                    f"postgresql://retention:***@127.0.0.1:{port}/warehouse: connection refused")
        for args in (["load", str(folder)], ["build"], ["db", "current"],
                     ["triggers", "--until", "2026-11-02T10:00:00Z"]):
            run = subprocess.run([sys.executable, "-m", "retention.cli", *args],
                                 env=_cli_env(tmp_path / "home", url), capture_output=True,
                                 text=True, timeout=120, cwd=ROOT)
            assert run.returncode == 2, (args, run.stdout, run.stderr)
            assert run.stderr.strip() == expected, (args, run.stderr)
            assert "Traceback" not in run.stdout + run.stderr
            assert password not in run.stdout + run.stderr


def test_build_shows_nodes_done_of_the_total(database_url, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "retention.cli", "--progress", "lines", "--progress-interval", "0",
         "build", "--as-of", "2026-11-01T00:00:00Z", "--select", "stg_events stg_product_changes"],
        env=_cli_env(tmp_path / "home", database_url), capture_output=True, text=True,
        timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("build as of ")]
    counts = [re.search(r"nodes (\d+)/(\d+) \(\d+%\)", line).groups() for line in lines]
    total = int(counts[0][1])
    assert total >= 2 and {int(t) for _, t in counts} == {total}
    # one line per finished node (interval 0) but the last, whose line is the summary
    assert [int(d) for d, _ in counts] == [*range(1, total), total], lines
    assert re.fullmatch(rf"build as of 2026-11-01T00:00:00\+00:00: nodes {total}/{total} "
                        r"\(100%\) in (\d+ min )?\d+ s, [\d.]+ nodes/s", lines[-1]), lines[-1]


def test_a_campaign_step_shows_messages_sent_of_those_planned(database_url, monkeypatch, capsys):
    from retention import progress
    from retention.campaigns.runner import run_campaign
    from retention.campaigns.spec import parse_campaign
    from retention.connections import channels_from_env
    from retention_dev.stack import local_provider_stack
    from test_dispatch import AS_OF, CASCADE, POLICY, _shop

    monkeypatch.setenv("RETENTION_PROMO_SECRET", secrets.token_hex(16))
    monkeypatch.setitem(progress._defaults, "mode", "lines")
    monkeypatch.setitem(progress._defaults, "interval", 3600.0)
    _shop(database_url, 200)
    with local_provider_stack() as (_, env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        result = run_campaign(parse_campaign(CASCADE, "cascade.yaml"), AS_OF,
                              channels_from_env(["email", "mobile_push", "telegram"]),
                              policy=POLICY)
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("campaign cascade step ")]
    assert len(lines) == 3, lines  # one summary per step (no periodic line within an hour)
    for wave, line in zip(result["waves"], lines):
        sent = wave["sent"] + wave["failed"] + wave["unknown"]
        assert sent > 0
        assert line.startswith(f"campaign cascade step {wave['step']}: messages "
                               f"{sent:,}/{sent + wave['planned']:,} ("), (line, wave)


def test_a_load_shows_bytes_streamed_per_file(database_url, tmp_path):
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "customers.csv").write_text("customer_id,email,created_at\n"
                                          "c1,a@example.com,2026-10-01T00:00:00Z\n")
    (folder / "orders.csv").write_text("order_id,customer_id,ordered_at,status,total_amount\n"
                                       "o1,c1,2026-10-30T10:00:00Z,paid,10\n")
    # ~60 MB: its COPY lasts many of the watcher's polls (every 0.05 s with interval 0)
    with open(folder / "events.csv", "w") as f:
        f.write("event_id,occurred_at,event_type,customer_id,session_id,product_id\n")
        for i in range(600_000):
            f.write(f"e{i:09d},2026-10-{1 + i % 28:02d}T10:00:00Z,view,c1,s{i // 10:08d},"
                    f"p{i % 500:05d}-a-rather-long-product-identifier-to-fill-bytes\n")
    total = sum(p.stat().st_size for p in folder.iterdir())
    run = subprocess.run(
        [sys.executable, "-m", "retention.cli", "--progress", "lines", "--progress-interval", "0",
         "load", str(folder), "--loaded-at", "2026-11-01T00:00:00Z", "--currency", "UAH"],
        env=_cli_env(tmp_path / "home", database_url), capture_output=True, text=True,
        timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("load")]
    # the server's COPY progress, seen while the events file streamed
    streaming = [line for line in lines if line.startswith("load events.csv: ")]
    assert streaming, run.stderr
    # bytes read so far, as the line gives them (`0 B`, `512.0 KB`, `3.2 MB`, ...)
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    done = [float(m.group(1)) * scale[m.group(2)] / 1e6
            for m in (re.search(r": ([\d.]+) (B|KB|MB|GB)/", line) for line in streaming)]
    assert done == sorted(done) and done[-1] <= total / 1e6 + 0.05
    assert re.fullmatch(rf"load: {total / 1e6:.1f} MB/{total / 1e6:.1f} MB \(100%\) in \d+ s, "
                        r"[\d.]+ [KM]B/s", lines[-1]), lines[-1]


def test_send_shards_each_show_the_whole_step(database_url, monkeypatch, capsys):
    """Two dispatchers of one step (the DAG's send shards, as threads here) each print
    the step's progress, not their own share: messages out of those due when it began,
    ending at all of them."""
    import threading

    from retention import db, progress
    from retention.campaigns.dispatch import dispatch_step
    from retention.campaigns.engine import plan_step, start_run, step_time
    from retention.campaigns.runner import step_progress
    from retention.campaigns.spec import parse_campaign
    from retention.connections import channels_from_env
    from retention_dev.stack import local_provider_stack
    from test_dispatch import AS_OF, CASCADE, POLICY, _shop

    monkeypatch.setenv("RETENTION_PROMO_SECRET", secrets.token_hex(16))
    monkeypatch.setitem(progress._defaults, "mode", "lines")
    monkeypatch.setitem(progress._defaults, "interval", 0.0)
    _shop(database_url, 300)
    campaign = parse_campaign(CASCADE, "cascade.yaml")
    step = campaign.steps[0]
    with local_provider_stack() as (_, env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        run = start_run(campaign, AS_OF, policy=POLICY)
        plan_step(campaign, run, step.name, policy=POLICY)
        at = step_time(campaign, run, step)
        with db.connect(database_url) as conn:
            due = conn.execute("select count(*) from ops.messages where run_id = %s and step = %s "
                               "and status = 'planned' and not_before <= %s",
                               (run.run_id, step.name, at)).fetchone()[0]
        assert due > 100
        errors = []

        def shard(i: int) -> None:
            try:
                with step_progress(campaign, run.run_id, step.name, at, f"shard {i + 1}/2") as cb:
                    dispatch_step(campaign, run, step.name,
                                  channels_from_env(list(step.channels)), on_batch=cb)
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

        threads = [threading.Thread(target=shard, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    err = capsys.readouterr().err.splitlines()
    for i in (1, 2):
        prefix = f"campaign cascade step {step.name} (shard {i}/2): messages "
        mine = [line[len(prefix):] for line in err if line.startswith(prefix)]
        assert mine, err
        done = [int(m.split("/")[0].replace(",", "")) for m in mine]
        assert done == sorted(done), mine
        assert all(f"/{due:,} (" in m for m in mine), mine
        # the last line: the whole step out, whichever shard sent it
        assert mine[-1].startswith(f"{due:,}/{due:,} (100%) in "), mine
