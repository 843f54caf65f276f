"""Audience freezing, arms and eligibility planning, on hand-made rows in real PostgreSQL."""

from __future__ import annotations

import hashlib
import textwrap
from dataclasses import replace
from datetime import datetime, time, timezone

import pytest

from retention import db
from retention.campaigns.engine import plan_step, start_run
from retention.campaigns.ledger import message_id_for
from retention.campaigns.policy import Policy
from retention.campaigns.spec import parse_campaign

AS_OF = datetime(2026, 11, 2, 7, 0, tzinfo=timezone.utc)  # Monday 09:00 in Kyiv
POLICY = Policy(global_cap=3, global_cap_days=7, channel_cap=2, channel_cap_days=7,
                quiet_start=time(21), quiet_end=time(9), default_timezone="Europe/Kyiv",
                global_holdout=0.0)

CASCADE = textwrap.dedent("""\
    id: cascade
    kind: promo
    audience:
      include_any:
        - visited: {within_days: 30}
    steps:
      - {name: email, channel: email, template: weekly_promo}
      - {name: push, channel: mobile_push, template: weekly_promo, wait: 24h}
    """)


def _exec(url: str, sql: str, rows: list[tuple]) -> None:
    with db.connect(url) as conn:
        with conn.cursor() as cur:
            cur.executemany(sql, rows)
        conn.commit()


@pytest.fixture()
def shop(database_url):
    customers = [
        ("c_ok", "Europe/Kyiv"),         # email + push, everything fine
        ("c_unsub", "Europe/Kyiv"),      # e-mail unsubscribed before the run
        ("c_night", "Asia/Almaty"),      # 12:00 in Almaty: fine
        ("c_late", "America/New_York"),  # 02:00 in New York: quiet hours
        ("c_capped", "Europe/Kyiv"),     # already got 3 messages this week
        ("c_bought", "Europe/Kyiv"),     # buys after the e-mail: exits the cascade
        ("c_nochannel", "Europe/Kyiv"),  # no subscription at all
        ("c_badtz", "Mars/Olympus"),     # unknown time zone: the default one
        ("c_quiet", None),               # visited long ago (a bonus credited since is no
                                         # visit): not in the audience
    ]
    _exec(database_url, "insert into raw.customers (customer_id, email, timezone, created_at) "
          "values (%s, %s, %s, '2025-01-01Z')", [(c, f"{c}@example.com", tz) for c, tz in customers])
    subs = [(c, "email", f"{c}@example.com", None) for c, _ in customers if c not in ("c_nochannel",)]
    subs = [(c, ch, a, "2026-10-01T00:00:00Z" if c == "c_unsub" else u) for c, ch, a, u in subs]
    subs += [(c, "mobile_push", f"token-{c}", None) for c in ("c_ok", "c_unsub", "c_bought")]
    _exec(database_url, "insert into raw.channel_subscriptions (customer_id, channel, address, "
          "subscribed_at, unsubscribed_at) values (%s, %s, %s, '2025-01-01Z', %s)", subs)
    events = [(f"e_{c}", "2026-11-01T12:00:00Z" if c != "c_quiet" else "2026-08-01T12:00:00Z", c)
              for c, _ in customers]
    _exec(database_url, "insert into raw.events (event_id, occurred_at, event_type, customer_id) "
          "values (%s, %s, 'view', %s)", events)
    _exec(database_url, "insert into raw.events (event_id, occurred_at, event_type, customer_id, "
          "properties) values (%s, %s, 'bonus_credited', %s, %s)",
          [("e_bonus", "2026-11-01T12:00:00Z", "c_quiet", '{"amount": 50}')])
    _exec(database_url, "insert into raw.orders (order_id, customer_id, ordered_at, status, "
          "total_amount) values (%s, %s, %s, 'paid', 10)", [("o_after", "c_bought", "2026-11-02T20:00:00Z")])
    # three earlier marketing messages for c_capped, from another campaign this week
    from retention.campaigns.ledger import ensure_ledger
    with db.connect(database_url) as conn:
        ensure_ledger(conn)
        conn.commit()
    _exec(database_url, "insert into ops.messages (message_id, campaign_id, run_id, step, channel, "
          "customer_id, variant, status, planned_at, cap_class) values (%s, 'other', 'other@x', "
          "'s', 'email', 'c_capped', 'A', 'sent', %s, 'promo')",
          [(f"old{i}", datetime(2026, 10, 29 + i, tzinfo=timezone.utc)) for i in range(3)])
    return database_url


def _member_no(url: str, run_id: str, customer_id: str) -> int:
    with db.connect(url) as conn:
        return conn.execute("select member_no from ops.audience_members "
                            "where run_id = %s and customer_id = %s",
                            (run_id, customer_id)).fetchone()[0]


def ledger(url: str, step: str) -> dict[str, tuple]:
    with db.connect(url) as conn:
        rows = conn.execute("select customer_id, status, reason, channel, not_before, message_id "
                            "from ops.messages where step = %s and campaign_id = 'cascade'",
                            (step,)).fetchall()
    return {r[0]: r[1:] for r in rows}


def _email_wave_planned():
    """The cascade started as of AS_OF and its e-mail step planned: (campaign, run)."""
    campaign = parse_campaign(CASCADE, "cascade.yaml")
    run = start_run(campaign, AS_OF, policy=POLICY)
    plan_step(campaign, run, "email", policy=POLICY)
    return campaign, run


def test_first_wave_applies_consent_caps_quiet_hours(shop):
    campaign = parse_campaign(CASCADE, "cascade.yaml")
    run = start_run(campaign, AS_OF, policy=POLICY)
    assert run.audience_size == 8 and run.created  # c_quiet is out of the audience
    counts = plan_step(campaign, run, "email", policy=POLICY)
    rows = ledger(shop, "email")
    assert set(rows) == {"c_ok", "c_unsub", "c_night", "c_late", "c_capped", "c_bought", "c_badtz"}
    assert rows["c_ok"][:3] == ("planned", None, "email")
    assert rows["c_ok"][3] == AS_OF
    assert rows["c_unsub"][:2] == ("suppressed", "no consent")
    assert rows["c_capped"][:2] == ("suppressed", "frequency cap: global")
    assert rows["c_night"][3] == AS_OF
    # 02:00 in New York: waits for 09:00 local (EST, UTC-5) = 14:00 UTC
    assert rows["c_late"][0] == "planned" and rows["c_late"][3] == datetime(2026, 11, 2, 14, tzinfo=timezone.utc)
    assert rows["c_badtz"][3] == AS_OF  # default zone Europe/Kyiv: 09:00, not quiet
    assert rows["c_ok"][4] == message_id_for(run.run_id, "email", "c_ok",
                                             _member_no(shop, run.run_id, "c_ok"))
    assert counts["audience"] == 7 and counts["planned"] == 5 and counts["suppressed"] == 2
    assert counts["suppressed_by_reason"] == {"no consent": 1, "frequency cap: global": 1}


def test_replanning_and_rerunning_change_nothing(shop):
    campaign, run = _email_wave_planned()
    before = ledger(shop, "email")
    again = start_run(campaign, AS_OF, policy=POLICY)
    assert not again.created and again.run_id == run.run_id
    # new data after the first selection does not change the frozen audience
    _exec(shop, "insert into raw.events (event_id, occurred_at, event_type, customer_id) values "
          "('late', '2026-11-01T00:00:00Z', 'view', 'c_quiet')", [()])
    assert start_run(campaign, AS_OF, policy=POLICY).audience_size == run.audience_size
    plan_step(campaign, again, "email", policy=POLICY)
    assert ledger(shop, "email") == before


def test_second_wave_skips_engaged_and_purchasers(shop):
    campaign, run = _email_wave_planned()
    with db.connect(shop) as conn:
        conn.execute("update ops.messages set status = 'sent', sent_at = planned_at "
                     "where campaign_id = 'cascade' and status = 'planned'")
        conn.commit()
    plan_step(campaign, run, "push", policy=POLICY)
    rows = ledger(shop, "push")
    # push subscribers: c_ok (reached, not engaged -> push), c_unsub (push is live -> push),
    # c_bought (purchased after the run started -> exits)
    assert rows["c_ok"][:3] == ("planned", None, "mobile_push")
    assert rows["c_unsub"][:3] == ("planned", None, "mobile_push")
    assert rows["c_bought"][:2] == ("suppressed", "exited: purchase")
    assert set(rows) == {"c_ok", "c_unsub", "c_bought"}


def test_engaged_member_is_left_out_of_the_next_wave(shop):
    campaign, run = _email_wave_planned()
    with db.connect(shop) as conn:
        conn.execute("update ops.messages set status = 'sent' where campaign_id = 'cascade' "
                     "and status = 'planned'")
        opened = message_id_for(run.run_id, "email", "c_ok", _member_no(shop, run.run_id, "c_ok"))
        conn.execute("insert into ops.message_events (provider, provider_event_id, message_id, "
                     "event_type, occurred_at, received_at) values ('sendgrid', 'ev1', %s, 'open', "
                     "%s, %s)", (opened, AS_OF, AS_OF))
        conn.commit()
    plan_step(campaign, run, "push", policy=POLICY)
    assert "c_ok" not in ledger(shop, "push")


def test_arms_are_deterministic_and_proportional(database_url):
    n = 4000
    _exec(database_url, "insert into raw.customers (customer_id) values (%s)",
          [(f"c{i:05d}",) for i in range(n)])
    spec = textwrap.dedent("""\
        id: ab
        kind: promo
        audience: {include_any: [{all_customers: true}]}
        steps: [{name: email, channel: email, template: weekly_promo}]
        variants: [{name: A, weight: 3}, {name: B, weight: 1}]
        holdout: 0.1
        """)
    campaign = parse_campaign(spec, "ab.yaml")
    policy = replace(POLICY, global_holdout=0.05)
    run = start_run(campaign, AS_OF, policy=policy)
    other = start_run(campaign, datetime(2026, 11, 9, 7, tzinfo=timezone.utc), policy=policy)
    with db.connect(database_url) as conn:
        arms = dict(conn.execute("select variant || coalesce(':' || holdout_kind, ''), count(*) "
                                 "from ops.audience_members where run_id = %s group by 1",
                                 (run.run_id,)).fetchall())
        changed = conn.execute("""select count(*) from ops.audience_members a
            join ops.audience_members b using (customer_id)
            where a.run_id = %s and b.run_id = %s and a.variant <> b.variant""",
                               (run.run_id, other.run_id)).fetchone()[0]
    assert changed == 0  # same customer, same campaign: same arm on every run
    assert abs(arms["holdout:global"] / n - 0.05) < 0.015
    assert abs(arms["holdout:campaign"] / n - 0.095) < 0.02
    assert abs(arms["A"] / (arms["A"] + arms["B"]) - 0.75) < 0.03
    plan_step(campaign, run, "email", policy=policy)
    with db.connect(database_url) as conn:
        holdout_rows = conn.execute(
            "select count(*), count(*) filter (where status = 'holdout' and variant = 'holdout') "
            "from ops.messages where run_id = %s and variant = 'holdout'", (run.run_id,)).fetchone()
    assert holdout_rows[0] == holdout_rows[1] == arms["holdout:global"] + arms["holdout:campaign"]


def _arm(campaign_id: str, customer: str, global_share: float, holdout: float,
         variants: tuple[str, ...] = ("A", "B")) -> str:
    """The arm of `customer`, worked out in Python from the md5 hashes the engine uses
    (two variants weighted 3:1, or one)."""
    def h(key: str) -> float:
        return int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 2 ** 32

    if h(f"global:{customer}") < global_share:
        return "holdout:global"
    if h(f"{campaign_id}:holdout:{customer}") < holdout:
        return "holdout:campaign"
    if len(variants) == 1:
        return variants[0]
    return variants[0] if h(f"{campaign_id}:variant:{customer}") < 0.75 else variants[1]


def test_each_arm_is_the_hash_of_its_customer(database_url):
    """Every member's arm, row by row, is the one of its md5 hashes (global holdout, then
    campaign holdout, then the variant's share), as on every release before."""
    customers = [f"c{i:05d}" for i in range(2000)]
    _exec(database_url, "insert into raw.customers (customer_id) values (%s)",
          [(c,) for c in customers])
    campaign = parse_campaign(textwrap.dedent("""\
        id: ab
        kind: promo
        audience: {include_any: [{all_customers: true}]}
        steps: [{name: email, channel: email, template: weekly_promo}]
        variants: [{name: A, weight: 3}, {name: B, weight: 1}]
        holdout: 0.1
        """), "ab.yaml")
    run = start_run(campaign, AS_OF, policy=replace(POLICY, global_holdout=0.05))
    with db.connect(database_url) as conn:
        arms = dict(conn.execute(
            "select customer_id, variant || coalesce(':' || holdout_kind, '') "
            "from ops.audience_members where run_id = %s", (run.run_id,)).fetchall())
    expected = {c: _arm("ab", c, 0.05, 0.1) for c in customers}
    assert arms == expected
    assert {"holdout:global", "holdout:campaign", "A", "B"} == set(expected.values())
    assert (run.audience_size, run.holdout_size) == (
        2000, sum(a.startswith("holdout") for a in expected.values()))


def test_an_audience_joining_the_predicted_values_freezes_each_customer_once(database_url):
    """An audience read through marts.customer_predicted_value (its latest snapshot at
    or before as_of): the customers it selects, once each, with their arms."""
    customers = [f"c{i:03d}" for i in range(300)]
    _exec(database_url, "insert into raw.customers (customer_id) values (%s)",
          [(c,) for c in customers])
    rows = [(c, at, "high" if i % 3 == 0 else "low")
            for i, c in enumerate(customers)
            for at in ("2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z")]
    rows += [(c, "2026-12-01T00:00:00Z", "low") for c in customers]  # after as_of: unread
    _exec(database_url, "insert into marts.customer_predicted_value (customer_id, as_of, "
          "purchases, time_unit, churn_risk) values (%s, %s, 1, '7 days', %s)", rows)
    campaign = parse_campaign(textwrap.dedent("""\
        id: risky
        kind: promo
        audience: {include_any: [{churn_risk: [high]}]}
        steps: [{name: email, channel: email, template: weekly_promo}]
        holdout: 0.1
        """), "risky.yaml")
    run = start_run(campaign, AS_OF, policy=POLICY)
    with db.connect(database_url) as conn:
        arms = dict(conn.execute(
            "select customer_id, variant || coalesce(':' || holdout_kind, '') "
            "from ops.audience_members where run_id = %s", (run.run_id,)).fetchall())
    expected = {c: _arm("risky", c, 0.0, 0.1, ("A",))
                for i, c in enumerate(customers) if i % 3 == 0}
    assert arms == expected and run.audience_size == 100
