"""Triggers on real and generated data, checked against sets computed independently
with pandas from the CSV files (never with the trigger SQL)."""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone

import pandas as pd
import pytest

from retention import db
from retention.campaigns.policy import Policy
from retention.campaigns.spec import load_campaign
from retention.ingest.formats import load_path
from retention.ingest.load import load_folder
from retention.triggers import run_triggers
from retention.triggers.config import TRIGGERS, TriggerSettings

# one pytest-xdist worker runs the module: its generated shop is made once
pytestmark = pytest.mark.xdist_group("test_triggers_data")

UTC = timezone.utc
POLICY = Policy(global_cap=3, global_cap_days=7, channel_cap=2, channel_cap_days=7,
                quiet_start=time(21), quiet_end=time(9), default_timezone="Europe/Kyiv",
                global_holdout=0.05)
SETTINGS = TriggerSettings()
WINDOW = SETTINGS.abandoned_cart_window


def _abandoned_carts(events: pd.DataFrame, orders: pd.DataFrame, items: pd.DataFrame,
                     lo: pd.Timestamp, hi: pd.Timestamp) -> set[str]:
    """Cart event ids abandoned with their window ending in (lo, hi]: no later cart of the
    customer and no checkout (purchase event, order not cancelled) within the window, and
    something left in the cart (carted in the 24 hours before, not removed nor bought)."""
    ev = events[events.customer_id.notna()]
    carts = ev[ev.event_type == "cart"]
    checkouts = pd.concat([
        ev[ev.event_type == "purchase"][["customer_id", "t"]],
        orders[orders.status != "cancelled"][["customer_id", "t"]]])
    bought_lines = pd.concat([
        ev[ev.event_type.isin(["purchase", "remove_from_cart"])][["customer_id", "product_id", "t"]],
        items.merge(orders, on="order_id")[["customer_id", "product_id", "t"]]])
    out = set()
    for c in carts.itertuples():
        end = c.t + WINDOW
        if not (lo < end <= hi):
            continue
        mine = carts[carts.customer_id == c.customer_id]
        later = mine[(mine.t > c.t) & (mine.t <= end) | ((mine.t == c.t) & (mine.event_id > c.event_id))]
        if len(later):
            continue
        co = checkouts[checkouts.customer_id == c.customer_id]
        if len(co[(co.t >= c.t) & (co.t <= end)]):
            continue
        recent = mine[(mine.t > c.t - pd.Timedelta(hours=24)) & (mine.t <= c.t)
                      & mine.product_id.notna()].groupby("product_id").t.max()
        gone = bought_lines[bought_lines.customer_id == c.customer_id]
        left = [p for p, k in recent.items()
                if not len(gone[(gone.product_id == p) & (gone.t >= k) & (gone.t <= end)])]
        if pd.notna(c.product_id) and not left:
            continue
        out.add(c.event_id)
    return out


def _run_every(url: str, start: datetime, end: datetime, step: timedelta, **kw) -> list[dict]:
    out, t = [], start
    while t < end:
        out.append(run_triggers(t, t + step, url, policy=POLICY, settings=SETTINGS, **kw))
        t += step
    return out


def test_rees46_sample_through_the_abandoned_cart_trigger(database_url, sample_data):
    path = sample_data / "rees46_sample_2019-10-01.csv"
    load_path(path, database_url, fmt="rees46", loaded_at=datetime(2019, 10, 2, tzinfo=UTC))
    campaigns = {"abandoned_cart": load_campaign("abandoned_cart")}
    # the DAG's 15-minute runs, from the first event until every window has closed
    results = _run_every(database_url, datetime(2019, 10, 1, tzinfo=UTC),
                         datetime(2019, 10, 1, 3, 45, tzinfo=UTC), timedelta(minutes=15),
                         triggers=["abandoned_cart"], campaigns=campaigns)

    # independently: sessions whose carts were followed by no purchase of the user
    # within the window after the session's last cart (a later cart restarts the wait)
    df = pd.read_csv(path, dtype={"user_id": str, "product_id": str})
    df["t"] = pd.to_datetime(df.event_time.str.replace(" UTC", "", regex=False), utc=True)
    carts, buys = df[df.event_type == "cart"], df[df.event_type == "purchase"]
    expected: set[str] = set()
    for session, g in carts.groupby("user_session"):
        user, last = g.user_id.iloc[0], g.t.max()
        next_carts = carts[(carts.user_id == user) & (carts.t > last) & (carts.t <= last + WINDOW)]
        bought = buys[(buys.user_id == user) & (buys.t >= last) & (buys.t <= last + WINDOW)]
        if next_carts.empty and bought.empty:
            expected.add(session)
    # in this sample nobody buys more than an hour after a cart: the literal reading
    # ("carted and did not purchase") is the same set
    literal = {s for s, g in carts.groupby("user_session")
               if buys[(buys.user_id == g.user_id.iloc[0]) & (buys.t >= g.t.max())].empty}
    assert expected == literal and len(expected) == 24

    with db.connect(database_url) as conn:
        got = conn.execute("""
            select e.session_id, h.chain_id, h.customer_id from ops.trigger_hits h
            join raw.events e on e.event_id = h.event_key
            where h.trigger = 'abandoned_cart'""").fetchall()
        chain_rows = conn.execute("""
            select customer_id, count(*) from ops.chain_instances
            where trigger = 'abandoned_cart' group by 1""").fetchall()
        not_abandoned_carts = conn.execute("""
            select count(*) from raw.events e where e.event_type = 'cart'
              and e.session_id <> all(%s)""", (list(expected),)).fetchone()[0]
    assert {s for s, _, _ in got} == expected
    assert len(got) == len(expected)  # one abandonment per session, each handled once
    # one chain per customer's cart: chains exactly for the users of those sessions
    users = {df[df.user_session == s].user_id.iloc[0] for s in expected}
    assert {c for c, _ in chain_rows} == users and all(n == 1 for _, n in chain_rows)
    assert sum(r["triggers"]["abandoned_cart"]["started"] for r in results) == len(users)
    assert not_abandoned_carts > 0  # the other carts were there, and started nothing


@pytest.fixture(scope="module")
def generated_shop(tmp_path_factory):
    from retention_dev.generate import generate_shop

    out = tmp_path_factory.mktemp("shop")
    generate_shop(out, customers=1200, seed=11, n_products=2000)
    return out


def test_generated_shop_chains_match_an_independent_computation(generated_shop, database_url,
                                                                monkeypatch):
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    end = datetime(2026, 10, 31, tzinfo=UTC)
    load_folder(generated_shop, database_url, loaded_at=end, currency="UAH")
    campaigns = {n: load_campaign(n) for n in TRIGGERS}
    start = end - timedelta(days=7)
    step = timedelta(hours=12)
    results = _run_every(database_url, start, end, step, campaigns=campaigns)

    events = pd.read_csv(generated_shop / "events.csv", dtype=str)
    events["t"] = pd.to_datetime(events.occurred_at, utc=True, format="ISO8601")
    orders = pd.read_csv(generated_shop / "orders.csv", dtype=str)
    orders["t"] = pd.to_datetime(orders.ordered_at, utc=True, format="ISO8601")
    items = pd.read_csv(generated_shop / "order_items.csv", dtype=str)
    expected = _abandoned_carts(events, orders, items, pd.Timestamp(start - SETTINGS.lateness),
                                pd.Timestamp(end))
    with db.connect(database_url) as conn:
        got = {r[0] for r in conn.execute(
            "select event_key from ops.trigger_hits where trigger = 'abandoned_cart'").fetchall()}
        ledger = conn.execute("select message_id, status, reason from ops.messages "
                              "order by message_id").fetchall()
        orphans = conn.execute("""select count(*) from ops.messages m where not exists (
                                    select 1 from ops.chain_instances c where c.chain_id = m.run_id)
                               """).fetchone()[0]
        per_trigger = dict(conn.execute(
            "select trigger, count(*) from ops.chain_instances group by 1").fetchall())
    assert len(expected) >= 10
    assert got == expected
    assert orphans == 0
    # the generated shop exercises most triggers in a week, the shop's own bonus_credited
    # event among them
    assert {"abandoned_cart", "browse_abandonment", "price_drop", "welcome_series",
            "review_request", "bonus_credited"} <= set(per_trigger), per_trigger
    # every chain was started by a run (the code triggers and the definition-only ones)
    assert sum(t["started"] for r in results for t in r["triggers"].values()) == \
        sum(per_trigger.values())
    # re-running the past intervals creates nothing new
    _run_every(database_url, start, start + 3 * step, step, campaigns=campaigns)
    with db.connect(database_url) as conn:
        again = conn.execute("select message_id, status, reason from ops.messages "
                             "order by message_id").fetchall()
    assert again == ledger


def _expected_recommendations(items: pd.DataFrame, views: pd.DataFrame, window_days: int = 90,
                              weight: int = 2, per_product: int = 20) -> pd.DataFrame:
    """marts.product_recommendations by its definition, in pandas."""
    bought = items.groupby(["customer_id", "product_id"], as_index=False).t.min()
    interactions = pd.concat([items.assign(is_purchase=True)[["customer_id", "product_id", "t", "is_purchase"]],
                              views.assign(is_purchase=False)[["customer_id", "product_id", "t", "is_purchase"]]])
    pairs = bought.merge(interactions, on="customer_id", suffixes=("", "_y"))
    pairs = pairs[(pairs.product_id_y != pairs.product_id) & (pairs.t_y > pairs.t)
                  & (pairs.t_y <= pairs.t + pd.Timedelta(days=window_days))]
    per_customer = pairs.groupby(["product_id", "product_id_y", "customer_id"]).is_purchase.any().reset_index()
    agg = per_customer.groupby(["product_id", "product_id_y"]).agg(
        customers=("customer_id", "size"), customers_bought=("is_purchase", "sum")).reset_index()
    buyers = bought.groupby("product_id").size().rename("buyers").reset_index()
    agg = agg.merge(buyers, on="product_id")
    agg["score"] = (agg.customers + weight * agg.customers_bought) / (agg.buyers + 1)
    agg = agg.sort_values(["product_id", "score", "customers", "product_id_y"],
                          ascending=[True, False, False, True])
    agg["rank"] = agg.groupby("product_id").cumcount() + 1
    agg = agg[agg["rank"] <= per_product].rename(columns={"product_id_y": "recommended_product_id"})
    return agg[["product_id", "recommended_product_id", "rank", "customers", "customers_bought",
                "buyers"]].reset_index(drop=True)


def test_recommendations_model_and_marts_feed_the_chains(generated_shop, database_url, monkeypatch):
    from retention.warehouse.build import build

    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    end = datetime(2026, 10, 31, tzinfo=UTC)
    load_folder(generated_shop, database_url, loaded_at=end, currency="UAH")
    # "buildable": only the tests whose every parent is built here (a relationships test
    # from an unselected model, e.g. stg_channel_subscriptions -> stg_customers, would
    # query a relation this database does not have)
    result = build(as_of=end, url=database_url, raise_on_failure=False, unit_tests=True,
                   select="+product_recommendations +cohort_retention +customer_category_affinity "
                          "+ropo_purchases", indirect_selection="buildable")
    # every selected node builds and passes: models, data tests and unit tests
    assert result["dbt"]["failed"] == [], result["dbt"]["failed"]
    assert result["dbt"]["success"], result["dbt"].get("error")
    assert result["dbt"]["unit_tests"] > 0, result["dbt"]["by_type"]
    # the weekly snapshot: Saturday 2026-10-31 00:00 UTC -> Monday 2026-10-26 00:00 UTC
    snapshot = datetime(2026, 10, 26, tzinfo=UTC)
    with db.connect(database_url) as conn:
        assert conn.execute("select array_agg(distinct as_of) from marts.product_recommendations"
                            ).fetchone()[0] == [snapshot]
        got = pd.DataFrame(conn.execute(
            "select product_id, recommended_product_id, rank, customers, customers_bought, buyers "
            "from marts.product_recommendations").fetchall(),
            columns=["product_id", "recommended_product_id", "rank", "customers",
                     "customers_bought", "buyers"])
        items = pd.DataFrame(conn.execute(
            "select customer_id, product_id, purchased_at from intermediate.int_purchase_items_categorized "
            "where customer_id is not null and product_id is not null and purchased_at <= %s",
            (snapshot,)).fetchall(),
            columns=["customer_id", "product_id", "t"])
        views = pd.DataFrame(conn.execute(
            "select customer_id, product_id, occurred_at from raw.events where event_type = 'view' "
            "and customer_id is not null and product_id is not null and occurred_at <= %s",
            (snapshot,)).fetchall(), columns=["customer_id", "product_id", "t"])
    expected = _expected_recommendations(items, views)
    assert len(got) > 1000
    key = ["product_id", "rank"]
    got = got.sort_values(key).reset_index(drop=True).astype({"rank": int, "customers": int,
                                                              "customers_bought": int, "buyers": int})
    expected = expected.sort_values(key).reset_index(drop=True).astype(got.dtypes.to_dict())
    pd.testing.assert_frame_equal(got, expected)

    # with the marts built, a day of triggers reads them: the cohort norm, ROPO purchases,
    # and the recommendations in the messages
    from test_triggers_flows import Recorder

    channels = {n: Recorder(n) for n in ("mobile_push", "web_push", "email", "telegram")}
    noon = end - timedelta(hours=12)  # 14:00 in Kyiv: outside quiet hours
    day = run_triggers(noon - timedelta(days=1), noon, database_url, channels, policy=POLICY,
                       settings=SETTINGS, campaigns={n: load_campaign(n) for n in TRIGGERS})
    assert day["cohort_norm_source"] == "marts.cohort_retention"
    mails = [m for m in channels["email"].sent]
    assert sum(day["triggers"][n]["started"] for n in TRIGGERS) > 10
    assert any("You may also like" in m.body_text for m in mails), len(mails)

    # the snapshot is rebuilt only when its moment moves: Sunday's build (same week)
    # leaves every row as it was, Monday's computes the week that has passed
    def rows_and_versions():
        with db.connect(database_url) as conn:
            return conn.execute("select count(*), sum(xmin::text::bigint), min(as_of), max(as_of) "
                                "from marts.product_recommendations").fetchone()

    before = rows_and_versions()
    build(as_of=end + timedelta(days=1), url=database_url, select="product_recommendations")
    assert rows_and_versions() == before
    build(as_of=end + timedelta(days=2), url=database_url, select="product_recommendations")
    after = rows_and_versions()
    assert after[1] != before[1] and after[2] == after[3] == end + timedelta(days=2)
    assert after[0] >= before[0]  # six more days of views and purchases
