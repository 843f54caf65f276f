"""Loading through the contract: bad rows quarantined with reason, bad files change nothing."""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from retention import db
from retention.ingest.formats import load_path
from retention.ingest.load import LoadError, load_folder

LOADED_AT = datetime(2026, 1, 1, tzinfo=timezone.utc)

CUSTOMERS = [
    ["customer_id", "email", "phone", "loyalty_card_id", "created_at", "timezone", "city", "country"],
    ["c1", "a@example.com", "+380671112233", "L1", "2025-01-01T10:00:00Z", "Europe/Kyiv", "Kyiv", "UA"],
    ["c2", "b@example.com", "", "", "2025-02-01T10:00:00+02:00", "Europe/Kyiv", "Lviv", "UA"],
]
ORDERS = [
    ["order_id", "customer_id", "ordered_at", "status", "total_amount", "currency", "payment_method", "cancel_reason"],
    ["o1", "c1", "2025-03-01T10:00:00Z", "paid", "100.50", "UAH", "card", ""],
    ["o2", "c2", "2025-03-02T10:00:00Z", "delivered", "20", "UAH", "cash", ""],
]
ITEMS = [
    ["order_id", "line_no", "product_id", "quantity", "unit_price"],
    ["o1", "1", "p1", "1", "100.50"],
    ["o2", "1", "p2", "2", "10"],
]


def write_csv(folder: Path, name: str, rows: list[list[str]], gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name + (".csv.gz" if gz else ".csv"))
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return path


def snapshot(url: str) -> dict[str, list[tuple]]:
    """Every raw and ops.quarantine row, to prove a failed load changed nothing."""
    tables = ["raw.customers", "raw.orders", "raw.order_items", "raw.channel_subscriptions",
              "raw.events", "raw.products", "ops.quarantine", "ops.loads"]
    with db.connect(url) as conn:
        return {t: conn.execute(f"select * from {t} order by 1, 2").fetchall() for t in tables}


def quarantine(url: str) -> list[tuple[str, str, int, str]]:
    with db.connect(url) as conn:
        return conn.execute(
            "select table_name, source_file, line_no, reason from ops.quarantine order by 1, 3"
        ).fetchall()


@pytest.fixture()
def good_shop(tmp_path, database_url) -> Path:
    folder = tmp_path / "shop"
    write_csv(folder, "customers", CUSTOMERS)
    write_csv(folder, "orders", ORDERS)
    write_csv(folder, "order_items", ITEMS)
    report = load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    assert report.quarantined == 0 and report.accepted == 6
    return folder


def test_clean_load_writes_typed_rows(good_shop, database_url):
    with db.connect(database_url) as conn:
        row = conn.execute(
            "select total_amount, ordered_at, status from raw.orders where order_id = 'o1'"
        ).fetchone()
        c2 = conn.execute("select phone, created_at from raw.customers where customer_id = 'c2'").fetchone()
    assert str(row[0]) == "100.50"
    assert row[1] == datetime(2025, 3, 1, 10, tzinfo=timezone.utc)
    assert row[2] == "paid"
    assert c2[0] is None  # empty field = NULL
    assert c2[1] == datetime(2025, 2, 1, 8, tzinfo=timezone.utc)


def test_reloading_the_same_files_changes_nothing(good_shop, database_url):
    before = snapshot(database_url)
    report = load_folder(good_shop, database_url, loaded_at=LOADED_AT, currency="UAH")
    assert [(t.inserted, t.updated) for t in report.tables] == [(0, 0)] * 3
    after = snapshot(database_url)
    before.pop("ops.loads"), after.pop("ops.loads")  # the load log records the second load
    assert before == after


def test_reload_with_a_changed_row_updates_it(good_shop, database_url):
    rows = [r[:] for r in ORDERS]
    rows[1][3] = "returned"
    write_csv(good_shop, "orders", rows)
    report = load_folder(good_shop, database_url, loaded_at=LOADED_AT, currency="UAH")
    orders = next(t for t in report.tables if t.table == "orders")
    assert (orders.inserted, orders.updated) == (0, 1)
    with db.connect(database_url) as conn:
        assert conn.execute("select status from raw.orders where order_id='o1'").fetchone()[0] == "returned"


BAD_ROWS = {
    # kind: (table, good rows + one bad row, expected reason fragment)
    "missing key": ("orders", ["", "c1", "2025-03-03T10:00:00Z", "paid", "5", "UAH", "", ""], "missing key order_id"),
    "duplicate key": ("orders", ["o1", "c2", "2025-03-03T10:00:00Z", "paid", "5", "UAH", "", ""], "duplicate key (first at line 2)"),
    "unknown status": ("orders", ["o9", "c1", "2025-03-03T10:00:00Z", "shipped", "5", "UAH", "", ""], "unknown status 'shipped'"),
    "negative amount": ("orders", ["o9", "c1", "2025-03-03T10:00:00Z", "paid", "-5", "UAH", "", ""], "negative total_amount"),
    "future timestamp": ("orders", ["o9", "c1", "2026-02-01T00:00:00Z", "paid", "5", "UAH", "", ""], "timestamp in the future of the load: ordered_at"),
    "wrong currency": ("orders", ["o9", "c1", "2025-03-03T10:00:00Z", "paid", "5", "USD", "", ""], "wrong currency USD (shop currency UAH)"),
    "unparsable amount": ("orders", ["o9", "c1", "2025-03-03T10:00:00Z", "paid", "5,00", "UAH", "", ""], "unparsable numeric in total_amount: '5,00'"),
    "unparsable timestamp": ("orders", ["o9", "c1", "2025-02-30T10:00:00Z", "paid", "5", "UAH", "", ""], "unparsable timestamptz in ordered_at"),
    "timestamp without offset": ("orders", ["o9", "c1", "2025-03-03 10:00:00", "paid", "5", "UAH", "", ""], "unparsable timestamptz in ordered_at"),
    "unknown customer": ("orders", ["o9", "c404", "2025-03-03T10:00:00Z", "paid", "5", "UAH", "", ""], "unknown customer: customer_id"),
    "item of a missing order": ("order_items", ["o404", "1", "p1", "1", "5"], "order does not exist: order_id"),
    "unparsable quantity": ("order_items", ["o1", "2", "p1", "two", "5"], "unparsable integer in quantity"),
    "unknown channel": ("channel_subscriptions", ["c1", "pigeon", "x", "2025-01-01T00:00:00Z", ""], "unknown channel 'pigeon'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_is_quarantined_and_good_rows_load(kind, tmp_path, database_url):
    table, bad, reason = BAD_ROWS[kind]
    folder = tmp_path / "shop"
    write_csv(folder, "customers", CUSTOMERS)
    base = {"orders": ORDERS, "order_items": ITEMS,
            "channel_subscriptions": [["customer_id", "channel", "address", "subscribed_at", "unsubscribed_at"],
                                      ["c1", "email", "a@example.com", "2025-01-01T00:00:00Z", ""]]}
    for name, rows in base.items():
        write_csv(folder, name, rows + ([bad] if name == table else []))
    report = load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    result = next(t for t in report.tables if t.table == table)
    good_rows = len(base[table]) - 1
    assert (result.accepted, result.quarantined) == (good_rows, 1)
    rows = quarantine(database_url)
    assert len(rows) == 1
    q_table, q_file, q_line, q_reason = rows[0]
    assert (q_table, q_line) == (table, len(base[table]) + 1)
    assert q_file.endswith(f"{table}.csv")
    assert reason in q_reason
    with db.connect(database_url) as conn:
        assert conn.execute(f"select count(*) from raw.{table}").fetchone()[0] == good_rows
        record = conn.execute("select record from ops.quarantine").fetchone()[0]
    assert record[next(iter(record))] is not None  # the original values are kept


def test_quarantine_is_replaced_when_the_file_is_fixed(tmp_path, database_url):
    folder = tmp_path / "shop"
    write_csv(folder, "customers", CUSTOMERS)
    write_csv(folder, "orders", ORDERS + [["o9", "c1", "2025-03-03T10:00:00Z", "paid", "-1", "UAH", "", ""]])
    load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    assert len(quarantine(database_url)) == 1
    write_csv(folder, "orders", ORDERS + [["o9", "c1", "2025-03-03T10:00:00Z", "paid", "1", "UAH", "", ""]])
    load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    assert quarantine(database_url) == []
    with db.connect(database_url) as conn:
        assert conn.execute("select count(*) from raw.orders").fetchone()[0] == 3


@pytest.mark.parametrize("broken", ["ragged row", "unclosed quote", "not utf-8"])
def test_malformed_file_fails_naming_it_and_changes_nothing(broken, good_shop, database_url):
    before = snapshot(database_url)
    write_csv(good_shop, "customers", CUSTOMERS + [["c3", "c@example.com", "", "", "", "", "", "UA"]])
    path = good_shop / "order_items.csv"
    if broken == "ragged row":
        path.write_text(path.read_text() + "o2,2,p3,1,5,EXTRA\n")
    elif broken == "unclosed quote":
        path.write_text(path.read_text() + 'o2,2,"p3,1,5\n')
    else:
        path.write_bytes(path.read_bytes() + b"o2,2,p\xff3,1,5\n")
    with pytest.raises(LoadError) as err:
        load_folder(good_shop, database_url, loaded_at=LOADED_AT, currency="UAH")
    assert "order_items.csv" in str(err.value)
    assert snapshot(database_url) == before  # customers c3 from the same load is not there either


def test_missing_required_column_names_file_and_column(tmp_path, database_url):
    folder = tmp_path / "shop"
    write_csv(folder, "customers", CUSTOMERS)
    write_csv(folder, "orders", [[v for j, v in enumerate(r) if j != 3] for r in ORDERS])  # no status
    before = snapshot(database_url)
    with pytest.raises(LoadError, match=r"orders\.csv: required column 'status' is missing"):
        load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    assert snapshot(database_url) == before


def test_required_tables_must_be_present(tmp_path, database_url):
    folder = tmp_path / "shop"
    write_csv(folder, "customers", CUSTOMERS)
    with pytest.raises(LoadError, match="orders.csv is required"):
        load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")


def test_gzip_files_and_inferred_currency(tmp_path, database_url, monkeypatch):
    monkeypatch.delenv("RETENTION_CURRENCY", raising=False)
    folder = tmp_path / "shop"
    write_csv(folder, "customers", CUSTOMERS, gz=True)
    write_csv(folder, "orders", ORDERS + [["o3", "c1", "2025-03-03T10:00:00Z", "paid", "5", "EUR", "", ""]], gz=True)
    report = load_folder(folder, database_url, loaded_at=LOADED_AT)
    assert report.currency == "UAH"  # the most frequent currency of the first load
    assert [(t.table, t.accepted, t.quarantined) for t in report.tables] == [
        ("customers", 2, 0), ("orders", 2, 1)]
    with db.connect(database_url) as conn:
        assert conn.execute("select value from ops.shop_settings where key='currency'").fetchone() == ("UAH",)


def test_rees46_sample_loads_without_loss(sample_data, database_url):
    sample = sample_data / "rees46_sample_2019-10-01.csv"
    with open(sample, newline="") as fh:
        records = list(csv.DictReader(fh))
    report = load_path(sample, database_url, fmt="rees46", loaded_at=LOADED_AT)
    assert report.quarantined == 0
    with db.connect(database_url) as conn:
        events = conn.execute(
            "select event_type, count(*) from raw.events group by 1 order by 1").fetchall()
        products = conn.execute("select count(*) from raw.products").fetchone()[0]
        sessions = conn.execute("select count(distinct session_id) from raw.events").fetchone()[0]
        first = conn.execute("select min(occurred_at), max(occurred_at) from raw.events").fetchone()
    expected_types: dict[str, int] = {}
    for r in records:
        expected_types[r["event_type"]] = expected_types.get(r["event_type"], 0) + 1
    assert dict(events) == expected_types and sum(expected_types.values()) == len(records) == 4999
    assert products == len({r["product_id"] for r in records})
    assert sessions == len({r["user_session"] for r in records})
    assert first == (datetime(2019, 10, 1, tzinfo=timezone.utc),
                     datetime(2019, 10, 1, 2, 28, tzinfo=timezone.utc).replace(second=first[1].second))
    again = load_path(sample, database_url, fmt="rees46", loaded_at=LOADED_AT)
    assert sum(t.inserted + t.updated for t in again.tables) == 0


def test_cli_reports_a_failed_load(tmp_path, database_url):
    folder = tmp_path / "shop"
    write_csv(folder, "customers", [["email"], ["x@example.com"]])
    write_csv(folder, "orders", ORDERS)
    proc = subprocess.run([sys.executable, "-m", "retention.cli", "load", str(folder)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "customers.csv: required column 'customer_id' is missing" in proc.stderr


def test_raw_schema_indexes_events_by_time(good_shop, database_url):
    """The daily dbt build reads only the last days of raw.events: the raw schema itself
    (not only the trigger tables) gives it an index on occurred_at, which a time-range
    read can use."""
    with db.connect(database_url) as conn:
        indexes = [r[0] for r in conn.execute(
            "select indexdef from pg_indexes where schemaname = 'raw' and tablename = 'events'")]
        assert any(d.endswith("(occurred_at)") for d in indexes), indexes
        conn.execute("set enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(
            "explain select * from raw.events where occurred_at >= '2026-10-28T00:00:00Z'"))
    assert "trg_events_time" in plan, plan


def _shop(folder: Path) -> Path:
    write_csv(folder, "customers", CUSTOMERS)
    write_csv(folder, "orders", ORDERS)
    write_csv(folder, "order_items", ITEMS)
    return folder


class _PausedLoad:
    """Loads in threads, each with its own connection (load_folder opens one); the load
    in the thread named `paused` stops after taking its locks, inside its transaction,
    until `release` is set, so a second load meets it deterministically."""

    def __init__(self, monkeypatch) -> None:
        import threading

        from retention.ingest import load as load_module

        self.threading = threading
        self.inside = threading.Event()
        self.release = threading.Event()
        self.outcomes: dict[str, object] = {}
        self.threads: dict[str, threading.Thread] = {}
        original = load_module.check_and_write

        def check_and_write(*args, **kwargs):
            if threading.current_thread().name == "paused":
                self.inside.set()
                assert self.release.wait(60), "the paused load was never released"
            return original(*args, **kwargs)

        monkeypatch.setattr(load_module, "check_and_write", check_and_write)

    def start(self, name: str, folder: Path, url: str) -> None:
        def run() -> None:
            try:
                self.outcomes[name] = load_folder(folder, url, loaded_at=LOADED_AT, currency="UAH")
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                self.outcomes[name] = exc

        thread = self.threading.Thread(target=run, name=name, daemon=True)
        self.threads[name] = thread
        thread.start()

    def start_behind(self, first: Path, second: Path, url: str) -> None:
        """Load `first` as `paused`; once it is inside its transaction, `second` as
        `second`."""
        self.start("paused", first, url)
        assert self.inside.wait(60)
        self.start("second", second, url)

    def join(self, name: str, timeout: float = 60) -> object:
        self.threads[name].join(timeout)
        assert not self.threads[name].is_alive(), f"load {name} did not finish"
        return self.outcomes[name]


def _waiting_on_advisory_lock(url: str) -> int:
    with db.connect(url) as conn:
        return conn.execute(
            "select count(*) from pg_stat_activity where datname = current_database() "
            "and wait_event_type = 'Lock' and wait_event = 'advisory'").fetchone()[0]


def test_concurrent_loads_wait_for_each_other(tmp_path, database_url, monkeypatch):
    """A second load started while one runs waits for the load lock, then runs: both
    succeed (without the lock at the start of the transaction, the second one failed
    with PostgreSQL's 'tuple concurrently updated')."""
    import time

    paused = _PausedLoad(monkeypatch)
    first, second = _shop(tmp_path / "first"), _shop(tmp_path / "second")
    try:
        paused.start_behind(first, second, database_url)
        deadline = time.monotonic() + 30
        while _waiting_on_advisory_lock(database_url) == 0 and time.monotonic() < deadline:
            assert paused.threads["second"].is_alive(), paused.outcomes.get("second")
            time.sleep(0.05)
        assert _waiting_on_advisory_lock(database_url) == 1
        assert paused.threads["second"].is_alive()
    finally:
        paused.release.set()
    a, b = paused.join("paused"), paused.join("second")
    assert not isinstance(a, BaseException), a
    assert not isinstance(b, BaseException), b
    assert b.load_id > a.load_id and b.accepted == a.accepted == 6
    with db.connect(database_url) as conn:
        loads = conn.execute("select status, count(*) from ops.loads group by 1").fetchall()
    assert loads == [("succeeded", 2)]


def test_a_load_that_cannot_get_the_lock_fails_clearly(tmp_path, database_url, monkeypatch):
    monkeypatch.setenv("RETENTION_LOAD_LOCK_TIMEOUT", "0.5")
    paused = _PausedLoad(monkeypatch)
    first, second = _shop(tmp_path / "first"), _shop(tmp_path / "second")
    try:
        paused.start_behind(first, second, database_url)
        paused.threads["second"].join(30)
        finished_while_paused = not paused.threads["second"].is_alive()
    finally:
        paused.release.set()
    b = paused.join("second")
    assert finished_while_paused, "the second load waited beyond its lock timeout"
    assert isinstance(b, LoadError), b
    assert "another load is running" in str(b) and "RETENTION_LOAD_LOCK_TIMEOUT" in str(b)
    a = paused.join("paused")
    assert not isinstance(a, BaseException), a
    with db.connect(database_url) as conn:
        loads = conn.execute("select source, status from ops.loads").fetchall()
    assert loads == [(str(first.resolve()), "succeeded")]


def test_lock_timeout_setting_must_be_seconds(good_shop, database_url, monkeypatch):
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("RETENTION_LOAD_LOCK_TIMEOUT", bad)
        with pytest.raises(LoadError, match="RETENTION_LOAD_LOCK_TIMEOUT"):
            load_folder(good_shop, database_url, loaded_at=LOADED_AT, currency="UAH")


def test_concurrent_cli_loads_in_separate_processes(tmp_path, database_url):
    """Real processes started together, as two `retention load` runs would be."""
    folders = [_shop(tmp_path / f"shop{i}") for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-m", "retention.cli", "load", str(f),
                               "--currency", "UAH"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for f in folders]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert "concurrently" not in err
    with db.connect(database_url) as conn:
        loads = conn.execute("select status, count(*) from ops.loads group by 1").fetchall()
    assert loads == [("succeeded", 4)]


def test_an_unknown_format_is_refused_by_name(database_url, tmp_path):
    with pytest.raises(LoadError, match="unknown format 'parquet'"):
        load_path(tmp_path, database_url, fmt="parquet", loaded_at=LOADED_AT)


def _raw_indexes(url: str) -> dict[str, tuple[str, int]]:
    """Every index of schema raw: name -> (definition, oid)."""
    with db.connect(url) as conn:
        return {name: (definition, oid) for name, definition, oid in conn.execute(
            "select indexname, indexdef, to_regclass(format('%I.%I', schemaname, indexname))::oid"
            " from pg_indexes where schemaname = 'raw'")}


def test_first_load_recreates_the_lookup_indexes_it_deferred(tmp_path, database_url):
    """Into empty tables the loader drops the lookup indexes before the upsert and creates
    them again after it: the same definitions (new objects) and a comment kept; a second
    load into tables with rows leaves them alone."""
    with db.connect(database_url) as conn:
        conn.execute("comment on index raw.trg_orders_time is 'orders by time'")
        conn.commit()
    before = _raw_indexes(database_url)
    assert {"trg_orders_customer_time", "trg_orders_time", "customers_pkey"} <= set(before)
    folder = _shop(tmp_path / "shop")
    load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    after = _raw_indexes(database_url)
    assert {n: d for n, (d, _) in after.items()} == {n: d for n, (d, _) in before.items()}
    # the orders lookups and the loaded tables' keys were dropped and made again (the
    # same definitions, new objects); the unloaded tables' stay
    assert after["trg_orders_time"][1] != before["trg_orders_time"][1]
    assert after["trg_orders_customer_time"][1] != before["trg_orders_customer_time"][1]
    assert after["customers_pkey"][1] != before["customers_pkey"][1]
    assert after["trg_events_time"][1] == before["trg_events_time"][1]
    assert after["events_pkey"][1] == before["events_pkey"][1]
    with db.connect(database_url) as conn:
        assert conn.execute("select pg_get_constraintdef(oid) from pg_constraint "
                            "where conname = 'customers_pkey' and contype = 'p'"
                            ).fetchone()[0] == "PRIMARY KEY (customer_id)"
    with db.connect(database_url) as conn:
        assert conn.execute("select obj_description('raw.trg_orders_time'::regclass, "
                            "'pg_class')").fetchone()[0] == "orders by time"
        conn.execute("set enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(
            "explain select * from raw.orders where ordered_at >= '2025-03-02T00:00:00Z'"))
    assert "trg_orders_time" in plan, plan
    write_csv(folder, "orders", ORDERS + [["o9", "c1", "2025-03-03T10:00:00Z", "paid", "1", "UAH", "", ""]])
    load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    assert _raw_indexes(database_url) == after  # tables with rows: indexes untouched


def test_failed_first_load_leaves_the_indexes_and_tables_as_they_were(tmp_path, database_url):
    """A first load whose last file is broken fails after the earlier tables' indexes
    were dropped and made again: the rollback leaves every index (the same objects) and
    every table as before."""
    before, rows = _raw_indexes(database_url), snapshot(database_url)
    folder = _shop(tmp_path / "shop")
    write_csv(folder, "events", [["event_id", "occurred_at", "event_type", "customer_id"],
                                 ["e1", "2025-03-01T10:00:00Z", "view", "c1", "EXTRA"]])
    with pytest.raises(LoadError, match="events.csv"):
        load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    assert _raw_indexes(database_url) == before
    assert snapshot(database_url) == rows
    load_folder(_shop(tmp_path / "fixed"), database_url, loaded_at=LOADED_AT, currency="UAH")
    assert {n: d for n, (d, _) in _raw_indexes(database_url).items()} == \
        {n: d for n, (d, _) in before.items()}


def test_a_first_load_without_currency_column_or_setting_loads(tmp_path, database_url,
                                                              monkeypatch):
    """currency is optional: with no column and no configured currency there is nothing to
    infer from; the orders load and the shop's currency stays unset."""
    monkeypatch.delenv("RETENTION_CURRENCY", raising=False)
    folder = tmp_path / "shop"
    write_csv(folder, "customers", CUSTOMERS)
    column = ORDERS[0].index("currency")
    write_csv(folder, "orders", [[v for j, v in enumerate(r) if j != column] for r in ORDERS])
    report = load_folder(folder, database_url, loaded_at=LOADED_AT)
    assert report.currency is None
    assert [(t.table, t.accepted, t.quarantined) for t in report.tables] == [
        ("customers", 2, 0), ("orders", 2, 0)]
    with db.connect(database_url) as conn:
        assert conn.execute("select count(*) from ops.shop_settings "
                            "where key = 'currency'").fetchone()[0] == 0


#: texts the casts read, some of which the contract refuses (the fast pass must refuse
#: them too, with the safe pass's reasons): ordered_at, total_amount
CASTABLE_EDGES = [
    ("2025-03-01T10:00:00Z", "100.50"),        # canonical: accepted without a pattern
    ("2025-03-01T10:00:00+02:00", "20"),       # other spellings: by the patterns
    ("2025-03-01 10:00:00Z", "+5"),
    ("2025-03-01T10:00:00.123456z", ".5"),
    ("2025-03-01T10:00:60Z", "5."),
    ("2025-03-01T24:00:00Z", "1.239"),         # hour 24: the cast reads it, the contract not
    ("0999-03-01T10:00:00Z", " 7 "),           # a year before 1000
    ("2025-03-01T 5:00:00Z", "1e3"),           # a space for a digit; an exponent
    ("2025-03-01T10:00:00", "NaN"),            # no offset; not a number
    ("2025-03-01", "-0.00"),                   # a date alone
    ("2025-03-01T10:00:00+1500", "12345678901234567.00"),  # offset > 14 h; 17 digits
]


def test_fast_and_safe_checks_agree(tmp_path, database_url):
    """The fast pass (plain casts, patterns only for other spellings) gives the rows and
    reasons of the safe pass on every text the casts can read; a text they cannot read
    fails the fast statement, and the load then checks the file by the safe pass."""
    from decimal import Decimal

    import psycopg

    from retention.db.schema import ensure_schemas
    from retention.ingest.contract import TABLE_BY_NAME
    from retention.ingest.load import PlannedFile, _validate_sql, read_header, stage_file

    rows = [ORDERS[0]] + [[f"o{i}", "c1", ts, "paid", amount, "UAH", "", ""]
                          for i, (ts, amount) in enumerate(CASTABLE_EDGES[:-1])]
    path = write_csv(tmp_path / "shop", "orders", rows)
    table = TABLE_BY_NAME["orders"]
    params = {"loaded_at": LOADED_AT}
    with db.connect(database_url) as conn:
        ensure_schemas(conn)
        stage_file(conn, PlannedFile(table, path, read_header(path)))
        order = "select * from ({}) x order by _rec_no"
        fast = conn.execute(order.format(_validate_sql(table, rows[0], "UAH", fast=True)
                                         .as_string(conn)), params).fetchall()
        safe = conn.execute(order.format(_validate_sql(table, rows[0], "UAH")
                                         .as_string(conn)), params).fetchall()
        assert fast == safe
        reasons = [r[-1] for r in fast]
        assert reasons[:5] == [None] * 5, reasons
        assert all(r and r.startswith("unparsable timestamptz in ordered_at") for r in reasons[5:])
        assert "unparsable numeric in total_amount: '1e3'" in reasons[7]
        assert "unparsable numeric in total_amount: 'NaN'" in reasons[8]
        assert [r[5] for r in fast[:5]] == [Decimal("100.50"), 20, 5, Decimal("0.50"), 5]
        # 17 digits: numeric(18,2) cannot hold it, so the fast statement fails
        conn.execute("savepoint s")
        overflow = write_csv(tmp_path / "big", "orders", [ORDERS[0], [
            "o1", "c1", CASTABLE_EDGES[-1][0], "paid", CASTABLE_EDGES[-1][1], "UAH", "", ""]])
        stage_file(conn, PlannedFile(table, overflow, read_header(overflow)))
        with pytest.raises(psycopg.DataError):
            conn.execute(_validate_sql(table, rows[0], "UAH", fast=True), params)
        conn.execute("rollback to savepoint s")
        conn.rollback()
    # the load: the safe pass after the failed fast one, and the first load's insert
    # after a repeated key (quarantined as a duplicate) made the plain one fail
    folder = tmp_path / "load"
    write_csv(folder, "customers", CUSTOMERS)
    write_csv(folder, "orders", ORDERS + [
        ["o9", "c1", CASTABLE_EDGES[-1][0], "paid", CASTABLE_EDGES[-1][1], "UAH", "", ""],
        ["o1", "c2", "2025-03-05T10:00:00Z", "paid", "5", "UAH", "", ""]])
    report = load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    orders = next(t for t in report.tables if t.table == "orders")
    assert (orders.inserted, orders.quarantined) == (2, 2)
    got = {line: reason for _, _, line, reason in quarantine(database_url)}
    assert got[4].startswith("unparsable timestamptz in ordered_at: '2025-03-01T10:00:00+1500'")
    assert "unparsable numeric in total_amount: '12345678901234567.00'" in got[4]
    assert got[5] == "duplicate key (first at line 2)"
