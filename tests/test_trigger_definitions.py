"""Trigger definitions (docs/triggers.md) find exactly the moments the code triggers find.

For every trigger whose campaign file has an `entry:` block, the compiled definition and
the Python detector of detect.py run over the same intervals of the same data (a
generated shop, the REES46 sample) and must return the same moments: customer, key,
subject, times, and the context the chain's messages read. Then whole runs through the
runner, once with the definitions and once with the code, must leave the same chains.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, time, timedelta, timezone

import pytest

from retention import db
from retention.campaigns.policy import Policy
from retention.campaigns.spec import load_all, load_campaign
from retention.ingest.formats import load_path
from retention.ingest.load import load_folder
from retention.triggers import run_triggers
from retention.triggers.config import TRIGGERS, TriggerSettings
from retention.triggers.definitions import compile_definition
from retention.triggers.detect import DETECTORS

pytestmark = pytest.mark.xdist_group("test_trigger_definitions")

UTC = timezone.utc
SETTINGS = TriggerSettings()
POLICY = Policy(global_cap=3, global_cap_days=7, channel_cap=2, channel_cap_days=7,
                quiet_start=time(21), quiet_end=time(9), default_timezone="Europe/Kyiv",
                global_holdout=0.05)
#: the triggers that are definitions now; the others stay code (their docstrings say why)
CONVERTED = ("abandoned_cart", "browse_abandonment", "search_abandonment", "wishlist_reminder",
             "welcome_series", "review_request", "order_cancelled_oos", "price_drop",
             "back_in_stock", "category_replenished")
END = datetime(2026, 10, 31, tzinfo=UTC)


def _moments(conn, sql: str, params: dict) -> set[tuple]:
    rows = conn.execute(f"select customer_id, event_key, subject, hit_at, anchor_at, "
                        f"first_step_at, context from ({sql}) d", params).fetchall()
    return {r[:6] + (tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in r[6].items())),)
            for r in rows}


def _compare(url: str, name: str, intervals, has_ropo: bool = False) -> tuple[int, list]:
    """Moments of the code and of the definition over each interval; returns how many
    and the differences (moment, context keys of the code compared)."""
    campaign = load_campaign(name)
    assert campaign.definition is not None, name
    compiled = compile_definition(campaign.definition, name, SETTINGS, has_ropo)
    code_sql, code_params = DETECTORS[name].build(SETTINGS, has_ropo)
    total, diffs = 0, []
    with db.connect(url) as conn:
        for lo, hi in intervals:
            code = _moments(conn, code_sql, dict(code_params, lo=lo, hi=hi))
            defined = _moments(conn, compiled.sql, dict(compiled.params, lo=lo, hi=hi))
            by_key = {m[:6]: dict(m[6]) for m in defined}
            code_keys = {m[:6] for m in code}
            for m in code:
                got = by_key.get(m[:6])
                # the definition's context may say more (sessions), never otherwise
                if got is None or any(got.get(k) != v for k, v in m[6]):
                    diffs.append(("code only" if got is None else "context", lo, hi, m, got))
            diffs += [("definition only", lo, hi, k) for k in set(by_key) - code_keys]
            total += len(code)
    return total, diffs


@pytest.fixture(scope="module")
def shop_url(tmp_path_factory, make_database, migrated_template):
    """A generated shop loaded once for the module (a database of its own)."""
    from retention_dev.generate import generate_shop

    out = tmp_path_factory.mktemp("shop")
    generate_shop(out, customers=1200, seed=11, n_products=2000)
    url = make_database("tdef", template=migrated_template)
    load_folder(out, url, loaded_at=END, currency="UAH")
    return url


@pytest.fixture(scope="module")
def rees46_url(make_database, migrated_template, sample_data):
    url = make_database("tdefr", template=migrated_template)
    load_path(sample_data / "rees46_sample_2019-10-01.csv", url, fmt="rees46",
              loaded_at=datetime(2019, 10, 2, tzinfo=UTC))
    return url


def _intervals(start: datetime, end: datetime, step: timedelta) -> list[tuple]:
    out, t = [], start
    while t < end:
        out.append((t, t + step))
        t += step
    return out


# the whole history, a week in 12-hour scans (lateness as the runner adds it), days,
# and 15-minute scans
SHOP_INTERVALS = ([(END - timedelta(days=800), END)]
                  + [(lo - SETTINGS.lateness, hi) for lo, hi in
                   _intervals(END - timedelta(days=7), END, timedelta(hours=12))]
                  + _intervals(END - timedelta(days=30), END - timedelta(days=27), timedelta(days=1))
                  + _intervals(END - timedelta(days=2), END - timedelta(days=1, hours=18),
                               timedelta(minutes=15)))


@pytest.fixture(scope="module")
def searches_url(shop_url, make_database):
    """The generated shop, where every search opens a session of views, with what came
    after every third search (up to the next search, within the search window) taken
    out: searches that lead nowhere."""
    from sqlalchemy.engine import make_url

    url = make_database("tdefs", template=make_url(shop_url).database)
    with db.connect(url) as conn:
        deleted = conn.execute("""
            with searches as (
              select event_id, customer_id, occurred_at,
                     row_number() over (order by occurred_at, event_id) as n
              from raw.events where event_type = 'search' and customer_id is not null
            )
            delete from raw.events e using searches s
            where s.n %% 3 = 0 and e.customer_id = s.customer_id and e.event_type <> 'search'
              and e.occurred_at >= s.occurred_at
              and e.occurred_at <= s.occurred_at + %(window)s""",
                               {"window": SETTINGS.search_window}).rowcount
        conn.commit()
    assert deleted > 100
    return url


@pytest.mark.parametrize("name", CONVERTED)
def test_definition_finds_the_moments_of_the_code_on_a_generated_shop(request, name):
    url = request.getfixturevalue("searches_url" if name == "search_abandonment" else "shop_url")
    total, diffs = _compare(url, name, SHOP_INTERVALS)
    assert diffs == [], diffs[:5]
    assert total > 0, f"{name}: no moment in the generated shop's intervals"


#: what the REES46 sample (views, carts, purchases, removals; no orders, subscriptions,
#: searches or wishlists) can feed
REES46_FED = ("abandoned_cart", "browse_abandonment")


@pytest.mark.parametrize("name", CONVERTED)
def test_definition_finds_the_moments_of_the_code_on_the_rees46_sample(rees46_url, name):
    start = datetime(2019, 10, 1, tzinfo=UTC)
    intervals = ([(start - SETTINGS.lateness, start + timedelta(hours=4))]
                 + _intervals(start, start + timedelta(hours=4), timedelta(minutes=15)))
    total, diffs = _compare(rees46_url, name, intervals)
    assert diffs == [], diffs[:5]
    if name in REES46_FED:
        assert total > 0
    else:
        with db.connect(rees46_url) as conn:
            assert conn.execute(DETECTORS[name].source_sql,
                                {"start": start - timedelta(days=60),
                                 "end": start + timedelta(days=1)}).fetchone()[0] == 0


def test_runs_with_definitions_leave_the_chains_the_code_leaves(shop_url, make_database,
                                                                 monkeypatch):
    """The runner over a day in 15-minute runs, once with the definitions and once with
    the code (the same campaign files without their definition): the same moments, the
    same chains, the same ledger."""
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    from sqlalchemy.engine import make_url

    defined = {n: load_campaign(n) for n in TRIGGERS}
    code = {n: replace(c, definition=None) for n, c in defined.items()}
    outcome = {}
    for label, campaigns in (("definition", defined), ("code", code)):
        url = make_database("tdefrun", template=make_url(shop_url).database)
        start = END - timedelta(days=3)
        results, t = [], start
        while t < END:
            results.append(run_triggers(t, t + timedelta(hours=6), url, policy=POLICY,
                                        settings=SETTINGS, campaigns=campaigns))
            t += timedelta(hours=6)
        sources = {r["triggers"][n]["source"] for r in results for n in CONVERTED}
        assert sources == {label}
        with db.connect(url) as conn:
            outcome[label] = (
                conn.execute("select trigger, customer_id, event_key, subject, hit_at, chain_id, "
                             "outcome from ops.trigger_hits order by 1, 2, 3").fetchall(),
                conn.execute("select chain_id, status, next_step, next_step_at, context "
                             "from ops.chain_instances order by 1").fetchall(),
                conn.execute("select message_id, status, reason from ops.messages "
                             "order by 1").fetchall())
    hits, chains, messages = outcome["definition"]
    assert len({h[0] for h in hits} & set(CONVERTED)) >= 5 and len(messages) > 10
    assert hits == outcome["code"][0]
    assert messages == outcome["code"][2]
    # chains: the same, and their contexts too, but for the sessions of an event entry that
    # the code's wishlist moments do not carry
    code_chains = {c[0]: c for c in outcome["code"][1]}
    assert [c[0] for c in chains] == list(code_chains)
    for chain in chains:
        code_chain = code_chains[chain[0]]
        assert chain[:4] == code_chain[:4]
        context, code_context = dict(chain[4]), dict(code_chain[4])
        if code_context.get("sessions") == [] and context.get("sessions"):
            context["sessions"] = []
        assert context == code_context, chain[0]


def test_report_names_who_entered(shop_url, make_database, monkeypatch):
    from retention.triggers.runner import format_report
    from sqlalchemy.engine import make_url

    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    url = make_database("tdefrep", template=make_url(shop_url).database)
    result = run_triggers(END - timedelta(days=1), END, url, policy=POLICY, settings=SETTINGS,
                          triggers=["abandoned_cart", "welcome_series"])
    text = format_report(result)
    cart = result["triggers"]["abandoned_cart"]
    assert cart["source"] == "definition" and cart["customers"] > 0
    assert 0 < len(cart["customers_sample"]) <= 5
    line = next(l for l in text.splitlines() if l.strip().startswith("entered abandoned_cart"))
    assert f"{cart['customers']:,} customer(s)" in line
    assert all(c in line for c in cart["customers_sample"])
    with db.connect(url) as conn:
        entered = {r[0] for r in conn.execute(
            "select customer_id from ops.trigger_hits where trigger = 'abandoned_cart'")}
    assert set(cart["customers_sample"]) <= entered and len(entered) == cart["customers"]


def test_shipped_trigger_files_are_definitions_where_the_language_can_say_them():
    campaigns = load_all()
    # the converted code triggers, and the triggers that exist only as definitions
    assert {n for n, c in campaigns.items() if c.definition is not None} == {
        *CONVERTED, "bonus_credited", "secure_payment_nudge", "inactive_viewers",
        "loyal_at_risk", "replenishment_due"}
    # the ones that stay code
    assert campaigns["second_purchase_nudge"].definition is None
    assert campaigns["reengagement"].definition is None
