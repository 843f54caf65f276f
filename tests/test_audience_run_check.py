"""ops.audience_members' reference to ops.campaign_runs (migration 0005): checked once per
statement by triggers instead of a foreign key checked per row, with the same integrity."""

from __future__ import annotations

import threading

import psycopg
import pytest

from retention import db
from retention.db import schema

RUN = ("promo@2026-11-02T10:00:00Z", "promo", "2026-11-02T10:00:00Z", "h", "{}", 0, 0,
       "2026-11-02T10:00:00Z")


def _add_run(conn: psycopg.Connection, run_id: str = RUN[0]) -> None:
    conn.execute("insert into ops.campaign_runs (run_id, campaign_id, as_of, spec_hash, spec, "
                 "audience_size, holdout_size, created_at) "
                 "values (%s, %s, %s, %s, %s, %s, %s, %s)", (run_id, *RUN[1:]))


def _add_members(conn: psycopg.Connection, run_id: str, n: int) -> None:
    conn.execute("insert into ops.audience_members (run_id, customer_id, variant) "
                 "select %s, 'c' || i, 'a' from generate_series(1, %s) i", (run_id, n))


def test_members_need_their_run(database_url):
    with db.connect(database_url) as conn:
        _add_run(conn)
        _add_members(conn, RUN[0], 3)
        conn.commit()
        # one member of an unknown run among many of a known one fails the statement
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="run check") as err:
            conn.execute("insert into ops.audience_members (run_id, customer_id, variant) "
                         "select case when i = 500 then 'nope@1' else %s end, 'd' || i, 'a' "
                         "from generate_series(1, 1000) i", (RUN[0],))
        assert "nope@1" in err.value.diag.message_detail
        conn.rollback()
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("update ops.audience_members set run_id = 'nope@2' "
                         "where customer_id = 'c1'")
        conn.rollback()
        # an update that keeps the run, and an empty insert, pass
        conn.execute("update ops.audience_members set variant = 'b' where customer_id = 'c1'")
        _add_members(conn, RUN[0], 0)
        conn.commit()
        assert conn.execute("select count(*), count(*) filter (where variant = 'b') "
                            "from ops.audience_members").fetchone() == (3, 1)


def test_a_run_with_members_stays(database_url):
    with db.connect(database_url) as conn:
        _add_run(conn)
        _add_run(conn, "empty@1")
        _add_members(conn, RUN[0], 2)
        conn.commit()
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="campaign_runs") as err:
            conn.execute("delete from ops.campaign_runs")
        assert RUN[0] in err.value.diag.message_detail
        conn.rollback()
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("update ops.campaign_runs set run_id = 'moved@1' where run_id = %s",
                         (RUN[0],))
        conn.rollback()
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("truncate ops.campaign_runs")
        conn.rollback()
        # a run without members goes; the counts of a run with members change freely;
        # members and their run go together (also by one truncate of both)
        conn.execute("delete from ops.campaign_runs where run_id = 'empty@1'")
        conn.execute("update ops.campaign_runs set audience_size = 2")
        conn.execute("delete from ops.audience_members")
        conn.execute("delete from ops.campaign_runs")
        conn.commit()
        _add_run(conn)
        _add_members(conn, RUN[0], 2)
        conn.commit()
        conn.execute("truncate ops.campaign_runs, ops.audience_members")
        conn.commit()
        assert conn.execute("select count(*) from ops.campaign_runs").fetchone() == (0,)


def test_a_run_cannot_go_while_members_are_added(database_url):
    """The members' check locks their run as the foreign key did: a concurrent delete of
    the run waits for the members' transaction and then fails."""
    with db.connect(database_url) as conn:
        _add_run(conn)
        conn.commit()
    with db.connect(database_url) as adder:
        _add_members(adder, RUN[0], 10)
        outcome: list[BaseException | None] = []
        pids: list[int] = []

        def delete() -> None:
            with db.connect(database_url) as conn:
                pids.append(conn.info.backend_pid)
                try:
                    conn.execute("delete from ops.campaign_runs")
                    conn.commit()
                    outcome.append(None)
                except psycopg.Error as exc:
                    outcome.append(exc)

        worker = threading.Thread(target=delete)
        worker.start()
        with db.connect(database_url, autocommit=True) as watcher:
            waiting = False
            for _ in range(3000):  # until the delete waits for the run's row lock
                waiting = bool(pids) and watcher.execute(
                    "select wait_event_type = 'Lock' from pg_stat_activity where pid = %s",
                    (pids[0],)).fetchone() == (True,)
                if waiting or not worker.is_alive():
                    break
                watcher.execute("select pg_sleep(0.01)")
        assert waiting, "the delete did not wait for the members' transaction"
        adder.commit()
        worker.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.ForeignKeyViolation)
    with db.connect(database_url) as conn:
        assert conn.execute("select count(*) from ops.audience_members").fetchone() == (10,)


def test_downgrade_restores_the_foreign_key(make_database):
    url = make_database("mig")
    schema.upgrade(url)
    with db.connect(url) as conn:
        _add_run(conn)
        _add_members(conn, RUN[0], 2)
        conn.commit()
    schema.downgrade(url, "0004_step_arms")
    with db.connect(url) as conn:
        assert conn.execute(
            "select conrelid::regclass::text from pg_constraint where contype = 'f' "
            "and confrelid = 'ops.campaign_runs'::regclass").fetchall() == [
                ("ops.audience_members",)]
        assert conn.execute("select count(*) from pg_trigger where not tgisinternal and "
                            "tgrelid in ('ops.audience_members'::regclass, "
                            "'ops.campaign_runs'::regclass)").fetchone() == (0,)
    schema.upgrade(url)
    with db.connect(url) as conn:
        assert conn.execute("select count(*) from pg_constraint where contype = 'f' and "
                            "confrelid = 'ops.campaign_runs'::regclass").fetchone() == (0,)
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            _add_members(conn, "nope@1", 1)
