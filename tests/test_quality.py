"""The data-quality checkpoint (Great Expectations) over a real raw layer."""

from __future__ import annotations

import csv
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from retention import db
from retention.ingest.load import load_folder
from retention.ingest.quality import CRITICAL, WARNING, DataQualityError, run_checkpoint

AS_OF = datetime(2026, 3, 1, tzinfo=timezone.utc)


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RETENTION_HOME", str(tmp_path))
    return tmp_path


def execute(url: str, statement: str, params: tuple = ()) -> None:
    with db.connect(url) as conn:
        conn.execute(statement, params)
        conn.commit()


def fill_clean(url: str, newest: datetime = AS_OF - timedelta(hours=3)) -> None:
    """A small shop whose newest order and event are `newest`."""
    with db.connect(url) as conn:
        conn.execute("insert into raw.customers (customer_id, email, created_at) values "
                     "('c1', 'a@example.com', %s), ('c2', null, %s)",
                     (newest - timedelta(days=90), newest - timedelta(days=30)))
        conn.execute("insert into raw.channel_subscriptions values "
                     "('c1', 'email', 'a@example.com', %s, null)", (newest - timedelta(days=90),))
        conn.execute("insert into raw.orders values "
                     "('o1', 'c1', %s, 'paid', 100.50, 'UAH', 'card', null), "
                     "('o2', 'c2', %s, 'cancelled', 0, 'UAH', 'card', 'out_of_stock')",
                     (newest - timedelta(days=10), newest))
        conn.execute("insert into raw.order_items values "
                     "('o1', 1, 'p1', 1, 100.50), ('o2', 1, 'p1', 2, 10), ('o2', 2, 'p2', 1, 5)")
        conn.execute("insert into raw.events (event_id, occurred_at, event_type, customer_id, "
                     "product_id, price) values ('e1', %s, 'view', 'c1', 'p1', 100.50), "
                     "('e2', %s, 'cart', null, 'p2', 5)", (newest - timedelta(days=1), newest))
        conn.commit()


def stored_results(url: str) -> list[tuple]:
    with db.connect(url) as conn:
        return conn.execute(
            "select run_key, load_id, as_of, checked_at, table_name, expectation, column_name, "
            "severity, success, observed_value from ops.data_quality_results "
            "order by table_name, expectation, column_name").fetchall()


def test_clean_dataset_passes_every_generated_expectation(database_url, home):
    fill_clean(database_url)

    report = run_checkpoint(database_url, as_of=AS_OF)

    assert report.success and report.failures == [], report.format()
    report.raise_for_failures(include_warnings=True)
    checks = {(r.table, r.expectation, r.column) for r in report.results}
    # suites come from the contract: keys, compound keys, enums, ranges, freshness, volume
    assert {
        ("customers", "expect_column_values_to_be_unique", "customer_id"),
        ("customers", "expect_table_row_count_to_be_between", None),
        ("orders", "expect_table_row_count_to_be_between", None),
        ("orders", "expect_column_values_to_be_in_set", "status"),
        ("orders", "expect_column_values_to_be_between", "total_amount"),
        ("orders", "expect_column_max_to_be_between", "ordered_at"),
        ("order_items", "expect_compound_columns_to_be_unique", "order_id, line_no"),
        ("order_items", "expect_column_values_to_be_between", "quantity"),
        ("channel_subscriptions", "expect_column_values_to_be_in_set", "channel"),
        ("events", "expect_column_values_to_be_in_set", "event_type"),
        ("events", "expect_column_max_to_be_between", "occurred_at"),
    } <= checks
    by_check = {(r.table, r.expectation, r.column): r for r in report.results}
    quantity = by_check[("order_items", "expect_column_values_to_be_between", "quantity")]
    assert quantity.kwargs["min_value"] == 1
    # an optional table with no file and no rows is not required to have rows
    assert ("products", "expect_table_row_count_to_be_between", None) not in checks
    assert report.docs_index == home / "data_quality" / "data_docs" / "index.html"
    assert "raw.order_items" in report.docs_index.read_text()


def test_empty_required_orders_fails_loudly_naming_the_table(database_url, home):
    fill_clean(database_url)
    execute(database_url, "delete from raw.order_items; delete from raw.orders")

    report = run_checkpoint(database_url, as_of=AS_OF)

    assert not report.success
    failed = {(r.table, r.expectation, r.severity) for r in report.failures}
    assert ("orders", "expect_table_row_count_to_be_between", CRITICAL) in failed
    with pytest.raises(DataQualityError,
                       match=r"raw\.orders: expect_table_row_count_to_be_between failed"):
        report.raise_for_failures()


def test_stale_events_fail_against_the_given_as_of(database_url, home):
    fill_clean(database_url)
    execute(database_url, "update raw.events set occurred_at = %s - case event_id "
                          "when 'e1' then interval '4 days' else interval '3 days' end", (AS_OF,))

    report = run_checkpoint(database_url, as_of=AS_OF, tables=["events"])

    [stale] = [r for r in report.errors if r.table == "events"]
    assert (stale.expectation, stale.column) == ("expect_column_max_to_be_between", "occurred_at")
    assert stale.observed["observed_value"].startswith(
        (AS_OF - timedelta(days=3)).date().isoformat())
    with pytest.raises(DataQualityError,
                       match=r"raw\.events\.occurred_at: expect_column_max_to_be_between"):
        report.raise_for_failures()
    # the lag is a parameter, and the same rows are fresh for an earlier as_of
    assert run_checkpoint(database_url, as_of=AS_OF, tables=["events"],
                          freshness_lags={"events": timedelta(days=4)}).success
    assert run_checkpoint(database_url, as_of=AS_OF - timedelta(days=2), tables=["events"]).success


def test_bad_rows_written_straight_into_raw_are_reported(database_url, home):
    fill_clean(database_url)
    # a shop writing into raw directly, bypassing the loader's quarantine
    execute(database_url, "insert into raw.orders values "
                          "('o3', 'c1', %s, 'shipped', -5, 'UAH', 'card', null)",
            (AS_OF - timedelta(hours=1),))

    report = run_checkpoint(database_url, as_of=AS_OF, tables=["orders"], load_id=None)

    failures = {(r.table, r.expectation, r.column): r for r in report.failures}
    status = failures[("orders", "expect_column_values_to_be_in_set", "status")]
    assert status.severity == WARNING
    assert status.observed["unexpected_count"] == 1
    assert status.observed["partial_unexpected_list"] == ["shipped"]
    assert ("orders", "expect_column_values_to_be_between", "total_amount") in failures
    # row-level problems are reported, like quarantine, and do not stop the run ...
    assert report.success
    report.raise_for_failures()
    # ... unless asked to
    with pytest.raises(DataQualityError,
                       match=r"raw\.orders\.status: expect_column_values_to_be_in_set"):
        report.raise_for_failures(include_warnings=True)
    stored = [row for row in stored_results(database_url)
              if row[4:7] == ("orders", "expect_column_values_to_be_in_set", "status")]
    assert [(row[7], row[8], row[9]["partial_unexpected_list"]) for row in stored] == [
        (WARNING, False, ["shipped"])]


def test_results_are_persisted_per_load_and_replaced_on_rerun(database_url, home, tmp_path):
    shop = tmp_path / "shop"
    shop.mkdir()
    files = {
        "customers": [["customer_id", "email"], ["c1", "a@example.com"]],
        "orders": [["order_id", "customer_id", "ordered_at", "status", "total_amount",
                    "currency"], ["o1", "c1", "2026-02-28T10:00:00Z", "paid", "10", "UAH"]],
        "events": [["event_id", "occurred_at", "event_type"]],  # a file with no rows
    }
    for name, rows in files.items():
        with open(shop / f"{name}.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
    load = load_folder(shop, database_url, loaded_at=AS_OF, currency="UAH")

    report = run_checkpoint(database_url, as_of=AS_OF, load_id=load.load_id)

    # the load's tables come from ops.loads: events had a file, so it must have rows
    assert {(r.table, r.expectation) for r in report.errors} == {
        ("events", "expect_table_row_count_to_be_between"),
        ("events", "expect_column_max_to_be_between")}
    stored = stored_results(database_url)
    assert len(stored) == len(report.results) > 20
    assert {(row[0], row[1], row[2], row[3]) for row in stored} == {
        (f"load-{load.load_id}", load.load_id, AS_OF, AS_OF)}
    orders_count = next(row for row in stored
                        if row[4:6] == ("orders", "expect_table_row_count_to_be_between"))
    assert (orders_count[8], orders_count[9]["observed_value"]) == (True, 1)
    events_count = next(row for row in stored
                        if row[4:6] == ("events", "expect_table_row_count_to_be_between"))
    assert (events_count[7], events_count[8], events_count[9]["observed_value"]) == (
        CRITICAL, False, 0)

    run_checkpoint(database_url, as_of=AS_OF, load_id=load.load_id)
    assert len(stored_results(database_url)) == len(stored)
