"""Build the customer lifetime tables: `dbt build` of dbt_project/ as of a moment.

`build()` runs dbt in-process (dbtRunner) with the connection of `retention.db` and the
var `as_of`, then reads the headline numbers back from the marts (`summary()`); while dbt works it
shows nodes done of the total, rate and time left (`retention.progress`: a bar on a
terminal, a line every 30 s in a task log).

as_of (CONTRACT.md section 2) is the end of the data the build may see. When it is not
given, it is the latest timestamp in raw (orders.ordered_at, offline_receipts.purchased_at,
events.occurred_at) rounded up to the next UTC midnight (a timestamp at exactly midnight
stays), i.e. "the end of the last day with data". Every model ignores rows after it, so
building again for the same as_of gives the same rows, and building for an earlier as_of
gives the numbers of the data up to it. The incremental models handle an earlier as_of
by themselves, no full refresh needed (materialized incremental in their YAML; the
paths below are in dbt_project/):
int_events_aggregated_daily rewrites every day from that as_of's day on
(macros/incremental_replace_window.sql); the four per-customer purchase tables and the
two affinity marts recompute every customer whose rows differ from what the previous
build (its as_of recorded in intermediate.incremental_state) left
(macros/incremental_replace_partitions.sql,
models/intermediate/int_*_customers_changed.yml);
product_recommendations is replaced whole whenever its weekly snapshot moment moves
(macros/incremental_replace_all.sql).

dbt's target and logs go to dbt_project/target (gitignored). Builds in one checkout are
serialised (a file lock on the target folder): dbt keeps its manifest there, and
dbtRunner is not safe to run twice at once in one process.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

from retention import db
from retention.config import settings

_PROFILE_ENV = {
    "host": "RETENTION_DBT_HOST",
    "port": "RETENTION_DBT_PORT",
    "user": "RETENTION_DBT_USER",
    "password": "RETENTION_DBT_PASSWORD",
    "dbname": "RETENTION_DBT_DBNAME",
}
_THREADS_ENV = "RETENTION_DBT_THREADS"
#: the environment variable the as_of() macro reads while nodes execute
AS_OF_ENV = "RETENTION_DBT_AS_OF"
_process_lock = threading.Lock()


class BuildError(RuntimeError):
    """dbt failed (a model, test or unit test failed, or the project did not compile).

    `summary` holds what `build` would have returned (dbt results, and the marts' numbers
    when they exist)."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


def project_dir() -> Path:
    return settings().dbt_project_dir.resolve()


def target_dir() -> Path:
    return project_dir() / "target"


def _utc(moment: datetime) -> datetime:
    """Naive datetimes are UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _custom_event_types() -> list[str]:
    """The custom event types the events file declares (stg_events accepts them)."""
    from retention.ingest.events import load_catalog

    return list(load_catalog().custom_types)


def as_of_literal(as_of: datetime) -> str:
    """The var value dbt gets: ISO-8601 in UTC with offset, microseconds kept."""
    return _utc(as_of).isoformat()


def default_as_of(url: str | None = None) -> datetime:
    """The latest timestamp in raw orders, offline receipts and events, rounded up to the
    next UTC midnight (unchanged when it is exactly midnight). Falls back to the latest
    customers.created_at; raises ValueError when raw holds no timestamp at all."""
    with db.connect(url) as conn:
        exists = {
            name for (name,) in conn.execute(
                "select table_name from information_schema.tables where table_schema = 'raw'")
        }
        parts = [f"select max({col}) from raw.{table}" for table, col in (
            ("orders", "ordered_at"), ("offline_receipts", "purchased_at"),
            ("events", "occurred_at")) if table in exists]
        latest = None
        if parts:
            latest = conn.execute(
                "select max(m) from (" + " union all ".join(parts) + ") as t(m)").fetchone()[0]
        if latest is None and "customers" in exists:
            latest = conn.execute("select max(created_at) from raw.customers").fetchone()[0]
    if latest is None:
        raise ValueError("raw holds no orders, receipts, events or customers: pass as_of")
    latest = _utc(latest)
    midnight = latest.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight if midnight == latest else midnight + timedelta(days=1)


@contextmanager
def _profile_env(url: str | None, as_of: datetime | None = None) -> Iterator[None]:
    """The RETENTION_DBT_* variables profiles.yml reads, and the as_of the models read
    (AS_OF_ENV, unset without one), for the duration of one build."""
    params = db.connection_params(url)
    # saved to be restored afterwards: the variables this build overwrites
    saved = {name: os.environ.get(name)
             for name in (*_PROFILE_ENV.values(), _THREADS_ENV, AS_OF_ENV)}
    saved["PGOPTIONS"] = os.environ.get("PGOPTIONS")
    try:
        for key, name in _PROFILE_ENV.items():
            os.environ[name] = str(params[key])
        os.environ[_THREADS_ENV] = str(settings().dbt_threads)
        if as_of is not None:
            os.environ[AS_OF_ENV] = as_of_literal(as_of)
        else:
            os.environ.pop(AS_OF_ENV, None)
        # JIT compiles every large query anew, and a build runs many of them once each,
        # so compiling costs more than it saves on these one-pass queries (measured:
        # bench/RESULTS.md, "Figures moved from docstrings"); sorts and hashes of a few
        # hundred thousand rows fit in 64MB instead of spilling; UTC keeps any implicit
        # timestamp rendering stable (the models themselves never depend on it)
        os.environ["PGOPTIONS"] = " ".join(part for part in (
            saved["PGOPTIONS"], "-c jit=off -c work_mem=64MB -c timezone=UTC") if part)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _exclusive_build() -> Iterator[None]:
    target = target_dir()
    target.mkdir(parents=True, exist_ok=True)
    with _process_lock, open(target / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def dbt_results(result: Any) -> dict[str, Any]:
    """Counts per resource type and status from a dbtRunnerResult."""
    counts: Counter[tuple[str, str]] = Counter()
    failed: list[str] = []
    for node_result in getattr(result.result, "results", None) or []:
        node = node_result.node
        kind = str(getattr(node.resource_type, "value", node.resource_type))
        status = str(getattr(node_result.status, "value", node_result.status))
        counts[(kind, status)] += 1
        if status in ("error", "fail"):
            failed.append(f"{kind} {node.name}: {status}")
    by_kind: dict[str, dict[str, int]] = {}
    for (kind, status), n in sorted(counts.items()):
        by_kind.setdefault(kind, {})[status] = n
    models = by_kind.get("model", {})
    return {
        "success": bool(result.success),
        "models": sum(models.values()),
        "models_built": models.get("success", 0),
        "tests": sum(by_kind.get("test", {}).values()),
        "unit_tests": sum(by_kind.get("unit_test", {}).values()),
        "failures": len(failed),
        "warnings": sum(s.get("warn", 0) for s in by_kind.values()),
        "skipped": sum(s.get("skipped", 0) for s in by_kind.values()),
        "failed": failed,
        "by_type": by_kind,
    }


def node_progress(what: str) -> tuple[Any, Callable[[Any], None]]:
    """A `retention.progress.Progress` of dbt nodes and the dbtRunner callback that feeds
    it: the total from dbt's `ConcurrencyLine` event, one step per `NodeFinished`."""
    from retention.progress import progress

    bar = progress(what, unit="nodes")

    def callback(event: Any) -> None:
        name = event.info.name
        if name == "ConcurrencyLine":
            bar.set_total(int(event.data.node_count))
        elif name == "NodeFinished":
            bar.update(1)

    return bar, callback


#: dbt commands that take --vars (retry replays its previous invocation's own)
_TAKES_VARS = {"build", "run", "test", "compile", "parse", "ls", "list", "docs", "seed",
               "snapshot", "show", "run-operation"}


def _parse_state(url: str | None) -> Path:
    """Where dbt's partial-parse state of the database of `url` is kept between builds.

    dbt reuses its parse (target/partial_parse.msgpack) only when the profile's
    connection is the one it was made with; builds of several databases from one
    checkout (the test suite, a staging and a production warehouse) would otherwise
    replace each other's and parse the whole project again each time."""
    import hashlib

    params = db.connection_params(url)
    key = "|".join(params[k] for k in ("host", "port", "user", "dbname"))
    return target_dir() / "partial_parse" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.msgpack"


def run_dbt(args: list[str], url: str | None = None, *, as_of: datetime | None = None,
            callbacks: list[Callable[[Any], None]] | None = None) -> Any:
    """Run one dbt command against the project with the profile of `url` (dbtRunner);
    `as_of` goes to the models through the environment (AS_OF_ENV, read only while nodes
    execute, so dbt keeps its partial parse from one as_of to the next), and commands
    that take vars get the project's vars (the declared custom event types). `callbacks`
    get dbt's events. Returns the dbtRunnerResult; `last_invocation()` tells the as_of
    of the run whose run_results.json the target folder holds."""
    import shutil

    from dbt.cli.main import dbtRunner

    project = project_dir()
    target = target_dir()
    full_args = list(args)
    if args and (args[0] in _TAKES_VARS) and "--vars" not in args:
        full_args += ["--vars", json.dumps({"custom_event_types": _custom_event_types()})]
    full_args += [
        "--project-dir", str(project),
        "--profiles-dir", str(project),
        "--target-path", str(target),
        "--log-path", str(target / "logs"),
    ]
    with _exclusive_build(), _profile_env(url, as_of):
        state, current = _parse_state(url), target / "partial_parse.msgpack"
        if state.exists():
            shutil.copyfile(state, current)
        result = dbtRunner(callbacks=list(callbacks or [])).invoke(full_args)
        if current.exists():
            state.parent.mkdir(exist_ok=True)
            shutil.copyfile(current, state)
        _record_invocation(target, args[0] if args else "", as_of)
        return result


def _record_invocation(target: Path, command: str, as_of: datetime | None) -> None:
    """Beside run_results.json: the as_of of the invocation that wrote it."""
    try:
        results = json.loads((target / "run_results.json").read_text())
        invocation = results["metadata"]["invocation_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    (target / "run_results.as_of.json").write_text(json.dumps({
        "invocation_id": invocation, "command": command,
        "as_of": as_of_literal(as_of) if as_of is not None else None}))


def last_invocation() -> tuple[dict, str | None]:
    """run_results.json of the target folder and the as_of of the invocation that wrote
    it (None when unknown: written by dbt by hand, or by a command without an as_of)."""
    target = target_dir()
    try:
        results = json.loads((target / "run_results.json").read_text())
    except (OSError, ValueError):
        return {}, None
    try:
        record = json.loads((target / "run_results.as_of.json").read_text())
    except (OSError, ValueError):
        record = {}
    invocation = (results.get("metadata") or {}).get("invocation_id")
    as_of = record.get("as_of") if record.get("invocation_id") == invocation else None
    if as_of is None:  # a build with the as_of on the command line
        as_of = ((results.get("args") or {}).get("vars") or {}).get("as_of")
    return results, as_of


def build(as_of: datetime | None = None, url: str | None = None, select: str | None = None,
          full_refresh: bool = False, *, raise_on_failure: bool = True,
          indirect_selection: str | None = None, exclude: str | None = None,
          unit_tests: bool = False) -> dict[str, Any]:
    """`dbt build` as of `as_of` (default: `default_as_of(url)`), then the headline numbers.

    `select` is passed to dbt `--select` (space-separated selection, e.g.
    "customer_lifetime+"), or names a YAML selector as "selector:lifetime"; without it dbt
    builds selector `default` of dbt_project/selectors.yml (everything but the tests of
    the tables predict.py writes afterwards). `exclude` is passed to `--exclude`.
    `indirect_selection` is dbt's `--indirect-selection` for the tests of `select`
    ("buildable": only tests whose every parent is selected or upstream of the selection).
    `unit_tests`: also run the dbt unit tests (`unit_tests:` in the model YAML). Off by
    default, as dbt advises for production: their inputs are fixed rows, so they prove
    the SQL, not the data, and cost the same on every build; the test suite and CI run
    them (tests/test_dbt_lifetime.py), and `retention build --unit-tests` does.
    `full_refresh` rebuilds the incremental models from scratch, needed only for changes
    they cannot see: raw events that arrived more than `incremental_lookback_days` late
    (int_events_aggregated_daily and the affinity marts), or an order line edited without
    any change to the order's status, time or total (the per-customer purchase tables,
    see int_purchases_customers_changed.yml). Raises BuildError when dbt
    fails, unless raise_on_failure is False; the summary then reports the failures.

    Returns: as_of, customers, buyers, rpr, new_customer_rpr_30d (over all complete
    cohorts), new_customer_rpr_30d_latest_cohort (+ _month), median_days_to_second_purchase,
    ropo_share_of_offline_revenue, and `dbt` (models, tests, failures, ...).
    """
    url = url or db.database_url()
    from retention.db.schema import ensure_schemas

    with db.connect(url) as conn:
        ensure_schemas(conn)
        conn.commit()
    as_of = _utc(as_of) if as_of is not None else default_as_of(url)
    args = ["build"]
    if select:
        if select.startswith("selector:"):
            args += ["--selector", select.split(":", 1)[1]]
        else:
            args += ["--select", *select.split()]
    if exclude:
        args += ["--exclude", *exclude.split()]
    if indirect_selection:
        args += ["--indirect-selection", indirect_selection]
    if not unit_tests:
        args += ["--exclude-resource-type", "unit_test"]
    if full_refresh:
        args.append("--full-refresh")
    bar, on_event = node_progress(f"build as of {as_of.isoformat()}")
    with bar:
        result = run_dbt(args, url, as_of=as_of, callbacks=[on_event])
    dbt_summary = dbt_results(result)
    if result.exception is not None:
        dbt_summary["error"] = str(result.exception)
        dbt_summary["success"] = False
    out: dict[str, Any] = {"as_of": as_of.isoformat()}
    try:
        out.update(summary(url, as_of))
    except LookupError as exc:  # the marts were not (all) built by this selection
        out["summary_error"] = str(exc)
    out["dbt"] = dbt_summary
    if raise_on_failure and not dbt_summary["success"]:
        detail = dbt_summary.get("error") or "; ".join(dbt_summary["failed"][:10])
        raise BuildError(f"dbt build as of {as_of.isoformat()} failed: {detail}", out)
    return out


def _relation_exists(conn, name: str) -> bool:
    return conn.execute("select to_regclass(%s) is not null", (name,)).fetchone()[0]


def summary(url: str | None = None, as_of: datetime | None = None) -> dict[str, Any]:
    """The headline numbers of the built marts.

    - customers: rows of marts.customer_lifetime; buyers: those with a purchase.
    - rpr: customers with at least two purchases / customers with at least one.
    - new_customer_rpr_30d: over every cohort whose 30-day window is complete
      (is_complete_30d), the share of their customers with a second purchase within 30
      days (cohorts weighted by size). new_customer_rpr_30d_latest_cohort is the same for
      the latest complete cohort alone (its month in ..._month).
    - median_days_to_second_purchase: median of days_to_second_purchase over customers
      with two purchases.
    - ropo_share_of_offline_revenue: revenue of ROPO receipts / revenue of all offline
      receipts up to as_of (matched or not); ropo_share_of_matched_offline_revenue
      divides by the matched receipts only.

    `as_of`, when given, must be the as_of the marts were built for (LookupError
    otherwise). Ratios are None when their denominator is zero.
    """
    needed = ("marts.customer_lifetime", "marts.cohort_retention", "marts.ropo_purchases",
              "intermediate.int_receipts_matched")
    with db.connect(url) as conn:
        missing = [name for name in needed if not _relation_exists(conn, name)]
        if missing:
            raise LookupError(f"not built: {', '.join(missing)} (run retention build)")
        built_as_of, customers, buyers, repeaters, median_days = conn.execute(
            """select max(as_of), count(*), count(*) filter (where purchases > 0),
                      count(*) filter (where purchases > 1),
                      percentile_cont(0.5) within group (order by days_to_second_purchase)
               from marts.customer_lifetime""").fetchone()
        if as_of is not None and built_as_of is not None and _utc(built_as_of) != _utc(as_of):
            raise LookupError(f"the marts are built as of {built_as_of.isoformat()}, "
                              f"not {_utc(as_of).isoformat()}")
        complete_customers, complete_second = conn.execute(
            """select sum(customers), sum(second_purchase_30d_customers)
               from marts.cohort_retention where is_complete_30d""").fetchone()
        latest = conn.execute(
            """select cohort_month, second_purchase_30d_rate from marts.cohort_retention
               where is_complete_30d order by cohort_month desc limit 1""").fetchone()
        ropo_revenue, matched_revenue = conn.execute(
            """select coalesce(sum(total_amount) filter (where is_ropo), 0),
                      coalesce(sum(total_amount), 0)
               from marts.ropo_purchases""").fetchone()
        offline_revenue = conn.execute(
            "select coalesce(sum(total_amount), 0) from intermediate.int_receipts_matched"
        ).fetchone()[0]

    def ratio(num, den) -> float | None:
        return float(num) / float(den) if den else None

    return {
        "as_of": _utc(built_as_of).isoformat() if built_as_of else None,
        "customers": int(customers),
        "buyers": int(buyers),
        "rpr": ratio(repeaters, buyers),
        "new_customer_rpr_30d": ratio(complete_second, complete_customers),
        "new_customer_rpr_30d_latest_cohort": float(latest[1]) if latest else None,
        "new_customer_rpr_30d_latest_cohort_month": latest[0].isoformat() if latest else None,
        "median_days_to_second_purchase": float(median_days) if median_days is not None else None,
        "ropo_share_of_offline_revenue": ratio(ropo_revenue, offline_revenue),
        "ropo_share_of_matched_offline_revenue": ratio(ropo_revenue, matched_revenue),
    }
