"""The trigger definition language (docs/triggers.md): validation names the file, line and
field; every construct compiles to SQL that finds the moments it says, on hand-made rows
in real PostgreSQL; values never become SQL text."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from retention import db
from retention.campaigns.spec import CampaignError, parse_campaign
from retention.triggers import run_triggers
from retention.triggers.config import TriggerSettings
from retention.triggers.definitions import compile_definition
from test_triggers import DAY, POLICY, SETTINGS, Shop, at, shop  # noqa: F401

UTC = timezone.utc

HEAD = textwrap.dedent("""\
    id: demo
    kind: trigger
    audience: {include_any: [{all_customers: true}]}
    """)
STEPS = textwrap.dedent("""\
    steps:
      - {name: first, channel: [email], template: abandoned_cart, wait: 0m}
    """)


def campaign(block: str, head: str = HEAD):
    return parse_campaign(head + textwrap.dedent(block) + STEPS, "demo.yaml")


@pytest.mark.unit
def test_a_definition_parses():
    c = campaign("""\
        entry:
          event: cart
          where: {category: electronics, price: {min: 100}}
          per: product
        wait: $abandoned_cart_window
        unless:
          - {event: [cart, purchase], same: product}
          - purchase: {}
        reentry: {every: 7d}
        """)
    d = c.definition
    assert (d.kind, d.per, d.key, d.wait) == ("event", "product", "event", "$abandoned_cart_window")
    assert len(d.unless) == 2 and d.reentry == {"every": "7d"}
    assert campaign("entry: {order: {status: delivered}, key: review}\nwait: 7d\n").definition.per == "order"


@pytest.mark.unit
@pytest.mark.parametrize("block,expected", [
    ("entry: {event: cart, order: {}}\n",
     "demo.yaml:4: entry: exactly one of event, order, receipt, subscription, product_change, "
     "date, predicted, stage, next_order (found event, order)"),
    ("entry:\n  event: [view, carts]\n",
     "demo.yaml:5: entry.event[1]: unknown event type 'carts'"),
    ("entry: {event: cart}\nwait: $abandoned_window\n",
     "demo.yaml:5: wait: no trigger setting 'abandoned_window'"),
    ("entry: {event: cart}\nwait: $browse_min_views\n",
     "demo.yaml:5: wait: setting 'browse_min_views' is not a duration"),
    ("entry: {event: cart}\nunless:\n  - purchase: {}\n",
     "demo.yaml:5: unless: needs a wait"),
    ("entry: {order: {status: paid}}\nwait: 1d\nunless:\n  - {event: view, same: product}\n",
     "demo.yaml:7: unless[0]: an order entry has no product to compare"),
    ("entry: {event: view}\nwait: 1h\nunless:\n  - {event: cart, since: session_start}\n",
     "demo.yaml:7: unless[0].since: session_start needs a session: entry"),
    ("entry: {order: {status: paid}, per: product}\n",
     "demo.yaml:4: entry.per: an order entry can be per order"),
    ("entry:\n  event: cart\n  where:\n    properties: {plan: {about: 3}}\n",
     "demo.yaml:7: entry.where.properties.plan"),
    ("entry:\n  order: {status: shipped}\n",
     "demo.yaml:5: entry.order.status"),
    ("entry:\n  event: cart\n  min_drop: 0.1\n",
     "demo.yaml:6: entry.min_drop: not an option of an event entry"),
    ("entry:\n  product_change: price_drop\n  min_drop: $wishlist_wait\n",
     "demo.yaml:6: entry.min_drop: setting 'wishlist_wait' is not a number"),
    ("wait: 1h\n", "demo.yaml:4: wait: needs an entry block"),
])
def test_invalid_definitions_name_the_line_and_field(block, expected):
    with pytest.raises(CampaignError) as err:
        campaign(block)
    assert str(err.value).startswith(expected), str(err.value)


@pytest.mark.unit
def test_a_promo_has_no_entry():
    with pytest.raises(CampaignError, match=r"demo.yaml:4: entry: a promo campaign"):
        campaign("entry: {event: cart}\n", HEAD.replace("trigger", "promo"))


@pytest.mark.unit
def test_values_are_bind_parameters_never_sql_text():
    evil = "x'); drop table raw.events; --"
    c = campaign(f"""\
        entry:
          event: cart
          where:
            product: "{evil}"
            category: "{evil}"
            properties: {{"plan": "{evil}", "n": {{gt: 5}}}}
          per: product
        wait: 1h
        unless:
          - event: view
            where: {{brand: "{evil}"}}
        """)
    compiled = compile_definition(c.definition, "demo", SETTINGS, has_ropo=True,
                                  columns={"properties"})
    assert "drop table" not in compiled.sql
    assert sum(evil in str(v) for v in compiled.params.values()) >= 4
    # without the properties column the definition names its line
    with pytest.raises(CampaignError, match=r"demo.yaml:9: properties: raw.events has no "
                                            r"properties column"):
        compile_definition(c.definition, "demo", SETTINGS, has_ropo=True)


# --------------------------------------------------------------------------- in PostgreSQL


def moments(shop: Shop, c, lo: datetime, hi: datetime, settings: TriggerSettings = SETTINGS,
            columns=frozenset()) -> list[tuple]:
    compiled = compile_definition(c.definition, c.id, settings, has_ropo=False, columns=columns)
    return shop.rows(f"select customer_id, event_key, subject, hit_at, context from "
                     f"({compiled.sql}) d order by hit_at, customer_id, event_key",
                     dict(compiled.params, lo=lo, hi=hi))


def test_event_filters_and_property_comparisons(shop):
    with db.connect(shop.url) as conn:
        # the contract's optional column, as a database that has custom event properties has it
        conn.execute("alter table raw.events add column if not exists properties jsonb")
        conn.commit()
    for cid in ("c1", "c2", "c3", "c4"):
        shop.customer(cid)
    shop.product("p1", "electronics.phone", price=500)
    shop.product("p2", "electronics.phone.case", price=20)
    shop.product("p3", "garden", price=500)

    def event(cid, when, product, props):
        eid = shop.event(cid, "cart", when, product)
        shop._exec("update raw.events set properties = %s::jsonb where event_id = %s",
                   (props, eid))
        return eid

    e1 = event("c1", at(10), "p1", '{"plan": "gold", "amount": 150}')
    event("c2", at(10), "p2", '{"plan": "gold", "amount": 150}')     # price 20: too cheap
    event("c3", at(10), "p3", '{"plan": "gold", "amount": 150}')     # garden
    event("c4", at(10), "p1", '{"plan": "gold", "amount": "150"}')   # a string is no number
    event("c4", at(11), "p1", '{"plan": "silver", "amount": 900}')   # not gold
    c = campaign("""\
        entry:
          event: cart
          where:
            category: electronics
            price: {min: 100}
            properties: {plan: gold, amount: {gte: 100, lt: 1000}}
          per: product
        """)
    got = moments(shop, c, at(9), at(12), columns={"properties"})
    assert [(m[0], m[1], m[2], m[3]) for m in got] == [("c1", e1, "product:p1", at(10))]
    # `in` and `exists`
    c = campaign("""\
        entry:
          event: cart
          where: {properties: {plan: {in: [silver, bronze]}, amount: {exists: true}}}
        """)
    assert [m[0] for m in moments(shop, c, at(9), at(12), columns={"properties"})] == ["c4"]


def test_order_entry_filters_and_unless_a_later_purchase(shop):
    for cid in ("c1", "c2", "c3"):
        shop.customer(cid)
    shop.product("p1", "electronics.phone")
    shop.product("p2", "garden")
    o1 = shop.order("c1", at(10), status="paid", products=["p1"])
    shop.order("c2", at(10), status="paid", products=["p2"])         # not electronics
    o3 = shop.order("c3", at(10), status="paid", products=["p1"])
    shop.order("c3", at(20), status="paid", products=["p2"])         # bought again in the wait
    shop._exec("update raw.orders set payment_method = 'card'", ())
    c = campaign("""\
        entry:
          order: {status: [paid, delivered], payment_method: card, amount: {min: 50},
                  category: electronics}
          key: thanks
        wait: 1d
        unless:
          - purchase: {}
        """)
    got = moments(shop, c, at(0), at(12, day=1))
    assert [(m[0], m[1], m[2], m[3]) for m in got] == [("c1", f"thanks:{o1}", f"order:{o1}",
                                                         at(10, day=1))]
    assert got[0][4]["products"] == ["p1"]
    # the moment is not seen before the wait has passed, nor twice by a later scan's range
    assert moments(shop, c, at(0), at(9, day=1)) == []
    assert o3 not in {m[1] for m in moments(shop, c, at(0), at(23, day=1))}


def test_reentry_once_and_every_period_through_runs(shop):
    shop.customer("c1")
    shop.product("p1", "electronics.phone")
    for day in range(4):
        shop.event("c1", "wishlist", at(10, day=day), "p1")
    block = """\
        entry: {event: wishlist, per: product}
        reentry: %s
        """
    counts = {}
    for label, rule in (("always", "always"), ("once", "once"), ("every", "{every: 2d}")):
        c = replace(campaign(block % rule), id=f"demo_{label}")
        t = at(6)
        while t < at(12, day=3):  # 6-hour runs
            run_triggers(t, t + timedelta(hours=6), shop.url, policy=POLICY, settings=SETTINGS,
                         triggers=[c.id], campaigns={c.id: c})
            t += timedelta(hours=6)
        counts[label] = [r[0] for r in shop.rows(
            "select hit_at from ops.trigger_hits where trigger = %s order by 1", (c.id,))]
    assert counts["always"] == [at(10, day=d) for d in range(4)]
    assert counts["once"] == [at(10)]
    assert counts["every"] == [at(10), at(10, day=2)]


def test_audience_filters_as_of_the_moment(shop):
    for cid in ("c1", "c2"):
        shop.customer(cid)
    shop.product("p1", "electronics.phone")
    shop.event("c1", "cart", at(10), "p1")
    shop.event("c2", "cart", at(10), "p1")
    c = campaign("entry: {event: cart}\n",
                 HEAD.replace("{include_any: [{all_customers: true}]}",
                              "{include_any: [{customer_ids: [c2]}], exclude_any: [{has_channel: sms}]}"))
    assert [m[0] for m in moments(shop, c, at(9), at(11))] == ["c2"]


def test_first_purchase_anniversary_in_the_customers_time_zone(shop):
    shop.customer("tokyo", tz="Asia/Tokyo")
    shop.customer("kyiv", tz="Europe/Kyiv")
    # 20:00 UTC on 2 November 2025 is 3 November in Tokyo, still 2 November in Kyiv
    shop.order("tokyo", datetime(2025, 11, 2, 20, tzinfo=UTC), status="delivered")
    shop.order("kyiv", datetime(2025, 11, 2, 20, tzinfo=UTC), status="delivered")
    shop.order("kyiv", datetime(2026, 5, 1, tzinfo=UTC), status="delivered")
    c = campaign("entry: {date: first_purchase_anniversary, at: '09:00', per: anniversary}\n")
    got = moments(shop, c, DAY - timedelta(days=2), DAY + timedelta(days=2))
    # 09:00 local: 07:00 UTC in Kyiv on 2 November (EET), 00:00 UTC in Tokyo on 3 November
    assert [(m[0], m[1], m[3]) for m in got] == [
        ("kyiv", "date:2026", datetime(2026, 11, 2, 7, tzinfo=UTC)),
        ("tokyo", "date:2026", datetime(2026, 11, 3, 0, tzinfo=UTC))]
    later = moments(shop, c, datetime(2026, 11, 2, 7, tzinfo=UTC), DAY + timedelta(days=2))
    assert [m[0] for m in later] == ["tokyo"]


def test_birthday_needs_the_column_and_then_finds_the_day(shop):
    shop.customer("c1", tz="UTC")
    c = campaign("entry: {date: birthday}\n")
    with pytest.raises(CampaignError, match=r"demo.yaml:4: entry.date: raw.customers has no "
                                            r"birth_date column"):
        moments(shop, c, DAY, DAY + timedelta(days=1))
    with db.connect(shop.url) as conn:
        conn.execute("alter table raw.customers add column if not exists birth_date date")
        conn.execute("update raw.customers set birth_date = '1990-11-03'")
        conn.commit()
    got = moments(shop, c, DAY, DAY + timedelta(days=2), columns={"birth_date"})
    assert [(m[0], m[1], m[3]) for m in got] == [("c1", "date:2026",
                                                  datetime(2026, 11, 3, 9, tzinfo=UTC))]


def test_predicted_value_crossing_a_threshold(shop):
    for cid in ("up", "stays", "new", "down"):
        shop.customer(cid)
    rows = [("up", 1, 50.0), ("up", 2, 150.0), ("stays", 1, 150.0), ("stays", 2, 200.0),
            ("new", 2, 500.0), ("down", 1, 150.0), ("down", 2, 20.0)]
    with db.connect(shop.url) as conn:
        for cid, week, value in rows:
            conn.execute("""insert into marts.customer_predicted_value (customer_id, as_of,
                              purchases, time_unit, predicted_value_12m)
                            values (%s, %s, 1, interval '7 days', %s)""",
                         (cid, DAY + timedelta(weeks=week), value))
        conn.commit()
    above = campaign("entry: {predicted: {measure: predicted_value_12m, above: 100}}\n")
    got = moments(shop, above, DAY, DAY + timedelta(weeks=3))
    assert [(m[0], m[3]) for m in got] == [("up", DAY + timedelta(weeks=2))]
    assert got[0][4]["previous"] == 50.0 and got[0][4]["value"] == 150.0
    below = campaign("entry: {predicted: {measure: predicted_value_12m, below: 100}}\n")
    assert [m[0] for m in moments(shop, below, DAY, DAY + timedelta(weeks=3))] == ["down"]
    # the snapshot of week 2 is outside a scan that ends before it
    assert moments(shop, above, DAY, DAY + timedelta(weeks=2) - timedelta(seconds=1)) == []


def _snapshot(shop, cid: str, as_of: datetime, **values) -> None:
    columns = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    shop._exec(f"insert into marts.customer_predicted_value (customer_id, as_of, purchases, "
               f"time_unit{', ' if values else ''}{columns}) values (%s, %s, 1, "
               f"interval '7 days'{', ' if values else ''}{marks})",
               (cid, as_of, *values.values()))


def test_next_order_due_with_nothing_bought(shop):
    """The snapshot's expected date passes: the moment is that date, unless the customer
    bought after the snapshot's as_of; wait and unless work as for any entry."""
    for cid in ("due", "bought", "later", "after_wait"):
        shop.customer(cid)
    week = DAY - timedelta(days=7)
    for cid in ("due", "bought", "after_wait"):
        _snapshot(shop, cid, week, expected_next_order_at=at(10), churn_risk="low")
    _snapshot(shop, "later", week, expected_next_order_at=at(10, day=5))
    shop.order("bought", DAY - timedelta(days=2), status="paid")  # after as_of, before the date
    shop.order("after_wait", at(12), status="paid")  # within the wait below
    c = campaign("entry: {next_order: due}\n")
    got = moments(shop, c, DAY, DAY + timedelta(days=1))
    assert [(m[0], m[1], m[3]) for m in got] == [
        ("after_wait", f"next_order:{week.timestamp():.6f}", at(10)),
        ("due", f"next_order:{week.timestamp():.6f}", at(10))]
    assert got[1][4]["churn_risk"] == "low"
    waited = campaign("entry: {next_order: due}\nwait: 1d\nunless:\n  - purchase: {}\n")
    assert [(m[0], m[3]) for m in moments(shop, waited, DAY, DAY + timedelta(days=2))] == [
        ("due", at(10, day=1))]
    # a scan that ends before the date finds nothing yet
    assert moments(shop, c, DAY, at(9)) == []


def test_audience_rules_on_the_predicted_snapshot(shop):
    """Churn risk, a top share by predicted value and a measure's range select on the
    customer's latest snapshot at or before the moment."""
    for i, cid in enumerate(("hi_top", "hi_low", "lo_top", "none")):
        shop.customer(cid)
        shop.event(cid, "cart", at(10 + i))
    old = DAY - timedelta(days=14)
    _snapshot(shop, "hi_top", old, churn_risk="low", predicted_value_rank=0.2)
    for cid, risk, rank, alive in (("hi_top", "high", 1.0, 0.3), ("hi_low", "high", 0.5, 0.2),
                                   ("lo_top", "low", 0.8, 0.9)):
        _snapshot(shop, cid, DAY - timedelta(days=7), churn_risk=risk,
                  predicted_value_rank=rank, probability_alive=alive)
    # a snapshot after the moments is not read
    _snapshot(shop, "hi_low", at(20), churn_risk="high", predicted_value_rank=1.0)

    def audience(rules: str):
        head = HEAD.replace("{include_any: [{all_customers: true}]}", rules)
        return [m[0] for m in moments(shop, campaign("entry: {event: cart}\n", head),
                                      DAY, DAY + timedelta(days=1))]

    assert audience("{include_all: [{churn_risk: [high]}, {predicted_value_top: 0.25}]}"
                    ) == ["hi_top"]
    assert audience("{include_any: [{churn_risk: [high, medium]}]}") == ["hi_top", "hi_low"]
    assert audience("{include_any: [{probability_alive: {min: 0.25}}]}") == ["hi_top", "lo_top"]
    assert audience("{include_any: [{all_customers: true}], "
                    "exclude_any: [{churn_risk: [high]}]}") == ["lo_top", "none"]
    with pytest.raises(CampaignError, match="churn_risk"):
        audience("{include_any: [{churn_risk: [huge]}]}")


@pytest.mark.unit
def test_a_new_definition_file_is_a_trigger_of_its_own(tmp_path):
    from retention.campaigns.spec import CAMPAIGNS_DIR
    from retention.triggers.runner import definition_triggers

    for name in ("abandoned_cart", "second_purchase_nudge", "weekly_promo"):
        (tmp_path / f"{name}.yaml").write_text((CAMPAIGNS_DIR / f"{name}.yaml").read_text())
    text = (CAMPAIGNS_DIR / "wishlist_reminder.yaml").read_text()
    (tmp_path / "gift_idea.yaml").write_text(text.replace("id: wishlist_reminder", "id: gift_idea"))
    # the code triggers run in their priority order; a new definition after them
    assert definition_triggers(tmp_path) == ["gift_idea"]


def test_matched_offline_receipt_entry(shop):
    """A receipt entry reads the ROPO matches dbt builds (marts.ropo_purchases); before
    the first build there is no receipt moment."""
    from retention.warehouse.build import build

    shop.customer("c1")
    shop.customer("c2")
    shop._exec("update raw.customers set loyalty_card_id = 'card-' || customer_id", ())
    shop.product("p1", "electronics.phone")
    shop.product("p2", "garden")
    for rid, card, product, when in (("r1", "card-c1", "p1", at(10)),
                                     ("r2", "card-c2", "p2", at(11)),
                                     ("r3", "card-nobody", "p1", at(12))):
        shop._exec("insert into raw.offline_receipts (receipt_id, store_id, purchased_at, "
                   "loyalty_card_id, total_amount, currency) values (%s, 's1', %s, %s, 300, 'UAH')",
                   (rid, when, card))
        shop._exec("insert into raw.offline_receipt_items (receipt_id, line_no, product_id, "
                   "quantity, unit_price) values (%s, 1, %s, 1, 300)", (rid, product))
    c = campaign("entry: {receipt: {category: electronics, amount: {min: 100}, store: s1}}\n"
                 "wait: 1d\nunless:\n  - purchase: {}\n")
    compiled = compile_definition(c.definition, c.id, SETTINGS, has_ropo=False)
    assert shop.rows(f"select count(*) from ({compiled.sql}) d",
                     dict(compiled.params, lo=at(0), hi=at(12, day=1)))[0][0] == 0
    result = build(as_of=at(12, day=1), url=shop.url, select="+ropo_purchases",
                   indirect_selection="buildable")
    assert result["dbt"]["success"], result["dbt"].get("error")
    compiled = compile_definition(c.definition, c.id, SETTINGS, has_ropo=True)
    got = shop.rows(f"select customer_id, event_key, subject, hit_at, context from "
                    f"({compiled.sql}) d", dict(compiled.params, lo=at(0), hi=at(12, day=1)))
    assert [g[:4] for g in got] == [("c1", "receipt:r1", "receipt:r1", at(10, day=1))]
    assert got[0][4]["products"] == ["p1"]
    # a purchase within the wait cancels it
    shop.order("c1", at(18), status="paid")
    assert shop.rows(f"select count(*) from ({compiled.sql}) d",
                     dict(compiled.params, lo=at(0), hi=at(12, day=1)))[0][0] == 0
