"""Alembic migrations of the schemas the pipeline owns (retention.db.schema).

A fresh database upgraded to head has every table the product uses, with the exact
columns, indexes, constraints and functions; a database made by the release before
migrations (tests/data/schema_previous_release.sql, its rows included) is adopted and
ends identical to a fresh one; an upgrade at head changes nothing.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
from datetime import date

import psycopg
import pytest
import yaml

from retention import db
from retention.cli import build_parser, main as cli_main
from retention.db import schema
from retention.ingest.contract import SQL_TYPES, TABLES

from conftest import DATA, ROOT

PREVIOUS_RELEASE = DATA / "schema_previous_release.sql"

#: every table the product reads or writes outside dbt, by schema
EXPECTED_TABLES = {
    "raw": {t.name for t in TABLES},
    "ops": {
        "alembic_version", "shop_settings", "loads", "quarantine", "data_quality_results",
        "campaign_runs", "audience_members", "messages", "claims", "message_events",
        "consent_changes", "deactivated_addresses", "chain_instances", "trigger_hits",
        "trigger_watermarks", "trigger_health", "webhook_batches", "report_deliveries",
        "predicted_value_backtests", "raw_writes",
    },
    "marts": {"customer_predicted_value", "predicted_value_fits"},
}
SCHEMAS = tuple(EXPECTED_TABLES)

#: format_type() of each contract type
PG_TYPES = {"text": "text", "timestamptz": "timestamp with time zone",
            "numeric(18,2)": "numeric(18,2)", "integer": "integer", "boolean": "boolean",
            "date": "date", "jsonb": "jsonb"}


def _tables(conn: psycopg.Connection) -> dict[str, set[str]]:
    rows = conn.execute("select table_schema, table_name from information_schema.tables "
                        "where table_schema = any(%s)", (list(SCHEMAS),)).fetchall()
    found: dict[str, set[str]] = {s: set() for s in SCHEMAS}
    for schema_name, table in rows:
        found[schema_name].add(table)
    return found


def _snapshot(url: str) -> dict[str, list[tuple]]:
    """Everything of the owned schemas a migration could change, in a comparable form."""
    with db.connect(url) as conn:
        return {
            "columns": conn.execute(
                """select c.relnamespace::regnamespace::text, c.relname,
                          row_number() over (partition by c.oid order by a.attnum), a.attname,
                          format_type(a.atttypid, a.atttypmod), a.attnotnull,
                          pg_get_expr(d.adbin, d.adrelid)
                   from pg_attribute a
                   join pg_class c on c.oid = a.attrelid
                   left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
                   where c.relnamespace::regnamespace::text = any(%s) and c.relkind = 'r'
                     and a.attnum > 0 and not a.attisdropped
                   order by 1, 2, 3""", (list(SCHEMAS),)).fetchall(),
            "indexes": conn.execute(
                "select schemaname, tablename, indexname, indexdef from pg_indexes "
                "where schemaname = any(%s) order by 1, 2, 3", (list(SCHEMAS),)).fetchall(),
            "constraints": conn.execute(
                """select conrelid::regclass::text, conname, pg_get_constraintdef(oid)
                   from pg_constraint
                   where connamespace::regnamespace::text = any(%s) order by 1, 2""",
                (list(SCHEMAS),)).fetchall(),
            "functions": conn.execute(
                """select p.oid::regprocedure::text, pg_get_functiondef(p.oid) from pg_proc p
                   where p.pronamespace::regnamespace::text = any(%s) order by 1""",
                (list(SCHEMAS),)).fetchall(),
            "sequences": conn.execute(
                "select schemaname, sequencename, data_type::text from pg_sequences "
                "where schemaname = any(%s) order by 1, 2", (list(SCHEMAS),)).fetchall(),
        }


def _restore_previous_release(url: str) -> None:
    with psycopg.connect(db.libpq_dsn(url), autocommit=True) as conn:
        conn.execute(PREVIOUS_RELEASE.read_text())


def _insert_rows(url: str) -> None:
    with db.connect(url) as conn:
        conn.execute("insert into raw.customers (customer_id, email) values ('c1', 'a@x.test')")
        conn.execute("insert into raw.orders (order_id, customer_id, ordered_at, total_amount) "
                     "values ('o1', 'c1', '2024-03-01T10:00:00Z', 12.5)")
        conn.execute("insert into ops.loads (source, format, loaded_at, status) "
                     "values ('landing/2024-03-01', 'contract', '2024-03-01T11:00:00Z', "
                     "'succeeded')")
        conn.execute("insert into ops.consent_changes (channel, address, unsubscribed_at, "
                     "source) values ('email', 'a@x.test', '2024-03-02T00:00:00Z', 'sendgrid')")
        conn.commit()


def _rows(url: str) -> list[tuple]:
    with db.connect(url) as conn:
        return [
            *conn.execute("select customer_id, email from raw.customers").fetchall(),
            *conn.execute("select order_id, total_amount::text from raw.orders").fetchall(),
            *conn.execute("select load_id, source, status from ops.loads").fetchall(),
            *conn.execute("select channel, address from ops.consent_changes").fetchall(),
        ]


ROWS = [("c1", "a@x.test"), ("o1", "12.50"), (1, "landing/2024-03-01", "succeeded"),
        ("email", "a@x.test")]


@pytest.fixture(scope="module")
def fresh_snapshot(make_database) -> dict[str, list[tuple]]:
    url = make_database("mig")
    schema.upgrade(url)
    return _snapshot(url)


def test_fresh_database_at_head_has_every_table(make_database):
    url = make_database("mig")
    assert schema.current(url) is None
    schema.upgrade(url)
    assert schema.current(url) == schema.head()
    with db.connect(url) as conn:
        assert _tables(conn) == EXPECTED_TABLES
        columns = {(t, c): (typ, notnull, default) for _, t, _, c, typ, notnull, default
                   in conn.execute(
                       """select c.relnamespace::regnamespace::text, c.relname, a.attnum,
                                 a.attname, format_type(a.atttypid, a.atttypmod),
                                 a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
                          from pg_attribute a join pg_class c on c.oid = a.attrelid
                          left join pg_attrdef d on d.adrelid = a.attrelid
                                                and d.adnum = a.attnum
                          where c.relnamespace = 'ops'::regnamespace and a.attnum > 0
                            and not a.attisdropped""").fetchall()}
        assert columns["messages", "status"] == ("text", True, None)
        assert columns["messages", "cap_class"] == ("text", True, "'promo'::text")
        assert columns["messages", "settle_after"] == ("timestamp with time zone", False, None)
        assert columns["loads", "load_id"] == (
            "bigint", True, "nextval('ops.loads_load_id_seq'::regclass)")
        assert columns["message_events", "payload"] == ("jsonb", True, "'{}'::jsonb")
        assert columns["webhook_batches", "deliveries"] == ("integer", True, "1")
        indexes = dict(conn.execute("select indexname, indexdef from pg_indexes "
                                    "where schemaname in ('raw', 'ops')").fetchall())
        assert indexes["messages_claimed"] == (
            "CREATE INDEX messages_claimed ON ops.messages USING btree (claim_token) "
            "WHERE (claim_token IS NOT NULL)")
        assert indexes["chain_instances_one_active"] == (
            "CREATE UNIQUE INDEX chain_instances_one_active ON ops.chain_instances USING btree "
            "(trigger, customer_id, subject) WHERE (status = 'active'::text)")
        assert indexes["data_quality_results_key"] == (
            "CREATE UNIQUE INDEX data_quality_results_key ON ops.data_quality_results "
            "USING btree (run_key, table_name, expectation, COALESCE(column_name, ''::text))")
        assert indexes["trg_events_time"] == (
            "CREATE INDEX trg_events_time ON raw.events USING btree (occurred_at)")
        status_check = conn.execute(
            "select pg_get_constraintdef(oid) from pg_constraint "
            "where conname = 'messages_status_check'").fetchone()[0]
        assert "'unknown'::text" in status_check
        # audience_members' run is checked per statement by triggers (migration 0005),
        # not by a foreign key
        assert conn.execute(
            "select conrelid::regclass::text from pg_constraint where contype = 'f' "
            "and confrelid = 'ops.campaign_runs'::regclass").fetchall() == []
        assert {r[0] for r in conn.execute(
            "select tgname from pg_trigger where not tgisinternal and tgrelid in "
            "('ops.audience_members'::regclass, 'ops.campaign_runs'::regclass)")} == {
                "audience_members_run_insert", "audience_members_run_update",
                "campaign_runs_members_delete", "campaign_runs_members_update",
                "campaign_runs_members_truncate"}
        # the loader's cast: a valid timestamp, an impossible day, no offset
        assert conn.execute(
            "select ops.try_timestamptz('2024-02-29T10:00:00+02:00') "
            "= '2024-02-29T08:00:00Z'::timestamptz, ops.try_timestamptz('2023-02-29T10:00:00Z'), "
            "ops.try_timestamptz('2024-02-01T10:00:00')").fetchone() == (True, None, None)


def test_the_database_fixture_is_at_head(database_url):
    """database_url (a clone of the session's migrated template) is what the other tests
    run on: at head, with every table."""
    assert schema.current(database_url) == schema.head()
    with db.connect(database_url) as conn:
        assert _tables(conn) == EXPECTED_TABLES


def test_raw_tables_are_the_contracts(fresh_snapshot):
    """The contract (what the loader validates) and the migrated raw tables agree."""
    migrated: dict[str, list[tuple]] = {}
    for schema_name, table, _, column, typ, notnull, _ in fresh_snapshot["columns"]:
        if schema_name == "raw":
            migrated.setdefault(table, []).append((column, typ, notnull))
    expected = {t.name: [(c.name, PG_TYPES[SQL_TYPES[c.type]], c.name in t.key)
                         for c in t.all_columns] for t in TABLES}
    assert migrated == expected
    keys = {name: d for table, name, d in fresh_snapshot["constraints"]
            if table.startswith("raw.")}
    for t in TABLES:
        assert keys[f"{t.name}_pkey"] == f"PRIMARY KEY ({', '.join(t.key)})"


def test_previous_release_database_is_adopted(make_database, fresh_snapshot):
    url = make_database("mig")
    _restore_previous_release(url)
    _insert_rows(url)
    assert schema.current(url) is None
    schema.upgrade(url)
    assert schema.current(url) == schema.head()
    assert _rows(url) == ROWS
    assert _snapshot(url) == fresh_snapshot


def test_partial_previous_release_database_is_completed(make_database, fresh_snapshot):
    """A database where only loads ran (no trigger, results or prediction tables), with a
    ledger from before the unknown status: the upgrade adds what is missing."""
    url = make_database("mig")
    _restore_previous_release(url)
    with db.connect(url) as conn:
        conn.execute("""
            drop table ops.chain_instances, ops.trigger_hits, ops.trigger_watermarks,
                       ops.trigger_health, ops.webhook_batches, ops.report_deliveries,
                       ops.data_quality_results, marts.customer_predicted_value,
                       marts.predicted_value_fits;
            drop index raw.trg_events_product_time, raw.trg_subscriptions_time;
            drop function ops.try_timestamptz(text);
            alter table ops.messages drop column settle_after;
            alter table ops.messages drop constraint messages_status_check;
            alter table ops.messages add constraint messages_status_check
              check (status in ('planned', 'sent', 'failed', 'suppressed', 'holdout'));
            insert into ops.messages (message_id, campaign_id, run_id, step, channel,
                                      customer_id, variant, status, planned_at)
            values ('m1', 'welcome', 'welcome@2024-03-01', 'email_1', 'email', 'c1', 'a',
                    'sent', '2024-03-01T00:00:00Z');""")
        conn.commit()
    _insert_rows(url)
    schema.upgrade(url)
    assert _rows(url) == ROWS
    assert _snapshot(url) == fresh_snapshot
    with db.connect(url) as conn:
        assert conn.execute("select message_id, status, settle_after from ops.messages"
                            ).fetchall() == [("m1", "sent", None)]
        # the status the swapped check lets in
        conn.execute("update ops.messages set status = 'unknown'")


def test_upgrade_from_the_baseline_adds_the_custom_event_columns(make_database, fresh_snapshot):
    """A database at the baseline revision, with rows: the next revision adds
    raw.events.properties and raw.customers.birth_date (NULL on the existing rows) and
    the loader's casts, and ends identical to a fresh database; its downgrade removes
    them again and keeps the rows."""
    url = make_database("mig")
    schema.upgrade(url, "0001_baseline")
    assert schema.current(url) == "0001_baseline"
    _insert_rows(url)
    with db.connect(url) as conn:
        conn.execute("insert into raw.events (event_id, occurred_at, event_type) "
                     "values ('e1', '2024-03-01T10:00:00Z', 'view')")
        conn.commit()
        assert conn.execute("select to_regprocedure('ops.try_jsonb(text)')").fetchone() == (
            None,)
    schema.upgrade(url)
    assert schema.current(url) == schema.head()
    assert _rows(url) == ROWS
    assert _snapshot(url) == fresh_snapshot
    with db.connect(url) as conn:
        assert conn.execute("select event_id, properties from raw.events").fetchall() == [
            ("e1", None)]
        assert conn.execute("select customer_id, birth_date from raw.customers").fetchall() == [
            ("c1", None)]
        assert conn.execute(
            "select ops.try_jsonb('{\"a\": 1}'), ops.try_jsonb('{a: 1'), "
            "ops.try_date('2024-02-29'), ops.try_date('2023-02-29'), ops.try_date('1990-1-2')"
        ).fetchone() == ({"a": 1}, None, date(2024, 2, 29), None, None)
    schema.downgrade(url, "0001_baseline")
    assert schema.current(url) == "0001_baseline"
    assert _rows(url) == ROWS
    with db.connect(url) as conn:
        columns = {r[0] for r in conn.execute(
            "select column_name from information_schema.columns where table_schema = 'raw' "
            "and table_name in ('events', 'customers')").fetchall()}
        assert "properties" not in columns and "birth_date" not in columns
        assert conn.execute("select to_regprocedure('ops.try_date(text)')").fetchone() == (None,)


def test_upgrade_from_0002_adds_churn_risk_columns_and_the_backtests(make_database,
                                                                      fresh_snapshot):
    """A database at 0002 with a prediction row: the next revision adds the churn and
    next-order columns (NULL on the existing row) and ops.predicted_value_backtests, and
    ends identical to a fresh database; its downgrade removes them and keeps the row."""
    url = make_database("mig")
    schema.upgrade(url, "0002_custom_events")
    with db.connect(url) as conn:
        conn.execute("insert into marts.customer_predicted_value (customer_id, as_of, "
                     "purchases, time_unit) values ('c1', '2024-03-01Z', 0, '7 days')")
        conn.commit()
    schema.upgrade(url, "0003_churn_risk")
    assert _snapshot(url) == fresh_snapshot or schema.head() != "0003_churn_risk"
    with db.connect(url) as conn:
        assert conn.execute("select customer_id, churn_risk, expected_next_order_at, "
                            "predicted_value_rank from marts.customer_predicted_value"
                            ).fetchall() == [("c1", None, None, None)]
        assert conn.execute("select count(*) from ops.predicted_value_backtests"
                            ).fetchone() == (0,)
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("update marts.customer_predicted_value set churn_risk = 'huge'")
    schema.downgrade(url, "0002_custom_events")
    with db.connect(url) as conn:
        assert conn.execute("select to_regclass('ops.predicted_value_backtests')"
                            ).fetchone() == (None,)
        columns = {r[0] for r in conn.execute(
            "select column_name from information_schema.columns where table_schema = 'marts' "
            "and table_name = 'customer_predicted_value'").fetchall()}
        assert "churn_risk" not in columns and "purchases" in columns
        assert conn.execute("select customer_id from marts.customer_predicted_value"
                            ).fetchall() == [("c1",)]


def test_upgrade_at_head_is_a_no_op(make_database, fresh_snapshot):
    url = make_database("mig")
    schema.upgrade(url)
    _insert_rows(url)
    schema.upgrade(url)
    with db.connect(url) as conn:
        schema.ensure_schemas(conn)
        conn.commit()
        assert conn.execute("select version_num from ops.alembic_version").fetchall() == [
            (schema.head(),)]
    assert _rows(url) == ROWS
    assert _snapshot(url) == fresh_snapshot


def test_ensure_schemas_at_head_does_not_migrate(make_database):
    """At head, ensure_schemas answers from the version table: it does not wait for the
    migration lock that an upgrade takes."""
    url = make_database("mig")
    schema.upgrade(url)
    with db.connect(url) as holder:
        holder.execute("select pg_advisory_xact_lock(hashtext('retention.db.migrations'))")
        done = threading.Event()

        def ensure() -> None:
            with db.connect(url) as conn:
                schema.ensure_schemas(conn)
            done.set()

        worker = threading.Thread(target=ensure, daemon=True)
        worker.start()
        finished = done.wait(timeout=20)
        holder.rollback()
        worker.join(timeout=60)
    assert finished, "ensure_schemas at head waited for the migration lock"


def test_ensure_schemas_upgrades_a_fresh_database(make_database):
    url = make_database("mig")
    with db.connect(url) as conn:
        schema.ensure_schemas(conn)
        # the caller's connection sees the tables at once
        assert conn.execute("select count(*) from ops.messages").fetchone() == (0,)
    assert schema.current(url) == schema.head()


def test_concurrent_upgrades_of_a_fresh_database(make_database, fresh_snapshot):
    """Processes (and threads of one process) upgrading one fresh database at the same
    moment: each succeeds, and the revisions ran once."""
    url = make_database("mig")
    code = ("import sys; from retention.db import schema; schema.head(); "
            "print('ready', flush=True); sys.stdin.readline(); "
            f"schema.upgrade({url!r})")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    processes = [subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(4)]
    for p in processes:  # every process has imported Alembic and read the scripts
        assert p.stdout.readline() == "ready\n", p.stderr.read()
    start = threading.Barrier(3)
    errors: list[BaseException] = []

    def run() -> None:
        start.wait()
        try:
            schema.upgrade(url)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for p in processes:
        p.stdin.write("go\n")
        p.stdin.flush()
    start.wait()
    for t in threads:
        t.join(timeout=120)
    outcomes = [(p.wait(timeout=120), p.stderr.read()) for p in processes]
    assert errors == []
    assert outcomes == [(0, "")] * len(processes)
    assert _snapshot(url) == fresh_snapshot
    with db.connect(url) as conn:
        assert conn.execute("select version_num from ops.alembic_version").fetchall() == [
            (schema.head(),)]


def test_baseline_is_not_reverted(make_database):
    url = make_database("mig")
    schema.upgrade(url)
    _insert_rows(url)
    with pytest.raises(RuntimeError, match="baseline is not reverted"):
        schema.downgrade(url, "base")
    assert schema.current(url) == schema.head()
    assert _rows(url) == ROWS


def test_a_database_of_a_newer_release_is_refused(make_database, monkeypatch, capsys):
    url = make_database("mig")
    schema.upgrade(url)
    with db.connect(url) as conn:
        conn.execute("update ops.alembic_version set version_num = '0999_from_the_future'")
        conn.commit()
    with pytest.raises(schema.UnknownRevision, match="0999_from_the_future.*newer release"):
        schema.upgrade(url)
    with db.connect(url) as conn, pytest.raises(schema.UnknownRevision):
        schema.ensure_schemas(conn)
    monkeypatch.setenv("RETENTION_DATABASE_URL", url)
    assert cli_main(["db", "upgrade"]) == 2
    assert "0999_from_the_future" in capsys.readouterr().err


def test_cli_db_upgrade_and_current(make_database, monkeypatch, capsys):
    url = make_database("mig")
    monkeypatch.setenv("RETENTION_DATABASE_URL", url)
    assert cli_main(["db", "current"]) == 0
    assert capsys.readouterr().out.strip() == "none (not migrated)"
    assert cli_main(["db", "upgrade"]) == 0
    assert capsys.readouterr().out.strip() == f"at {schema.head()} (head)"
    assert cli_main(["db", "current"]) == 0
    assert capsys.readouterr().out.strip() == f"{schema.head()} (head)"
    with db.connect(url) as conn:
        assert _tables(conn) == EXPECTED_TABLES


@pytest.mark.unit
def test_airflow_init_upgrades_the_warehouse():
    """docker-compose's init container, which every Airflow service waits for, runs
    `retention db upgrade` against the database the tasks use."""
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    services = compose["services"]
    args = shlex.split(services["airflow-init"]["command"])
    assert args[:2] == ["bash", "-c"], args
    steps = [shlex.split(step) for step in args[2].split("&&")]
    upgrade = [s for s in steps if s[:3] == ["python", "-m", "retention.cli"]]
    assert len(upgrade) == 1, steps
    assert build_parser().parse_args(upgrade[0][3:]).action == "upgrade"
    assert (services["airflow-init"]["environment"]["RETENTION_DATABASE_URL"]
            == services["airflow-worker"]["environment"]["RETENTION_DATABASE_URL"])
