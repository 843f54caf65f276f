"""`retention`: the command line of the pipeline, for operators and the quick start.

Every subcommand calls the same functions the Airflow tasks call. Long work (a load, a
build, a campaign's steps) shows its progress on stderr (`retention.progress`: a live bar
on a terminal, else a plain line every `--progress-interval` seconds). A warehouse that
cannot be reached is one line naming it (password hidden) and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

from retention.config import Settings


def timestamp(value: str) -> datetime:
    """An ISO-8601 timestamp argument (UTC when it names no zone)."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 timestamp: {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def cmd_db(args: argparse.Namespace) -> int:
    from retention import db

    if args.stop:
        print("embedded PostgreSQL stopped" if db.stop_embedded() else "embedded PostgreSQL was not running")
        return 0
    if args.action in ("upgrade", "current"):
        from retention.db import schema

        try:
            if args.action == "upgrade":
                schema.upgrade()
        except schema.UnknownRevision as exc:
            print(f"retention: {exc}", file=sys.stderr)
            return 2
        revision, head = schema.current(), schema.head()
        if revision == head:
            print(f"at {head} (head)" if args.action == "upgrade" else f"{head} (head)")
        elif revision is None:
            print("none (not migrated)")
        else:
            print(f"{revision} (head is {head}: run `retention db upgrade`)")
        return 0
    url = db.database_url()
    print(url if args.show_password else db.redacted_url(url))
    return 0


def _copy_bytes(path: Path) -> int:
    """The bytes COPY receives from a file: its size, or a gzip file's uncompressed size
    from its trailer (modulo 4 GiB, so an estimate for larger members)."""
    size = path.stat().st_size
    if path.name.endswith(".gz") and size >= 18:
        with open(path, "rb") as f:
            f.seek(-4, 2)
            return int.from_bytes(f.read(4), "little") or size
    return size


def _load_files(path: Path, fmt: str) -> list[Path]:
    """The files a load streams, in the order it streams them."""
    if fmt != "contract":
        return [path]
    from retention.ingest.contract import LOAD_ORDER
    from retention.ingest.load import discover

    files, _ = discover(path)
    return [files[name] for name in LOAD_ORDER if name in files]


def _copy_columns(query: str) -> list[str] | None:
    """The column list of a `copy stage ("a", "b") from stdin` statement."""
    head, _, rest = query.partition("(")
    if not head.strip().lower().startswith("copy"):
        return None
    return [c.strip().strip('"') for c in rest.partition(")")[0].split(",")]


class _CopyWatch:
    """Progress of a load seen from outside it: a second session polls PostgreSQL's
    `pg_stat_progress_copy` for the COPY of the load's own session (told apart by its
    application name; the statement's column list tells which file it streams) and moves
    a bytes bar over the input files. A server without that
    view (before PostgreSQL 14) shows no bar; the load itself is never affected."""

    def __init__(self, path: Path, fmt: str) -> None:
        import os
        import secrets
        import threading
        import time

        from retention.progress import progress

        from retention.ingest.load import read_header

        try:
            self.files = _load_files(path, fmt)
            self.sizes = [_copy_bytes(f) for f in self.files]
            self.headers = [read_header(f) for f in self.files]
        except Exception:  # noqa: BLE001 - the load reports bad input itself
            self.files, self.sizes, self.headers = [], [], []
        self.app = f"retention-load-{os.getpid()}-{secrets.token_hex(3)}"
        self.saved_app = os.environ.get("PGAPPNAME")
        os.environ["PGAPPNAME"] = self.app
        first = self.files[0].name if self.files else str(path)
        self.started = time.monotonic()  # the clock of `retention.progress`
        self.bar = progress(f"load {first}", sum(self.sizes) or None, unit="B",
                            started=self.started)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="load-progress", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        import time

        import psycopg

        from retention import db

        try:
            conn = psycopg.connect(db.libpq_dsn(), autocommit=True,
                                   application_name=f"{self.app}-watch")
        except Exception:  # noqa: BLE001 - no bar rather than a failed load
            return
        with conn:
            index = 0
            rows_before, rows_now = 0, 0  # rows COPYed from the files before this one, of it
            # polled as often as lines may be written (--progress-interval), at most every
            # 0.5 s and at least every 0.05 s
            period = min(0.5, max(0.05, float(getattr(self.bar, "interval", 0.5))))
            while not self.stop.wait(period):
                try:
                    row = conn.execute(
                        "select a.query, p.bytes_processed, p.tuples_processed "
                        "from pg_stat_progress_copy p "
                        "join pg_stat_activity a using (pid) where a.application_name = %s",
                        (self.app,)).fetchone()
                except psycopg.Error:
                    return
                if row is None:
                    continue
                columns = _copy_columns(row[0])
                now = next((i for i, h in enumerate(self.headers) if h == columns), index)
                if now != index:
                    index = now
                    rows_before += rows_now
                    self.bar.describe(f"load {self.files[index].name}")
                rows_now = int(row[2])
                rows = rows_before + rows_now
                seconds = max(time.monotonic() - self.started, 1e-9)
                self.bar.set_note(f"{rows:,} rows, {rows / seconds:,.0f} rows/s")
                self.bar.set_done(sum(self.sizes[:index]) + int(row[1]))

    def close(self, ok: bool, rows: int | None = None) -> None:
        """End the bar; `rows`: the rows the load read, for a last line of rows per
        second over the whole load (written before the bar's own last line)."""
        import os

        from retention.progress import progress

        self.stop.set()
        self.thread.join(timeout=5)
        if self.saved_app is None:
            os.environ.pop("PGAPPNAME", None)
        else:
            os.environ["PGAPPNAME"] = self.saved_app
        if ok and rows is not None:
            with progress("load", rows, unit="rows", started=self.started) as count:
                count.set_done(rows)
        if ok and self.sizes:
            self.bar.describe("load")
            self.bar.set_note("")
            self.bar.set_done(sum(self.sizes))
        self.bar.close(summary=ok)


def cmd_load(args: argparse.Namespace) -> int:
    from retention.ingest.formats import load_path

    watch = _CopyWatch(Path(args.path).resolve(), args.format)
    ok = False
    try:
        report = load_path(args.path, loaded_at=args.loaded_at, currency=args.currency,
                           fmt=args.format, recheck=args.recheck)
        ok = True
    finally:
        # the rows read: a file unchanged since its last load is not read again
        watch.close(ok, sum(t.rows for t in report.tables
                            if getattr(t, "unchanged_since", None) is None) if ok else None)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format())
    if args.check:
        from retention.ingest.quality import run_checkpoint

        quality = run_checkpoint(None, as_of=report.loaded_at, load_id=report.load_id)
        print(quality.format() if hasattr(quality, "format") else quality)
        quality.raise_for_failures()
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from retention.warehouse.build import build

    summary = build(as_of=args.as_of, full_refresh=args.full_refresh, select=args.select,
                    unit_tests=args.unit_tests)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_campaign(args: argparse.Namespace) -> int:
    from retention.campaigns.runner import format_waves, run_campaign
    from retention.campaigns.spec import load_all, load_campaign

    if args.action == "list":
        for cid, c in load_all().items():
            print(f"{cid:<28}{c.kind:<14}{c.schedule or '-':<16}"
                  f"{' -> '.join('/'.join(s.channels) for s in c.steps)}")
        return 0
    if args.action == "validate":
        campaigns = load_all()
        print(f"{len(campaigns)} campaign files are valid")
        return 0
    if not args.name:
        raise SystemExit("retention campaign run: give the campaign name")
    campaign = load_campaign(args.name)
    as_of = args.as_of or _default_as_of()
    from retention.connections import channels_from_env

    names = sorted({ch for step in campaign.steps for ch in step.channels})
    result = run_campaign(campaign, as_of, channels_from_env(names))
    print(f"campaign {campaign.id} as of {as_of.isoformat()}")
    print(format_waves(result))
    return 0


def cmd_triggers(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from retention.triggers import run_reengagement, run_triggers
    from retention.triggers.runner import format_report

    end = args.until or _default_as_of()
    channels = None
    if args.send:
        from retention.connections import channels_from_env
        from retention.triggers.runner import LazyChannels

        # a missing connection fails only when a message for that channel is due
        channels = LazyChannels(lambda name: channels_from_env([name])[name])
    if args.command == "reengagement":
        result = run_reengagement(end, channels=channels)
    else:
        start = end - timedelta(minutes=args.minutes)
        result = run_triggers(start, end, channels=channels,
                              triggers=args.trigger or None)
    print(format_report(result))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from retention.warehouse.predict import write_predictions

    as_of = args.as_of or _default_as_of()
    print(json.dumps(write_predictions(None, as_of), indent=2, default=str))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from retention.results.pipeline import build_attribution, load_results

    as_of = args.as_of or _default_as_of()
    loaded = load_results(as_of)
    print(json.dumps(loaded, indent=2, default=str))
    if not args.no_build:
        built = build_attribution(as_of, with_parents=not args.narrow)
        print(json.dumps(built, indent=2, default=str))
    from retention import db
    from retention.results.summary import format_step_results, step_results

    with db.connect() as conn:
        if conn.execute("select to_regclass('marts.campaign_results') is not null").fetchone()[0]:
            print("campaign results (treated arms | holdout, sent nothing, as the control):")
            print("\n".join(format_step_results(step_results(conn))))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from retention.results.report import configured_recipients, send_report, write_report

    path = write_report(args.week, out_dir=args.out_dir)
    print(path)
    if args.send:
        recipients = configured_recipients()
        if not recipients:
            raise SystemExit("retention report --send: RETENTION_REPORT_RECIPIENTS is empty")
        print(json.dumps(send_report(path, recipients), indent=2))
    return 0


def _default_as_of():
    from retention.warehouse.build import default_as_of

    return default_as_of()


def cmd_settings(args: argparse.Namespace) -> int:
    for field, info in Settings.model_fields.items():
        print(f"{Settings.variable(field)}\n    {info.description}\n"
              f"    default: {Settings.shown(info.default)}")
    return 0


def cmd_airflow(args: argparse.Namespace) -> int:
    from retention_airflow.local import DEFAULT_PORT, LocalAirflow, LocalAirflowError

    local = LocalAirflow()
    try:
        if args.action == "up":
            local.up(port=args.port or DEFAULT_PORT, timeout=args.timeout,
                     metadata_database=args.metadata_database, executor=args.executor,
                     workers=args.workers, broker_url=args.broker_url,
                     worker_concurrency=args.worker_concurrency)
        elif args.action == "down":
            local.down()
        else:
            running = local.status()
            for component, pid in running.items():
                print(f"{component:<14}{'running, PID ' + str(pid) if pid else 'stopped'}")
            if any(running.values()):
                health = local.health() or {}
                print(f"UI and REST API at {local.base_url}: "
                      + (", ".join(f"{k} {v.get('status')}" for k, v in health.items()
                                   if isinstance(v, dict)) or "not answering"))
            return 0 if all(running.values()) else 3
    except LocalAirflowError as exc:
        print(f"retention airflow {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retention",
        description="Retention-marketing pipeline: load shop data, build lifetime tables, "
                    "run campaigns. Settings come from RETENTION_* environment variables "
                    "(`retention settings` lists them).")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--progress", choices=["auto", "bar", "lines", "off"], default="auto",
                        help="progress of long work on stderr: a live bar on a terminal, "
                             "plain lines elsewhere (auto), or off")
    parser.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                        help="seconds between two plain progress lines (default 10)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("db", help="print the database URL in use (password hidden); "
                                  "`db upgrade` migrates it to head, `db current` prints "
                                  "its revision")
    p.add_argument("action", nargs="?", choices=["url", "upgrade", "current"], default="url")
    p.add_argument("--show-password", action="store_true")
    p.add_argument("--stop", action="store_true", help="stop the embedded PostgreSQL")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("load", help="load a folder of contract CSV files (or one file) into raw")
    p.add_argument("path")
    p.add_argument("--format", choices=["contract", "rees46"], default="contract",
                   help="input format (retention.ingest.formats.LOADERS)")
    p.add_argument("--currency", help="the shop's reporting currency (overrides RETENTION_CURRENCY)")
    p.add_argument("--loaded-at", type=timestamp,
                   help="the load's time; later timestamps are quarantined (default: now)")
    p.add_argument("--check", action="store_true",
                   help="run the data-quality checkpoint after the load")
    p.add_argument("--recheck", action="store_true",
                   help="read and check every file, also those unchanged since their last "
                        "load (which are otherwise taken as they were)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("build", help="build the dbt lifetime tables as of a date")
    p.add_argument("--as-of", type=timestamp, help="default: end of the latest raw day")
    p.add_argument("--full-refresh", action="store_true")
    p.add_argument("--select")
    p.add_argument("--unit-tests", action="store_true",
                   help="also run the dbt unit tests (fixed inputs: CI runs them, production need not)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("campaign", help="run, list or validate campaigns (include/campaigns/)")
    p.add_argument("action", choices=["run", "list", "validate"])
    p.add_argument("name", nargs="?")
    p.add_argument("--as-of", type=timestamp, help="the run's as_of (default: end of the data)")
    p.set_defaults(func=cmd_campaign)

    for name, text in (("triggers", "one run of the trigger chains and lifecycle flows"),
                       ("reengagement", "one daily run of the re-engagement sequence")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--until", type=timestamp,
                       help="end of the run's interval (default: end of the data)")
        if name == "triggers":
            p.add_argument("--minutes", type=float, default=15,
                           help="length of the interval (default 15, the DAG's schedule)")
            p.add_argument("--trigger", action="append",
                           help="only this trigger (repeatable; default: all)")
        p.add_argument("--send", action="store_true",
                       help="send due messages through the retention_* connections "
                            "(default: plan ledger rows only)")
        p.set_defaults(func=cmd_triggers)

    p = sub.add_parser("predict", help="fit BG/NBD + Gamma-Gamma and write "
                                       "marts.customer_predicted_value")
    p.add_argument("--as-of", type=timestamp, help="default: end of the data")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("results", help="load landed webhook batches and send results, "
                                       "then build the attribution marts")
    p.add_argument("--as-of", type=timestamp, help="default: end of the data")
    p.add_argument("--no-build", action="store_true", help="only load the results")
    p.add_argument("--narrow", action="store_true",
                   help="rebuild only the two results marts over the last full build")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("report", help="write the weekly marketer report (HTML) and print its path")
    p.add_argument("--week", help="2026-W43 or a date in the week (default: the latest "
                                  "week with messages)")
    p.add_argument("--out-dir", help="default: RETENTION_HOME/reports")
    p.add_argument("--send", action="store_true",
                   help="also e-mail it to RETENTION_REPORT_RECIPIENTS (once per week each)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("settings", help="list the RETENTION_* settings")
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser("airflow", help="a local Airflow on this machine: `up` starts it "
                                       "(DAGs of dags/, logs in RETENTION_HOME/airflow/logs), "
                                       "`status`, `down` stops it")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--port", type=int, help="the UI's and REST API's port on 127.0.0.1 "
                                            "(default 8080)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds `up` waits for Airflow to be healthy and the DAGs parsed")
    p.add_argument("--metadata-database", default="airflow_meta",
                   help="the Airflow metadata database on the pipeline's PostgreSQL server "
                        "(created when missing; default airflow_meta)")
    p.add_argument("--executor", choices=["local", "celery"], default="local",
                   help="local: the LocalExecutor; celery: the CeleryExecutor with --workers "
                        "Celery workers on a Redis broker, as docker-compose.yaml runs it")
    p.add_argument("--workers", type=int, default=2, help="Celery workers (default 2)")
    p.add_argument("--worker-concurrency", type=int, default=4,
                   help="task slots per Celery worker (default 4)")
    p.add_argument("--broker-url", default="redis://127.0.0.1:6379/0",
                   help="the Celery broker (default redis://127.0.0.1:6379/0)")
    p.set_defaults(func=cmd_airflow)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from retention.campaigns.spec import CampaignError
    from retention.connections import ConnectionError_
    from retention.db import WarehouseUnreachable
    from retention.ingest.load import LoadError
    from retention.progress import configure
    from retention.warehouse.build import BuildError

    configure(mode=args.progress, interval=args.progress_interval)
    try:
        return args.func(args)
    except WarehouseUnreachable as exc:
        print(f"retention: {exc}", file=sys.stderr)
        return 2
    except BuildError as exc:  # dbt said what failed; its log is in dbt_project/target/logs
        print(f"retention: {exc}", file=sys.stderr)
        return 1
    except LoadError as exc:
        print(f"retention: load failed, nothing was changed: {exc}", file=sys.stderr)
        return 2
    except (CampaignError, ConnectionError_) as exc:
        print(f"retention: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
