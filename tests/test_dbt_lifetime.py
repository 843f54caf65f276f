"""Customer lifetime tables (dbt_project/, plugins/retention/warehouse/build.py) on real PostgreSQL.

- A hand-made shop with the edge cases (same-second purchases, cancelled/returned/placed
  orders, a family phone, a loyalty card and a phone pointing to different customers,
  local phone formats, rows after as_of, incomplete cohort windows, ties in preferred
  category, the 30-day ROPO boundary): exact values in every mart.
- A generated shop, loaded through the contract loader: every published column of the
  marts equals an independent pandas computation of CONTRACT.md section 2 (the
  `reference` function below, written from the contract, not from the SQL).
- as_of: the same as_of twice gives identical marts; an earlier as_of (through the
  incremental events model, without --full-refresh) gives the numbers of the data before
  it; moving forward again gives the first build back.
"""

from __future__ import annotations

import math
import os
import re
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pandas as pd
import psycopg
import pytest

from retention import db
from retention.ingest import load
from retention_dev import generate
from retention.warehouse.build import BuildError, build, default_as_of, summary
from retention.ingest.contract import TABLES
from retention.db.schema import ensure_schemas

# one pytest-xdist worker runs the module: its generated shop is built once
pytestmark = pytest.mark.xdist_group("test_dbt_lifetime")

UTC = timezone.utc
SELECT = "selector:lifetime"  # the lifetime models and their tests (dbt_project/selectors.yml)
DAY = timedelta(days=1)

MARTS = {
    "customer_lifetime": ["customer_id"],
    "cohort_retention": ["cohort_month"],
    "customer_category_affinity": ["customer_id", "category_path"],
    "customer_top_category_affinity": ["customer_id", "top_category"],
    "ropo_purchases": ["receipt_id"],
}


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _insert(conn: psycopg.Connection, table: str, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        cols = list(row)
        conn.execute(
            f"insert into raw.{table} ({', '.join(cols)}) values ({', '.join(['%s'] * len(cols))})",
            [row[c] for c in cols])


def _query(url: str, sql: str) -> list[dict[str, Any]]:
    with db.connect(url) as conn:
        cur = conn.execute(sql)
        names = [d.name for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def _mart(url: str, name: str) -> dict[tuple, dict[str, Any]]:
    keys = MARTS[name]
    return {tuple(r[k] for k in keys): r for r in _query(url, f"select * from marts.{name}")}


def _all_marts(url: str) -> dict[str, dict[tuple, dict[str, Any]]]:
    return {name: _mart(url, name) for name in MARTS}


def _build(url: str, as_of: datetime, **kw) -> dict[str, Any]:
    result = build(as_of=as_of, url=url, select=SELECT, **kw)
    assert result["dbt"]["success"], result["dbt"]
    assert result["dbt"]["failures"] == 0
    assert result["dbt"]["models"] >= 20 and result["dbt"]["tests"] > 50
    # unit tests run only when asked for (production builds leave them out)
    assert (result["dbt"]["unit_tests"] >= 15) if kw.get("unit_tests") else (result["dbt"]["unit_tests"] == 0)
    return result


# --------------------------------------------------------------------------- hand-made shop

AS_OF = ts("2026-03-01T00:00:00Z")


def _hand_made_shop(conn: psycopg.Connection) -> None:
    created = ts("2025-01-01T00:00:00Z")
    _insert(conn, "customers", [
        {"customer_id": "anna", "email": "anna@example.org", "phone": "+380671111111",
         "loyalty_card_id": "29001", "created_at": created},
        # the till writes boris's phone in two local formats
        {"customer_id": "boris", "phone": "0672222222", "created_at": created},
        # a family phone: a receipt with it identifies nobody
        {"customer_id": "mother", "phone": "+380673333333", "created_at": created},
        {"customer_id": "son", "phone": "+38 (067) 333-33-33", "created_at": created},
        {"customer_id": "vera", "loyalty_card_id": "29002", "created_at": created},
        # signed up after as_of: not a customer yet, nor a match for a receipt
        {"customer_id": "late", "phone": "+380674444444", "created_at": ts("2026-03-05T00:00:00Z")},
        # account created after as_of but with an order before it: exists as of as_of
        {"customer_id": "migrated", "created_at": ts("2026-04-01T00:00:00Z")},
        {"customer_id": "subscriber", "created_at": created},
        {"customer_id": "unsubscribed", "created_at": created},
        {"customer_id": "unsubscribes_later", "created_at": created},
    ])
    _insert(conn, "channel_subscriptions", [
        {"customer_id": "subscriber", "channel": "email", "address": "s@example.org",
         "subscribed_at": ts("2025-06-01T00:00:00Z")},
        {"customer_id": "unsubscribed", "channel": "email", "address": "u@example.org",
         "subscribed_at": ts("2025-06-01T00:00:00Z"), "unsubscribed_at": ts("2025-07-01T00:00:00Z")},
        {"customer_id": "unsubscribes_later", "channel": "sms", "address": "+380675555555",
         "subscribed_at": ts("2025-06-01T00:00:00Z"), "unsubscribed_at": ts("2026-04-01T00:00:00Z")},
    ])
    _insert(conn, "products", [
        {"product_id": "p_phone", "name": "Phone", "category_path": "phones.android", "price": 90},
        {"product_id": "p_case", "name": "Case", "category_path": "phones.case", "price": 5},
        {"product_id": "p_case2", "name": "Case 2", "category_path": "phones.case", "price": 50},
        {"product_id": "p_tv", "name": "TV", "category_path": "tv.oled", "price": 90},
    ])
    order = lambda oid, cid, at, status, total: {  # noqa: E731
        "order_id": oid, "customer_id": cid, "ordered_at": ts(at), "status": status,
        "total_amount": Decimal(total), "currency": "UAH"}
    _insert(conn, "orders", [
        # two purchases at the same second: numbered o1 then o2 (same source, by id)
        order("o1", "anna", "2026-01-01T10:00:00Z", "paid", "100.00"),
        order("o2", "anna", "2026-01-01T10:00:00Z", "delivered", "50.00"),
        order("o3", "anna", "2026-01-05T00:00:00Z", "cancelled", "999.00"),
        order("o4", "anna", "2026-01-06T00:00:00Z", "returned", "500.00"),
        order("o5", "anna", "2026-01-07T00:00:00Z", "placed", "70.00"),
        order("o6", "anna", "2026-03-02T00:00:00Z", "paid", "30.00"),  # after as_of
        order("o7", "boris", "2026-02-10T00:00:00Z", "paid", "80.00"),
        order("o8", "migrated", "2026-01-10T00:00:00Z", "delivered", "40.00"),
    ])
    item = lambda oid, line, pid, qty, price: {  # noqa: E731
        "order_id": oid, "line_no": line, "product_id": pid, "quantity": qty,
        "unit_price": Decimal(price)}
    _insert(conn, "order_items", [
        item("o1", 1, "p_phone", 1, "90.00"), item("o1", 2, "p_case", 2, "5.00"),
        item("o2", 1, "p_case2", 1, "50.00"),
        item("o3", 1, "p_tv", 10, "99.90"),
        item("o4", 1, "p_tv", 5, "100.00"),
        item("o6", 1, "p_tv", 1, "30.00"),
        item("o7", 1, "p_phone", 1, "80.00"),
        item("o8", 1, "p_case", 4, "10.00"),
    ])
    receipt = lambda rid, at, card, phone, total: {  # noqa: E731
        "receipt_id": rid, "store_id": "st1", "purchased_at": ts(at), "loyalty_card_id": card,
        "phone": phone, "total_amount": Decimal(total), "currency": "UAH"}
    _insert(conn, "offline_receipts", [
        # anna's card with boris's phone: the card wins
        receipt("r1", "2026-01-20T12:00:00Z", "29001", "+380672222222", "90.00"),
        receipt("r2", "2026-02-15T12:00:00Z", None, "0673333333", "25.00"),  # family phone
        receipt("r3", "2026-02-20T12:00:00Z", None, "067 222 22 22", "15.00"),  # boris
        receipt("r4", "2026-03-10T12:00:00Z", "29001", None, "60.00"),  # after as_of
        receipt("r5", "2026-02-25T12:00:00Z", None, "0674444444", "10.00"),  # late's phone
        receipt("r6", "2026-02-26T10:00:00Z", "29002", None, "30.00"),  # vera, no views
    ])
    line = lambda rid, n, pid, qty, price: {  # noqa: E731
        "receipt_id": rid, "line_no": n, "product_id": pid, "quantity": qty,
        "unit_price": Decimal(price)}
    _insert(conn, "offline_receipt_items", [
        line("r1", 1, "p_tv", 1, "90.00"),
        line("r2", 1, "p_case", 5, "5.00"),
        line("r3", 1, "p_case", 1, "15.00"),
        line("r4", 1, "p_tv", 1, "60.00"),
        line("r5", 1, "p_case", 2, "5.00"),
        line("r6", 1, "p_tv", 1, "30.00"),
    ])
    event = lambda eid, at, kind, cid, pid, cat: {  # noqa: E731
        "event_id": eid, "occurred_at": ts(at), "event_type": kind, "customer_id": cid,
        "session_id": "s", "product_id": pid, "category_path": cat}
    _insert(conn, "events", [
        # 30 days and 1 second before r1: outside the ROPO window; exactly 30 days: inside
        event("e1", "2025-12-21T11:59:59Z", "view", "anna", "p_tv", "tv.oled"),
        event("e2", "2025-12-21T12:00:00Z", "view", "anna", "p_tv", None),
        event("e3", "2026-02-27T18:00:00Z", "view", "anna", "p_phone", "phones.android"),
        event("e4", "2026-02-27T18:05:00Z", "cart", "anna", "p_phone", "phones.android"),
        event("e5", "2026-03-02T09:00:00Z", "view", "anna", "p_phone", "phones.android"),
        # boris viewed another case: r3 is ROPO by category
        event("e6", "2026-01-25T09:00:00Z", "view", "boris", "p_case2", "phones.case"),
        event("e7", "2026-02-01T09:00:00Z", "view", None, "p_tv", "tv.oled"),  # anonymous
        event("e8", "2026-02-01T09:00:00Z", "search", "vera", None, None),
        # the 90-day window of views_90d starts 2025-12-01T00:00Z (exclusive)
        event("e9", "2025-12-01T00:00:00Z", "view", "vera", "p_tv", "tv.oled"),
    ])


def _decay(days: float) -> float:
    return 0.5 ** (days / 90)


def test_hand_made_shop_exact_values_and_as_of(database_url):
    with db.connect(database_url) as conn:
        _hand_made_shop(conn)
        conn.commit()

    result = _build(database_url, AS_OF, unit_tests=True)  # the dbt unit tests run here
    marts = _all_marts(database_url)

    # ---- customer_lifetime: one row per customer existing as of as_of
    lifetime = {k[0]: v for k, v in marts["customer_lifetime"].items()}
    assert set(lifetime) == {"anna", "boris", "mother", "son", "vera", "migrated", "subscriber",
                             "unsubscribed", "unsubscribes_later"}
    assert {r["as_of"] for r in lifetime.values()} == {AS_OF}
    anna, boris, vera, migrated = (lifetime[c] for c in ("anna", "boris", "vera", "migrated"))

    # o1 + o2 (same second) + r1 (card wins over boris's phone); o3-o5 are no purchases,
    # o6 and r4 are after as_of
    assert (anna["purchases"], anna["online_purchases"], anna["offline_purchases"]) == (3, 2, 1)
    assert anna["ltv"] == Decimal("240.00") and anna["avg_order_value"] == Decimal("80.00")
    assert anna["first_purchase_at"] == anna["second_purchase_at"] == ts("2026-01-01T10:00:00Z")
    assert anna["last_purchase_at"] == ts("2026-01-20T12:00:00Z")
    assert anna["days_to_second_purchase"] == 0
    assert anna["avg_days_between_purchases"] == pytest.approx((19 + 2 / 24) / 2, abs=1e-12)
    assert anna["days_since_last_purchase"] == pytest.approx(39.5, abs=1e-12)
    # revenue: phones.android 90 (Jan 1), tv.oled 90 (Jan 20), phones.case 10 + 50:
    # the tie goes to the category bought most recently
    assert anna["preferred_category"] == "tv.oled"

    assert (boris["purchases"], boris["online_purchases"], boris["offline_purchases"]) == (2, 1, 1)
    assert boris["ltv"] == Decimal("95.00") and boris["avg_order_value"] == Decimal("47.50")
    assert boris["days_to_second_purchase"] == pytest.approx(10.5, abs=1e-12)
    assert boris["days_since_last_purchase"] == pytest.approx(8.5, abs=1e-12)
    assert boris["preferred_category"] == "phones.android"

    assert (migrated["purchases"], migrated["ltv"]) == (1, Decimal("40.00"))
    assert migrated["preferred_category"] == "phones.case"
    assert migrated["second_purchase_at"] is None and migrated["days_to_second_purchase"] is None
    assert migrated["avg_days_between_purchases"] is None
    assert (vera["purchases"], vera["offline_purchases"]) == (1, 1)
    for name in ("mother", "son", "subscriber", "unsubscribed", "unsubscribes_later"):
        row = lifetime[name]
        assert row["purchases"] == 0 and row["ltv"] == 0 and row["avg_order_value"] is None
        assert row["first_purchase_at"] is None and row["days_since_last_purchase"] is None
        assert row["preferred_category"] is None and row["rfm_segment"] == "no_purchase"

    # RFM among 4 buyers. recency ranks vera 1, boris 2, anna 3, migrated 4 -> r 4,3,2,1;
    # LTV ranks vera 30 < migrated 40 < boris 95 < anna 240 -> m 2,3,4,5
    assert [(lifetime[c]["r_score"], lifetime[c]["f_score"], lifetime[c]["m_score"],
             lifetime[c]["rfm_segment"]) for c in ("vera", "boris", "anna", "migrated")] == [
        (4, 1, 2, "new"), (3, 2, 4, "potential_loyalist"), (2, 3, 5, "at_risk"), (1, 1, 3, "lost")]

    # lifecycle: one-time norm = median days to second purchase (0 and 10.5) = 5.25,
    # floored at 14 days; anna's own gap 9.54 -> 14 too
    assert {c: r["lifecycle_stage"] for c, r in lifetime.items()} == {
        "anna": "at_risk",        # quiet 39.5 days > 2 x 14
        "boris": "repeat",        # quiet 8.5 days, 2 purchases
        "vera": "new",            # one purchase 3.6 days ago
        "migrated": "at_risk",    # one purchase 50 days ago: > 28, not > 56
        "mother": "prospect", "son": "prospect", "unsubscribed": "prospect",
        "subscriber": "subscriber_no_purchase",
        "unsubscribes_later": "subscriber_no_purchase",  # unsubscribes after as_of
    }
    assert lifetime["migrated"]["lifecycle_clock_days"] == 14

    # ---- cohort_retention
    cohorts = {k[0]: v for k, v in marts["cohort_retention"].items()}
    assert set(cohorts) == {date(2026, 1, 1), date(2026, 2, 1)}
    jan, feb = cohorts[date(2026, 1, 1)], cohorts[date(2026, 2, 1)]
    assert jan["customers"] == 2 and feb["customers"] == 2  # anna, migrated | boris, vera
    assert (jan["second_purchase_30d_rate"], jan["second_purchase_60d_rate"],
            jan["second_purchase_90d_rate"]) == (0.5, 0.5, 0.5)
    assert feb["second_purchase_30d_rate"] == 0.5
    # Jan's 30-day window ends Mar 3 > as_of: nothing is final yet
    assert not any(c[f"is_complete_{n}d"] for c in (jan, feb) for n in (30, 60, 90))
    assert jan["avg_first_purchase_categories"] == 1.5  # o1: android + case, o8: case
    assert jan["avg_second_purchase_categories"] == 1.0
    assert (jan["median_days_to_second_purchase"], jan["mean_days_to_second_purchase"]) == (0, 0)
    assert feb["median_days_to_second_purchase"] == pytest.approx(10.5, abs=1e-12)

    # ---- ropo_purchases: matched receipts only (r2 family phone, r5 not yet a customer)
    ropo = {k[0]: v for k, v in marts["ropo_purchases"].items()}
    assert set(ropo) == {"r1", "r3", "r6"}
    assert (ropo["r1"]["customer_id"], ropo["r1"]["matched_by"], ropo["r1"]["is_ropo"],
            ropo["r1"]["last_online_view_at"]) == ("anna", "loyalty_card", True,
                                                   ts("2025-12-21T12:00:00Z"))
    assert (ropo["r3"]["customer_id"], ropo["r3"]["matched_by"], ropo["r3"]["is_ropo"],
            ropo["r3"]["last_online_view_at"]) == ("boris", "phone", True,
                                                   ts("2026-01-25T09:00:00Z"))
    assert (ropo["r6"]["customer_id"], ropo["r6"]["is_ropo"],
            ropo["r6"]["last_online_view_at"]) == ("vera", False, None)
    matched = {r["receipt_id"]: r for r in _query(
        database_url, "select * from intermediate.int_receipts_matched")}
    assert matched["r1"]["card_and_phone_disagree"] is True
    assert matched["r1"]["phone_customer_id"] == "boris"
    assert (matched["r2"]["match_status"], matched["r2"]["customer_id"]) == ("ambiguous_phone", None)
    assert matched["r5"]["match_status"] == "unmatched"
    assert "r4" not in matched

    # ---- affinity: anna's categories
    affinity = {k[1]: v for k, v in marts["customer_category_affinity"].items() if k[0] == "anna"}
    assert set(affinity) == {"phones.android", "phones.case", "tv.oled"}
    android, case, tv = affinity["phones.android"], affinity["phones.case"], affinity["tv.oled"]
    assert (android["purchases"], android["purchase_revenue"], android["views_90d"]) == (
        1, Decimal("90.00"), 1)
    assert android["last_interaction_at"] == ts("2026-02-27T18:00:00Z")  # a view; e5 is after as_of
    # decay relative to anna's latest interaction (the view on Feb 27, 18:00)
    assert android["affinity_score"] == pytest.approx(5 + 3 + 1, abs=1e-6)
    assert (case["purchases"], case["purchase_revenue"], case["views_90d"]) == (2, Decimal("60.00"), 0)
    assert case["affinity_score"] == pytest.approx(10 * _decay(57 + 8 / 24), abs=1e-6)
    assert (tv["purchases"], tv["purchase_revenue"], tv["views_90d"]) == (1, Decimal("90.00"), 2)
    assert tv["affinity_score"] == pytest.approx(7 * _decay(38.25), abs=1e-6)
    assert [android["affinity_rank"], case["affinity_rank"], tv["affinity_rank"]] == [1, 2, 3]
    vera_tv = marts["customer_category_affinity"][("vera", "tv.oled")]
    assert vera_tv["views_90d"] == 0  # viewed at exactly as_of - 90 days: outside
    assert vera_tv["purchases"] == 1
    top = {k[1]: v for k, v in marts["customer_top_category_affinity"].items() if k[0] == "anna"}
    assert (top["phones"]["purchases"], top["phones"]["purchase_revenue"],
            top["phones"]["categories"]) == (2, Decimal("150.00"), 2)  # o1 has two phones paths
    assert top["phones"]["affinity_rank"] == 1 and top["tv"]["affinity_rank"] == 2

    # ---- summary
    assert result["customers"] == 9 and result["buyers"] == 4
    assert result["rpr"] == 0.5
    assert result["new_customer_rpr_30d"] is None  # no cohort complete yet
    assert result["median_days_to_second_purchase"] == pytest.approx(5.25)
    # ROPO r1 + r3 = 105 of all receipts up to as_of (r1, r2, r3, r5, r6 = 170)
    assert result["ropo_share_of_offline_revenue"] == pytest.approx(105 / 170)
    assert result["ropo_share_of_matched_offline_revenue"] == pytest.approx(105 / 135)
    assert summary(database_url, AS_OF)["rpr"] == 0.5

    # ---- a later as_of sees o6, r4, e5 and 'late'; going back gives the first rows again
    later = _build(database_url, ts("2026-03-15T00:00:00Z"))
    assert later["customers"] == 10
    anna_later = _mart(database_url, "customer_lifetime")[("anna",)]
    assert (anna_later["purchases"], anna_later["ltv"]) == (5, Decimal("330.00"))
    assert _mart(database_url, "customer_category_affinity")[("anna", "phones.android")][
        "views_90d"] == 2
    _build(database_url, AS_OF)
    assert _all_marts(database_url) == marts


def test_build_fails_loudly_when_raw_breaks_the_contract(database_url):
    """A shop may write raw directly (CONTRACT.md section 1): the dbt tests catch what the
    loader would have quarantined, and build() raises with the failing test named."""
    with db.connect(database_url) as conn:
        _hand_made_shop(conn)
        _insert(conn, "orders", [{"order_id": "o_bad", "customer_id": "anna",
                                  "ordered_at": ts("2026-02-01T00:00:00Z"),
                                  "status": "shipped", "total_amount": Decimal("1.00")}])
        conn.commit()
    with pytest.raises(BuildError) as excinfo:
        build(as_of=AS_OF, url=database_url, select=SELECT)
    dbt = excinfo.value.summary["dbt"]
    assert dbt["success"] is False and dbt["failures"] >= 1
    assert any("accepted_values" in f and "orders_status" in f for f in dbt["failed"]), dbt["failed"]
    assert dbt["skipped"] > 0  # nothing downstream of the broken table was published
    # the default as_of: the latest raw timestamp (r4, 2026-03-10T12:00Z) rounded up
    assert default_as_of(database_url) == ts("2026-03-11T00:00:00Z")


# --------------------------------------------------------------------------- generated shop
#
# The reference below computes the marts from the raw tables with pandas, following
# CONTRACT.md section 2 and the rules documented in the models' YAML. Money is kept in
# integer cents so that revenue ties are exact.

# RETENTION_TEST_LIFETIME_CUSTOMERS=100000 runs the same cross-check at the scale
# (measured 2026-12-01: build with every dbt test passing and the pandas reference agreeing
# on every published column, 477 s wall on a loaded 2-core machine, 5.5 GB peak for pandas)
GENERATED_CUSTOMERS = int(os.environ.get("RETENTION_TEST_LIFETIME_CUSTOMERS", "3000"))
EARLY_AS_OF = ts("2026-06-15T13:45:00Z")  # mid-day: windows end inside a day
W_PURCHASE, W_CART, W_WISHLIST, W_VIEW, HALF_LIFE = 5, 3, 2, 1, 90.0
FREQUENCY_THRESHOLDS = (2, 3, 4, 6)


def _cents(value) -> int:
    return int((Decimal(value) * 100).to_integral_value())


def _norm_phone(phone: str | None) -> str | None:
    digits = re.sub(r"\D", "", phone or "")
    if digits.startswith("00"):
        digits = digits[2:]
    local = re.fullmatch(r"8?0([1-9]\d{8})", digits)
    if local:
        digits = "380" + local.group(1)
    return digits if 8 <= len(digits) <= 15 else None


def _blank(value: str | None) -> str | None:
    value = value.strip() if isinstance(value, str) else value
    return value or None


def _days(delta: pd.Timedelta | timedelta) -> float:
    return pd.Timedelta(delta).total_seconds() / 86400


def _score(purchases: int, carts: int, wishlists: int, views: int, days: float) -> float:
    raw = (W_PURCHASE * purchases + W_CART * carts + W_WISHLIST * wishlists + W_VIEW * views) \
        * 0.5 ** (days / HALF_LIFE)
    # PostgreSQL turns a float into numeric with 15 significant digits, then rounds half up
    return float(Decimal(format(raw, ".15g")).quantize(Decimal("0.000001"), ROUND_HALF_UP))


def _read_raw(url: str) -> dict[str, pd.DataFrame]:
    frames = {}
    for table in TABLES:
        rows = _query(url, f"select {', '.join(table.column_names)} from raw.{table.name}")
        frame = pd.DataFrame(rows, columns=table.column_names, dtype=object)
        for column in table.columns:
            if column.type == "timestamptz":
                frame[column.name] = pd.to_datetime(frame[column.name], utc=True)
        frames[table.name] = frame
    return frames


def reference(raw: dict[str, pd.DataFrame], as_of: datetime) -> dict[str, pd.DataFrame]:
    """The five marts as of `as_of`, computed from the raw tables."""
    as_of_ts = pd.Timestamp(as_of)
    orders = raw["orders"][raw["orders"].ordered_at <= as_of]
    customers = raw["customers"]
    created = customers.created_at
    customers = customers[created.isna() | (created <= as_of)
                          | customers.customer_id.isin(set(orders.customer_id))]
    known = set(customers.customer_id)
    categories = {r.product_id: _blank(r.category_path) for r in raw["products"].itertuples()}

    # -- purchases: paid/delivered orders and matched receipts
    purchases = [
        {"purchase_id": o.order_id, "source": "online", "customer_id": o.customer_id,
         "purchased_at": o.ordered_at, "revenue": _cents(o.total_amount)}
        for o in orders.itertuples() if o.status in ("paid", "delivered")]
    holders: dict[str, list[str]] = {}
    owners: dict[str, list[str]] = {}
    for c in customers.itertuples():
        if _blank(c.loyalty_card_id):
            holders.setdefault(_blank(c.loyalty_card_id), []).append(c.customer_id)
        if _norm_phone(c.phone):
            owners.setdefault(_norm_phone(c.phone), []).append(c.customer_id)
    receipts = raw["offline_receipts"][raw["offline_receipts"].purchased_at <= as_of]
    offline_revenue = sum(_cents(v) for v in receipts.total_amount)
    matched = []
    for r in receipts.itertuples():
        by_card = holders.get(_blank(r.loyalty_card_id), []) if _blank(r.loyalty_card_id) else []
        by_phone = owners.get(_norm_phone(r.phone), []) if _norm_phone(r.phone) else []
        if len(by_card) == 1:
            customer, how = by_card[0], "loyalty_card"
        elif len(by_phone) == 1:
            customer, how = by_phone[0], "phone"
        else:
            continue
        matched.append({"receipt_id": r.receipt_id, "customer_id": customer, "matched_by": how,
                        "purchased_at": r.purchased_at, "total_amount": _cents(r.total_amount)})
        purchases.append({"purchase_id": r.receipt_id, "source": "offline",
                          "customer_id": customer, "purchased_at": r.purchased_at,
                          "revenue": _cents(r.total_amount)})
    purchases = pd.DataFrame(purchases, columns=["purchase_id", "source", "customer_id",
                                                 "purchased_at", "revenue"])
    purchases["purchased_at"] = pd.to_datetime(purchases.purchased_at, utc=True)
    purchases = purchases.sort_values(["customer_id", "purchased_at", "source", "purchase_id"])
    purchases["number"] = purchases.groupby("customer_id").cumcount() + 1
    key_of = {("online", p): (c, t, n) for p, c, t, n, s in zip(
        purchases.purchase_id, purchases.customer_id, purchases.purchased_at, purchases.number,
        purchases.source) if s == "online"}
    key_of.update({("offline", p): (c, t, n) for p, c, t, n, s in zip(
        purchases.purchase_id, purchases.customer_id, purchases.purchased_at, purchases.number,
        purchases.source) if s == "offline"})

    # -- purchase lines with categories (item revenue = quantity * unit_price)
    lines = []
    for source, table, id_col in (("online", "order_items", "order_id"),
                                  ("offline", "offline_receipt_items", "receipt_id")):
        for it in raw[table].itertuples():
            owner = key_of.get((source, getattr(it, id_col)))
            if owner is None:
                continue
            lines.append({"purchase": (source, getattr(it, id_col)), "source": source,
                          "purchase_id": getattr(it, id_col), "customer_id": owner[0],
                          "purchased_at": owner[1], "number": owner[2],
                          "product_id": it.product_id,
                          "category_path": categories.get(it.product_id),
                          "revenue": it.quantity * _cents(it.unit_price)})
    lines = pd.DataFrame(lines, columns=["purchase", "source", "purchase_id", "customer_id",
                                         "purchased_at", "number", "product_id",
                                         "category_path", "revenue"])
    lines["purchased_at"] = pd.to_datetime(lines.purchased_at, utc=True)
    categorised = lines[lines.category_path.notna()].copy()

    # -- clickstream of logged-in customers up to as_of
    events = raw["events"]
    events = events[(events.occurred_at <= as_of) & events.customer_id.notna()].copy()
    events["category_path"] = [
        _blank(cat) or categories.get(pid) for cat, pid in zip(events.category_path, events.product_id)]
    events = events[events.product_id.notna() | events.category_path.notna()]
    views = events[events.event_type == "view"]

    # ---------------- customer_lifetime
    stats = {}
    for cid, group in purchases.groupby("customer_id"):
        times = list(group.purchased_at)
        n = len(times)
        stats[cid] = {
            "purchases": n, "online_purchases": int((group.source == "online").sum()),
            "offline_purchases": int((group.source == "offline").sum()),
            "ltv": int(group.revenue.sum()),
            "first_purchase_at": times[0], "second_purchase_at": times[1] if n > 1 else None,
            "last_purchase_at": times[-1],
            "days_to_second_purchase": _days(times[1] - times[0]) if n > 1 else None,
            "avg_days_between_purchases": _days(times[-1] - times[0]) / (n - 1) if n > 1 else None,
            "days_since_last_purchase": _days(as_of_ts - times[-1]),
        }
    by_category = categorised.groupby(["customer_id", "category_path"]).agg(
        revenue=("revenue", "sum"), last=("purchased_at", "max"),
        purchases=("purchase", "nunique")).reset_index()
    preferred = (by_category.assign(neg_revenue=-by_category.revenue)
                 .sort_values(["customer_id", "neg_revenue", "last", "category_path"],
                              ascending=[True, True, False, True])
                 .groupby("customer_id").first().category_path.to_dict())
    buyers = pd.DataFrame.from_dict(stats, orient="index")
    buyers["last_purchase_at"] = pd.to_datetime(buyers.last_purchase_at, utc=True)
    n_buyers = len(buyers)
    recency_rank = buyers.last_purchase_at.rank(method="max", ascending=False).astype(int)
    monetary_rank = buyers.ltv.rank(method="max", ascending=True).astype(int)
    second_gaps = [s["days_to_second_purchase"] for s in stats.values()
                   if s["days_to_second_purchase"] is not None]
    norm = float(pd.Series(second_gaps).median()) if second_gaps else 60.0
    subs = raw["channel_subscriptions"]
    subs = subs[subs.subscribed_at.isna() | (subs.subscribed_at <= as_of)]
    subscribed = set(subs[subs.unsubscribed_at.isna() | (subs.unsubscribed_at > as_of)].customer_id)

    lifetime = []
    for cid in customers.customer_id:
        s = stats.get(cid)
        row: dict[str, Any] = {"customer_id": cid, "as_of": as_of_ts,
                               "preferred_category": preferred.get(cid),
                               "is_subscribed": cid in subscribed}
        if s is None:
            row.update({"purchases": 0, "online_purchases": 0, "offline_purchases": 0, "ltv": 0,
                        "avg_order_value": None, "first_purchase_at": None,
                        "second_purchase_at": None, "last_purchase_at": None,
                        "days_to_second_purchase": None, "avg_days_between_purchases": None,
                        "days_since_last_purchase": None, "r_score": None, "f_score": None,
                        "m_score": None, "rfm_segment": "no_purchase",
                        "lifecycle_clock_days": None,
                        "lifecycle_stage": "subscriber_no_purchase" if cid in subscribed
                        else "prospect"})
            lifetime.append(row)
            continue
        row.update(s)
        row["avg_order_value"] = (Decimal(s["ltv"]) / 100 / s["purchases"]).quantize(
            Decimal("0.01"), ROUND_HALF_UP)
        r = 6 - math.ceil(5 * int(recency_rank[cid]) / n_buyers)
        m = math.ceil(5 * int(monetary_rank[cid]) / n_buyers)
        f = 1 + sum(s["purchases"] >= t for t in FREQUENCY_THRESHOLDS)
        if r >= 4 and f >= 4:
            segment = "champions"
        elif r >= 3 and f >= 3:
            segment = "loyal"
        elif r >= 3 and f == 2:
            segment = "potential_loyalist"
        elif r >= 4:
            segment = "new"
        elif r == 3:
            segment = "promising"
        elif f >= 4 and m >= 4:
            segment = "cant_lose"
        elif f >= 3:
            segment = "at_risk"
        elif r == 2:
            segment = "hibernating"
        else:
            segment = "lost"
        clock = max(norm if s["purchases"] == 1 else s["avg_days_between_purchases"], 14.0)
        quiet = s["days_since_last_purchase"]
        if s["purchases"] == 1 and _days(as_of_ts - s["first_purchase_at"]) <= 30:
            stage = "new"
        elif quiet > 4 * clock:
            stage = "lapsed"
        elif quiet > 2 * clock:
            stage = "at_risk"
        elif s["purchases"] == 1:
            stage = "one_time"
        elif s["purchases"] >= 4:
            stage = "loyal"
        else:
            stage = "repeat"
        row.update({"r_score": r, "f_score": f, "m_score": m, "rfm_segment": segment,
                    "lifecycle_clock_days": clock, "lifecycle_stage": stage})
        lifetime.append(row)
    lifetime = pd.DataFrame(lifetime)
    lifetime["ltv"] = [Decimal(v) / 100 for v in lifetime.ltv]

    # ---------------- cohort_retention
    first_categories = categorised[categorised.number == 1].groupby("customer_id").category_path.nunique()
    second_categories = categorised[categorised.number == 2].groupby("customer_id").category_path.nunique()
    cohort_rows = []
    buyers = buyers.assign(
        cohort=[date(t.year, t.month, 1) for t in pd.DatetimeIndex(buyers.first_purchase_at).tz_convert("UTC")],
        first_categories=[first_categories.get(c) for c in buyers.index],
        second_categories=[second_categories.get(c) for c in buyers.index])
    for month, group in buyers.groupby("cohort"):
        nxt = date(month.year + month.month // 12, month.month % 12 + 1, 1)
        window_start = datetime(nxt.year, nxt.month, nxt.day, tzinfo=UTC)
        gaps = group.days_to_second_purchase.dropna().astype(float)
        row = {"cohort_month": month, "customers": len(group),
               "second_purchase_customers": int(group.second_purchase_at.notna().sum()),
               "avg_first_purchase_categories": group.first_categories.dropna().astype(float).mean(),
               "avg_second_purchase_categories": group.second_categories.dropna().astype(float).mean(),
               "median_days_to_second_purchase": gaps.median() if len(gaps) else None,
               "mean_days_to_second_purchase": gaps.mean() if len(gaps) else None}
        for n in (30, 60, 90):
            within = int((gaps <= n).sum())
            row[f"second_purchase_{n}d_customers"] = within
            row[f"second_purchase_{n}d_rate"] = within / len(group)
            row[f"is_complete_{n}d"] = window_start + timedelta(days=n) <= as_of
        cohort_rows.append(row)
    cohorts = pd.DataFrame(cohort_rows)

    # ---------------- customer_category_affinity / customer_top_category_affinity
    boundary = as_of_ts - pd.Timedelta(days=90)
    recent = events[events.occurred_at > boundary]
    clicks = events[events.category_path.notna()]
    view_stats = clicks[clicks.event_type == "view"].groupby(["customer_id", "category_path"]).agg(
        views=("event_id", "size"), last_view_at=("occurred_at", "max"))
    last_events = clicks.groupby(["customer_id", "category_path"]).occurred_at.max().rename(
        "last_event_at")
    recent = recent[recent.category_path.notna()]
    windowed = recent.groupby(["customer_id", "category_path", "event_type"]).size().unstack(fill_value=0)
    for kind in ("view", "cart", "wishlist"):
        if kind not in windowed:
            windowed[kind] = 0
    affinity = by_category.set_index(["customer_id", "category_path"]).join(
        view_stats, how="outer").join(windowed[["view", "cart", "wishlist"]], how="left").join(
        last_events, how="left")
    affinity = affinity.reset_index()
    affinity = affinity[affinity.customer_id.isin(known)]
    for col in ("revenue", "purchases", "views", "view", "cart", "wishlist"):
        affinity[col] = affinity[col].fillna(0).astype(int)
    affinity = affinity[(affinity.purchases > 0) | (affinity.views > 0)].copy()
    affinity = affinity.rename(columns={"last": "last_purchased_at"})
    affinity["last_interaction_at"] = affinity[["last_purchased_at", "last_view_at"]].max(axis=1)
    affinity["top_category"] = affinity.category_path.str.split(".").str[0]

    def scored(frame: pd.DataFrame, name_col: str) -> pd.DataFrame:
        frame = frame.copy()
        latest = frame.groupby("customer_id").last_interaction_at.transform("max")
        frame["affinity_score"] = [
            _score(p, c, w, v, _days(top - t)) for p, c, w, v, t, top in zip(
                frame.purchases, frame.cart, frame.wishlist, frame.view,
                frame.last_interaction_at, latest)]
        frame = frame.sort_values(["customer_id", "affinity_score", "last_interaction_at", name_col],
                                  ascending=[True, False, False, True])
        frame["affinity_rank"] = frame.groupby("customer_id").cumcount() + 1
        frame["purchase_revenue"] = [Decimal(int(v)) / 100 for v in frame.revenue]
        return frame.rename(columns={"view": "views_90d", "cart": "carts_90d",
                                     "wishlist": "wishlists_90d"})

    category_affinity = scored(affinity, "category_path")
    categorised_top = categorised.assign(top=categorised.category_path.str.split(".").str[0])
    top_purchases = categorised_top.groupby(["customer_id", "top"]).purchase.nunique()
    top = affinity.groupby(["customer_id", "top_category"]).agg(
        revenue=("revenue", "sum"), view=("view", "sum"), cart=("cart", "sum"),
        wishlist=("wishlist", "sum"), views=("views", "sum"), categories=("category_path", "size"),
        last_interaction_at=("last_interaction_at", "max"),
        last_purchased_at=("last_purchased_at", "max"), last_view_at=("last_view_at", "max"),
    ).reset_index()
    top["purchases"] = [int(top_purchases.get((c, t), 0))
                        for c, t in zip(top.customer_id, top.top_category)]
    top_affinity = scored(top, "top_category")

    # ---------------- ropo_purchases
    ropo = []
    receipt_lines = lines[lines.source == "offline"]
    products_of = receipt_lines.groupby("purchase_id").product_id.agg(list).to_dict()
    cats_of = (receipt_lines[receipt_lines.category_path.notna()]
               .groupby("purchase_id").category_path.agg(list).to_dict())
    views_of = {cid: group for cid, group in views.groupby("customer_id")}
    window = pd.Timedelta(days=30)
    for m in matched:
        seen = views_of.get(m["customer_id"])
        last_view = None
        if seen is not None:
            p = pd.Timestamp(m["purchased_at"])
            hits = seen[(seen.occurred_at >= p - window) & (seen.occurred_at < p)
                        & (seen.product_id.isin(products_of.get(m["receipt_id"], []))
                           | seen.category_path.isin(cats_of.get(m["receipt_id"], [])))]
            if len(hits):
                last_view = hits.occurred_at.max()
        ropo.append({**m, "total_amount": Decimal(m["total_amount"]) / 100,
                     "is_ropo": last_view is not None, "last_online_view_at": last_view})
    ropo = pd.DataFrame(ropo)

    return {"customer_lifetime": lifetime, "cohort_retention": cohorts,
            "customer_category_affinity": category_affinity,
            "customer_top_category_affinity": top_affinity, "ropo_purchases": ropo,
            "_totals": {"offline_revenue": offline_revenue, "norm": norm}}


def _same(actual: Any, expected: Any) -> bool:
    if expected is None or (not isinstance(expected, (str, bytes, bool)) and pd.isna(expected)):
        return actual is None or (not isinstance(actual, (str, bytes, bool)) and pd.isna(actual))
    if actual is None:
        return False
    if isinstance(expected, float) or isinstance(actual, float):
        return math.isclose(float(actual), float(expected), rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(expected, (datetime, pd.Timestamp)):
        return pd.Timestamp(actual) == pd.Timestamp(expected)
    return actual == expected


def _compare(url: str, mart: str, expected: pd.DataFrame, columns: list[str]) -> None:
    keys = MARTS[mart]
    actual = _mart(url, mart)
    expected_rows = {tuple(r[k] for k in keys): r for r in expected.to_dict("records")}
    assert len(actual) > 0
    missing, extra = set(expected_rows) - set(actual), set(actual) - set(expected_rows)
    assert not missing and not extra, (mart, sorted(missing)[:5], sorted(extra)[:5])
    problems = []
    for key, exp in expected_rows.items():
        for col in columns:
            if not _same(actual[key][col], exp[col]):
                problems.append((key, col, actual[key][col], exp[col]))
    assert not problems, f"{mart}: {len(problems)} differences, e.g. {problems[:8]}"


LIFETIME_COLUMNS = [
    "as_of", "first_purchase_at", "second_purchase_at", "last_purchase_at", "purchases",
    "online_purchases", "offline_purchases", "ltv", "avg_order_value",
    "days_to_second_purchase", "avg_days_between_purchases", "days_since_last_purchase",
    "preferred_category", "rfm_segment", "lifecycle_stage", "r_score", "f_score", "m_score",
    "lifecycle_clock_days", "is_subscribed"]
COHORT_COLUMNS = [
    "customers", "second_purchase_30d_rate", "second_purchase_60d_rate",
    "second_purchase_90d_rate", "is_complete_30d", "is_complete_60d", "is_complete_90d",
    "second_purchase_30d_customers", "second_purchase_60d_customers",
    "second_purchase_90d_customers", "second_purchase_customers",
    "avg_first_purchase_categories", "avg_second_purchase_categories",
    "median_days_to_second_purchase", "mean_days_to_second_purchase"]
AFFINITY_COLUMNS = [
    "purchase_revenue", "purchases", "views_90d", "last_interaction_at", "affinity_score",
    "affinity_rank", "carts_90d", "wishlists_90d", "views", "last_purchased_at", "last_view_at"]
ROPO_COLUMNS = ["customer_id", "matched_by", "purchased_at", "total_amount", "is_ropo",
                "last_online_view_at"]


def _check_against_reference(url: str, raw: dict[str, pd.DataFrame], as_of: datetime,
                             result: dict[str, Any]) -> None:
    ref = reference(raw, as_of)
    _compare(url, "customer_lifetime", ref["customer_lifetime"], LIFETIME_COLUMNS)
    _compare(url, "cohort_retention", ref["cohort_retention"], COHORT_COLUMNS)
    _compare(url, "customer_category_affinity", ref["customer_category_affinity"],
             AFFINITY_COLUMNS + ["top_category", "last_event_at"])
    _compare(url, "customer_top_category_affinity", ref["customer_top_category_affinity"],
             AFFINITY_COLUMNS + ["categories"])
    _compare(url, "ropo_purchases", ref["ropo_purchases"], ROPO_COLUMNS)

    lifetime, cohorts, ropo = (ref["customer_lifetime"], ref["cohort_retention"],
                               ref["ropo_purchases"])
    buyers = lifetime[lifetime.purchases > 0]
    assert result["customers"] == len(lifetime)
    assert result["rpr"] == pytest.approx((buyers.purchases > 1).sum() / len(buyers))
    complete = cohorts[cohorts.is_complete_30d]
    assert result["new_customer_rpr_30d"] == pytest.approx(
        complete.second_purchase_30d_customers.sum() / complete.customers.sum())
    assert result["median_days_to_second_purchase"] == pytest.approx(
        buyers.days_to_second_purchase.dropna().astype(float).median())
    ropo_revenue = sum(ropo[ropo.is_ropo].total_amount)
    assert result["ropo_share_of_offline_revenue"] == pytest.approx(
        float(ropo_revenue) * 100 / ref["_totals"]["offline_revenue"])


@pytest.fixture(scope="module")
def generated_shop(make_database, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lifetime_shop")
    generate.generate_shop(folder, GENERATED_CUSTOMERS, seed=23)
    url = make_database("lifetime")
    with db.connect(url) as conn:
        ensure_schemas(conn)
        conn.commit()
    report = load.load_folder(folder, url=url, loaded_at=generate.DEFAULT_END + DAY)
    assert report.quarantined == 0
    raw = _read_raw(url)
    assert len(raw["events"]) > 10_000 and len(raw["offline_receipts"]) > 500
    first = _build(url, None)  # the default as_of: end of the last day with data
    as_of = ts(first["as_of"])
    assert as_of == default_as_of(url)
    return {"url": url, "raw": raw, "as_of": as_of, "result": first, "marts": _all_marts(url)}


def test_generated_shop_matches_the_contract_definitions(generated_shop):
    shop = generated_shop
    assert shop["as_of"] == datetime(2026, 10, 31, tzinfo=UTC)  # end of the last day with data
    lifetime = shop["marts"]["customer_lifetime"]
    # the shop is rich enough for the comparison to mean something
    stages = {r["lifecycle_stage"] for r in lifetime.values()}
    segments = {r["rfm_segment"] for r in lifetime.values()}
    assert len(stages) >= 7 and len(segments) >= 9, (stages, segments)
    assert sum(r["offline_purchases"] for r in lifetime.values()) > 300
    assert any(r["is_ropo"] for r in shop["marts"]["ropo_purchases"].values())
    assert any(r["matched_by"] == "phone" for r in shop["marts"]["ropo_purchases"].values())
    _check_against_reference(shop["url"], shop["raw"], shop["as_of"], shop["result"])


def test_same_as_of_twice_gives_identical_marts(generated_shop):
    shop = generated_shop
    again = _build(shop["url"], shop["as_of"])
    assert _all_marts(shop["url"]) == shop["marts"]
    # the affinity marts were maintained per changed customer: only those with
    # clickstream on the re-aggregated last days, not everyone
    changed = _query(shop["url"], "select reason, count(*) as n from intermediate.int_affinity_customers_changed group by reason")
    assert {r["reason"] for r in changed} <= {"clickstream changed", "90-day window moved"}
    assert 0 < sum(r["n"] for r in changed) < GENERATED_CUSTOMERS * 0.2
    # the purchase tables were maintained per changed customer: nobody's purchases changed
    assert _query(shop["url"], "select count(*) as n from intermediate.int_purchases_customers_changed"
                  ) == [{"n": 0}]
    assert {k: v for k, v in again.items() if k != "dbt"} == {
        k: v for k, v in shop["result"].items() if k != "dbt"}


def test_earlier_as_of_gives_the_numbers_of_the_data_before_it(generated_shop):
    """Incremental events model built up to 2026-10-31, then a build for mid-June without
    --full-refresh: every mart equals the reference computed from the data up to then.
    Going forward again restores the first build exactly."""
    shop = generated_shop
    url = shop["url"]
    newest_day = _query(url, "select max(event_date) as d from intermediate.int_events_aggregated_daily")[0]["d"]
    assert newest_day == date(2026, 10, 30)
    early = _build(url, EARLY_AS_OF)
    days = _query(url, """select max(event_date) as newest, max(last_event_at) as last_event
                          from intermediate.int_events_aggregated_daily""")[0]
    assert days["newest"] == date(2026, 6, 15) and days["last_event"] <= EARLY_AS_OF
    _check_against_reference(url, shop["raw"], EARLY_AS_OF, early)

    # the rows per customer and product with interactions after mid-June were recomputed
    # (or dropped): the table equals a --full-refresh of it for the same as_of
    interactions = _query(url, "select * from intermediate.int_customer_product_interactions")
    assert interactions and max(r["ends_max"] for r in interactions) <= EARLY_AS_OF
    result = build(as_of=EARLY_AS_OF, url=url, select="int_customer_product_interactions",
                   full_refresh=True)
    assert result["dbt"]["success"] and result["dbt"]["failures"] == 0, result["dbt"]
    key = lambda r: (r["customer_id"], r["product_id"])  # noqa: E731
    assert sorted(interactions, key=key) == sorted(
        _query(url, "select * from intermediate.int_customer_product_interactions"), key=key)

    # the purchase tables recomputed only the customers with purchases after mid-June
    reasons = _query(url, "select reason, count(*) as n from intermediate.int_purchases_customers_changed group by 1")
    assert [r["reason"] for r in reasons] == ["purchases changed"]
    assert 0 < reasons[0]["n"] < GENERATED_CUSTOMERS

    _build(url, shop["as_of"])
    assert _all_marts(url) == shop["marts"]


PER_CUSTOMER = {  # the incremental per-customer purchase tables and their keys
    "int_purchases_numbered": ["source", "purchase_id"],
    "int_purchase_items_categorized": ["source", "purchase_id", "line_no"],
    "int_customer_purchases_aggregated": ["customer_id"],
    "int_customer_category_purchases": ["customer_id", "category_path"],
    # what product_recommendations reads, maintained per changed customer and product
    "int_customer_product_interactions": ["customer_id", "product_id"],
}


def _tables(url: str) -> dict[str, Any]:
    out: dict[str, Any] = _all_marts(url)
    for name, keys in PER_CUSTOMER.items():
        out[name] = {tuple(r[k] for k in keys): r
                     for r in _query(url, f"select * from intermediate.{name}")}
    return out


SEND_TIME = {  # customer_send_time, its per-customer signal counts and sessions, with their keys
    "intermediate.int_send_time_sessions": ["customer_id", "session_id"],
    "intermediate.int_send_time_signals": ["customer_id", "channel", "hour_of_week"],
    "marts.customer_send_time": ["customer_id", "channel"],
}


def _send_time_tables(url: str) -> dict[str, Any]:
    return {name: {tuple(r[k] for k in keys): r for r in _query(url, f"select * from {name}")}
            for name, keys in SEND_TIME.items()}


def _send_time_build(url: str, as_of: datetime, **kw) -> None:
    result = build(as_of=as_of, url=url, select="+customer_send_time",
                   indirect_selection="cautious", **kw)  # not the other marts' tests
    assert result["dbt"]["success"] and result["dbt"]["failures"] == 0, result["dbt"]


def test_send_time_signals_recompute_only_changed_customers(generated_shop):
    """customer_send_time reads int_send_time_signals, maintained per changed customer.
    Built first ten days before the shop's as_of, then forward to it (new sessions and
    opens, the 180-day history's start moved, a customer's time zone changed) and back five
    days (signals after as_of drop out): each incremental build equals a --full-refresh
    build of the same as_of, row for row, and recomputes only the customers it must."""
    url, end = generated_shop["url"], generated_shop["as_of"]
    first, back = end - 10 * DAY, end - 5 * DAY
    with db.connect(url) as conn:
        # a customer with sessions in the history but none in the moments the forward
        # build looks at: only the time zone change can list them
        quiet, = conn.execute(
            """select customer_id from raw.events e where session_id is not null
               and occurred_at > %(first)s - interval '180 days' and occurred_at <= %(first)s
               and customer_id in (select customer_id from raw.customers
                                   where timezone is distinct from 'Asia/Tokyo'
                                     and created_at < %(first)s - interval '3 days')
               group by customer_id
               having count(*) filter (where occurred_at > %(first)s - interval '3 days'
                                         or occurred_at <= %(end)s - interval '180 days') = 0
                  and not exists (select 1 from raw.events l where l.customer_id = e.customer_id
                                  and l.occurred_at > %(first)s and l.occurred_at <= %(end)s)
               order by customer_id limit 1""", {"first": first, "end": end}).fetchone()
        # opens and clicks: one message engaged before the first build, one after it
        engaged = [r[0] for r in conn.execute(
            "select customer_id from raw.customers where created_at < %s and customer_id <> %s "
            "order by customer_id limit 2", (first - 30 * DAY, quiet))]
        for i, (customer, channel, sent) in enumerate(zip(engaged, ("email", "mobile_push"),
                                                          (first - 5 * DAY, end - 2 * DAY))):
            conn.execute(
                "insert into ops.messages (message_id, campaign_id, run_id, step, channel, customer_id, "
                "variant, status, planned_at, sent_at) values (%s, 'c', 'r', 's', %s, %s, 'a', 'sent', %s, %s)",
                (f"m{i}", channel, customer, sent, sent))
            for j, (kind, minutes) in enumerate((("open", 10), ("click", 40), ("open", 24 * 60))):
                at = sent + timedelta(minutes=minutes)
                conn.execute(
                    "insert into ops.message_events (provider, provider_event_id, message_id, event_type, "
                    "occurred_at, received_at) values ('p', %s, %s, %s, %s, %s)",
                    (f"e{i}{j}", f"m{i}", kind, at, at))
        conn.commit()

    _send_time_build(url, first)
    reasons = _query(url, "select distinct reason from intermediate.int_send_time_customers_changed")
    assert {r["reason"] for r in reasons} <= {"no previous build"}
    assert {r["timezone"] for r in _query(
        url, f"select timezone from intermediate.int_send_time_signals where customer_id = '{quiet}'")
            } - {"Asia/Tokyo"}
    with db.connect(url) as conn:  # the customer moves to another time zone
        conn.execute("update raw.customers set timezone = 'Asia/Tokyo' where customer_id = %s", (quiet,))
        conn.commit()

    _send_time_build(url, end)
    changed = {r["customer_id"]: r["reason"] for r in _query(
        url, "select * from intermediate.int_send_time_customers_changed")}
    assert changed[quiet] == "time zone changed"
    assert changed[engaged[1]] == "engagements changed"  # opened after the first build
    assert {"sessions changed", "new customer"} <= set(changed.values())
    assert 0 < len(changed) < GENERATED_CUSTOMERS * 0.6, len(changed)
    forward = _send_time_tables(url)
    signals = forward["intermediate.int_send_time_signals"]
    assert {k[1] for k in signals} == {"any", "email", "mobile_push"}
    assert {r["timezone"] for k, r in signals.items() if k[0] == quiet} == {"Asia/Tokyo"}
    assert len(forward["marts.customer_send_time"]) >= GENERATED_CUSTOMERS
    _send_time_build(url, end, full_refresh=True)
    assert _send_time_tables(url) == forward

    _send_time_build(url, back)
    changed = {r["customer_id"]: r["reason"] for r in _query(
        url, "select * from intermediate.int_send_time_customers_changed")}
    assert "signals after as_of" in changed.values() or "sessions changed" in changed.values()
    assert 0 < len(changed) < GENERATED_CUSTOMERS * 0.6, len(changed)
    backward = _send_time_tables(url)
    assert backward != forward
    _send_time_build(url, back, full_refresh=True)
    assert _send_time_tables(url) == backward

    # the same as_of again: the customers with sessions in the lookback are recomputed,
    # and their rows, equal to the stored ones, are not rewritten (same row versions)
    versions = "select customer_id, channel, hour_of_week, xmin::text as v from intermediate.int_send_time_signals"
    before = {(r["customer_id"], r["channel"], r["hour_of_week"]): r["v"] for r in _query(url, versions)}
    _send_time_build(url, back)
    recomputed = {r["customer_id"] for r in _query(
        url, "select customer_id from intermediate.int_send_time_customers_changed")}
    after = {(r["customer_id"], r["channel"], r["hour_of_week"]): r["v"] for r in _query(url, versions)}
    kept = [k for k in before if k[0] in recomputed]
    assert len(kept) > 20, len(kept)
    assert after == before
    assert _send_time_tables(url) == backward

    # the module's next test starts from the lifetime tables as of the shop's as_of
    _build(url, end)


def test_changed_purchases_recompute_only_their_customers(generated_shop):
    """Raw changes in place, as a shop's systems make them: an order is returned, a
    receipt's loyalty card moves to another customer, a product changes category, an
    order arrives. The incremental build recomputes exactly those customers' purchase
    rows, and every table equals a --full-refresh build of the same data. Runs last: it
    changes the module's shop."""
    url = generated_shop["url"]
    as_of = generated_shop["as_of"]
    with db.connect(url) as conn:
        returned, returner = conn.execute(
            "select order_id, customer_id from raw.orders where status = 'delivered' "
            "order by order_id limit 1").fetchone()
        conn.execute("update raw.orders set status = 'returned' where order_id = %s", (returned,))
        receipt, old_holder, card = conn.execute(
            """select r.receipt_id, c.customer_id, r.loyalty_card_id from raw.offline_receipts r
               join raw.customers c on c.loyalty_card_id = r.loyalty_card_id
               where r.purchased_at <= %s and (select count(*) from raw.customers h
                                               where h.loyalty_card_id = r.loyalty_card_id) = 1
               order by r.receipt_id limit 1""", (as_of,)).fetchone()
        new_holder = conn.execute(
            "select customer_id from raw.customers where loyalty_card_id is null and customer_id <> %s "
            "and created_at < %s order by customer_id limit 1", (returner, as_of)).fetchone()[0]
        conn.execute("update raw.customers set loyalty_card_id = null where customer_id = %s", (old_holder,))
        conn.execute("update raw.customers set loyalty_card_id = %s where customer_id = %s", (card, new_holder))
        product, = conn.execute(
            """select i.product_id from intermediate.int_purchase_items_categorized i
               group by 1 having count(distinct customer_id) between 2 and 5 order by 1 limit 1""").fetchone()
        buyers = {r[0] for r in conn.execute(
            "select distinct customer_id from intermediate.int_purchase_items_categorized "
            "where product_id = %s", (product,))}
        conn.execute("update raw.products set category_path = 'moved.elsewhere' where product_id = %s", (product,))
        conn.execute("""insert into raw.orders (order_id, customer_id, ordered_at, status, total_amount, currency)
                        values ('o_new_today', %s, %s, 'paid', 12.34, 'UAH')""",
                     (returner, as_of - timedelta(hours=1)))
        # every receipt on the moved card follows it (unless a phone still matches the old holder)
        card_receipts = {r[0] for r in conn.execute(
            "select receipt_id from raw.offline_receipts where loyalty_card_id = %s and purchased_at <= %s",
            (card, as_of))}
        conn.commit()
    assert receipt in card_receipts

    _build(url, as_of)
    changed = {r["customer_id"]: r["reason"] for r in _query(
        url, "select * from intermediate.int_purchases_customers_changed")}
    assert changed[returner] == "purchases changed"
    assert changed[old_holder] == changed[new_holder] == "purchases changed"
    assert buyers <= set(changed) and all(changed[b] in ("product category changed", "purchases changed")
                                           for b in buyers)
    assert len(changed) <= len(buyers) + 3  # nobody else
    incremental = _tables(url)
    assert incremental["int_customer_purchases_aggregated"][(new_holder,)]["purchases"] >= 1

    _build(url, as_of, full_refresh=True)
    full = _tables(url)
    for name in full:
        assert incremental[name] == full[name], name
