"""The quick start: the whole pipeline end to end on a generated sample shop, as Airflow
DAG runs.

`bin/demo` generates the shop, brings the local Airflow up (`retention-dev airflow up
--readers --manual-only`: the provider stand-ins with simulated e-mail readers, the
scheduler starting only triggered runs, since the story's dates lie in the past), drops
the shop's files into the landing folder and then triggers, through Airflow's REST API
(`retention_airflow.client`), one DAG run per chapter of the story, each with the data
interval the story needs (every task takes its as_of from it):

| chapter | DAG | as of (data interval end) |
|---|---|---|
| ingest and data quality | retention_ingest | the load time, 2026-10-31 01:00 |
| lifetime tables, predicted value | retention_dbt_build | the cascade's Monday, 2026-10-26 07:00 |
| weekly promo cascade | weekly_promo_cascade | 2026-10-26 07:00 |
| trigger chains (a day's interval) | retention_triggers | 2026-10-30 12:00 |
| re-engagement | retention_reengagement | 2026-10-30 12:00 |
| results back | retention_results | the end of the data |
| weekly marketer report of the cascade's week, with the attribution marts rebuilt over every purchase until then | retention_weekly_report | the next Monday 08:00 |

While a run goes on it prints each task as it starts and ends, with the counts of its
return value; after it, what the chapter did (the waves, the ledger against what the
stand-ins accepted, the trigger tables, the campaign results). Airflow stays up at the
end for exploring the runs in its UI. The runs have fixed ids (`demo__<as of>`): a second
`bin/demo` replaces the runs of the DAGs that send (`SENDING_DAGS`: deletes each and
triggers it again with the same id and data interval), which reuses the frozen audience
and sends nothing twice, and keeps the others that succeeded (the same data gives the
same rows; `--rerun-all` replaces them too, which loads nothing new). The readers are deterministic (a digest of each
message id) and post their webhook events when the SendGrid stand-in accepts a send, so
the counts are the same on every machine and every run.

`--in-process` runs the same story without Airflow, calling the task functions in this
process (quicker to debug).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from retention import db
from retention.config import paths, settings

DEFAULT_END = datetime(2026, 10, 31, tzinfo=timezone.utc)
#: the weekly cascade's Monday run inside the sample's history, so its results come back
CASCADE_AS_OF = datetime(2026, 10, 26, 7, tzinfo=timezone.utc)
#: the end of the trigger run's interval (one day) and the re-engagement run's as_of
TRIGGERS_UNTIL = datetime(2026, 10, 30, 12, tzinfo=timezone.utc)


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(started: float) -> None:
    print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)


def run_in_process(customers: int, seed: int, verbose: bool = False) -> int:
    """The story in this process: the task functions called in order, with the stand-ins
    on a thread and the readers simulated between the waves."""
    from retention.ingest.load import load_folder

    home = paths().home
    home.mkdir(parents=True, exist_ok=True)
    if not verbose:
        # dbt's per-node lines go to its log file (dbt_project/target/logs/dbt.log); the
        # demo prints the build's counts. urllib3's retries of Google's regional-access
        # lookup (no route from here; real deployments reach it) are not the demo's news.
        os.environ.setdefault("DBT_QUIET", "true")
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

    t = _step("database")
    url = db.database_url()
    print(f"   {db.redacted_url(url)}")
    _done(t)

    shop = _generate(home, customers, seed)

    t = _step("load through the contract (bad rows to ops.quarantine)")
    loaded_at = DEFAULT_END + timedelta(hours=1)
    report = load_folder(shop, url, loaded_at=loaded_at)
    print("   " + report.format().replace("\n", "\n   "))
    _done(t)

    try:
        from retention.ingest.quality import run_checkpoint
    except ImportError:  # pragma: no cover - while the module is being built
        run_checkpoint = None
    if run_checkpoint is not None:
        t = _step("data quality checkpoint (Great Expectations)")
        quality = run_checkpoint(url, as_of=loaded_at, load_id=report.load_id)
        print("   " + (quality.format() if hasattr(quality, "format") else str(quality)).replace(
            "\n", "\n   "))
        quality.raise_for_failures()
        _done(t)

    from retention.warehouse.build import build

    t = _step(f"dbt build as of Monday {CASCADE_AS_OF:%Y-%m-%d %H:%M} UTC: customer lifetime tables")
    _print_summary(build(as_of=CASCADE_AS_OF, url=url))
    _done(t)

    t = _step("predicted customer value (BG/NBD + Gamma-Gamma)")
    from retention.warehouse.predict import write_predictions

    pred = write_predictions(url, CASCADE_AS_OF)
    _print_predictions(pred)
    _done(t)

    _ensure_promo_secret(home)
    from retention.campaigns.runner import format_waves, run_campaign
    from retention.campaigns.spec import load_campaign
    from retention.connections import channels_from_env
    from retention_dev import engagement
    from retention_dev.stack import local_provider_stack
    from retention.triggers import run_reengagement, run_triggers
    from retention.triggers.runner import LazyChannels, format_report

    with local_provider_stack() as (handle, env), engagement.webhook_receiver(url=url) as hook:
        os.environ.update(env)
        channels = LazyChannels(lambda name: channels_from_env([name])[name])

        t = _step(f"weekly promo cascade as of {CASCADE_AS_OF:%Y-%m-%d %H:%M} UTC "
                  "(local SendGrid/FCM/Telegram stand-ins)")
        print(f"   providers on {handle.base_url}; SendGrid Event Webhook receiver on {hook.url}")
        campaign = load_campaign("weekly_promo")
        readers: dict[str, dict] = {}

        def after_step(run_id: str, step: str) -> None:
            # the readers' opens, clicks, bounces and unsubscribes arrive during the wait
            readers[step] = engagement.simulate_step(hook, run_id, step, url)

        result = run_campaign(campaign, CASCADE_AS_OF, channels, url, after_step=after_step)
        print("   " + format_waves(result).replace("\n", "\n   "))
        for step, r in readers.items():
            if r.get("emails"):
                print(f"   {step} readers (simulated, via the signed webhook): "
                      + ", ".join(f"{k} {r.get(k, 0):,}" for k in
                                  ("delivered", "bounce", "open", "click", "unsubscribe"))
                      + f"; {r['duplicates']:,} duplicate events ignored")
        _print_agreement(handle, result["run_id"], url)
        _done(t)

        t = _step(f"trigger chains over the day to {TRIGGERS_UNTIL:%Y-%m-%d %H:%M} UTC")
        triggered = run_triggers(TRIGGERS_UNTIL - timedelta(days=1), TRIGGERS_UNTIL, url,
                                 channels)
        print("   " + format_report(triggered).replace("\n", "\n   "))
        _done(t)

        t = _step(f"re-engagement sequence, daily run as of {TRIGGERS_UNTIL:%Y-%m-%d %H:%M} UTC")
        reengaged = run_reengagement(TRIGGERS_UNTIL, url, channels)
        print("   " + format_report(reengaged).replace("\n", "\n   "))
        _done(t)

        from retention.warehouse.build import default_as_of
        from retention.results.pipeline import load_results

        end = default_as_of(url)
        t = _step(f"results back, and dbt build as of the end of the data, "
                  f"{end:%Y-%m-%d %H:%M} UTC (lifetime and attribution marts)")
        r = engagement.simulate_step(hook, url=url)
        print(f"   readers of the trigger e-mails (simulated, via the signed webhook): "
              f"{r.get('inserted', 0):,} new events, {r.get('duplicates', 0):,} already counted")
    loaded = load_results(end, url)
    webhook = loaded["webhook"]
    print(f"   landed webhook batches loaded: {webhook.get('files', 0)} (the receiver ingests "
          f"each batch as it lands)")
    print(f"   push, Telegram, SMS and Viber send results recorded: "
          f"{sum(loaded['send_results'].values()):,}")
    _print_summary(build(as_of=end, url=url))
    _print_campaign_results(url)
    _done(t)

    t = _step("weekly marketer report")
    from retention.results.report import write_report

    path = write_report(CASCADE_AS_OF.date(), url)
    _done(t)
    print(f"\nquick start finished. The weekly report: {path}")
    print("The warehouse stays up for exploring: `retention db` prints its URL.")
    return 0


def _print_predictions(pred: dict, label: str = "") -> None:
    """What write_predictions returned: the customers scored and the fitted parameters."""
    fit, gg = pred.get("bgnbd") or {}, pred.get("gamma_gamma") or {}
    print(f"   {label}customers scored {pred['customers']:,} "
          f"({pred['customers_with_purchases']:,} with purchases)")
    if fit:
        print("   BG/NBD r={r:.3f} alpha={alpha:.3f} a={a:.3f} b={b:.3f}".format(**fit))
    if gg:
        print("   Gamma-Gamma p={p:.3f} q={q:.3f} gamma={gamma:.3f}".format(**gg))


def _generate(home: Path, customers: int, seed: int) -> Path:
    """The sample shop's contract CSV files under RETENTION_HOME (generated once per size
    and seed: the same seed gives the same files)."""
    from retention_dev.generate import generate_shop

    t = _step(f"generate a sample shop: {customers:,} customers, seed {seed}")
    shop = home / f"sample-shop-{customers}-{seed}"
    marker = shop / ".complete"
    if not marker.exists():
        counts = generate_shop(shop, customers=customers, seed=seed, end=DEFAULT_END)
        marker.write_text("ok\n")
    else:
        counts = {p.name.split(".")[0]: sum(1 for _ in open(p)) - 1 for p in sorted(shop.glob("*.csv"))}
        print("   (already generated; same seed gives the same files)")
    for table, n in counts.items():
        print(f"   {table:<24}{n:>12,}")
    _done(t)
    return shop


# --------------------------------------------------------------------------- through Airflow

#: the kept reports in the Airflow UI, when the reports plugin cannot be imported
REPORTS_UI_PATH = "/plugin/retention-reports/retention/reports"


def report_url(base_url: str, name: str) -> str:
    """The weekly report `name` in the Airflow UI (the retention_reports plugin's view)."""
    try:
        from retention_airflow.report_link import report_url_in_ui
    except ImportError:
        return f"{base_url}{REPORTS_UI_PATH}/{name}"
    return report_url_in_ui(name, base_url)

#: the weekly report's run: the Monday after the cascade's week, at its schedule's hour
REPORT_AS_OF = CASCADE_AS_OF + timedelta(days=7, hours=1)
#: the DAGs the story runs (unpaused before the first run; paused DAGs' runs wait)
STORY_DAGS = ("retention_ingest", "retention_dbt_build", "weekly_promo_cascade",
              "retention_triggers", "retention_reengagement", "retention_results",
              "retention_weekly_report")
#: the DAGs whose timetable gives a run the interval before its time (CronDataIntervalTimetable):
#: the story gives them a day's interval; the others run at an instant (start = end)
#: the DAGs whose runs a second demo always runs again: the ones that send, to show that
#: nothing goes out twice (the others are kept when they succeeded: same data, same rows)
SENDING_DAGS = ("weekly_promo_cascade", "retention_triggers", "retention_reengagement")
INTERVAL_DAGS = {"retention_triggers": timedelta(days=1), "retention_reengagement": timedelta(days=1)}


class DemoFailed(RuntimeError):
    """A DAG run of the story did not succeed (the message says which, and where to look)."""


def run_id_for(as_of: datetime) -> str:
    """The story's run id of a DAG run as of `as_of`: fixed, so a second demo finds it."""
    return f"demo__{as_of.astimezone(timezone.utc):%Y-%m-%dT%H:%M}"


def _ui_line(line: str) -> None:
    print(f"   {line}", flush=True)


def _airflow_up(local, port: int | None, metadata_database: str) -> bool:
    """The demo's Airflow: left as it is when the demo started it and it still runs with
    its stand-ins; otherwise (not running, or started without the simulated readers and
    manual-only scheduling) stopped and started again. True if started now."""
    import json

    from retention_airflow.local import DEFAULT_PORT
    from retention_dev.cli import airflow_up, providers_info, stop_providers

    marker = local.home / "demo.json"
    status = local.status()
    info = providers_info()
    try:
        ours = json.loads(marker.read_text()).get("scheduler") == \
            local.pid_file("scheduler").read_text()
    except (OSError, ValueError):
        ours = False
    if all(status.values()) and ours and info and info.get("readers"):
        _ui_line(f"already running for the demo at {local.base_url} (PIDs "
                 + ", ".join(f"{c} {p}" for c, p in status.items()) + ")")
        return False
    if any(status.values()) or info:
        _ui_line("a local Airflow or its stand-ins run without the demo's settings "
                 "(simulated readers, triggered runs only): stopping them first")
        local.down()
        stop_providers()
    airflow_up(local, port=port or DEFAULT_PORT, metadata_database=metadata_database,
               readers=True, manual_only=True, out=_ui_line)
    marker.write_text(json.dumps({"scheduler": local.pid_file("scheduler").read_text()}))
    return True


def _wire(info: dict | None) -> dict[str, int]:
    """What the demo's stand-ins accepted so far (their process serves the counts)."""
    import json
    from urllib import request as urlrequest

    if not info or not info.get("wire_counts_url"):
        raise DemoFailed("the provider stand-ins are not running (retention-dev airflow down, "
                         "then bin/demo again)")
    opener = urlrequest.build_opener(urlrequest.ProxyHandler({}))
    with opener.open(f"{info['wire_counts_url']}/accepted", timeout=30) as resp:
        return json.loads(resp.read())


def _drop_shop(shop: Path) -> Path | None:
    """The shop's files as a drop in the landing folder (`_SUCCESS` written last); None
    when a drop of that name was loaded before (the ingest run finds nothing new)."""
    import shutil

    from retention.ingest.landing import READY_MARKER, landing_dir

    root = landing_dir()
    if (root / "loaded" / shop.name).exists():
        return None
    drop = root / "incoming" / shop.name
    drop.mkdir(parents=True, exist_ok=True)
    for path in sorted(shop.iterdir()):
        if path.name.endswith((".csv", ".csv.gz")):
            shutil.copyfile(path, drop / path.name)
    (drop / READY_MARKER).write_text("")
    return drop


def _count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def task_summary(task_id: str, value: object) -> str:
    """A task's return value in a few words: its counts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return Path(value).name if "/" in value else value
    if isinstance(value, list):
        if value and all(isinstance(v, dict) and "load_id" in v for v in value):
            return "; ".join(
                f"load {v['load_id']}: " + ", ".join(
                    f"{k} {sum(t.get(k, 0) for t in v['tables'].values()):,}"
                    for k in ("rows", "inserted", "updated", "quarantined"))
                for v in value)
        return f"{len(value)} item(s)"
    if not isinstance(value, dict):
        return str(value)[:120]
    if isinstance(value.get("dbt"), dict):
        d = value["dbt"]
        return ", ".join(f"{k} {d[k]:,}" for k in ("models_built", "tests", "failures", "skipped")
                         if isinstance(d.get(k), int))
    if task_id == "start_run":
        return (f"audience {value.get('audience_size', 0):,} (holdout {value.get('holdout_size', 0):,})"
                + ("" if value.get("created", True) else ", frozen audience reused"))
    if task_id == "predicted_value":
        return (f"customers scored {value.get('customers', 0):,} "
                f"({value.get('customers_with_purchases', 0):,} with purchases)")
    if task_id == "load_results":
        webhook = value.get("webhook") or {}
        sends = value.get("send_results") or {}
        return (f"webhook batches loaded {webhook.get('files', 0):,}, send results recorded "
                f"{sum(v for v in sends.values() if isinstance(v, int)):,}")
    if task_id == "run_triggers":
        return (f"chains started {sum(t.get('started', 0) for t in value.values()):,}, "
                f"extended {sum(t.get('extended', 0) for t in value.values()):,}, "
                f"flagged {sum(1 for t in value.values() if t.get('flagged'))}")
    if task_id.startswith(("plan_", "send_", "deliver_deferred_")):
        value = {k: value.get(k) for k in ("audience", "sent", "failed", "unknown", "holdout",
                                           "planned", "waiting", "suppressed") if k in value}
        if "planned" in value:
            value["waiting"] = value.pop("planned")
    ints = [(k, v) for k, v in value.items() if isinstance(v, int) and not isinstance(v, bool)]
    if ints:
        return ", ".join(f"{k} {v:,}" for k, v in ints[:8])
    return ", ".join(f"{k}" for k in list(value)[:6])


class _Progress:
    """Prints the tasks of a run as they start and end (with their counts) and keeps the
    last state seen of each."""

    def __init__(self, client) -> None:
        self.client = client
        self.last: dict[str, object] = {}

    def __call__(self, change) -> None:
        self.last[change.task_id] = change
        label = f"   {change.dag_id}  {change.task_id}"
        if change.state == "running":
            print(f"{label} running", flush=True)
        elif change.state == "success":
            took = f" ({change.duration:.1f} s)" if change.duration is not None else ""
            task_id = change.task_id.split("[")[0]
            counts = task_summary(task_id, self.client.xcom(
                change.dag_id, change.run_id, task_id, map_index=change.map_index))
            print(f"{label} success{took}" + (f": {counts}" if counts else ""), flush=True)
        elif change.state in ("skipped", "upstream_failed", "failed", "up_for_retry",
                              "up_for_reschedule", "deferred", "removed"):
            print(f"{label} {change.state}", flush=True)


def _story_run(client, title: str, dag_id: str, as_of: datetime, timeout: float,
               timings: list[tuple[str, float]], rerun_all: bool = False):
    """Trigger the story's run of `dag_id` as of `as_of` (an earlier demo's run: replaced
    when the DAG sends or the run did not succeed or `rerun_all`, else kept), print its
    tasks as they go, and return it with the progress (the tasks' last states)."""
    from retention_airflow.client import RunTimeout

    start = as_of - INTERVAL_DAGS.get(dag_id, timedelta(0))
    run_id = run_id_for(as_of)
    interval = (f"data interval {start:%Y-%m-%d %H:%M} .. {as_of:%Y-%m-%d %H:%M} UTC"
                if start != as_of else f"as of {as_of:%Y-%m-%d %H:%M} UTC")
    t = _step(f"{title}: DAG run {dag_id} / {run_id} ({interval})")
    # an earlier demo's run is replaced rather than cleared: a cleared task runs as a further
    # try, which retention_dbt_build's layer tasks take for a retry (`dbt retry` of the
    # target folder's last invocation) instead of a build
    earlier = client.dag_run(dag_id, run_id)
    keep = (earlier is not None and earlier.state == "success" and not rerun_all
            and dag_id not in SENDING_DAGS)
    run = client.start_run(dag_id, run_id, logical_date=start, data_interval=(start, as_of),
                           existing="keep" if keep else "replace",
                           note="the quick start (bin/demo)")
    if keep:
        print("   run exists from an earlier demo and succeeded: kept (`bin/demo --rerun-all` "
              "runs it again)", flush=True)
    elif earlier is not None:
        print("   run exists from an earlier demo: replaced by a new run of the same id, "
              "triggered through the REST API", flush=True)
    else:
        print("   triggered through the REST API", flush=True)
    progress = _Progress(client)
    try:
        run = client.wait(run, timeout=timeout, poll=1.0, on_task=progress)
    except RunTimeout as exc:
        raise DemoFailed(f"{exc}\n   see {client.ui_run_url(dag_id, run_id)}") from None
    elapsed = time.perf_counter() - t
    timings.append((f"{dag_id} as of {as_of:%Y-%m-%d %H:%M}", elapsed))
    if run.state != "success":
        failed = [c for c in progress.last.values() if c.state in ("failed", "upstream_failed")]
        for change in failed:
            if change.state != "failed":
                continue
            events = client.task_log(dag_id, run_id, change.task_id, change.try_number)
            print(f"   --- {change.task_id}, try {change.try_number}, last log lines:")
            for e in events[-25:]:
                print(f"   {e.get('level', ''):<8}{e.get('event', '')}")
        raise DemoFailed(f"{dag_id} run {run_id} ended {run.state} (failed: "
                         f"{', '.join(c.task_id for c in failed) or '-'}); see "
                         f"{client.ui_run_url(dag_id, run_id)}")
    return run, progress, t


def _xcom(client, run, progress, task_id: str):
    """The return value of a task that succeeded in this run (None otherwise)."""
    change = progress.last.get(task_id)
    if change is None or change.state != "success":
        return None
    return client.xcom(run.dag_id, run.run_id, task_id)


def _print_ingest(client, run, progress, url: str | None) -> None:
    from retention.ingest.quality import CRITICAL

    loads = _xcom(client, run, progress, "load_drops")
    if not loads:
        print("   no new drop in the landing folder: the shop's drop was loaded by an earlier "
              "run, so nothing is loaded again")
        return
    for load in loads:
        print(f"   load {load['load_id']} from {load['source']} (currency {load.get('currency') or '-'})")
        print(f"     {'table':<24}{'rows':>12}{'accepted':>12}{'new':>12}{'updated':>10}"
              f"{'quarantined':>13}")
        for table, n in load["tables"].items():
            print(f"     {table:<24}{n['rows']:>12,}{n['accepted']:>12,}{n['inserted']:>12,}"
                  f"{n['updated']:>10,}{n['quarantined']:>13,}")
            for reason, k in sorted(n.get("reasons", {}).items(), key=lambda kv: -kv[1]):
                print(f"         {k:>10,}  {reason}")
        with db.connect(url) as conn:
            row = conn.execute(
                "select run_key, max(as_of), count(*), "
                "count(*) filter (where not success and severity = %s), "
                "count(*) filter (where not success and severity <> %s) "
                "from ops.data_quality_results where load_id = %s group by 1",
                (CRITICAL, CRITICAL, load["load_id"])).fetchone()
        if row:
            key, as_of, n, critical, warnings = row
            print(f"   data quality {key} as of {as_of.isoformat()}: "
                  f"{'passed' if not critical else 'FAILED'} ({n} expectations, "
                  f"{critical} critical failures, {warnings} warnings)")


def _print_build(client, run, progress, as_of: datetime, url: str | None) -> None:
    """The headline numbers of the marts as of the run's time, the dbt counts of every
    layer task summed, and the predicted value."""
    from retention.warehouse.build import summary

    totals: dict[str, int] = {}
    for task_id in sorted(progress.last):
        if not task_id.startswith("dbt_") or task_id == "dbt_docs":
            continue
        value = _xcom(client, run, progress, task_id)
        for k, v in ((value or {}).get("dbt") or {}).items():
            if isinstance(v, int) and not isinstance(v, bool):
                totals[k] = totals.get(k, 0) + v
    _print_summary({"as_of": as_of.isoformat(), **summary(url, as_of)})
    print("   dbt (every layer task): " + ", ".join(
        f"{k} {totals.get(k, 0)}" for k in ("models", "models_built", "tests", "unit_tests",
                                            "failures", "warnings", "skipped")))
    pred = _xcom(client, run, progress, "predicted_value") or {}
    if pred:
        _print_predictions(pred, "predicted value: ")


def _print_cascade(client, run, progress, url: str | None, wire: dict[str, int]) -> None:
    from retention.campaigns.engine import step_counts
    from retention.campaigns.runner import format_waves
    from retention.campaigns.spec import load_campaign

    started = _xcom(client, run, progress, "start_run")
    campaign = load_campaign(started["campaign_id"])
    waves = []
    for step in campaign.steps:
        counts = step_counts(started["run_id"], step.name, url)
        counts["step"] = step.name
        waves.append(counts)
    print("   " + format_waves({
        "run_id": started["run_id"], "audience_size": started["audience_size"],
        "holdout_size": started["holdout_size"],
        "reused_frozen_audience": not started["created"], "waves": waves}).replace("\n", "\n   "))
    with db.connect(url) as conn:
        rows = conn.execute("""
            select m.step, e.event_type, count(*) from ops.messages m
            join ops.message_events e on e.message_id = m.message_id
            where m.run_id = %s and m.channel = 'email' group by 1, 2""",
                            (started["run_id"],)).fetchall()
    by_step: dict[str, dict[str, int]] = {}
    for step, kind, n in rows:
        by_step.setdefault(step, {})[kind] = n
    for step, kinds in by_step.items():
        print(f"   {step} readers (simulated at the SendGrid stand-in, via the signed webhook): "
              + ", ".join(f"{k} {kinds.get(k, 0):,}"
                          for k in ("delivered", "bounce", "open", "click", "unsubscribe")))
    _print_ledger_and_wire(started["run_id"], url, wire)


def _print_printed(client, run, progress, task_id: str) -> None:
    """What the task printed (its report table), from its log."""
    change = progress.last.get(task_id)
    if change is None:
        return
    text = client.printed(run.dag_id, run.run_id, task_id, change.try_number)
    if text.strip():
        print("   " + text.rstrip().replace("\n", "\n   "))


def run_airflow(customers: int, seed: int, *, port: int | None = None,
                metadata_database: str = "airflow_meta", run_timeout: float = 900.0,
                rerun_all: bool = False) -> int:
    """The story as DAG runs of the local Airflow (see the module docstring)."""
    from retention_airflow.client import AirflowClient
    from retention_airflow.local import LocalAirflow, LocalAirflowError
    from retention_dev.cli import ProvidersError, providers_info

    begun = time.perf_counter()
    home = paths().home
    home.mkdir(parents=True, exist_ok=True)
    timings: list[tuple[str, float]] = []

    t = _step("database")
    url = db.database_url()
    print(f"   {db.redacted_url(url)}")
    _done(t)
    shop = _generate(home, customers, seed)
    _ensure_promo_secret(home)  # the components inherit it from this environment

    t = _step("local Airflow with the provider stand-ins and simulated e-mail readers")
    local = LocalAirflow(out=_ui_line)
    try:
        started = _airflow_up(local, port, metadata_database)
    except (LocalAirflowError, ProvidersError) as exc:
        print(f"bin/demo: Airflow did not start: {exc}", file=sys.stderr)
        return 1
    timings.append(("Airflow up" if started else "Airflow already up", time.perf_counter() - t))
    _done(t)
    client = AirflowClient.local(local)
    for dag_id in STORY_DAGS:
        if client.unpause(dag_id):
            print(f"   unpaused {dag_id}")
    info = providers_info()
    wire_begin = _wire(info)

    try:
        t = _step("drop the shop's files into the landing folder")
        drop = _drop_shop(shop)
        print(f"   {drop} (+ _SUCCESS)" if drop else
              f"   {shop.name} was loaded before (in the landing folder's loaded/): no new drop")
        _done(t)

        loaded_at = DEFAULT_END + timedelta(hours=1)
        run, progress, t = _story_run(client, "load through the contract and data quality "
                                      "checkpoint", "retention_ingest", loaded_at, run_timeout,
                                      timings, rerun_all)
        _print_ingest(client, run, progress, url)
        _done(t)

        run, progress, t = _story_run(client, "dbt build of the customer lifetime tables and "
                                      "the predicted customer value", "retention_dbt_build",
                                      CASCADE_AS_OF, run_timeout, timings, rerun_all)
        _print_build(client, run, progress, CASCADE_AS_OF, url)
        _done(t)

        before = _wire(info)
        run, progress, t = _story_run(client, "weekly promo cascade (local SendGrid/FCM/"
                                      "Telegram stand-ins)", "weekly_promo_cascade",
                                      CASCADE_AS_OF, run_timeout, timings, rerun_all)
        after = _wire(info)
        print(f"   providers on {info['providers_url']}; simulated readers post to the "
              f"SendGrid Event Webhook receiver on {info['receiver_url']}")
        _print_cascade(client, run, progress, url,
                       {k: after.get(k, 0) - before.get(k, 0) for k in after})
        _done(t)

        run, progress, t = _story_run(client, "trigger chains over a day", "retention_triggers",
                                      TRIGGERS_UNTIL, run_timeout, timings, rerun_all)
        _print_printed(client, run, progress, "run_triggers")
        _done(t)

        run, progress, t = _story_run(client, "re-engagement sequence, the daily run",
                                      "retention_reengagement", TRIGGERS_UNTIL, run_timeout,
                                      timings, rerun_all)
        _print_printed(client, run, progress, "run_reengagement")
        _done(t)

        from retention.warehouse.build import default_as_of

        end = default_as_of(url)
        run, progress, t = _story_run(client, "results back (webhook batches, send results, "
                                      "attribution)", "retention_results", end, run_timeout,
                                      timings, rerun_all)
        loaded = _xcom(client, run, progress, "load_results") or {}
        print(f"   landed webhook batches loaded: {(loaded.get('webhook') or {}).get('files', 0)} "
              f"(the receiver ingests each batch as it lands)")
        print(f"   push, Telegram, SMS and Viber send results recorded: "
              f"{sum((loaded.get('send_results') or {}).values()):,}")
        _done(t)

        run, progress, t = _story_run(client, "weekly marketer report of the cascade's week "
                                      "(results and attribution as of the next Monday)",
                                      "retention_weekly_report", REPORT_AS_OF, run_timeout,
                                      timings, rerun_all)
        report = _xcom(client, run, progress, "write_report")
        _print_campaign_results(url)
        _done(t)
    except DemoFailed as exc:
        print(f"\nbin/demo: {exc}", file=sys.stderr)
        print(f"Airflow is left up at {client.base_url} for a look; "
              "`retention-dev airflow down` stops it.", file=sys.stderr)
        return 1

    wire_end = _wire(info)
    print("\n== timings (wall clock)")
    for what, seconds in timings:
        print(f"   {what:<58}{seconds:>7.1f} s")
    print(f"   {'the whole demo':<58}{time.perf_counter() - begun:>7.1f} s")
    print("\nquick start finished: every DAG run of the story is green.")
    print("accepted on the wire during this demo: " + ", ".join(
        f"{k} {wire_end.get(k, 0) - wire_begin.get(k, 0):,}" for k in ("email", "push", "telegram")))
    print(f"The weekly report: {report}")
    print(f"   in the Airflow UI: {report_url(client.base_url, Path(report).name)}")
    print(f"Airflow UI: {client.base_url} (the story's runs are the ones named demo__...)")
    print(f"   log in as `admin`: the password is in {local.passwords_file}")
    print("   only triggered runs start (the schedules are off: the sample's dates lie in the past)")
    print("Airflow is left up for exploring; `retention-dev airflow down` stops it and the "
          "stand-ins.")
    return 0


def _print_summary(summary: dict) -> None:
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        if not isinstance(value, (dict, list)):
            print(f"   {key:<42}{value}")
    dbt = summary.get("dbt")
    if isinstance(dbt, dict):
        print("   dbt: " + ", ".join(f"{k} {v}" for k, v in dbt.items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)))


def _ensure_promo_secret(home: Path) -> None:
    """Promo codes and unsubscribe links are keyed by RETENTION_PROMO_SECRET. The demo
    makes one for this machine (kept in RETENTION_HOME, never in the repository)."""
    if settings().promo_secret:
        return
    keep = home / "demo_promo_secret"
    try:
        # created owner-only: no moment in which another user could read it
        fd = os.open(keep, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if keep.stat().st_mode & 0o077:
            keep.chmod(0o600)
    else:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secrets.token_urlsafe(32))
    os.environ["RETENTION_PROMO_SECRET"] = keep.read_text().strip()


def _print_agreement(handle, run_id: str, url: str) -> None:
    """The ledger against what the provider stand-ins accepted on the wire during this run
    (on a re-run of the demo the ledger already has every message, so nothing goes out)."""
    from retention_dev.stack import wire_counts

    _print_ledger_and_wire(run_id, url, wire_counts(handle))


def _print_ledger_and_wire(run_id: str, url: str | None, wire: dict[str, int]) -> None:
    with db.connect(url) as conn:
        rows = conn.execute("select channel, count(*) from ops.messages where run_id = %s "
                            "and status = 'sent' group by 1 order by 1", (run_id,)).fetchall()
    print("   ledger, sent by channel: " + ", ".join(f"{c} {n:,}" for c, n in rows))
    print("   accepted on the wire in this run: "
          + ", ".join(f"{k} {wire.get(k, 0):,}" for k in ("email", "push", "telegram")))


def _print_campaign_results(url: str) -> None:
    """marts.campaign_results per campaign step and channel (all runs): the treated arms,
    and the holdout beside them (retention.results.summary, as `retention results` prints)."""
    from retention.results.summary import format_step_results, step_results

    with db.connect(url) as conn:
        rows = step_results(conn)
    for line in format_step_results(rows):
        print("   " + line)


def main(argv: list[str] | None = None) -> int:
    from retention_dev.cli import add_airflow_arguments

    parser = argparse.ArgumentParser(prog="bin/demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show dbt's per-model lines and library warnings (--in-process)")
    parser.add_argument("--in-process", action="store_true",
                        help="the same story without Airflow: the task functions in this process")
    add_airflow_arguments(parser)
    parser.add_argument("--run-timeout", type=float, default=900.0,
                        help="seconds each DAG run may take")
    parser.add_argument("--rerun-all", action="store_true",
                        help="run every story run of an earlier demo again (by default only "
                             "the sending ones are, the others kept when they succeeded)")
    args = parser.parse_args(argv)
    if args.in_process:
        return run_in_process(args.customers, args.seed, args.verbose)
    return run_airflow(args.customers, args.seed, port=args.port,
                       metadata_database=args.metadata_database, run_timeout=args.run_timeout,
                       rerun_all=args.rerun_all)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
