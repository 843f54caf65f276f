"""Data quality of the raw layer: a Great Expectations 1.x checkpoint run after each load.

The suites are generated from the contract as data (`retention.ingest.contract.TABLES`), one per
raw table, so a column is named in one place:

* keys: not null and unique (compound keys with `expect_compound_columns_to_be_unique`),
  other required columns not null;
* enums: accepted values from the contract's enums (event types: the contract's and
  those the shop declares in its events file, `retention.ingest.events`);
* ranges: amounts and prices >= 0, quantities >= 1;
* freshness: the newest event time of a table (its first required timestamp column, e.g.
  `orders.ordered_at`) is no older than `as_of - lag` (`DEFAULT_FRESHNESS_LAGS`);
* volume: at least one row in the required tables (customers, orders) and in every table
  that had a file in the load.

Two severities, following CONTRACT.md section 3. A *row-level* failure (a bad enum, a
negative amount, a duplicate key) is what the loader quarantines; it can only reach `raw`
when a shop writes there directly, so it is reported as a `warning`: in the report, in
`ops.data_quality_results` and in Data Docs, and the run goes on. A *table-level* failure
(an empty required or loaded table, a stale table, a check that could not run) has no
quarantine: it is `critical`, `QualityReport.success` is False and
`QualityReport.raise_for_failures()` fails the run.

Every expectation GX runs here compiles to aggregate SQL (count, max, a GROUP BY for
uniqueness), so nothing is pulled into Python but counts and up to 20 example values.

The GX context is ephemeral (datasource, suites and checkpoint are rebuilt from the
contract on every run, so nothing can drift and no connection string is ever written to
disk); validation results and the Data Docs site are kept on the filesystem under
RETENTION_HOME/data_quality (`validations/`, `data_docs/index.html`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from psycopg import sql

from retention import db
from retention.config import paths
from retention.ingest.contract import REQUIRED_TABLES, TABLE_BY_NAME, TABLES, Table
from retention.db.schema import ensure_schemas

log = logging.getLogger(__name__)

CRITICAL = "critical"
WARNING = "warning"

#: how old the newest row of a table may be at as_of; a table not named here has no
#: freshness check. Callers may pass their own mapping to `run_checkpoint`.
DEFAULT_FRESHNESS_LAGS: dict[str, timedelta] = {
    "orders": timedelta(days=2),
    "events": timedelta(days=2),
    "offline_receipts": timedelta(days=7),
}

#: lower bounds stricter than "not negative", by column name
MIN_VALUES: dict[str, int] = {"quantity": 1}

_DATASOURCE = "warehouse"
_URL_VARIABLE = "retention_quality_database_url"
_SUITE_PREFIX = "raw."
_DOCS_RESULTS_LIMIT = 200
#: columns whose values never leave the database in examples (channel addresses included)
_SENSITIVE = {t.name: {c.name for c in t.columns if c.pii or c.name == "address"} for t in TABLES}


class DataQualityError(Exception):
    """A critical data-quality failure: the message names each table and expectation."""


@dataclass(frozen=True)
class ExpectationResult:
    table: str
    expectation: str  # the GX expectation type, e.g. expect_column_values_to_be_in_set
    column: str | None  # compound keys as "a, b"; None for table-level expectations
    success: bool
    severity: str  # critical | warning
    observed: dict[str, Any]  # JSON-ready: observed_value, or unexpected counts and examples
    kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        where = f"raw.{self.table}" + (f".{self.column}" if self.column else "")
        return f"{where}: {self.expectation} failed ({_observed_text(self.observed)})"


@dataclass
class QualityReport:
    run_key: str
    as_of: datetime
    load_id: int | None
    tables: dict[str, list[ExpectationResult]]
    docs_index: Path | None = None

    @property
    def results(self) -> list[ExpectationResult]:
        return [r for rs in self.tables.values() for r in rs]

    @property
    def failures(self) -> list[ExpectationResult]:
        """Every failed expectation, critical and warning."""
        return [r for r in self.results if not r.success]

    @property
    def errors(self) -> list[ExpectationResult]:
        return [r for r in self.failures if r.severity == CRITICAL]

    @property
    def warnings(self) -> list[ExpectationResult]:
        return [r for r in self.failures if r.severity != CRITICAL]

    @property
    def success(self) -> bool:
        """True when no critical expectation failed (warnings do not stop the run)."""
        return not self.errors

    def raise_for_failures(self, include_warnings: bool = False) -> None:
        failed = self.failures if include_warnings else self.errors
        if failed:
            lines = [f"data quality checkpoint {self.run_key} (as_of {self.as_of.isoformat()}) "
                     f"failed {len(failed)} expectation(s):"]
            lines += [f"  {r.describe()}" for r in failed]
            raise DataQualityError("\n".join(lines))

    def format(self) -> str:
        lines = [f"data quality {self.run_key} as of {self.as_of.isoformat()}: "
                 f"{'passed' if self.success else 'FAILED'} "
                 f"({len(self.results)} expectations, {len(self.errors)} critical failures, "
                 f"{len(self.warnings)} warnings)"]
        for table, results in self.tables.items():
            failed = sum(not r.success for r in results)
            lines.append(f"  {table:<24}{len(results):>4} checks{failed:>4} failed")
        for r in self.failures:
            lines.append(f"  {r.severity.upper():<9}{r.describe()}")
        if self.docs_index:
            lines.append(f"  Data Docs: {self.docs_index}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- suites


def event_time_column(table: Table) -> str | None:
    """The column that says how fresh a table is: its first required timestamp."""
    return next((c.name for c in table.columns if c.type == "timestamptz" and c.not_null), None)


def suite_for(table: Table, *, as_of: datetime, expect_rows: bool,
              freshness_lag: timedelta | None,
              accepted: Mapping[str, Iterable[str]] | None = None):
    """The expectation suite of one raw table, generated from the contract.
    `accepted`: column -> accepted values replacing the contract's enum (event_type with
    the shop's declared event types)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    expectations = []
    if expect_rows:
        expectations.append(gxe.ExpectTableRowCountToBeBetween(
            min_value=1, severity=CRITICAL,
            notes=f"raw.{table.name} must not be empty (required, or a file of this load)"))
    if freshness_lag is not None:
        column = event_time_column(table)
        if column is None:
            raise ValueError(f"raw.{table.name} has no required timestamp to check freshness on")
        expectations.append(gxe.ExpectColumnMaxToBeBetween(
            column=column, min_value=as_of - freshness_lag, severity=CRITICAL,
            notes=f"freshness: newest {column} within {freshness_lag} of as_of "
                  f"{as_of.isoformat()}"))
    if len(table.key) == 1:
        expectations.append(gxe.ExpectColumnValuesToBeUnique(
            column=table.key[0], severity=WARNING, notes="contract key"))
    else:
        expectations.append(gxe.ExpectCompoundColumnsToBeUnique(
            column_list=list(table.key), severity=WARNING, notes="contract key"))
    for col in table.columns:
        if col.name in table.key or col.not_null:
            expectations.append(gxe.ExpectColumnValuesToNotBeNull(
                column=col.name, severity=WARNING,
                notes="contract key" if col.name in table.key else "required value"))
        if col.enum:
            expectations.append(gxe.ExpectColumnValuesToBeInSet(
                column=col.name, value_set=list((accepted or {}).get(col.name, col.enum)),
                severity=WARNING, notes="contract enum"))
        if col.non_negative:
            minimum = MIN_VALUES.get(col.name, 0)
            expectations.append(gxe.ExpectColumnValuesToBeBetween(
                column=col.name, min_value=minimum, severity=WARNING,
                notes=f"contract range: {col.name} >= {minimum}"))
    return gx.ExpectationSuite(name=_SUITE_PREFIX + table.name, expectations=expectations)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Plan:
    table: Table
    expect_rows: bool
    freshness_lag: timedelta | None


def _utc(value: datetime) -> datetime:
    """A plain UTC datetime (pendulum and naive values included; naive means UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return datetime.fromisoformat(value.astimezone(timezone.utc).isoformat())


def _loaded_tables(conn, load_id: int) -> set[str]:
    row = conn.execute("select summary from ops.loads where load_id = %s", (load_id,)).fetchone()
    if row is None:
        raise ValueError(f"load {load_id} not found in ops.loads")
    return set((row[0] or {}).get("tables", {}))


def _has_rows(conn, table: str) -> bool:
    return conn.execute(sql.SQL("select exists (select 1 from raw.{})").format(
        sql.Identifier(table))).fetchone()[0]


def _plan(conn, tables: Iterable[str] | None, load_id: int | None,
          lags: Mapping[str, timedelta | None]) -> list[_Plan]:
    """Which tables to check, which must have rows and which must be fresh.

    With `tables` (the tables that had a file in this load) or a `load_id` (whose tables
    are read from ops.loads), the required tables and those are checked; with neither,
    every contract table is. Tables of the load and required tables must have rows; a
    table with a freshness lag is checked for freshness when it must have rows or has any.
    """
    if tables is not None:
        loaded = set(tables)
    elif load_id is not None:
        loaded = _loaded_tables(conn, load_id)
    else:
        loaded = None
    unknown = sorted((loaded or set()) - set(TABLE_BY_NAME))
    if unknown:
        raise ValueError(f"not contract tables: {', '.join(unknown)}")
    unknown_lags = sorted(set(lags) - set(TABLE_BY_NAME))
    if unknown_lags:
        raise ValueError(f"freshness lag for unknown tables: {', '.join(unknown_lags)}")
    plans = []
    for table in TABLES:  # contract order: parents first
        if loaded is not None and table.name not in loaded and table.name not in REQUIRED_TABLES:
            continue
        expect_rows = table.name in REQUIRED_TABLES or table.name in (loaded or ())
        lag = lags.get(table.name)
        if lag is not None and not expect_rows and not _has_rows(conn, table.name):
            lag = None  # a missing optional table is an empty one: nothing to be stale
        plans.append(_Plan(table, expect_rows, lag))
    return plans


# --------------------------------------------------------------------------- GX


def _context(root: Path, url: str):
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    config.stores[config.validation_results_store_name] = {
        "class_name": "ValidationResultsStore",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(root / "validations")},
    }
    config.data_docs_sites = {
        "local_site": {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(root / "data_docs")},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder",
                                   "validation_results_limit": _DOCS_RESULTS_LIMIT},
        }
    }
    # The URL reaches GX as a config variable, so GX's own repr and logs show
    # "${...}" rather than the credentials.
    return gx.get_context(mode="ephemeral", project_config=config,
                          runtime_environment={_URL_VARIABLE: url})


def _checkpoint(context, plans: list[_Plan], as_of: datetime):
    import great_expectations as gx

    accepted = {}
    if any(plan.table.name == "events" for plan in plans):
        # the event types the loader accepts (a wrong events file fails here too)
        from retention.ingest.events import load_catalog

        accepted = {"events": {"event_type": load_catalog().event_types}}

    datasource = context.data_sources.add_postgres(
        _DATASOURCE, connection_string="${" + _URL_VARIABLE + "}")
    definitions = []
    for plan in plans:
        asset = datasource.add_table_asset(name=plan.table.name, table_name=plan.table.name,
                                           schema_name="raw")
        batch = asset.add_batch_definition_whole_table("whole_table")
        suite = context.suites.add(suite_for(plan.table, as_of=as_of,
                                             expect_rows=plan.expect_rows,
                                             freshness_lag=plan.freshness_lag,
                                             accepted=accepted.get(plan.table.name)))
        definitions.append(context.validation_definitions.add(
            gx.ValidationDefinition(name=suite.name, data=batch, suite=suite)))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name="raw_after_load",
        validation_definitions=definitions,
        # no UpdateDataDocsAction: it rebuilds the site once per table; one build after
        # the run (`_build_docs`) renders the same pages
        actions=[],
        result_format="SUMMARY",
    ))
    return datasource, checkpoint


def _build_docs(context, checkpoint_result) -> None:
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
    )

    identifiers: list = list(checkpoint_result.run_results)
    identifiers += [ExpectationSuiteIdentifier(name=v.suite_name)
                    for v in checkpoint_result.run_results.values()]
    context.build_data_docs(resource_identifiers=identifiers)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


_OBSERVED_KEYS = ("observed_value", "element_count", "unexpected_count", "unexpected_percent",
                  "partial_unexpected_list")


def _observed(result: dict, exception_info: Any) -> dict[str, Any]:
    observed = {k: _jsonable(result[k]) for k in _OBSERVED_KEYS if k in result}
    if "partial_unexpected_list" in observed:
        observed["partial_unexpected_list"] = observed["partial_unexpected_list"][:10]
    if not result and exception_info:
        infos = exception_info.values() if "raised_exception" not in exception_info else [
            exception_info]
        messages = [i.get("exception_message") for i in infos
                    if isinstance(i, dict) and i.get("raised_exception")]
        observed["error"] = (messages[0] or "check could not run").splitlines()[0][:500] \
            if messages else "check could not run"
    return observed


def _observed_text(observed: dict[str, Any]) -> str:
    if "error" in observed:
        return f"error: {observed['error']}"
    if "unexpected_count" in observed:
        examples = observed.get("partial_unexpected_list") or []
        text = f"{observed['unexpected_count']} unexpected of {observed.get('element_count')}"
        return text + (f", e.g. {', '.join(map(str, examples[:5]))}" if examples else "")
    return f"observed {observed.get('observed_value')}"


def _results(checkpoint_result) -> dict[str, list[ExpectationResult]]:
    tables: dict[str, list[ExpectationResult]] = {}
    for validation in checkpoint_result.run_results.values():
        table = validation.suite_name.removeprefix(_SUITE_PREFIX)
        rows = tables.setdefault(table, [])
        for r in validation.results:
            config = r.expectation_config
            kwargs = {k: _jsonable(v) for k, v in config.kwargs.items() if k != "batch_id"}
            column = kwargs.get("column") or (", ".join(kwargs["column_list"])
                                             if "column_list" in kwargs else None)
            raised = not r.result and bool(r.exception_info)
            observed = _observed(r.result or {}, r.exception_info)
            if _SENSITIVE.get(table, set()) & set(kwargs.get("column_list") or [column]):
                observed.pop("partial_unexpected_list", None)  # e-mails, phones, tokens
            severity = getattr(config.severity, "value", config.severity) or CRITICAL
            rows.append(ExpectationResult(
                table=table,
                expectation=config.type,
                column=column,
                success=bool(r.success),
                # a check that could not run proves nothing: treat it as critical
                severity=CRITICAL if raised else str(severity),
                observed=observed,
                kwargs=kwargs,
            ))
    return {t.name: tables[t.name] for t in TABLES if t.name in tables}


def _persist(url: str | None, report: QualityReport) -> None:
    with db.connect(url) as conn:
        ensure_schemas(conn)
        conn.execute("delete from ops.data_quality_results where run_key = %s", (report.run_key,))
        with conn.cursor() as cur:
            cur.executemany(
                """insert into ops.data_quality_results (run_key, load_id, as_of, table_name,
                     expectation, column_name, severity, success, observed_value, kwargs,
                     checked_at)
                   values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                [(report.run_key, report.load_id, report.as_of, r.table, r.expectation, r.column,
                  r.severity, r.success, json.dumps(r.observed), json.dumps(r.kwargs),
                  report.as_of) for r in report.results])
        conn.commit()


def run_key_for(as_of: datetime, load_id: int | None) -> str:
    """Results of one run are keyed by this: a re-run of the same load replaces them."""
    return f"load-{load_id}" if load_id is not None else f"as-of-{_utc(as_of):%Y%m%dT%H%M%SZ}"


def run_checkpoint(url: str | None, as_of: datetime, tables: list[str] | None = None,
                   load_id: int | None = None, *,
                   freshness_lags: Mapping[str, timedelta | None] | None = None,
                   root: Path | None = None) -> QualityReport:
    """Run the raw-layer checkpoint as of `as_of` and keep its results.

    `url`: the warehouse (None: `retention.db.database_url()`). `tables`: the tables that
    had a file in this load (None: those of `load_id` in ops.loads, or every table).
    `freshness_lags`: table -> lag, replacing `DEFAULT_FRESHNESS_LAGS` (None disables a
    table's freshness check). `root`: where validation results and Data Docs go
    (default RETENTION_HOME/data_quality).

    Results go to ops.data_quality_results (one row per expectation, checked_at = as_of)
    and to the Data Docs site. The report is returned, never raised: call
    `raise_for_failures()` to fail on critical failures.
    """
    url = url or db.database_url()
    as_of = _utc(as_of)
    lags = DEFAULT_FRESHNESS_LAGS if freshness_lags is None else freshness_lags
    root = Path(root) if root is not None else paths().data_quality
    root.mkdir(parents=True, exist_ok=True)
    with db.connect(url) as conn:
        ensure_schemas(conn)
        conn.commit()
        plans = _plan(conn, tables, load_id, lags)

    import great_expectations as gx

    run_key = run_key_for(as_of, load_id)
    context = _context(root, db.sqlalchemy_url(url).render_as_string(hide_password=False))
    datasource, checkpoint = _checkpoint(context, plans, as_of)
    try:
        result = checkpoint.run(run_id=gx.RunIdentifier(run_name=run_key, run_time=as_of))
        _build_docs(context, result)
    finally:
        datasource.get_execution_engine().close()
    docs_index = root / "data_docs" / "index.html"
    report = QualityReport(run_key=run_key, as_of=as_of, load_id=load_id,
                           tables=_results(result),
                           docs_index=docs_index if docs_index.exists() else None)
    _persist(url, report)
    for failure in report.failures:
        log.log(logging.ERROR if failure.severity == CRITICAL else logging.WARNING,
                "data quality %s: %s", failure.severity, failure.describe())
    return report
