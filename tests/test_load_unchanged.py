"""A re-load of unchanged files: taken from the load that wrote them, unless anything
that decides their rows changed since (retention.ingest.load, "unchanged files")."""

from __future__ import annotations

from datetime import datetime, timezone

from retention import db
from retention.cli import main as cli_main
from retention.ingest.load import load_folder

from test_load import CUSTOMERS, ITEMS, LOADED_AT, ORDERS, quarantine, snapshot, write_csv

LATER = datetime(2026, 3, 1, tzinfo=timezone.utc)


def _by_table(report) -> dict:
    return {t.table: t for t in report.tables}


def _shop(folder, orders=ORDERS):
    write_csv(folder, "customers", CUSTOMERS)
    write_csv(folder, "orders", orders)
    write_csv(folder, "order_items", ITEMS)
    return folder


def test_unchanged_files_are_taken_from_the_load_that_wrote_them(tmp_path, database_url):
    folder = _shop(tmp_path / "shop")
    first = load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    assert all(t.unchanged_since is None and t.sha256 for t in first.tables)
    before = snapshot(database_url)
    second = load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    third = load_folder(folder, database_url, loaded_at=LATER, currency="UAH")
    for report in (second, third):
        for t in report.tables:
            old = _by_table(first)[t.table]
            assert t.unchanged_since == first.load_id, t
            assert (t.rows, t.accepted, t.quarantined, t.inserted, t.updated, t.sha256) == (
                old.rows, old.accepted, old.quarantined, 0, 0, old.sha256)
    assert "unchanged since load" in second.format()
    after = snapshot(database_url)
    before.pop("ops.loads"), after.pop("ops.loads")
    assert before == after
    with db.connect(database_url) as conn:
        summary = conn.execute("select summary from ops.loads where load_id = %s",
                               (third.load_id,)).fetchone()[0]
        writes = dict(conn.execute("select table_name, load_id from ops.raw_writes"
                                   " where table_name in ('customers', 'orders', 'order_items')"))
    assert summary["tables"]["orders"]["unchanged_since"] == first.load_id
    assert writes == {"customers": first.load_id, "orders": first.load_id,
                      "order_items": first.load_id}


def test_a_table_changed_by_hand_is_read_again(tmp_path, database_url):
    folder = _shop(tmp_path / "shop")
    first = load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    with db.connect(database_url) as conn:
        conn.execute("update raw.orders set status = 'cancelled' where order_id = 'o1'")
        conn.commit()
    second = load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    report = _by_table(second)
    assert report["customers"].unchanged_since == first.load_id
    assert report["orders"].unchanged_since is None
    assert (report["orders"].inserted, report["orders"].updated) == (0, 1)
    # order_items point to orders, written by hand since (which might have removed an
    # order): read again too, and nothing in it changed
    assert report["order_items"].unchanged_since is None
    assert (report["order_items"].inserted, report["order_items"].updated) == (0, 0)
    with db.connect(database_url) as conn:
        assert conn.execute("select status from raw.orders where order_id = 'o1'"
                            ).fetchone()[0] == "paid"
    # the load that read them again is now the one they are taken from
    third = load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    assert {t.table: t.unchanged_since for t in third.tables} == {
        "customers": first.load_id, "orders": second.load_id, "order_items": second.load_id}


def test_a_parent_deleted_by_hand_makes_its_children_read_again(tmp_path, database_url):
    folder = tmp_path / "shop"
    write_csv(folder, "customers", CUSTOMERS)
    write_csv(folder, "orders", ORDERS)
    load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    with db.connect(database_url) as conn:
        conn.execute("delete from raw.customers where customer_id = 'c2'")
        conn.commit()
    # only the orders file: the customer is not loaded back, so o2 is an orphan now
    report = _by_table(load_folder(folder / "orders.csv", database_url, loaded_at=LOADED_AT,
                                   currency="UAH"))
    assert report["orders"].unchanged_since is None
    assert report["orders"].quarantined == 1
    assert [r[2:] for r in quarantine(database_url)] == [(3, "unknown customer: customer_id")]


def test_rows_quarantined_for_the_load_time_are_checked_again(tmp_path, database_url):
    future = ["o9", "c1", "2026-02-01T00:00:00Z", "paid", "5", "UAH", "", ""]
    folder = _shop(tmp_path / "shop", ORDERS + [future])
    first = _by_table(load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH"))
    assert (first["orders"].quarantined, first["orders"].context_quarantined) == (1, 1)
    again = _by_table(load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH"))
    assert again["orders"].unchanged_since is None and again["orders"].quarantined == 1
    assert again["customers"].unchanged_since is not None
    later = _by_table(load_folder(folder, database_url, loaded_at=LATER, currency="UAH"))
    assert later["orders"].unchanged_since is None
    assert (later["orders"].quarantined, later["orders"].inserted) == (0, 1)
    assert quarantine(database_url) == []


def test_an_earlier_load_time_or_other_rules_read_the_file_again(tmp_path, database_url):
    folder = _shop(tmp_path / "shop")
    load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    earlier = _by_table(load_folder(folder, database_url,
                                    loaded_at=datetime(2025, 3, 1, 12, tzinfo=timezone.utc),
                                    currency="UAH"))
    # o2 (2025-03-02) is in the future of that load
    assert earlier["orders"].unchanged_since is None and earlier["orders"].quarantined == 1
    assert earlier["customers"].unchanged_since is None  # every file of an earlier load
    usd = _by_table(load_folder(folder, database_url, loaded_at=LOADED_AT, currency="USD"))
    assert usd["orders"].unchanged_since is None
    assert usd["orders"].reasons == {"wrong currency UAH (shop currency USD)": 2}


def test_rows_quarantined_for_the_row_itself_stay_quarantined(tmp_path, database_url):
    bad = ["o9", "c1", "2025-03-03T10:00:00Z", "shipped", "5", "UAH", "", ""]
    folder = _shop(tmp_path / "shop", ORDERS + [bad])
    first = load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    rows = quarantine(database_url)
    assert len(rows) == 1
    again = _by_table(load_folder(folder, database_url, loaded_at=LATER, currency="UAH"))
    assert again["orders"].unchanged_since == first.load_id
    assert (again["orders"].quarantined, again["orders"].reasons) == (1, {"unknown status 'shipped'": 1})
    assert quarantine(database_url) == rows


def test_recheck_reads_every_file(tmp_path, database_url, capsys):
    folder = _shop(tmp_path / "shop")
    load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    report = load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH", recheck=True)
    assert [(t.unchanged_since, t.inserted, t.updated) for t in report.tables] == [(None, 0, 0)] * 3
    assert cli_main(["--progress", "off", "load", str(folder), "--recheck", "--currency", "UAH",
                     "--loaded-at", LOADED_AT.isoformat()]) == 0
    out = capsys.readouterr().out
    assert "unchanged since" not in out
    assert cli_main(["--progress", "off", "load", str(folder), "--currency", "UAH",
                     "--loaded-at", LOADED_AT.isoformat()]) == 0
    assert capsys.readouterr().out.count("unchanged since load") == 3


def test_a_currency_inferred_by_the_first_load_keeps_the_other_files_unchanged(
        tmp_path, database_url, monkeypatch):
    monkeypatch.delenv("RETENTION_CURRENCY", raising=False)
    folder = _shop(tmp_path / "shop")
    first = load_folder(folder, database_url, loaded_at=LOADED_AT)
    assert first.currency == "UAH"
    again = load_folder(folder, database_url, loaded_at=LOADED_AT)
    assert [t.unchanged_since for t in again.tables] == [first.load_id] * 3
