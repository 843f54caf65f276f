"""Loading shop files into schema `raw`, following CONTRACT.md sections 1 and 3.

How a load works:

1. *Preflight*, before anything is written: every file's header is read; a file that is
   not readable CSV or lacks a required column fails the load with an error naming the
   file and the column. A load with an events file reads the shop's events file once
   (setting `events_file`, `retention.ingest.events`): the custom event types it declares
   are accepted, each event's `properties` are checked against its type's declaration,
   and a wrong events file fails the load naming its line and field.
2. One transaction for the whole load. Each file is streamed into a temporary text-only
   staging table with PostgreSQL COPY (a 1 GB file never sits in memory), then checked
   set-wise in SQL: every row that breaks the contract goes to `ops.quarantine` with its
   reason, file and line; the rest is upserted into `raw.<table>` on the table's key, only
   where a value changed, so re-loading the same files changes nothing (rows equal to the
   stored ones are left out before the upsert, which would otherwise lock, and so write,
   every row it finds).
   The checks run as one statement per file (`_validate_sql`). Its fast pass reads the
   values with plain casts and runs the contract's patterns only on texts that are not
   the cast's own rendering (a clean file's values mostly are); when one text in the file
   cannot be cast at all, that statement fails, is rolled back to a savepoint, and the
   safe pass (functions that never fail) checks the file instead, with the same result.
   When `raw.<table>` is empty before its write (a shop's first load), the accepted rows
   go in with a plain INSERT, without the upsert's conflict checks; a repeated key makes
   that insert fail on the primary key, and then it is rolled back to a savepoint, the
   repeats are quarantined as duplicates, and the rest goes in (a file without repeats
   spares the search for them). The table's primary key and its secondary
   indexes (not unique, backing no constraint: the lookup indexes the migrations create)
   are dropped just before the insert and created again right after it from their own
   definitions as the database holds them (`pg_get_constraintdef`, `pg_get_indexdef`,
   with their tablespace and comment), in the same transaction: one sort per index
   instead of maintaining each while millions of rows go in (a repeated key then fails
   the key's build, as it failed the insert before). No other session sees the table without them (the
   dropped indexes keep the table locked until the load commits; a first load's readers
   wait for it), and a failed load rolls the drop back with everything else.
3. A COPY error (ragged rows, broken quoting, invalid UTF-8) aborts the transaction: the
   database is exactly as before, and the error names the file and the line.
4. *Unchanged files* are not read again (`unchanged_since`): a file whose content
   (sha256, recorded with each load in ops.loads.summary) and rules (the loader's code,
   the contract, the currency, the declared event types) are those of the load that last
   wrote its raw table, when nothing but a load has written that table (or the tables
   its foreign keys point to) since (ops.raw_writes, kept by statement-level triggers)
   and none of its rows was quarantined for a reason a later load could see otherwise
   (a future timestamp, an orphan), would be checked to the same rows, quarantine the
   same lines and write nothing. Its result is that load's, reported with
   `unchanged_since` and nothing inserted or updated; its quarantine stays as it is.
   This is how warehouse loaders treat files they have loaded (Snowflake's COPY INTO
   skips a file whose checksum it has loaded, unless FORCE); unlike them, a table
   changed by hand since is noticed, and the file is read and its rows written again.
   `recheck=True` (`retention load --recheck`) reads and checks every file.

Loads into one database run one at a time: the transaction starts by taking an advisory
lock, so a second load waits for the first to commit (up to RETENTION_LOAD_LOCK_TIMEOUT
seconds, default 900; 0 waits without limit) and otherwise fails with a LoadError saying
another load is running, having changed nothing.

Line numbers are record numbers counted from the header (line 1), which equal physical
lines unless a quoted field spans lines.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import psycopg
from psycopg import sql

from retention import db
from retention.config import settings
from retention.ingest.contract import LOAD_ORDER, REQUIRED_TABLES, SQL_TYPES, TABLE_BY_NAME, Table
from retention.ingest.events import EventCatalog, EventsFileError, load_catalog, properties_reason
from retention.db.schema import ensure_schemas

COPY_CHUNK = 1 << 20

LOAD_LOCK = "retention.ingest.load"
LOCK_TIMEOUT_ENV = "RETENTION_LOAD_LOCK_TIMEOUT"

NUMERIC = r"^[+-]?(\d{1,16}(\.\d*)?|\.\d+)$"
INTEGER = r"^[+-]?\d{1,9}$"
BOOLEANS_TRUE = ("true", "t", "1", "yes", "y")
BOOLEANS_FALSE = ("false", "f", "0", "no", "n")


class LoadError(Exception):
    """The load failed as a whole and changed nothing. The message names file and column."""


@dataclass
class TableResult:
    table: str
    source_file: str
    rows: int = 0
    accepted: int = 0
    inserted: int = 0
    updated: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    #: what the file held (sha256 of its content as streamed, size on disk) and the
    #: fingerprint of the rules it was checked under (`rules_fingerprint`)
    sha256: str | None = None
    file_bytes: int | None = None
    rules: str | None = None
    #: quarantined rows whose reason depends on the load's time or on other tables (a
    #: future timestamp, an orphan): a later load may accept them
    context_quarantined: int = 0
    #: the load whose result this file's is, when the file was taken as unchanged
    #: (`unchanged_since`) and not read again; None when it was read and checked
    unchanged_since: int | None = None


@dataclass
class LoadReport:
    load_id: int
    source: str
    loaded_at: datetime
    currency: str | None
    tables: list[TableResult]
    ignored_files: list[str] = field(default_factory=list)
    ignored_columns: dict[str, list[str]] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return sum(t.accepted for t in self.tables)

    @property
    def quarantined(self) -> int:
        return sum(t.quarantined for t in self.tables)

    def as_dict(self) -> dict:
        return {
            "load_id": self.load_id,
            "source": self.source,
            "loaded_at": self.loaded_at.isoformat(),
            "currency": self.currency,
            "tables": {
                t.table: {
                    "file": t.source_file,
                    "rows": t.rows,
                    "accepted": t.accepted,
                    "inserted": t.inserted,
                    "updated": t.updated,
                    "quarantined": t.quarantined,
                    "reasons": t.reasons,
                    "sha256": t.sha256,
                    "file_bytes": t.file_bytes,
                    "rules": t.rules,
                    "context_quarantined": t.context_quarantined,
                    "unchanged_since": t.unchanged_since,
                }
                for t in self.tables
            },
            "ignored_files": self.ignored_files,
            "ignored_columns": self.ignored_columns,
        }

    def format(self) -> str:
        lines = [f"load {self.load_id} from {self.source} (currency {self.currency or '-'})"]
        lines.append(f"  {'table':<24}{'rows':>12}{'accepted':>12}{'new':>12}{'updated':>10}"
                     f"{'quarantined':>13}")
        for t in self.tables:
            lines.append(f"  {t.table:<24}{t.rows:>12,}{t.accepted:>12,}{t.inserted:>12,}"
                         f"{t.updated:>10,}{t.quarantined:>13,}")
            if t.unchanged_since is not None:
                lines.append(f"      unchanged since load {t.unchanged_since}: same content, "
                             "same rules, raw table untouched since; not read again")
            for reason, n in sorted(t.reasons.items(), key=lambda kv: -kv[1]):
                lines.append(f"      {n:>10,}  {reason}")
        for f in self.ignored_files:
            lines.append(f"  ignored file (not a contract table): {f}")
        for f, cols in self.ignored_columns.items():
            lines.append(f"  ignored columns in {f}: {', '.join(cols)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- files


def _open_binary(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _table_name_of(path: Path) -> str | None:
    name = path.name
    for suffix in (".csv.gz", ".csv"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def read_header(path: Path) -> list[str]:
    """The header row of a CSV or CSV.gz file; LoadError when it cannot be read."""
    try:
        with _open_binary(path) as raw:
            first = raw.readline(1 << 20)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise LoadError(f"{path}: cannot read the file ({exc})") from exc
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LoadError(f"{path}: the header is not UTF-8 ({exc})") from exc
    if not text.strip():
        raise LoadError(f"{path}: the file is empty (no header row)")
    try:
        header = next(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise LoadError(f"{path}: the header is not valid CSV ({exc})") from exc
    header = [h.strip() for h in header]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise LoadError(f"{path}: column {dupes[0]!r} appears twice in the header")
    return header


def _stream(path: Path) -> Iterator[bytes]:
    with _open_binary(path) as raw:
        first = True
        while True:
            chunk = raw.read(COPY_CHUNK)
            if not chunk:
                return
            if first and chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
            first = False
            yield chunk


@dataclass
class PlannedFile:
    table: Table
    path: Path
    header: list[str]


def _plan(files: dict[str, Path]) -> tuple[list[PlannedFile], dict[str, list[str]]]:
    planned, ignored_columns = [], {}
    for name in LOAD_ORDER:
        if name not in files:
            continue
        table = TABLE_BY_NAME[name]
        header = read_header(files[name])
        missing = [c.name for c in table.all_columns if c.required and c.name not in header]
        if missing:
            raise LoadError(
                f"{files[name]}: required column {missing[0]!r} is missing "
                f"(table {name} needs "
                f"{', '.join(c.name for c in table.all_columns if c.required)})"
            )
        extra = [h for h in header if h not in table.all_column_names]
        if extra:
            ignored_columns[str(files[name])] = extra
        planned.append(PlannedFile(table, files[name], header))
    return planned, ignored_columns


def discover(path: Path) -> tuple[dict[str, Path], list[str]]:
    """Contract files in a folder (or one file): table name -> path, plus ignored names."""
    if not path.exists():
        raise LoadError(f"{path}: no such file or folder")
    candidates = sorted(path.iterdir()) if path.is_dir() else [path]
    files: dict[str, Path] = {}
    ignored: list[str] = []
    for p in candidates:
        if p.is_dir() or p.name.startswith((".", "_")):
            continue
        name = _table_name_of(p)
        if name is None or name not in TABLE_BY_NAME:
            ignored.append(p.name)
            continue
        if name in files:
            raise LoadError(f"{p}: table {name} is given twice ({files[name].name} and {p.name})")
        files[name] = p
    return files, ignored


# --------------------------------------------------------------------------- SQL


STRICT_TIMESTAMP = (
    r"^[1-9]\d{3}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[T ]([01]\d|2[0-3]):[0-5]\d"
    r"(:([0-5]\d|60)(\.\d{1,6})?)?([Zz]|[+-](0\d|1[0-4])(:?[0-5]\d)?)$"
)
#: ops.try_date's pattern
STRICT_DATE = r"^[1-9]\d{3}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$"


def _lock_timeout() -> float:
    """Seconds a load waits for another one to finish (RETENTION_LOAD_LOCK_TIMEOUT)."""
    from retention.config import SettingError

    try:
        return settings().load_lock_timeout
    except SettingError as exc:
        raise LoadError(f"{exc} (the seconds to wait for another load, e.g. 900; 0 waits "
                        "without limit)") from None


def lock_loads(conn: psycopg.Connection) -> None:
    """Hold the load lock until the current transaction ends, waiting for a load that
    holds it; LoadError when it is not free within RETENTION_LOAD_LOCK_TIMEOUT seconds.

    Taken first in a load's transaction: two loads running at once would otherwise both
    replace ops.try_timestamptz and write the same rows, and the second failed with
    PostgreSQL's "tuple concurrently updated" (or a duplicate key in pg_proc). Taking it
    again in the same transaction returns at once.
    """
    timeout = _lock_timeout()
    previous = conn.execute("select current_setting('lock_timeout')").fetchone()[0]
    millis = max(1, round(timeout * 1000)) if timeout > 0 else 0
    conn.execute("select set_config('lock_timeout', %s, true)", (f"{millis}ms",))
    try:
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (LOAD_LOCK,))
    except psycopg.errors.LockNotAvailable:
        raise LoadError(f"another load is running on this database; waited {timeout:g} s for it "
                        f"to finish (set {LOCK_TIMEOUT_ENV} to wait longer, 0 without limit)"
                        ) from None
    conn.execute("select set_config('lock_timeout', %s, true)", (previous,))


def tune_session(conn: psycopg.Connection) -> None:
    """Set-wise checks over millions of staged rows: sort and hash in memory, no JIT
    (its compile time dominates on these one-off statements); index builds (a first
    load's, see `deferred_indexes`) sort in memory too."""
    conn.execute("set local jit = off")
    conn.execute("set local work_mem = '256MB'")
    conn.execute("set local maintenance_work_mem = '256MB'")


@dataclass(frozen=True)
class DeferredIndex:
    """An index dropped for a bulk write, and what recreates it as it was: a secondary
    index, or (`key_of` set) the primary key constraint of table `key_of`."""
    name: str
    definition: str  # pg_get_indexdef: CREATE INDEX ... ON raw.<table> USING ...;
    #                  a key's pg_get_constraintdef: PRIMARY KEY (...) [USING INDEX ...]
    tablespace: str | None
    comment: str | None  # a key's: the constraint's comment
    key_of: str | None = None


def deferred_indexes(conn: psycopg.Connection, table: str) -> list[DeferredIndex]:
    """Drop the primary key and the secondary indexes of `raw.<table>` when the table is
    empty, for `restore_indexes` to create again after the write (the key first); []
    (nothing dropped) when the table has rows or this role does not own it. Secondary:
    not unique, not the primary key, backing no constraint, valid, not the replica
    identity. The key is dropped unless its index is the replica identity or has a
    comment of its own, or a foreign key points to it; adding it again after the write
    is one sorted build of its index instead of a unique check and an index entry (with
    its WAL record) per row, and a repeated key fails there, with the UniqueViolation the
    insert would have raised. Run inside the load's transaction."""
    key = conn.execute("""
        select c.conname, pg_get_constraintdef(c.oid), null::text,
               obj_description(c.oid, 'pg_constraint'), %s::text
        from pg_constraint c
        join pg_class t on t.oid = c.conrelid
        join pg_index x on x.indexrelid = c.conindid
        where c.conrelid = to_regclass(%s) and c.contype = 'p' and x.indisvalid
          and not x.indisreplident and pg_has_role(t.relowner, 'USAGE')
          and obj_description(c.conindid, 'pg_class') is null
          and not exists (select 1 from pg_constraint f where f.confrelid = c.conrelid)
    """, (table, f"raw.{table}")).fetchall()
    rows = conn.execute("""
        select i.relname, pg_get_indexdef(x.indexrelid), ts.spcname,
               obj_description(x.indexrelid, 'pg_class')
        from pg_index x
        join pg_class i on i.oid = x.indexrelid
        join pg_class t on t.oid = x.indrelid
        left join pg_tablespace ts on ts.oid = i.reltablespace
        where x.indrelid = to_regclass(%s) and not x.indisunique and not x.indisprimary
          and x.indisvalid and not x.indisreplident
          and pg_has_role(t.relowner, 'USAGE')
          and not exists (select 1 from pg_constraint c where c.conindid = x.indexrelid)
        order by i.relname
    """, (f"raw.{table}",)).fetchall()
    if not (key or rows) or not _is_empty(conn, table):
        return []
    found = [DeferredIndex(*row) for row in key + rows]
    for index in found:
        if index.key_of:
            conn.execute(sql.SQL("alter table {} drop constraint {}").format(
                sql.Identifier("raw", table), sql.Identifier(index.name)))
        else:
            conn.execute(sql.SQL("drop index {}").format(sql.Identifier("raw", index.name)))
    return found


def restore_indexes(conn: psycopg.Connection, indexes: list[DeferredIndex]) -> None:
    """Create again, as they were, the indexes `deferred_indexes` dropped; the primary
    key first (UniqueViolation when the rows written repeat a key)."""
    for index in indexes:
        if index.key_of:
            table = sql.Identifier("raw", index.key_of)
            conn.execute(sql.SQL("alter table {} add constraint {} {}").format(
                table, sql.Identifier(index.name), sql.SQL(index.definition)))
            if index.comment is not None:
                conn.execute(sql.SQL("comment on constraint {} on {} is {}").format(
                    sql.Identifier(index.name), table, sql.Literal(index.comment)))
            continue
        statement = sql.SQL(index.definition)  # the server's own text of the index
        if index.tablespace:
            statement = sql.SQL("{} tablespace {}").format(
                statement, sql.Identifier(index.tablespace))
        conn.execute(statement)
        if index.comment is not None:
            conn.execute(sql.SQL("comment on index {} is {}").format(
                sql.Identifier("raw", index.name), sql.Literal(index.comment)))


def _typed_expr(col_type: str, ref: sql.Composable) -> sql.Composable:
    """The value of the cleaned text `ref` as `col_type`, NULL where the contract does not
    accept the text; never fails (the safe pass)."""
    if col_type == "text":
        return ref
    if col_type == "timestamptz":
        return sql.SQL("ops.try_timestamptz({})").format(ref)
    if col_type == "date":
        return sql.SQL("ops.try_date({})").format(ref)
    if col_type == "jsonb":
        return sql.SQL("case when {r} is not null then ops.try_jsonb({r}) end").format(r=ref)
    if col_type == "numeric":
        return sql.SQL("case when {r} ~ {p} then ({r})::numeric(18,2) end").format(
            r=ref, p=sql.Literal(NUMERIC))
    if col_type == "integer":
        return sql.SQL("case when {r} ~ {p} then ({r})::integer end").format(
            r=ref, p=sql.Literal(INTEGER))
    if col_type == "boolean":
        return _boolean_expr(ref)
    raise ValueError(col_type)


def _boolean_expr(ref: sql.Composable) -> sql.Composable:
    return sql.SQL(
        "case when lower({r}) in ({t}) then true when lower({r}) in ({f}) then false end"
    ).format(r=ref, t=sql.SQL(", ").join(map(sql.Literal, BOOLEANS_TRUE)),
             f=sql.SQL(", ").join(map(sql.Literal, BOOLEANS_FALSE)))


#: the fast pass's plain cast of each type (it fails the statement on a text the type
#: cannot read, and the safe pass runs instead); text and boolean need none
CASTS = {"timestamptz": "timestamptz", "date": "date", "jsonb": "jsonb",
         "numeric": "numeric(18,2)", "integer": "integer"}


def _fast_typed_expr(col_type: str, ref: sql.Composable, cast: sql.Composable) -> sql.Composable:
    """The fast pass's value of the cleaned text `ref`, given `cast`, its plain cast that
    succeeded: the same value as `_typed_expr` gives. A text the cast reads but the
    contract does not accept (a timestamp without offset, `1e3`, `NaN`) is NULL: the text
    is accepted at once when it is the cast's own canonical rendering (what exporters
    write: `2025-03-01T10:00:00Z`, `100.50`, `7`), else when it matches the contract's
    pattern, so the regular expression only runs on the other spellings."""
    if col_type in ("text", "jsonb"):
        return ref if col_type == "text" else cast
    if col_type == "boolean":
        return _boolean_expr(ref)
    if col_type == "timestamptz":
        canonical = sql.SQL(
            "({r} like '____-__-__T__:__:__Z' and left({r}, 1) <> '0' and "
            "to_char({c} at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') = {r})"
        ).format(r=ref, c=cast)
        pattern = STRICT_TIMESTAMP
    elif col_type == "date":
        canonical = sql.SQL("(left({r}, 1) <> '0' and to_char({c}, 'YYYY-MM-DD') = {r})").format(
            r=ref, c=cast)
        pattern = STRICT_DATE
    elif col_type == "numeric":
        # a finite numeric(18,2) renders with two decimals (NaN and Infinity do not)
        canonical = sql.SQL("({c}::text = {r} and {r} like '%%.__')").format(r=ref, c=cast)
        pattern = NUMERIC
    elif col_type == "integer":
        canonical = sql.SQL("({c}::text = {r} and {c} between -999999999 and 999999999)"
                            ).format(r=ref, c=cast)
        pattern = INTEGER
    else:
        raise ValueError(col_type)
    return sql.SQL("case when {canonical} or {r} ~ {p} then {c} end").format(
        canonical=canonical, r=ref, p=sql.Literal(pattern), c=cast)


def _reason(cond: sql.Composable, text: sql.Composable | str) -> sql.Composable:
    msg = sql.Literal(text) if isinstance(text, str) else text
    return sql.SQL("case when {} then {} end").format(cond, msg)


def _validate_sql(table: Table, header: list[str], currency: str | None,
                  catalog: EventCatalog | None = None, *, fast: bool = False) -> sql.Composable:
    """One pass over the staged text rows: _rec_no, typed contract columns and the reasons
    a row breaks the contract (NULL when it does not). Duplicates and foreign keys are
    checked afterwards on the result (see `_mark_duplicates_and_orphans`).

    `fast`: the typed values come from plain casts (`CASTS`), and the statement fails
    (a DataError) when a text cannot be cast at all; otherwise its result is the same
    as the safe pass's (`fast=False`), whose typed values never fail. See `_checked_stage`.

    `catalog`: the shop's declared event types (events only): a declared custom type is
    a known event_type, and each row's properties are checked against its type's
    declaration. Without it only the contract's event types are known."""
    n = sql.Identifier
    cleaned, casts, typed, reasons = [], [], [], []
    for col in table.all_columns:
        if col.name in header:
            # nullif(btrim(x), ''), with btrim's copy only where there are spaces to trim
            # ('%%': the statement has parameters; LIKE reads '%%' as '%' either way)
            src = sql.SQL("case when s.{0} like ' %%' or s.{0} like '%% ' "
                          "then nullif(btrim(s.{0}), '') else nullif(s.{0}, '') end"
                          ).format(n(col.name))
        else:
            src = sql.SQL("null::text")
        if col.enum:
            src = sql.SQL("lower({})").format(src)
        cleaned.append(sql.SQL("{} as {}").format(src, n(f"t_{col.name}")))
        if fast and col.type in CASTS:
            casts.append(sql.SQL("(c.{})::{} as {}").format(
                n(f"t_{col.name}"), sql.SQL(CASTS[col.type]), n(f"k_{col.name}")))
        tref = sql.SQL("k.{}").format(n(f"t_{col.name}"))
        if fast and col.type in CASTS:
            expr = _fast_typed_expr(col.type, tref, sql.SQL("k.{}").format(n(f"k_{col.name}")))
        elif fast:
            expr = _fast_typed_expr(col.type, tref, sql.SQL("null"))
        else:
            expr = _typed_expr(col.type, tref)
        typed.append(sql.SQL("{} as {}").format(expr, n(col.name)))
    for col in table.all_columns:
        tref = sql.SQL("v.{}").format(n(f"t_{col.name}"))
        vref = sql.SQL("v.{}").format(n(col.name))
        if col.name in table.key:
            reasons.append(_reason(sql.SQL("{} is null").format(tref), f"missing key {col.name}"))
        elif col.not_null:
            reasons.append(_reason(sql.SQL("{} is null").format(tref), f"missing {col.name}"))
        if col.type != "text":
            reasons.append(_reason(
                sql.SQL("{} is not null and {} is null").format(tref, vref),
                sql.SQL("'unparsable ' || {} || ' ' || quote_literal(left({}, 60))").format(
                    sql.Literal(f"{col.type} in {col.name}:"), tref)))
        if col.enum and catalog is not None and col.name == "event_type":
            reasons.append(_reason(
                sql.SQL("{} is not null and {} <> all({})").format(
                    tref, tref, sql.Literal(list(catalog.event_types))),
                sql.SQL("{} || quote_literal({}) || {}").format(
                    sql.Literal(f"unknown {col.name} "), tref,
                    sql.Literal(f" (not a contract type, not declared in "
                                f"{catalog.path.name})"))))
        elif col.enum:
            reasons.append(_reason(
                sql.SQL("{} is not null and {} <> all({})").format(
                    tref, tref, sql.Literal(list(col.enum))),
                sql.SQL("{} || quote_literal({})").format(
                    sql.Literal(f"unknown {col.name} "), tref)))
        if col.non_negative:
            reasons.append(_reason(sql.SQL("{} < 0").format(vref), f"negative {col.name}"))
        if col.type == "timestamptz":
            reasons.append(_reason(
                sql.SQL("{} > %(loaded_at)s").format(vref),
                f"timestamp in the future of the load: {col.name}"))
        if col.type == "date":
            # a day of grace: the load's UTC date is already tomorrow in some time zones
            reasons.append(_reason(
                sql.SQL("{} > (%(loaded_at)s::timestamptz at time zone 'UTC')::date + 1"
                        ).format(vref),
                f"date in the future of the load: {col.name}"))
        if col.type == "jsonb":
            reasons.append(_reason(
                sql.SQL("jsonb_typeof({}) <> 'object'").format(vref),
                sql.SQL("{} || left({}::text, 60)").format(
                    sql.Literal(f"{col.name} is not a JSON object: "), vref)))
    if catalog is not None and "properties" in table.all_column_names:
        reasons.append(properties_reason(catalog, sql.SQL("v.t_event_type"),
                                         sql.SQL("v.properties"), sql.SQL("v.t_properties")))
    if table.currency_column and currency:
        cref = sql.SQL("upper(v.{})").format(n(f"t_{table.currency_column}"))
        reasons.append(_reason(
            sql.SQL("{} <> {}").format(cref, sql.Literal(currency)),
            sql.SQL("'wrong currency ' || {} || {}").format(
                cref, sql.Literal(f" (shop currency {currency})"))))
    # nested subqueries, each kept apart by `offset 0` so that an expression is computed
    # once per row: c cleans the text, k casts it (fast pass), v types it; the reasons
    # read v (a lateral subquery per level costs a rescan per row, these do not)
    return sql.SQL("""
        select v._rec_no, {cols}, nullif(concat_ws('; ', {reasons}), '') as reason
        from (select k.*, {typed} from (
                select c.*{casts} from (
                  select s._rec_no, {cleaned} from stage s offset 0) c
                offset 0) k
              offset 0) v
    """).format(
        cols=sql.SQL(", ").join(sql.SQL("v.{}").format(n(c.name)) for c in table.all_columns),
        reasons=sql.SQL(", ").join(reasons) if reasons else sql.SQL("null"),
        cleaned=sql.SQL(", ").join(cleaned),
        casts=sql.SQL("").join(sql.SQL(", {}").format(c) for c in casts),
        typed=sql.SQL(", ").join(typed),
    )


def _first_write(conn: psycopg.Connection, table: Table) -> int | None:
    """Into an empty `raw.<table>` (a shop's first load of it): mark the orphans, then
    insert the rows valid so far with a plain INSERT, the primary key and the secondary
    indexes built after it (`deferred_indexes`); the number of rows inserted. When the
    file repeats a key (the primary key's build refuses it), everything it did is rolled
    back and it returns None: the caller marks duplicates and orphans as usual, and writes then.
    A file without repeated keys so spares the duplicate search over all its rows."""
    conn.execute("savepoint first_write")
    try:
        _mark_orphans(conn, table)
        deferred = deferred_indexes(conn, table.name)
        inserted = conn.execute(_insert_sql(table)).rowcount
        restore_indexes(conn, deferred)
    except psycopg.errors.UniqueViolation:
        conn.execute("rollback to savepoint first_write")
        conn.execute("release savepoint first_write")
        return None
    conn.execute("release savepoint first_write")
    return inserted


def _mark_duplicates_and_orphans(conn: psycopg.Connection, table: Table) -> None:
    """A second row with the key of an earlier valid row is a duplicate; a row whose
    foreign key points nowhere is an orphan. Both only among rows valid so far."""
    n = sql.Identifier
    keys = sql.SQL(", ").join(n(k) for k in table.key)
    join = sql.SQL(" and ").join(sql.SQL("c.{0} = d.{0}").format(n(k)) for k in table.key)
    conn.execute(sql.SQL("""
        with dupes as (
          select {keys}, min(_rec_no) as first_rec from checked_stage
          where reason is null group by {keys} having count(*) > 1
        )
        update checked_stage c
        set reason = 'duplicate key (first at line ' || (d.first_rec + 1) || ')'
        from dupes d where {join} and c.reason is null and c._rec_no <> d.first_rec
    """).format(keys=keys, join=join))
    _mark_orphans(conn, table)


def _mark_orphans(conn: psycopg.Connection, table: Table) -> None:
    """A row (valid so far) whose foreign key points nowhere is an orphan."""
    n = sql.Identifier
    for fk in table.foreign_keys:
        conn.execute(sql.SQL("""
            update checked_stage c set reason = {reason}
            where c.reason is null and c.{col} is not null
              and not exists (select 1 from raw.{ref} r where r.{refcol} = c.{col})
        """).format(reason=sql.Literal(f"{fk.reason}: {fk.column}"), col=n(fk.column),
                    ref=n(fk.table), refcol=n(fk.ref_column)))


def _is_empty(conn: psycopg.Connection, table: str) -> bool:
    return not conn.execute(sql.SQL("select exists (select 1 from raw.{})").format(
        sql.Identifier(table))).fetchone()[0]


def _insert_sql(table: Table) -> sql.Composable:
    """The accepted rows into an empty `raw.<table>` (see check_and_write)."""
    cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.all_columns)
    return sql.SQL("insert into raw.{table} ({cols}) select {cols} from checked_stage "
                   "where reason is null").format(table=sql.Identifier(table.name), cols=cols)


def _upsert_sql(table: Table) -> sql.Composable:
    n = sql.Identifier
    cols = sql.SQL(", ").join(n(c.name) for c in table.all_columns)
    non_key = [c.name for c in table.all_columns if c.name not in table.key]
    updates = sql.SQL(", ").join(sql.SQL("{0} = excluded.{0}").format(n(c)) for c in non_key)
    changed = sql.SQL("({}) is distinct from ({})").format(
        sql.SQL(", ").join(sql.SQL("t.{}").format(n(c)) for c in non_key),
        sql.SQL(", ").join(sql.SQL("excluded.{}").format(n(c)) for c in non_key))
    # rows equal to the stored ones are left out before the insert: the upsert would
    # lock (and so write) every row it finds, even where it changes nothing
    same = sql.SQL(" and ").join(
        [sql.SQL("r.{0} = c.{0}").format(n(k)) for k in table.key]
        + ([sql.SQL("({}) is not distinct from ({})").format(
            sql.SQL(", ").join(sql.SQL("r.{}").format(n(c)) for c in non_key),
            sql.SQL(", ").join(sql.SQL("c.{}").format(n(c)) for c in non_key))] if non_key else []))
    return sql.SQL("""
        with written as (
          insert into raw.{table} as t ({cols})
          select {cols} from checked_stage c where c.reason is null
            and not exists (select from raw.{table} r where {same})
          on conflict ({key}) do update set {updates} where {changed}
          returning (xmax = 0) as inserted
        )
        select count(*) filter (where inserted), count(*) filter (where not inserted) from written
    """).format(table=n(table.name), cols=cols,
                key=sql.SQL(", ").join(n(k) for k in table.key),
                updates=updates, changed=changed, same=same)


# --------------------------------------------------------------------------- unchanged files

#: the code whose rules decide what a file's rows become (`rules_fingerprint`)
RULES_SOURCES = tuple(Path(__file__).with_name(name)
                      for name in ("load.py", "contract.py", "events.py"))


def context_reason_patterns(table: Table) -> list[str]:
    """LIKE patterns of the quarantine reasons that depend on more than the row and the
    rules: the load's time (a future timestamp or date) and the rows of other tables (an
    orphan)."""
    return ["%in the future of the load%"] + [f"%{fk.reason}: {fk.column}%"
                                               for fk in table.foreign_keys]


def rules_fingerprint(table: Table, currency: str | None,
                      catalog: EventCatalog | None) -> str:
    """What, besides a file's bytes and the load's time, decides which of its rows are
    accepted and what they become: the loader's and the contract's code, the table, the
    shop currency (tables with a currency column) and (events) the declared event types."""
    digest = hashlib.sha256()
    for source in RULES_SOURCES:
        digest.update(source.read_bytes())
    digest.update(repr((table, currency if table.currency_column else None)).encode())
    if catalog is not None:
        digest.update(repr(catalog.declared).encode())
    return digest.hexdigest()


def content_sha256(path: Path) -> str:
    """The sha256 of a file's content as the load streams it (`_stream`)."""
    digest = hashlib.sha256()
    for chunk in _stream(path):
        digest.update(chunk)
    return digest.hexdigest()


def unchanged_since(conn: psycopg.Connection, pf: PlannedFile, rules: str,
                    loaded_at: datetime) -> TableResult | None:
    """The result of the earlier load that `pf` would only repeat, taken over, or None
    when the file must be read and checked.

    A file is unchanged when all of this holds (anything else reads it):

    * the last write to `raw.<table>` was a contract load's (ops.raw_writes, kept by
      triggers: a hand edit, a script, an erasure, any write but a load's, since then
      makes the table not what that load left) and that load succeeded;
    * that load's file of the table had the same content (sha256 of the bytes streamed;
      the file's size on disk is compared first, so a changed file is not hashed twice)
      and was checked under the same rules (`rules_fingerprint`: the same loader code,
      contract, currency and declared event types);
    * it was the same file, or none of its rows was quarantined (the quarantine keeps
      each row under its file's name);
    * none of its rows was quarantined for a reason a later load could see otherwise (a
      timestamp in the future of that load, an orphan), and this load's time is not
      earlier than that load's (an accepted timestamp stays in the past);
    * no table its foreign keys point to was written by anything but a load since (a
      deleted parent would make an accepted row an orphan).

    Then checking the file again would accept the same rows, write nothing and
    quarantine the same rows: its result is that load's, with nothing inserted or updated.
    """
    row = conn.execute("""
        select w.load_id, l.summary -> 'tables' -> %(t)s,
               not exists (select 1 from ops.raw_writes p
                           where p.table_name = any(%(parents)s)
                             and p.other_write_seq > w.write_seq),
               l.loaded_at <= %(at)s
        from ops.raw_writes w
        join ops.loads l on l.load_id = w.load_id and l.status = 'succeeded'
        where w.table_name = %(t)s
    """, {"t": pf.table.name, "parents": [fk.table for fk in pf.table.foreign_keys],
          "at": loaded_at}).fetchone()
    if row is None:
        return None
    load_id, entry, parents_untouched, not_later = row
    if not entry or not parents_untouched or not not_later:
        return None
    if (entry.get("rules") != rules or entry.get("file_bytes") != pf.path.stat().st_size
            or entry.get("context_quarantined") != 0 or entry.get("sha256") is None
            or (entry.get("file") != str(pf.path) and entry.get("quarantined") != 0)):
        return None
    if content_sha256(pf.path) != entry["sha256"]:
        return None
    return TableResult(
        pf.table.name, str(pf.path), rows=entry["rows"], accepted=entry["accepted"],
        quarantined=entry["quarantined"], reasons=dict(entry.get("reasons") or {}),
        sha256=entry["sha256"], file_bytes=entry["file_bytes"], rules=rules,
        unchanged_since=load_id)


# --------------------------------------------------------------------------- the load


def _shop_currency(conn: psycopg.Connection, explicit: str | None,
                   loaded_at: datetime) -> str | None:
    """Explicit argument, then RETENTION_CURRENCY, then the currency fixed by an earlier load."""
    chosen = explicit or settings().currency
    if chosen:
        return chosen.strip().upper()
    row = conn.execute("select value from ops.shop_settings where key = 'currency'").fetchone()
    return row[0] if row else None


def _infer_currency(conn: psycopg.Connection, loaded_at: datetime) -> str | None:
    """First load without a configured currency: the most frequent one of its orders."""
    row = conn.execute("""
        select upper(nullif(btrim(currency), '')) c, count(*) from stage
        where nullif(btrim(currency), '') is not null group by 1 order by 2 desc, 1 limit 1
    """).fetchone()
    if not row:
        return None
    conn.execute(
        "insert into ops.shop_settings (key, value, set_at, set_by) values "
        "('currency', %s, %s, 'inferred from the first load') on conflict (key) do nothing",
        (row[0], loaded_at))
    return row[0]


def stage_file(conn: psycopg.Connection, pf: PlannedFile) -> str:
    """COPY the file into the temporary table `stage`; the sha256 of what it streamed
    (`content_sha256`)."""
    n = sql.Identifier
    conn.execute("drop table if exists stage, checked_stage")
    conn.execute(sql.SQL("create temp table stage (_rec_no bigserial, {}) on commit drop").format(
        sql.SQL(", ").join(sql.SQL("{} text").format(n(h or f"unnamed_{i}"))
                           for i, h in enumerate(pf.header))))
    copy_cols = sql.SQL(", ").join(n(h or f"unnamed_{i}") for i, h in enumerate(pf.header))
    stmt = sql.SQL("copy stage ({}) from stdin with (format csv, header true, encoding 'UTF8')")
    digest = hashlib.sha256()
    try:
        with conn.cursor().copy(stmt.format(copy_cols)) as copy:
            for chunk in _stream(pf.path):
                digest.update(chunk)
                copy.write(chunk)
    except (psycopg.errors.DataError, psycopg.errors.BadCopyFileFormat,
            psycopg.errors.CharacterNotInRepertoire, psycopg.errors.UntranslatableCharacter,
            gzip.BadGzipFile, EOFError, OSError) as exc:
        detail = str(exc).strip().splitlines()[0]
        where = getattr(getattr(exc, "diag", None), "context", None) or ""
        line = ""
        if "line " in where:
            # COPY counts the header as line 1, which is our numbering too
            line = " at line " + where.split("line ", 1)[1].split(",")[0].split(":")[0]
        raise LoadError(f"{pf.path}: not valid CSV{line}: {detail}") from exc
    return digest.hexdigest()


def _checked_stage(conn: psycopg.Connection, pf: PlannedFile, currency: str | None,
                   loaded_at: datetime, catalog: EventCatalog | None) -> None:
    """Create `checked_stage` from `stage` (see `_validate_sql`): by the fast pass, in a
    savepoint, and when a text in the file cannot be cast at all (a date that does not
    exist, a number that is no number), by the safe pass after rolling the fast one back.
    Both give the same rows: the fast pass spares a clean file the regular expressions
    and the safe functions' costs on every value."""
    params = {"loaded_at": loaded_at}
    conn.execute("savepoint fast_check")
    try:
        conn.execute(sql.SQL("create temp table checked_stage on commit drop as {}").format(
            _validate_sql(pf.table, pf.header, currency, catalog, fast=True)), params)
    except (psycopg.DataError, psycopg.errors.ProgramLimitExceeded):
        # (a JSON text nested too deep for the cast, which ops.try_jsonb reads as NULL)
        conn.execute("rollback to savepoint fast_check")
        conn.execute(sql.SQL("create temp table checked_stage on commit drop as {}").format(
            _validate_sql(pf.table, pf.header, currency, catalog)), params)
    conn.execute("release savepoint fast_check")
    # statistics for the joins that follow (duplicates, foreign keys, the rows that
    # changed): without them `reason is null` looks rare, and the planner probes the raw
    # table's index once per staged row instead of hashing
    conn.execute("analyze checked_stage")


def check_and_write(conn: psycopg.Connection, pf: PlannedFile, currency: str | None,
                    loaded_at: datetime, load_id: int, source_file: str, *,
                    catalog: EventCatalog | None = None) -> TableResult:
    """Check the staged rows of one file, quarantine the bad ones and write the rest.
    `catalog`: the declared event types, for the events file (see `_validate_sql`)."""
    table = pf.table
    result = TableResult(table.name, source_file)
    _checked_stage(conn, pf, currency, loaded_at, catalog)
    written = _first_write(conn, table) if _is_empty(conn, table.name) else None
    if written is None:
        _mark_duplicates_and_orphans(conn, table)
    rows, bad, contextual = conn.execute(
        "select count(*), count(*) filter (where reason is not null), "
        "count(*) filter (where reason like any(%s)) from checked_stage",
        (context_reason_patterns(table),)).fetchone()
    result.rows, result.quarantined, result.accepted = rows, bad, rows - bad
    result.context_quarantined = contextual
    if bad:
        result.reasons = dict(conn.execute(
            "select split_part(reason, ':', 1), count(*) from checked_stage "
            "where reason is not null group by 1").fetchall())
    # the quarantine set of a file is replaced by that of its latest load
    conn.execute(
        "delete from ops.quarantine q where table_name = %s and source_file = %s and not exists "
        "(select 1 from checked_stage c where c.reason is not null and c._rec_no + 1 = q.line_no)",
        (table.name, source_file))
    if bad:
        conn.execute(
            """insert into ops.quarantine as q (table_name, source_file, line_no, reason, record,
                                                load_id, quarantined_at)
               select %s, %s, c._rec_no + 1, c.reason, to_jsonb(s) - '_rec_no', %s, %s
               from checked_stage c join stage s using (_rec_no)
               where c.reason is not null
               on conflict (table_name, source_file, line_no) do update
                 set reason = excluded.reason, record = excluded.record, load_id = excluded.load_id,
                     quarantined_at = excluded.quarantined_at
                 where (q.reason, q.record) is distinct from (excluded.reason, excluded.record)""",
            (table.name, source_file, load_id, loaded_at))
    if written is not None:
        result.inserted = written
    elif result.accepted and _is_empty(conn, table.name):
        # nothing to conflict with (the staged keys are distinct: later ones are
        # quarantined as duplicates), so a plain insert, with the lookups built after it
        deferred = deferred_indexes(conn, table.name)
        result.inserted = conn.execute(_insert_sql(table)).rowcount
        restore_indexes(conn, deferred)
    else:
        result.inserted, result.updated = conn.execute(_upsert_sql(table)).fetchone()
    return result


def load_folder(path: str | Path, url: str | None = None, *, loaded_at: datetime | None = None,
                currency: str | None = None, recheck: bool = False) -> LoadReport:
    """Load a folder of contract CSV/CSV.gz files (or one file) into schema raw.

    `loaded_at` is the load's own time: timestamps after it are quarantined as future ones.
    The CLI passes the current time, the ingest DAG its data interval end.
    `recheck`: read and check every file, also those unchanged since their last load
    (`unchanged_since`).
    """
    path = Path(path).resolve()
    loaded_at = loaded_at or datetime.now(timezone.utc)
    files, ignored = discover(path)
    if not files:
        raise LoadError(f"{path}: no contract files found (expected e.g. customers.csv, orders.csv)")
    planned, ignored_columns = _plan(files)
    catalog = None
    if "events" in files:
        # once per load, before anything is written: a wrong file fails the load
        try:
            catalog = load_catalog()
        except EventsFileError as exc:
            raise LoadError(str(exc)) from None
    with db.connect(url) as conn:
        ensure_schemas(conn)
        conn.commit()
        lock_loads(conn)
        tune_session(conn)
        for name in REQUIRED_TABLES:
            if name not in files:
                present = conn.execute(sql.SQL("select exists (select 1 from raw.{})").format(
                    sql.Identifier(name))).fetchone()[0]
                if not present:
                    raise LoadError(f"{path}: {name}.csv is required (raw.{name} is empty)")
        load_id = conn.execute(
            "insert into ops.loads (source, format, loaded_at, status) values (%s, %s, %s, "
            "'running') returning load_id", (str(path), "contract", loaded_at)).fetchone()[0]
        # the triggers of ops.raw_writes record this load as the writer of what it writes
        conn.execute("select set_config('retention.load_id', %s, true)", (str(load_id),))
        shop_currency = _shop_currency(conn, currency, loaded_at)
        results = []
        for pf in planned:
            file_catalog = catalog if pf.table.name == "events" else None
            rules = rules_fingerprint(pf.table, shop_currency, file_catalog)
            same = None if recheck else unchanged_since(conn, pf, rules, loaded_at)
            if same is not None:
                results.append(same)
                continue
            file_bytes = pf.path.stat().st_size
            digest = stage_file(conn, pf)
            if pf.table.currency_column and shop_currency is None \
                    and pf.table.currency_column in pf.header:
                shop_currency = _infer_currency(conn, loaded_at)
                rules = rules_fingerprint(pf.table, shop_currency, file_catalog)
            result = check_and_write(conn, pf, shop_currency, loaded_at, load_id, str(pf.path),
                                     catalog=file_catalog)
            result.sha256, result.file_bytes, result.rules = digest, file_bytes, rules
            results.append(result)
        report = LoadReport(load_id, str(path), loaded_at, shop_currency, results, ignored,
                            ignored_columns)
        conn.execute("update ops.loads set status = 'succeeded', summary = %s where load_id = %s",
                     (json.dumps(report.as_dict()), load_id))
        conn.commit()
    return report


def stage_rows_sql_types() -> dict[str, str]:  # pragma: no cover - documentation helper
    return dict(SQL_TYPES)
