"""Two triggers that are campaign files and templates alone (include/campaigns/
secure_payment_nudge.yaml, inactive_viewers.yaml), run on a shop loaded through the loader
from CSV files and sent through the provider stand-ins (retention_dev.servers), which
count what they accepted. Time is the runs' data intervals, never the wall clock.

* secure_payment_nudge: an order paid cash on delivery (paid or delivered) gets, 5 days
  later, a nudge to pay online next time, unless the customer ordered with an online
  payment in those 5 days; at most once in 60 days.
* inactive_viewers: a view followed by 30 days with no event, order or receipt of the
  customer's starts a chain of offers at 30, 60 and 90 days; any activity or purchase
  ends it; one chain per customer.

Over the whole history of a generated shop, both find exactly the moments computed in
Python from the loaded raw rows.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from retention import db
from retention.campaigns.spec import CampaignError, load_campaign
from retention.cli import main as cli_main
from retention.ingest.contract import EVENT_TYPES
from retention.ingest.load import load_folder
from retention.triggers import run_triggers
from retention.triggers.config import TRIGGERS
from retention.triggers.definitions import compile_definition
from retention.triggers.runner import definition_triggers
from test_load import write_csv
from test_trigger_language import campaign
from test_triggers import POLICY, SETTINGS, shop  # noqa: F401  (fixture)

UTC = timezone.utc
DAY = timedelta(days=1)
#: the payment nudge's orders are placed on this day
PAID = datetime(2026, 10, 1, tzinfo=UTC)
#: the inactive viewers' views are at 10:00 on this day
VIEWED = datetime(2026, 7, 1, 10, tzinfo=UTC)
LOADED_AT = datetime(2026, 11, 30, tzinfo=UTC)
ONLINE = ("card", "apple_pay", "google_pay", "installments")

ORDERS = [
    # order, customer, ordered_at, status, payment_method
    ("o01", "c1", PAID + timedelta(hours=10), "delivered", "cash_on_delivery"),
    ("o02", "c2", PAID + timedelta(hours=11), "paid", "cash_on_delivery"),
    # c3 tried a card two days later: no nudge
    ("o03", "c3", PAID + timedelta(hours=10), "delivered", "cash_on_delivery"),
    ("o04", "c3", PAID + timedelta(days=2, hours=10), "paid", "card"),
    # c4 paid by card: nothing to nudge
    ("o05", "c4", PAID + timedelta(hours=12), "delivered", "card"),
    # c5's cash-on-delivery orders are neither paid nor delivered
    ("o06", "c5", PAID + timedelta(hours=12), "placed", "cash_on_delivery"),
    ("o07", "c5", PAID + timedelta(hours=13), "cancelled", "cash_on_delivery"),
    # c6 paid by card, but after the 5 days: nudged
    ("o08", "c6", PAID + timedelta(hours=14), "delivered", "cash_on_delivery"),
    ("o09", "c6", PAID + timedelta(days=6, hours=12), "paid", "card"),
    # c7 paid cash twice within 60 days: nudged once
    ("o10", "c7", PAID + timedelta(hours=9), "delivered", "cash_on_delivery"),
    ("o11", "c7", PAID + timedelta(days=10, hours=9), "delivered", "cash_on_delivery"),
    # c8 paid with Google Pay the next day: no nudge
    ("o12", "c8", PAID + timedelta(hours=10), "delivered", "cash_on_delivery"),
    ("o13", "c8", PAID + timedelta(days=1, hours=10), "paid", "google_pay"),
    # the inactive viewers' purchases
    ("o20", "v4", VIEWED + timedelta(days=50), "paid", "card"),
    ("o21", "v6", VIEWED + timedelta(days=10), "paid", "card"),
]

EVENTS = [
    # customer, event type, days after VIEWED, product
    ("v1", "view", 0, "p1"),                    # silent since: offers at 30, 60, 90 days
    ("v2", "view", 0, "p1"), ("v2", "app_open", 20, ""),   # active at 20 days: no chain
    ("v3", "view", 0, "p1"), ("v3", "view", 40, "p2"),     # back at 40 days: exits
    ("v4", "view", 0, "p1"),                    # ordered at 50 days (o20): exits
    ("v5", "view", 0, "p1"), ("v5", "search", 45, ""),     # searched at 45 days: exits
    ("v6", "view", 0, "p1"),                    # ordered at 10 days (o21): no chain
    ("v8", "view", 0, "p1"), ("v8", "view", 1 / 24, "p2"),  # one chain, about p2
]
EMAIL_CUSTOMERS = {"v1"}


def write_shop(folder: Path) -> Path:
    customers = sorted({o[1] for o in ORDERS} | {e[0] for e in EVENTS})
    write_csv(folder, "customers", [["customer_id", "email", "timezone", "created_at"],
                                    *[[c, f"{c}@example.com", "UTC", "2025-01-01T00:00:00Z"]
                                      for c in customers]])
    write_csv(folder, "channel_subscriptions", [
        ["customer_id", "channel", "address", "subscribed_at"],
        *[[c, "email", f"{c}@example.com", "2025-01-01T00:00:00Z"] if c in EMAIL_CUSTOMERS
          else [c, "mobile_push", f"token-{c}", "2025-01-01T00:00:00Z"] for c in customers]])
    write_csv(folder, "products", [
        ["product_id", "name", "category_path", "price", "in_stock"],
        ["p1", "Bosch Kettle K100", "home.kitchen.kettle", "49.90", "true"],
        ["p2", "Tefal Toaster T2", "home.kitchen.toaster", "39.90", "true"]])
    write_csv(folder, "orders", [
        ["order_id", "customer_id", "ordered_at", "status", "total_amount", "currency",
         "payment_method"],
        *[[o, c, t.isoformat(), s, "100", "UAH", m] for o, c, t, s, m in ORDERS]])
    write_csv(folder, "order_items", [
        ["order_id", "line_no", "product_id", "quantity", "unit_price"],
        *[[o[0], "1", "p1", "1", "100"] for o in ORDERS]])
    write_csv(folder, "events", [
        ["event_id", "occurred_at", "event_type", "customer_id", "session_id", "product_id",
         "category_path", "price", "search_query"],
        *[[f"e{i:03d}", (VIEWED + timedelta(days=d)).isoformat(), t, c, f"s{i}", p, "", "",
           "kettle" if t == "search" else ""] for i, (c, t, d, p) in enumerate(EVENTS)]])
    return folder


@pytest.fixture()
def loaded(tmp_path, shop):  # noqa: F811
    report = load_folder(write_shop(tmp_path / "shop"), shop.url, loaded_at=LOADED_AT,
                         currency="UAH")
    assert report.quarantined == 0
    return shop


def _send_runs(shop, monkeypatch, trigger: str, ends: list[datetime]):
    """Runs of one trigger over the consecutive intervals ending at `ends`, sending
    through the stand-ins; then the same intervals again. Returns the results of the
    first pass, the stand-in's handle and the accepted counts after each pass."""
    from retention.connections import channels_from_env
    from retention_dev.stack import local_provider_stack

    with local_provider_stack() as (handle, env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        channels = channels_from_env(["mobile_push", "email", "telegram"])
        campaigns = {trigger: load_campaign(trigger)}  # the shipped file, read once
        counts, results = [], []
        for _ in range(2):
            for start, end in zip(ends, ends[1:]):
                result = run_triggers(start, end, shop.url, channels, policy=POLICY,
                                      settings=SETTINGS, triggers=[trigger],
                                      campaigns=campaigns)
                if not counts:
                    results.append(result)
            counts.append((handle.providers["fcm"].accepted_recipients(),
                           handle.providers["sendgrid"].accepted_recipients(),
                           shop.rows("select count(*) from ops.messages")[0][0]))
        bodies = [r.body for r in handle.accepted]
    return results, counts, bodies


# --------------------------------------------------------------------------- the files


@pytest.mark.unit
def test_both_are_definitions_run_after_the_code_triggers():
    names = definition_triggers()
    assert {"secure_payment_nudge", "inactive_viewers"} <= set(names)
    assert not set(names) & set(TRIGGERS)
    nudge, viewers = load_campaign("secure_payment_nudge"), load_campaign("inactive_viewers")
    assert (nudge.kind, nudge.definition.kind, nudge.definition.per) == (
        "trigger", "order", "order")
    assert (viewers.kind, viewers.definition.kind, viewers.definition.per) == (
        "trigger", "event", "inactive_viewer")
    assert [s.wait for s in viewers.steps] == [timedelta(0), 30 * DAY, 30 * DAY]


@pytest.mark.unit
def test_an_unless_order_takes_the_order_filters_inside():
    c = campaign("""\
        entry: {order: {payment_method: cash_on_delivery}}
        wait: 1d
        unless:
          - order: {payment_method: [card, apple_pay], status: [paid, delivered]}
        """)
    assert c.definition.unless == ({"order": {"payment_method": ["card", "apple_pay"],
                                              "status": ["paid", "delivered"]}},)
    with pytest.raises(CampaignError, match=r"demo.yaml:7: unless\[0\]: an order takes its "
                                            r"filters inside"):
        campaign("entry: {order: {status: paid}}\nwait: 1d\nunless:\n"
                 "  - {order: {}, same: product}\n")
    with pytest.raises(CampaignError, match=r"demo.yaml:8: unless\[0\]\.order\.status"):
        campaign("entry: {order: {status: paid}}\nwait: 1d\nunless:\n"
                 "  - order:\n      status: shipped\n")
    with pytest.raises(CampaignError, match=r"exit_on\[0\]"):
        campaign("entry: {event: view}\nexit_on: [scroll]\n")


# --------------------------------------------------------------------------- a generated shop


def _walk(moments, period: timedelta) -> set[tuple[str, datetime]]:
    """`reentry: {every: period}` over (customer, moment, key) triples: per customer, a
    moment is kept when it comes at least `period` after the last kept one."""
    kept, last = set(), {}
    for customer, moment, _ in sorted(moments, key=lambda m: (m[0], m[1], m[2])):
        if customer not in last or moment >= last[customer] + period:
            kept.add((customer, moment))
            last[customer] = moment
    return kept


def test_on_a_generated_shop_the_moments_are_those_of_the_raw_rows(tmp_path, shop):  # noqa: F811
    """Both definitions over the whole history of a generated shop find exactly the
    moments computed here in Python from the loaded raw rows."""
    from retention_dev.generate import generate_shop

    end = datetime(2026, 10, 31, tzinfo=UTC)
    generate_shop(tmp_path / "gen", customers=400, seed=5, n_products=2000, end=end)
    assert load_folder(tmp_path / "gen", shop.url, loaded_at=end, currency="UAH").quarantined == 0
    lo, hi = end - timedelta(days=800), end
    orders = shop.rows("select order_id, customer_id, ordered_at, status, payment_method "
                       "from raw.orders where customer_id is not null")
    # the customer's own activity: the contract's event types (a shop's custom events,
    # such as a bonus credited to the customer, are not)
    events = shop.rows("select event_id, customer_id, occurred_at, event_type from raw.events "
                       "where customer_id is not null and event_type = any(%s)",
                       (list(EVENT_TYPES),))
    by_customer: dict[str, list] = {}
    for e in events:
        by_customer.setdefault(e[1], []).append(e)
    orders_of: dict[str, list] = {}
    for o in orders:
        orders_of.setdefault(o[1], []).append(o)

    nudges = _walk([(c, t + 5 * DAY, f"secure_payment:{o}") for o, c, t, s, m in orders
                    if m == "cash_on_delivery" and s in ("paid", "delivered")
                    and lo < t + 5 * DAY <= hi
                    and not any(t < t2 <= t + 5 * DAY and m2 in ONLINE
                                for _, _, t2, _, m2 in orders_of[c])], 60 * DAY)

    def active(e, until) -> bool:
        eid, c, t = e[0], e[1], e[2]
        return (any((t2 > t or (t2 == t and id2 > eid)) and t2 <= until
                    for id2, _, t2, _ in by_customer[c])
                or any(x == "purchase" and t <= t2 <= until for _, _, t2, x in by_customer[c])
                or any(s != "cancelled" and t <= t2 <= until
                       for _, _, t2, s, _ in orders_of.get(c, [])))

    viewers = _walk([(e[1], e[2] + 30 * DAY, e[0]) for e in events
                     if e[3] == "view" and lo < e[2] + 30 * DAY <= hi
                     and not active(e, e[2] + 30 * DAY)], 90 * DAY)
    assert len(nudges) > 20 and len(viewers) > 20
    with db.connect(shop.url) as conn:
        for name, expected in (("secure_payment_nudge", nudges), ("inactive_viewers", viewers)):
            compiled = compile_definition(load_campaign(name).definition, name, SETTINGS,
                                          has_ropo=False)
            got = conn.execute(f"select customer_id, hit_at from ({compiled.sql}) d",
                               dict(compiled.params, lo=lo, hi=hi)).fetchall()
            assert len(got) == len(set(got)) and set(got) == expected, name


# --------------------------------------------------------------------------- secure payment


def _nudged_from_raw_rows(shop, lo: datetime, hi: datetime) -> dict[str, datetime]:
    """Independently of the definition: per customer, the first moment (order time + 5
    days, within (lo, hi]) of an order paid or delivered cash on delivery with no order
    paid online in the 5 days after it, keeping moments at least 60 days apart."""
    orders = shop.rows("select customer_id, ordered_at, status, payment_method from raw.orders")
    moments = sorted(
        (t + 5 * DAY, c) for c, t, s, m in orders
        if m == "cash_on_delivery" and s in ("paid", "delivered") and lo < t + 5 * DAY <= hi
        and not any(c2 == c and t < t2 <= t + 5 * DAY and m2 in ONLINE
                    for c2, t2, _, m2 in orders))
    first: dict[str, datetime] = {}
    for moment, customer in moments:
        if customer not in first or moment >= first[customer] + 60 * DAY:
            first.setdefault(customer, moment)
    return first


def test_cash_on_delivery_buyers_are_nudged_once_through_the_stand_ins(loaded, monkeypatch):
    shop = loaded
    # daily runs at noon over the 20 days after the orders
    ends = [PAID + timedelta(days=d, hours=12) for d in range(21)]
    results, counts, bodies = _send_runs(shop, monkeypatch, "secure_payment_nudge", ends)
    expected = _nudged_from_raw_rows(shop, ends[0], ends[-1])
    assert set(expected) == {"c1", "c2", "c6", "c7"}
    chains = shop.rows("select customer_id, subject, started_at, status from ops.chain_instances "
                       "where trigger = 'secure_payment_nudge' order by customer_id")
    assert {c: t for c, _, t, _ in chains} == expected
    assert [(c, s, st) for c, s, _, st in chains] == [
        ("c1", "order:o01", "completed"), ("c2", "order:o02", "completed"),
        ("c6", "order:o08", "completed"), ("c7", "order:o10", "completed")]
    # c7's second cash order (moment 10 days after the first) is within the 60 days
    assert shop.rows("select event_key from ops.trigger_hits where customer_id = 'c7'") == [
        ("secure_payment:o10",)]
    # the first moment 5 days after the order (10:00): the run ending at noon that day
    found = {r["interval_end"]: r["triggers"]["secure_payment_nudge"]["customers_sample"]
             for r in results if r["triggers"]["secure_payment_nudge"]["customers"]}
    assert found == {(PAID + timedelta(days=5, hours=12)).isoformat(): ["c7", "c1", "c2"],
                     (PAID + timedelta(days=6, hours=12)).isoformat(): ["c6"]}
    # each nudged customer accepted once at the stand-in; the second pass sent nothing
    first, second = counts
    assert first[0] == {"token-c1": 1, "token-c2": 1, "token-c6": 1, "token-c7": 1}
    assert first[1] == {} and second == first
    assert shop.rows("select customer_id, step, status from ops.messages "
                     "where campaign_id = 'secure_payment_nudge' order by 1") == [
        (c, "nudge", "sent") for c in ("c1", "c2", "c6", "c7")]
    assert sum("Next time, pay online" in json.dumps(b) for b in bodies) == 4
    assert any("Bosch Kettle K100" in json.dumps(b) for b in bodies)


# --------------------------------------------------------------------------- inactive viewers


def test_inactive_viewers_get_offers_at_30_60_and_90_days(loaded, monkeypatch):
    shop = loaded
    # daily runs at noon from the views to 95 days after
    ends = [VIEWED + timedelta(days=d, hours=2) for d in range(96)]
    results, counts, bodies = _send_runs(shop, monkeypatch, "inactive_viewers", ends)
    chains = {r[0]: r[1:] for r in shop.rows(
        "select customer_id, subject, started_at, status, exit_reason, context -> 'products' "
        "from ops.chain_instances where trigger = 'inactive_viewers'")}
    # v2 was active at 20 days and v6 ordered at 10: no chain; one chain per customer
    assert sorted(chains) == ["v1", "v3", "v4", "v5", "v8"]
    assert {c[0] for c in chains.values()} == {"inactive_viewer"}
    assert chains["v8"][1] == VIEWED + timedelta(days=30, hours=1)
    assert chains["v8"][4] == ["p2"]  # the last view decides, its product is shown
    assert {c: v[1] for c, v in chains.items() if c != "v8"} == {
        c: VIEWED + 30 * DAY for c in ("v1", "v3", "v4", "v5")}
    # not at 29 days: the first moment is found by the run ending 30 days + 2 h after
    entered = {r["interval_end"]: r["triggers"]["inactive_viewers"]["customers"]
               for r in results if r["triggers"]["inactive_viewers"]["customers"]}
    assert entered == {(VIEWED + timedelta(days=30, hours=2)).isoformat(): 5}
    assert {c: v[2:4] for c, v in chains.items()} == {
        "v1": ("completed", None), "v8": ("completed", None), "v3": ("exited", "view"),
        "v4": ("exited", "purchase"), "v5": ("exited", "search")}
    sent = shop.rows("select customer_id, step, planned_at, status from ops.messages "
                     "where campaign_id = 'inactive_viewers' order by 1, 3")
    offset = {"day_30": 30, "day_60": 60, "day_90": 90}
    assert sent == sorted(
        [(c, s, VIEWED + timedelta(days=n, hours=2), "sent")
         for c in ("v1", "v8") for s, n in offset.items()]
        + [(c, "day_30", VIEWED + timedelta(days=30, hours=2), "sent")
           for c in ("v3", "v4", "v5")], key=lambda r: (r[0], r[2]))
    # each message accepted once at the stand-ins; the second pass sent nothing
    first, second = counts
    assert first[0] == {"token-v3": 1, "token-v4": 1, "token-v5": 1, "token-v8": 3}
    assert first[1] == {"v1@example.com": 3}
    assert second == first
    mails = [json.dumps(b) for b in bodies if "personalizations" in json.dumps(b)]
    assert len(mails) == 3 and all("Bosch Kettle K100" in m for m in mails)
    assert sum("Last call" in m for m in mails) == 1
    pushes = [json.dumps(b) for b in bodies if "token-v8" in json.dumps(b)]
    assert len(pushes) == 3 and all("Tefal Toaster T2" in p for p in pushes)


def test_the_cli_shows_who_would_enter_without_sending(loaded, capsys):
    """`retention triggers` without --send plans and names who entered."""
    until = PAID + timedelta(days=6)
    assert cli_main(["triggers", "--until", until.isoformat(), "--minutes", "1440",
                     "--trigger", "secure_payment_nudge"]) == 0
    out = capsys.readouterr().out
    assert "(planned only, not sent)" in out
    line = next(l for l in out.splitlines() if "entered secure_payment_nudge" in l)
    assert line.strip() == ("entered secure_payment_nudge (definition): 4 customer(s): "
                            "c7, c1, c2, c6")
    # every trigger: the event entries read the run's copy of their events
    until = VIEWED + timedelta(days=31)
    assert cli_main(["triggers", "--until", until.isoformat(), "--minutes", "1440"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines()
                if "entered inactive_viewers" in l)
    assert line.strip() == ("entered inactive_viewers (definition): 5 customer(s): "
                            "v1, v3, v4, v5, v8")
    assert loaded.rows("select count(*) from ops.messages where status = 'sent'") == [(0,)]
