"""Trigger chains on hand-made event sequences in real PostgreSQL.

Each test writes the few raw rows a story needs, runs the triggers over 15-minute data
intervals the way the DAG would, and reads what the run decided from ops.chain_instances,
ops.trigger_hits and ops.messages.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from datetime import datetime, time, timedelta, timezone
from pathlib import Path

import pytest

from retention import db
from retention.campaigns.policy import Policy
from retention.campaigns.spec import load_campaign
from retention.triggers import run_triggers
from retention.triggers.config import TRIGGERS, TriggerSettings
from retention.triggers.state import chain_id_for, ensure_trigger_tables

UTC = timezone.utc
DAY = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
POLICY = Policy(global_cap=3, global_cap_days=7, channel_cap=2, channel_cap_days=7,
                quiet_start=time(21), quiet_end=time(9), default_timezone="UTC",
                global_holdout=0.0)
SETTINGS = TriggerSettings()
CAMPAIGNS = {name: load_campaign(name) for name in TRIGGERS}
MINUTES_15 = timedelta(minutes=15)


def at(hour: int, minute: int = 0, second: int = 0, day: int = 0) -> datetime:
    return DAY + timedelta(days=day, hours=hour, minutes=minute, seconds=second)


class Shop:
    """Hand-made raw rows."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.n = 0

    def _exec(self, sql: str, params: tuple) -> None:
        with db.connect(self.url) as conn:
            conn.execute(sql, params)
            conn.commit()

    def customer(self, cid: str, channels=("mobile_push", "email"), tz: str = "UTC",
                 since: datetime = datetime(2025, 1, 1, tzinfo=UTC)) -> str:
        self._exec("insert into raw.customers (customer_id, email, timezone, created_at) "
                   "values (%s, %s, %s, %s)", (cid, f"{cid}@example.com", tz, since))
        for channel in channels:
            self.subscribe(cid, channel, since)
        return cid

    def subscribe(self, cid: str, channel: str, when: datetime,
                  unsubscribed_at: datetime | None = None) -> None:
        address = {"email": f"{cid}@example.com", "mobile_push": f"token-{cid}",
                   "web_push": f"web-{cid}", "telegram": f"chat-{cid}",
                   "sms": "+380500000000", "viber": "+380500000000"}[channel]
        self._exec("insert into raw.channel_subscriptions (customer_id, channel, address, "
                   "subscribed_at, unsubscribed_at) values (%s, %s, %s, %s, %s)",
                   (cid, channel, address, when, unsubscribed_at))

    def unsubscribe(self, cid: str, channel: str, when: datetime) -> None:
        self._exec("update raw.channel_subscriptions set unsubscribed_at = %s "
                   "where customer_id = %s and channel = %s", (when, cid, channel))

    def event(self, cid: str | None, etype: str, when: datetime, product: str | None = None,
              session: str | None = None, category: str | None = None,
              query: str | None = None) -> str:
        self.n += 1
        eid = f"e{self.n:05d}"
        self._exec("insert into raw.events (event_id, occurred_at, event_type, customer_id, "
                   "session_id, product_id, category_path, search_query) "
                   "values (%s, %s, %s, %s, %s, %s, %s, %s)",
                   (eid, when, etype, cid, session or f"s-{cid}", product, category, query))
        return eid

    def product(self, pid: str, category: str, price: float = 100.0, in_stock: bool = True,
                name: str | None = None) -> str:
        self._exec("insert into raw.products (product_id, name, category_path, price, in_stock) "
                   "values (%s, %s, %s, %s, %s)", (pid, name or f"Item {pid}", category, price,
                                                   in_stock))
        return pid

    def change(self, pid: str, when: datetime, price: float, in_stock: bool = True) -> None:
        self._exec("insert into raw.product_changes (product_id, changed_at, price, in_stock) "
                   "values (%s, %s, %s, %s)", (pid, when, price, in_stock))

    def order(self, cid: str, when: datetime, status: str = "paid", products=(),
              cancel_reason: str | None = None) -> str:
        self.n += 1
        oid = f"o{self.n:05d}"
        self._exec("insert into raw.orders (order_id, customer_id, ordered_at, status, "
                   "total_amount, currency, cancel_reason) values (%s, %s, %s, %s, 100, 'UAH', %s)",
                   (oid, cid, when, status, cancel_reason))
        for i, pid in enumerate(products, 1):
            self._exec("insert into raw.order_items (order_id, line_no, product_id, quantity, "
                       "unit_price) values (%s, %s, %s, 1, 100)", (oid, i, pid))
        return oid

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        with db.connect(self.url) as conn:
            return conn.execute(sql, params).fetchall()


@pytest.fixture()
def shop(database_url, monkeypatch) -> Shop:
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    with db.connect(database_url) as conn:
        ensure_trigger_tables(conn)
        conn.commit()
    return Shop(database_url)


def run(shop: Shop, start: datetime, end: datetime, triggers=None, settings=SETTINGS,
        policy=POLICY, channels=None, campaigns=None) -> dict:
    return run_triggers(start, end, shop.url, channels, policy=policy, settings=settings,
                        triggers=triggers, campaigns=campaigns or CAMPAIGNS)


def run_every_15(shop: Shop, start: datetime, end: datetime, triggers=None, **kw) -> list[dict]:
    results, t = [], start
    while t < end:
        results.append(run(shop, t, t + MINUTES_15, triggers, **kw))
        t += MINUTES_15
    return results


def chains(shop: Shop, trigger: str | None = None) -> list[dict]:
    rows = shop.rows("""select chain_id, trigger, customer_id, subject, status, started_at,
                               anchor_at, next_step, next_step_at, exit_reason, extensions, context
                        from ops.chain_instances where %s::text is null or trigger = %s
                        order by started_at, customer_id""", (trigger, trigger))
    keys = ("chain_id", "trigger", "customer_id", "subject", "status", "started_at", "anchor_at",
            "next_step", "next_step_at", "exit_reason", "extensions", "context")
    return [dict(zip(keys, r)) for r in rows]


def messages(shop: Shop, campaign: str | None = None) -> list[tuple]:
    return shop.rows("""select message_id, campaign_id, step, customer_id, channel, status, reason,
                               run_id, planned_at
                        from ops.messages where %s::text is null or campaign_id = %s
                        order by planned_at, campaign_id, step, customer_id""", (campaign, campaign))


# --------------------------------------------------------------------------- abandoned cart


def test_cart_then_purchase_within_window_starts_nothing(shop):
    shop.customer("c1")
    shop.product("p1", "home.kitchen.kettle")
    shop.event("c1", "cart", at(10, 0), "p1")
    shop.event("c1", "purchase", at(10, 40), "p1")
    shop.customer("c2")
    shop.event("c2", "cart", at(10, 0), "p1")
    shop.order("c2", at(10, 59), status="placed", products=["p1"])  # checkout, not yet paid
    run_every_15(shop, at(10), at(13), ["abandoned_cart"])
    assert chains(shop) == []
    assert messages(shop) == []


def test_abandoned_cart_starts_one_chain_at_window_end(shop):
    shop.customer("c1")
    shop.product("p1", "home.kitchen.kettle")
    cart = shop.event("c1", "cart", at(10, 5), "p1")
    shop.event("c1", "purchase", at(11, 30), "p1")  # after the window: the chain exits
    results = run_every_15(shop, at(10), at(11), ["abandoned_cart"])
    assert chains(shop) == []  # 10:05 + 60 min is not over by 11:00
    results = run_every_15(shop, at(11), at(11, 15), ["abandoned_cart"])
    (chain,) = chains(shop)
    assert chain["started_at"] == at(11, 5) and chain["anchor_at"] == at(10, 5)
    assert chain["chain_id"] == chain_id_for("abandoned_cart", "c1", "cart", at(11, 5))
    assert chain["context"]["products"] == ["p1"]
    assert results[0]["triggers"]["abandoned_cart"]["started"] == 1
    (msg,) = messages(shop)
    assert msg[1:7] == ("abandoned_cart", "reminder", "c1", "mobile_push", "planned", None)
    assert msg[7] == chain["chain_id"]  # run_id = the chain
    assert shop.rows("select event_key, outcome from ops.trigger_hits") == [(cart, "started")]
    # the purchase at 11:30 ends the chain before its second step
    run(shop, at(11, 15), at(11, 45), ["abandoned_cart"])
    (chain,) = chains(shop)
    assert (chain["status"], chain["exit_reason"], chain["next_step"]) == ("exited", "purchase", None)


def test_cart_abandoned_at_2359_is_caught_by_the_next_run(shop):
    shop.customer("late")
    shop.customer("edge")
    shop.product("p1", "home.kitchen.kettle")
    # edge: carted at 22:59:59, abandoned at 23:59:59, inside the run (23:45, 00:00]
    shop.event("edge", "cart", at(22, 59, 59), "p1")
    run(shop, at(23, 30), at(23, 45), ["abandoned_cart"])
    assert chains(shop) == []
    run(shop, at(23, 45), at(24), ["abandoned_cart"])
    assert [c["customer_id"] for c in chains(shop)] == ["edge"]
    # late: the same moment, but the cart event reaches the database only after the
    # (23:45, 00:00] run: the next run's lateness window catches it, once
    shop.event("late", "cart", at(22, 59, 59), "p1")
    result = run(shop, at(24), at(24, 15), ["abandoned_cart"])
    assert result["triggers"]["abandoned_cart"]["started"] == 1
    late = [c for c in chains(shop) if c["customer_id"] == "late"]
    assert len(late) == 1 and late[0]["started_at"] == at(23, 59, 59)
    run_every_15(shop, at(24, 15), at(26), ["abandoned_cart"])
    run(shop, at(23, 45), at(24), ["abandoned_cart"])  # re-run of the past interval
    assert len(chains(shop)) == 2
    assert len(messages(shop)) == 2


def test_cart_at_midnight_belongs_to_the_next_day_run(shop):
    shop.customer("c1")
    shop.product("p1", "home.kitchen.kettle")
    shop.event("c1", "cart", at(23, 59), "p1")  # abandoned at 00:59 the next day
    run_every_15(shop, at(23, 30), at(24, 45), ["abandoned_cart"])
    assert chains(shop) == []
    run(shop, at(24, 45), at(25), ["abandoned_cart"])
    assert [c["started_at"] for c in chains(shop)] == [at(24, 59)]


def test_second_cart_extends_the_chain(shop):
    shop.customer("c1")
    shop.product("p1", "home.kitchen.kettle")
    shop.product("p2", "home.kitchen.toaster")
    first = shop.event("c1", "cart", at(10, 0), "p1", session="s1")
    within = shop.event("c1", "cart", at(10, 20), "p2", session="s1")  # within the window
    run_every_15(shop, at(10), at(12), ["abandoned_cart"])
    (chain,) = chains(shop)
    assert chain["started_at"] == at(11, 20)  # the wait restarted at the second cart
    assert chain["context"]["products"] == ["p2", "p1"]
    # a new session the next day: its abandonment extends the active chain
    shop.event("c1", "cart", at(9, 0, day=1), "p2", session="s2")
    run_every_15(shop, at(9, day=1), at(10, 30, day=1), ["abandoned_cart"])
    (chain,) = chains(shop)
    assert chain["status"] == "active" and chain["extensions"] == 1
    assert chain["anchor_at"] == at(9, day=1)
    assert sorted(chain["context"]["sessions"]) == ["s1", "s2"]
    # its next step is not before the new abandonment plus the step's wait
    assert chain["next_step_at"] >= at(10, day=1) + timedelta(hours=24)
    hits = dict(shop.rows("select event_key, outcome from ops.trigger_hits"))
    assert first not in hits and hits[within] == "started" and list(hits.values()).count("extended") == 1
    assert len(messages(shop)) == 1


def test_anonymous_and_emptied_carts_start_nothing(shop):
    shop.customer("c1")
    shop.product("p1", "home.kitchen.kettle")
    shop.event(None, "cart", at(10), "p1", session="anon")
    shop.event("c1", "cart", at(10), "p1")
    shop.event("c1", "remove_from_cart", at(10, 5), "p1")
    run_every_15(shop, at(10), at(12), ["abandoned_cart"])
    assert chains(shop) == []


# ---------------------------------------------------------------------- the other triggers


def test_browse_abandonment(shop):
    for c in ("viewer", "once", "carted"):
        shop.customer(c)
    shop.product("p1", "electronics.audio.headphones")
    shop.product("p2", "electronics.audio.headphones")
    shop.event("viewer", "view", at(10, 0), "p1", category="electronics.audio.headphones")
    shop.event("viewer", "view", at(10, 3), "p2", category="electronics.audio.headphones")
    shop.event("viewer", "view", at(10, 4), "p1", category="electronics.audio.headphones")
    shop.event("once", "view", at(10, 0), "p1", category="electronics.audio.headphones")
    shop.event("carted", "view", at(10, 0), "p1", category="electronics.audio.headphones")
    shop.event("carted", "view", at(10, 1), "p2", category="electronics.audio.headphones")
    shop.event("carted", "cart", at(10, 30), "p2")
    run_every_15(shop, at(10), at(12), ["browse_abandonment"])
    (chain,) = chains(shop)
    assert (chain["customer_id"], chain["subject"]) == ("viewer", "category:electronics.audio.headphones")
    assert chain["started_at"] == at(11, 4) and chain["context"]["products"] == ["p1", "p2"]


def test_search_abandonment(shop):
    for c in ("gave_up", "looked"):
        shop.customer(c)
    shop.product("p1", "sport.outdoor.tent", name="Quechua Tent T200")
    shop.event("gave_up", "search", at(10, 0), query=" Tent ")
    shop.event("looked", "search", at(10, 0), query="tent")
    shop.event("looked", "view", at(10, 10), "p1")
    run_every_15(shop, at(10), at(11), ["search_abandonment"])
    (chain,) = chains(shop)
    assert (chain["customer_id"], chain["subject"], chain["started_at"]) == (
        "gave_up", "search:tent", at(10, 30))


def test_wishlist_reminder(shop):
    for c in ("waits", "carts"):
        shop.customer(c)
    shop.product("p1", "home.decor.lamp")
    shop.event("waits", "wishlist", at(10), "p1")
    shop.event("carts", "wishlist", at(10), "p1")
    shop.event("carts", "cart", at(12, day=2), "p1")
    run(shop, at(9, day=3), at(10, day=3), ["wishlist_reminder"])
    (chain,) = chains(shop)
    assert (chain["customer_id"], chain["subject"], chain["started_at"]) == (
        "waits", "product:p1", at(10, day=3))


def test_price_drop_and_back_in_stock_reach_interested_customers(shop):
    for c in ("viewed", "wished", "bought", "stranger", "old_view"):
        shop.customer(c)
    shop.product("p1", "electronics.phone", price=900)
    shop.change("p1", at(0, day=-60), 1000)
    shop.event("viewed", "view", at(9), "p1")
    shop.event("wished", "wishlist", at(8), "p1")
    shop.event("bought", "cart", at(8), "p1")
    shop.order("bought", at(8, 10), products=["p1"])
    shop.event("old_view", "view", at(8, day=-40), "p1")
    shop.change("p1", at(10, 5), 980)  # a 2% cut: not a drop worth a message
    shop.change("p1", at(10, 20), 900)  # 8% below the last price
    shop.product("p2", "electronics.phone", in_stock=True)
    shop.change("p2", at(0, day=-60), 500, in_stock=True)
    shop.change("p2", at(0, day=-5), 500, in_stock=False)
    shop.event("viewed", "view", at(9), "p2")
    shop.change("p2", at(10, 40), 500, in_stock=True)
    run_every_15(shop, at(10), at(11), ["price_drop", "back_in_stock"])
    got = sorted((c["trigger"], c["customer_id"], c["subject"], c["started_at"]) for c in chains(shop))
    assert got == [("back_in_stock", "viewed", "product:p2", at(10, 40)),
                   ("price_drop", "viewed", "product:p1", at(10, 20)),
                   ("price_drop", "wished", "product:p1", at(10, 20))]
    drop = next(c for c in chains(shop, "price_drop"))
    assert (drop["context"]["old_price"], drop["context"]["new_price"]) == (980, 900)


def test_category_replenished(shop):
    for c in ("browser", "buyer", "stale"):
        shop.customer(c)
    shop.product("old", "beauty.skin.cream")
    shop.change("old", at(0, day=-100), 10)
    shop.event("browser", "view", at(20, day=-1), "old")
    shop.event("buyer", "view", at(20, day=-1), "old")
    shop.order("buyer", at(21, day=-1), products=["old"])
    shop.event("stale", "view", at(8, day=-2), "old")
    shop.product("new1", "beauty.skin.cream")
    shop.product("new2", "beauty.skin.cream")
    shop.change("new1", at(10, 5), 12)
    shop.change("new2", at(10, 10), 14)
    run_every_15(shop, at(10), at(10, 30), ["category_replenished"])
    (chain,) = chains(shop)
    assert (chain["customer_id"], chain["subject"]) == ("browser", "category:beauty.skin.cream")
    assert chain["context"]["products"] == ["new2", "new1"]  # both arrivals, newest first
    hits = shop.rows("select event_key, outcome from ops.trigger_hits order by event_key")
    assert hits == [("new:new1", "started"), ("new:new2", "started")]


def test_order_cancelled_out_of_stock_is_transactional(shop):
    shop.customer("c1")
    shop.customer("nochannel", channels=())
    shop.customer("unsubscribed", channels=())
    shop.subscribe("unsubscribed", "email", at(0, day=-300), unsubscribed_at=at(0, day=-30))
    shop.product("gone", "toys.lego", price=50, in_stock=False)
    shop.product("alike", "toys.lego", price=55, in_stock=True)
    shop.order("c1", at(10, 5), status="cancelled", products=["gone"], cancel_reason="out_of_stock")
    shop.order("c1", at(10, 6), status="cancelled", products=["gone"], cancel_reason="changed mind")
    shop.order("nochannel", at(10, 7), status="cancelled", products=["gone"],
               cancel_reason="Out of stock")
    # c1 is at the cap already: transactional messages are exempt from caps
    with db.connect(shop.url) as conn:
        for i in range(3):
            conn.execute("insert into ops.messages (message_id, campaign_id, run_id, step, channel, "
                         "customer_id, variant, status, planned_at, cap_class) values "
                         "(%s, 'promo', 'r', 's', 'mobile_push', 'c1', 'A', 'sent', %s, 'promo')",
                         (f"old{i}", at(9, day=-i)))
        conn.commit()
    shop.order("unsubscribed", at(10, 8), status="cancelled", products=["gone"],
               cancel_reason="out-of-stock")
    run(shop, at(10), at(10, 15), ["order_cancelled_oos"])
    assert sorted((c["customer_id"], c["subject"]) for c in chains(shop)) == [
        ("c1", "order:o00001"), ("nochannel", "order:o00003"), ("unsubscribed", "order:o00004")]
    # exempt from caps, never from consent (no subscription at all: no row)
    assert [m[3:7] for m in messages(shop, "order_cancelled_oos")] == [
        ("c1", "mobile_push", "planned", None),
        ("unsubscribed", "mobile_push", "suppressed", "no consent")]


def test_welcome_series_on_first_subscription_only(shop):
    shop.customer("new", channels=())
    shop.subscribe("new", "email", at(10, 5))
    shop.subscribe("new", "mobile_push", at(10, 20))
    shop.customer("veteran")  # subscribed in 2025
    shop.subscribe("veteran", "telegram", at(10, 7))
    run_every_15(shop, at(10), at(11), ["welcome_series"])
    (chain,) = chains(shop)
    assert (chain["customer_id"], chain["started_at"], chain["next_step"]) == ("new", at(10, 5), 1)
    (msg,) = messages(shop)
    # planned at the end of the run that found it, on the only live channel then... by
    # the run's end (10:15) the push token did not exist yet
    assert msg[2:6] == ("welcome", "new", "email", "planned")
    assert chain["next_step_at"] == at(10, 15) + timedelta(days=2)


def test_second_purchase_nudge_is_timed_by_the_cohort_norm(shop):
    # twenty repeat buyers of the September cohort took 10 days to buy again
    for i in range(20):
        c = shop.customer(f"r{i:02d}", channels=())
        shop.order(c, datetime(2026, 9, 3, tzinfo=UTC))
        shop.order(c, datetime(2026, 9, 13, tzinfo=UTC))
    shop.customer("first")
    shop.product("p1", "garden.tools.rake")
    shop.order("first", at(10, 5), products=["p1"])
    shop.customer("repeat")  # a September buyer whose second purchase is now
    shop.order("repeat", datetime(2026, 9, 20, tzinfo=UTC))
    shop.order("repeat", at(10, 6))
    result = run(shop, at(10), at(10, 15), ["second_purchase_nudge"])
    (chain,) = chains(shop)
    assert chain["customer_id"] == "first"
    # the young November cohort borrows September's norm (10 days); the nudge goes at 80%
    assert chain["next_step_at"] == at(10, 5) + timedelta(days=8)
    assert chain["context"]["nudge_days"] == 8.0
    assert result["cohort_norm_source"] == "raw.orders"


def test_review_request_after_delivery(shop):
    shop.customer("c1")
    shop.order("c1", at(10, 5, day=-7), status="delivered")
    shop.order("c1", at(10, 6, day=-7), status="paid")
    run(shop, at(10), at(10, 15), ["review_request"])
    (chain,) = chains(shop)
    assert (chain["subject"], chain["started_at"]) == ("order:o00001", at(10, 5))


# --------------------------------------------------------------------------- exits


def _cart_chain(shop: Shop, cid: str = "c1") -> dict:
    shop.customer(cid, channels=("mobile_push", "email", "telegram"))
    if not shop.rows("select 1 from raw.products where product_id = 'p1'"):
        shop.product("p1", "home.kitchen.kettle")
    shop.event(cid, "cart", at(10), "p1")
    run(shop, at(10, 45), at(11), ["abandoned_cart"])
    (chain,) = [c for c in chains(shop) if c["customer_id"] == cid]
    assert chain["next_step"] == 1
    return chain


@pytest.mark.parametrize("exit_event", ["order", "purchase_event", "unsubscribe", "consent_change"])
def test_exit_rules_stop_the_chain_before_its_next_step(shop, exit_event):
    chain = _cart_chain(shop)
    second_step_at = chain["next_step_at"]
    if exit_event == "order":
        shop.order("c1", at(18), status="paid")
    elif exit_event == "purchase_event":
        shop.event("c1", "purchase", at(18), "p1")
    elif exit_event == "unsubscribe":
        shop.unsubscribe("c1", "email", at(18))
    else:
        with db.connect(shop.url) as conn:
            conn.execute("insert into ops.consent_changes (channel, address, unsubscribed_at, source) "
                         "values ('mobile_push', 'token-c1', %s, 'webhook')", (at(18),))
            conn.commit()
    run(shop, second_step_at - MINUTES_15, second_step_at, ["abandoned_cart"])
    (chain,) = chains(shop)
    expected = "purchase" if exit_event in ("order", "purchase_event") else "unsubscribe"
    assert (chain["status"], chain["exit_reason"]) == ("exited", expected)
    assert [m[2] for m in messages(shop)] == ["reminder"]


def test_exit_on_the_action_the_chain_asks_for(shop):
    # browse abandonment asks for a cart in the category; a cart elsewhere does not count
    for c in ("carts_it", "carts_other"):
        shop.customer(c)
        shop.event(c, "view", at(10), "p1", category="garden.tools.rake")
        shop.event(c, "view", at(10, 1), "p1", category="garden.tools.rake")
    shop.product("p1", "garden.tools.rake")
    shop.product("p9", "toys.lego")
    run(shop, at(10, 45), at(11, 15), ["browse_abandonment"])
    assert [c["next_step"] for c in chains(shop)] == [1, 1]
    shop.event("carts_it", "cart", at(15), "p1")
    shop.event("carts_other", "cart", at(15), "p9")
    nxt = chains(shop)[0]["next_step_at"]
    run(shop, nxt - MINUTES_15, nxt + MINUTES_15, ["browse_abandonment"])
    state = {c["customer_id"]: (c["status"], c["exit_reason"]) for c in chains(shop)}
    assert state == {"carts_it": ("exited", "cart"), "carts_other": ("completed", None)}
    assert sorted((m[3], m[2]) for m in messages(shop)) == [
        ("carts_it", "nudge"), ("carts_other", "nudge"), ("carts_other", "reminder")]


def test_view_exit_of_a_two_step_search_chain(shop):
    spec = replace(CAMPAIGNS["search_abandonment"],
                   steps=CAMPAIGNS["search_abandonment"].steps
                   + (replace(CAMPAIGNS["search_abandonment"].steps[0], index=1, name="again",
                              wait=timedelta(hours=24)),))
    campaigns = dict(CAMPAIGNS, search_abandonment=spec)
    shop.customer("c1")
    shop.event("c1", "search", at(10), query="tent")
    run(shop, at(10, 15), at(10, 30), ["search_abandonment"], campaigns=campaigns)
    shop.event("c1", "view", at(15), "p1")
    run(shop, at(10, 30, day=1), at(10, 45, day=1), ["search_abandonment"], campaigns=campaigns)
    (chain,) = chains(shop)
    assert (chain["status"], chain["exit_reason"]) == ("exited", "view")
    assert [m[2] for m in messages(shop)] == ["results"]


# ------------------------------------------------------------------ caps, idempotence


def test_customer_in_several_triggers_gets_no_more_than_the_caps(shop):
    shop.customer("busy", channels=("mobile_push", "email", "telegram"))
    for pid in ("p1", "p2", "p3"):
        shop.product(pid, "home.kitchen.kettle", price=90)
        shop.change(pid, at(0, day=-30), 100)
    shop.product("p6", "home.decor.lamp")
    shop.event("busy", "cart", at(9, 2), "p3", session="s1")           # abandoned at 10:02
    shop.event("busy", "wishlist", at(10, 3, day=-3), "p6")           # reminder due 10:03
    shop.event("busy", "view", at(9, 10), "p1", session="s2", category="home.kitchen.kettle")
    shop.event("busy", "view", at(9, 11), "p2", session="s2", category="home.kitchen.kettle")
    for pid in ("p1", "p2", "p3"):
        shop.change(pid, at(10, 5), 90)  # price drops on all three: three chains
    run_every_15(shop, at(10), at(10, 30))
    started = sorted(c["trigger"] for c in chains(shop))
    assert started == ["abandoned_cart", "browse_abandonment", "price_drop", "price_drop",
                       "price_drop", "wishlist_reminder"]
    rows = messages(shop)
    assert len(rows) == 6  # every due step has its ledger row
    live = [m for m in rows if m[5] == "planned"]
    per_channel: dict[str, int] = {}
    for m in live:
        per_channel[m[4]] = per_channel.get(m[4], 0) + 1
    assert len(live) <= POLICY.global_cap and max(per_channel.values()) <= POLICY.channel_cap
    # priority: the abandoned cart first, then one price drop; the push cap stops the rest
    assert sorted(m[1] for m in live) == ["abandoned_cart", "price_drop"]
    assert {m[6] for m in rows if m[5] == "suppressed"} == {"frequency cap: channel"}


def test_rerunning_past_intervals_creates_no_new_messages(shop):
    for c in ("a", "b", "c"):
        shop.customer(c)
    shop.product("p1", "home.kitchen.kettle")
    shop.product("p2", "home.kitchen.kettle", price=80)
    shop.change("p2", at(0, day=-10), 100)
    shop.event("a", "cart", at(10, 2), "p1")
    shop.event("b", "view", at(10, 3), "p2", category="home.kitchen.kettle")
    shop.event("b", "view", at(10, 4), "p1", category="home.kitchen.kettle")
    shop.change("p2", at(11, 20), 80)
    shop.event("c", "search", at(10, 40), query="kettle")
    run_every_15(shop, at(10), at(13))
    first = messages(shop)
    first_chains = chains(shop)
    assert len({m[1] for m in first}) >= 3
    run_every_15(shop, at(10), at(13))  # a backfill over the same intervals
    run(shop, at(11), at(11, 15))
    assert messages(shop) == first
    assert chains(shop) == first_chains


def test_gap_in_runs_misses_nothing(shop):
    shop.customer("c1")
    shop.product("p1", "home.kitchen.kettle")
    run(shop, at(8), at(8, 15), ["abandoned_cart"])
    shop.event("c1", "cart", at(8, 30), "p1")
    # the scheduler was down from 08:15 until 13:00 (catchup is off): the next run's
    # interval is (12:45, 13:00], but the watermark says the last scan ended at 08:15
    result = run(shop, at(12, 45), at(13), ["abandoned_cart"])
    assert result["triggers"]["abandoned_cart"]["started"] == 1


def test_a_run_killed_midway_is_completed_by_its_retry(shop):
    shop.customer("c1")
    shop.product("p1", "home.kitchen.kettle")
    shop.event("c1", "cart", at(10), "p1")
    script = (
        "import sys; sys.path.insert(0, 'plugins');"
        "from datetime import datetime, time, timezone;"
        "from retention.campaigns.policy import Policy;"
        "from retention.triggers import run_triggers;"
        "from retention_dev.faults import KillAt;"
        "p = Policy(3, 7, 2, 7, time(21), time(9), 'UTC', 0.0);"
        "run_triggers(datetime(2026, 11, 2, 10, 45, tzinfo=timezone.utc),"
        " datetime(2026, 11, 2, 11, tzinfo=timezone.utc), sys.argv[1], policy=p,"
        " triggers=['abandoned_cart'], on_point=KillAt('triggers.after_detect'))")
    root = Path(__file__).resolve().parents[1]
    died = subprocess.run([sys.executable, "-c", script, shop.url], cwd=root,
                          capture_output=True, text=True)
    assert died.returncode == 137, died.stderr
    (chain,) = chains(shop)  # detection was committed, the step was not planned
    assert chain["next_step"] == 0 and messages(shop) == []
    run(shop, at(10, 45), at(11), ["abandoned_cart"])  # Airflow's retry of the same interval
    (chain,) = chains(shop)
    assert chain["next_step"] == 1 and len(messages(shop)) == 1
