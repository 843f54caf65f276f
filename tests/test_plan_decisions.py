"""Every eligibility decision of plan_step, row by row: channel fallback, consent (raw
unsubscriptions, consent changes, deactivated addresses, subscription times), which
address of a channel, both frequency caps with their windows and what they count, quiet
hours per time zone, and the transactional exceptions. Each customer below exercises one
rule; the ledger row (status, reason, channel, address, not_before, message id) is
asserted exactly."""

from __future__ import annotations

import textwrap
from datetime import datetime, time, timezone

import psycopg
import pytest

from retention import db
from retention.campaigns.engine import plan_step, start_run
from retention.campaigns.ledger import ensure_ledger, message_id_for, message_id_prefix
from retention.campaigns.policy import Policy
from retention.campaigns.spec import parse_campaign

AS_OF = datetime(2026, 11, 2, 10, 0, tzinfo=timezone.utc)  # 12:00 in Kyiv, 05:00 in New York
NY_MORNING = datetime(2026, 11, 2, 14, 0, tzinfo=timezone.utc)  # 09:00 in New York
POLICY = Policy(global_cap=2, global_cap_days=7, channel_cap=1, channel_cap_days=3,
                quiet_start=time(21), quiet_end=time(9), default_timezone="Europe/Kyiv",
                global_holdout=0.0)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


# customer: time zone, subscriptions (channel, address, subscribed_at, unsubscribed_at)
CUSTOMERS = {
    "d_push": ("Europe/Kyiv", [("mobile_push", "tok-push", "2025-01-01", None),
                               ("email", "push@x", "2025-01-01", None)]),
    "d_deact": ("Europe/Kyiv", [("mobile_push", "tok-deact", "2025-01-01", None),
                                ("email", "deact@x", "2025-01-01", None)]),
    "d_consent": ("Europe/Kyiv", [("mobile_push", "tok-consent", "2025-01-01", None),
                                  ("email", "consent@x", "2025-01-01", None)]),
    "d_consent_later": ("Europe/Kyiv", [("mobile_push", "tok-later", "2025-01-01", None)]),
    "d_future_unsub": ("Europe/Kyiv", [("email", "future@x", "2025-01-01", "2026-11-05")]),
    "d_unsub": ("Europe/Kyiv", [("email", "unsub@x", "2025-01-01", "2026-10-01")]),
    "d_none": ("Europe/Kyiv", []),
    "d_telegram": ("Europe/Kyiv", [("telegram", "12345", "2025-01-01", None)]),
    "d_two": ("Europe/Kyiv", [("email", "a-old@x", "2025-01-01", None),
                              ("email", "b-new@x", "2026-01-01", None)]),
    "d_later_sub": ("Europe/Kyiv", [("email", "later@x", "2026-12-01", None)]),
    "d_null_sub": ("Europe/Kyiv", [("email", "null@x", None, None)]),
    "d_null_vs_dated": ("Europe/Kyiv", [("email", "a-null@x", None, None),
                                        ("email", "b-dated@x", "2025-01-01", None)]),
    "d_tokens": ("Europe/Kyiv", [("mobile_push", "tok-old", "2025-01-01", None),
                                 ("mobile_push", "tok-new", "2026-06-01", None)]),
    "d_both_dead": ("Europe/Kyiv", [("mobile_push", "tok-dead", "2025-01-01", None),
                                    ("email", "dead@x", "2025-01-01", "2026-10-01")]),
    "d_chcap": ("Europe/Kyiv", [("mobile_push", "tok-chcap", "2025-01-01", None)]),
    "d_chcap_old": ("Europe/Kyiv", [("mobile_push", "tok-chold", "2025-01-01", None)]),
    "d_chcap_other": ("Europe/Kyiv", [("mobile_push", "tok-chother", "2025-01-01", None)]),
    "d_gcap": ("Europe/Kyiv", [("mobile_push", "tok-gcap", "2025-01-01", None)]),
    "d_gcap_old": ("Europe/Kyiv", [("mobile_push", "tok-gold", "2025-01-01", None)]),
    "d_trans": ("Europe/Kyiv", [("mobile_push", "tok-trans", "2025-01-01", None)]),
    "d_failed": ("Europe/Kyiv", [("mobile_push", "tok-failed", "2025-01-01", None)]),
    "d_future": ("Europe/Kyiv", [("mobile_push", "tok-future", "2025-01-01", None)]),
    "d_waiting": ("Europe/Kyiv", [("mobile_push", "tok-waiting", "2025-01-01", None)]),
    "d_ny": ("America/New_York", [("mobile_push", "tok-ny", "2025-01-01", None)]),
    "d_badtz": ("Mars/Olympus", [("mobile_push", "tok-badtz", "2025-01-01", None)]),
    "d_notz": (None, [("mobile_push", "tok-notz", "2025-01-01", None)]),
}
DEACTIVATED = [("mobile_push", "tok-deact"), ("mobile_push", "tok-new"),
               ("mobile_push", "tok-dead")]
CONSENT_CHANGES = [("mobile_push", "tok-consent", "2026-11-01"),
                   ("mobile_push", "tok-later", "2026-11-03")]
# earlier ledger rows of another campaign: customer, channel, status, planned_at,
# not_before, cap_class
EARLIER = [
    ("d_chcap", "mobile_push", "sent", "2026-11-01", None, "promo"),
    ("d_chcap_old", "mobile_push", "sent", "2026-10-28", None, "promo"),
    ("d_chcap_other", "email", "sent", "2026-11-01", None, "promo"),
    ("d_gcap", "email", "sent", "2026-10-30", None, "promo"),
    ("d_gcap", "email", "sent", "2026-10-31", None, "trigger"),
    ("d_gcap_old", "email", "sent", "2026-10-20", None, "promo"),
    ("d_gcap_old", "email", "sent", "2026-10-21", None, "promo"),
    ("d_trans", "email", "sent", "2026-10-31", None, "transactional"),
    ("d_trans", "mobile_push", "sent", "2026-11-01", None, "transactional"),
    ("d_failed", "email", "failed", "2026-10-31", None, "promo"),
    ("d_failed", "mobile_push", "suppressed", "2026-11-01", None, "promo"),
    ("d_future", "mobile_push", "planned", "2026-11-04", None, "promo"),
    ("d_waiting", "email", "unknown", "2026-11-01", None, "promo"),
    ("d_waiting", "email", "planned", "2026-10-25", "2026-10-27", "promo"),
]

PLANNED = ("planned", None)
CAMPAIGN_ROWS = {
    "d_push": (*PLANNED, "mobile_push", "tok-push", AS_OF),
    "d_deact": (*PLANNED, "email", "deact@x", AS_OF),
    "d_consent": (*PLANNED, "email", "consent@x", AS_OF),
    "d_consent_later": (*PLANNED, "mobile_push", "tok-later", AS_OF),
    "d_future_unsub": (*PLANNED, "email", "future@x", AS_OF),
    "d_unsub": ("suppressed", "no consent", "mobile_push", None, None),
    "d_two": (*PLANNED, "email", "b-new@x", AS_OF),
    "d_later_sub": ("suppressed", "no consent", "mobile_push", None, None),
    "d_null_sub": (*PLANNED, "email", "null@x", AS_OF),
    "d_null_vs_dated": (*PLANNED, "email", "b-dated@x", AS_OF),
    "d_tokens": (*PLANNED, "mobile_push", "tok-old", AS_OF),
    "d_both_dead": ("suppressed", "no consent", "mobile_push", None, None),
    "d_chcap": ("suppressed", "frequency cap: channel", "mobile_push", None, None),
    "d_chcap_old": (*PLANNED, "mobile_push", "tok-chold", AS_OF),
    "d_chcap_other": (*PLANNED, "mobile_push", "tok-chother", AS_OF),
    "d_gcap": ("suppressed", "frequency cap: global", "mobile_push", None, None),
    "d_gcap_old": (*PLANNED, "mobile_push", "tok-gold", AS_OF),
    "d_trans": (*PLANNED, "mobile_push", "tok-trans", AS_OF),
    "d_failed": (*PLANNED, "mobile_push", "tok-failed", AS_OF),
    "d_future": ("suppressed", "frequency cap: channel", "mobile_push", None, None),
    "d_waiting": ("suppressed", "frequency cap: global", "mobile_push", None, None),
    "d_ny": (*PLANNED, "mobile_push", "tok-ny", NY_MORNING),
    "d_badtz": (*PLANNED, "mobile_push", "tok-badtz", AS_OF),
    "d_notz": (*PLANNED, "mobile_push", "tok-notz", AS_OF),
}


def _campaign(kind: str):
    return parse_campaign(textwrap.dedent(f"""\
        id: decisions_{kind}
        kind: {kind}
        audience:
          include_any:
            - customer_ids: {sorted(CUSTOMERS)}
        steps:
          - {{name: wave, channel: [mobile_push, email], template: weekly_promo}}
        holdout: 0
        """), f"decisions_{kind}.yaml")


@pytest.fixture()
def shop(database_url):
    with db.connect(database_url) as conn:
        ensure_ledger(conn)
        with conn.cursor() as cur:
            cur.executemany("insert into raw.customers (customer_id, timezone, created_at) "
                            "values (%s, %s, '2025-01-01Z')",
                            [(c, tz) for c, (tz, _) in CUSTOMERS.items()])
            cur.executemany(
                "insert into raw.channel_subscriptions (customer_id, channel, address, "
                "subscribed_at, unsubscribed_at) values (%s, %s, %s, %s, %s)",
                [(c, ch, a, s and utc(s), u and utc(u))
                 for c, (_, subs) in CUSTOMERS.items() for ch, a, s, u in subs])
            cur.executemany("insert into ops.deactivated_addresses (channel, address, "
                            "deactivated_at, reason) values (%s, %s, '2026-10-01Z', 'gone')",
                            DEACTIVATED)
            cur.executemany("insert into ops.consent_changes (channel, address, "
                            "unsubscribed_at, source) values (%s, %s, %s, 'test')",
                            [(ch, a, utc(t)) for ch, a, t in CONSENT_CHANGES])
            cur.executemany(
                "insert into ops.messages (message_id, campaign_id, run_id, step, channel, "
                "customer_id, variant, status, planned_at, not_before, cap_class) "
                "values (%s, 'other', 'other@x', 's', %s, %s, 'A', %s, %s, %s, %s)",
                [(f"earlier{i}", ch, c, st, utc(p), nb and utc(nb), cc)
                 for i, (c, ch, st, p, nb, cc) in enumerate(EARLIER)])
        conn.commit()
    return database_url


def _rows(url: str, run_id: str) -> dict[str, tuple]:
    with db.connect(url) as conn:
        rows = conn.execute("select x.customer_id, x.status, x.reason, x.channel, x.address, "
                            "x.not_before, x.message_id, x.planned_at, m.member_no "
                            "from ops.messages x join ops.audience_members m "
                            "on m.run_id = x.run_id and m.customer_id = x.customer_id "
                            "where x.run_id = %s", (run_id,)).fetchall()
    for r in rows:
        assert r[6] == message_id_for(run_id, "wave", r[0], r[8])
        assert r[7] == AS_OF
    return {r[0]: r[1:6] for r in rows}


def _members(url: str, run_id: str) -> list[tuple]:
    with db.connect(url) as conn:
        return conn.execute("select customer_id, member_no from ops.audience_members "
                            "where run_id = %s order by member_no", (run_id,)).fetchall()


def test_members_are_numbered_in_customer_byte_order(shop):
    """Each member gets a number, 1..N in the byte order of the customer ids, and each
    ledger row of a numbered member the id of the run's and step's prefix and that number
    (checked in _rows): the step's ids follow the order its rows are written in."""
    campaign = _campaign("promo")
    run = start_run(campaign, AS_OF, shop, POLICY)
    members = _members(shop, run.run_id)
    assert [n for _, n in members] == list(range(1, len(CUSTOMERS) + 1))
    assert [c for c, _ in members] == sorted(CUSTOMERS, key=lambda c: c.encode())
    plan_step(campaign, run, "wave", shop, POLICY)
    with db.connect(shop) as conn:
        ids = [r[0] for r in conn.execute(
            "select x.message_id from ops.messages x join ops.audience_members m "
            "on m.run_id = x.run_id and m.customer_id = x.customer_id "
            "where x.run_id = %s order by m.member_no", (run.run_id,)).fetchall()]
    assert ids == sorted(ids) and len(set(ids)) == len(CAMPAIGN_ROWS)
    assert all(len(i) == 34 and i.startswith(message_id_prefix(run.run_id, "wave"))
               for i in ids)


def test_a_run_frozen_without_numbers_keeps_its_ids(shop):
    """A run frozen before members were numbered (member_no null, as migration 0007 leaves
    the older runs) is planned with the ids of sha256(run|step|customer), the ids the
    earlier code gave its rows: planning it again writes nothing new."""
    campaign = _campaign("promo")
    run = start_run(campaign, AS_OF, shop, POLICY)
    with db.connect(shop) as conn:
        conn.execute("update ops.audience_members set member_no = null where run_id = %s",
                     (run.run_id,))
        conn.commit()
    plan_step(campaign, run, "wave", shop, POLICY)
    assert _rows(shop, run.run_id) == CAMPAIGN_ROWS
    with db.connect(shop) as conn:
        ids = {r[0]: r[1] for r in conn.execute(
            "select customer_id, message_id from ops.messages where run_id = %s",
            (run.run_id,)).fetchall()}
    assert ids == {c: message_id_for(run.run_id, "wave", c) for c in CAMPAIGN_ROWS}
    counts = plan_step(campaign, run, "wave", shop, POLICY)
    assert counts["audience"] == len(CAMPAIGN_ROWS)
    assert _rows(shop, run.run_id) == CAMPAIGN_ROWS


def test_every_decision_of_a_marketing_wave(shop):
    campaign = _campaign("promo")
    run = start_run(campaign, AS_OF, shop, POLICY)
    assert run.audience_size == len(CUSTOMERS) and run.holdout_size == 0
    counts = plan_step(campaign, run, "wave", shop, POLICY)
    rows = _rows(shop, run.run_id)
    assert rows == CAMPAIGN_ROWS  # d_none and d_telegram: no subscription to the channels
    assert counts["audience"] == len(CAMPAIGN_ROWS)
    # planning again writes nothing and changes nothing (its own rows are not counted)
    plan_step(campaign, run, "wave", shop, POLICY)
    assert _rows(shop, run.run_id) == CAMPAIGN_ROWS


def test_every_decision_of_a_transactional_wave(shop):
    """No caps, no quiet hours (not_before is the step's time); consent still applies."""
    campaign = _campaign("transactional")
    run = start_run(campaign, AS_OF, shop, POLICY)
    plan_step(campaign, run, "wave", shop, POLICY)
    expected = {}
    for customer, (status, reason, channel, address, not_before) in CAMPAIGN_ROWS.items():
        if reason and reason.startswith("frequency cap"):
            token = CUSTOMERS[customer][1][0][1]
            status, reason, address = "planned", None, token
        if status == "planned":
            not_before = AS_OF
        expected[customer] = (status, reason, channel, address, not_before)
    assert _rows(shop, run.run_id) == expected


def test_a_step_planned_without_numbers_is_planned_again_with_its_ids(shop):
    """A numbered run whose step got the customer-hashed ids (planned by code that did not
    number the members) keeps them when planned again: no second row per member."""
    campaign = _campaign("promo")
    run = start_run(campaign, AS_OF, shop, POLICY)
    with db.connect(shop) as conn:
        numbers = conn.execute("select customer_id, member_no from ops.audience_members "
                               "where run_id = %s", (run.run_id,)).fetchall()
        conn.execute("update ops.audience_members set member_no = null where run_id = %s",
                     (run.run_id,))
        conn.commit()
    plan_step(campaign, run, "wave", shop, POLICY)
    with db.connect(shop) as conn:
        conn.cursor().executemany("update ops.audience_members set member_no = %s "
                                  "where run_id = %s and customer_id = %s",
                                  [(n, run.run_id, c) for c, n in numbers])
        conn.commit()
    counts = plan_step(campaign, run, "wave", shop, POLICY)
    assert counts["audience"] == len(CAMPAIGN_ROWS)
    with db.connect(shop) as conn:
        ids = dict(conn.execute("select customer_id, message_id from ops.messages "
                                "where run_id = %s", (run.run_id,)).fetchall())
    assert ids == {c: message_id_for(run.run_id, "wave", c) for c in CAMPAIGN_ROWS}


def _split(monkeypatch, sessions: int) -> None:
    """Plan every step of two members or more in `sessions` parts."""
    monkeypatch.setenv("RETENTION_PLAN_SESSIONS", str(sessions))
    monkeypatch.setenv("RETENTION_PLAN_SPLIT_MEMBERS", "2")


def _transactions(url: str, run_id: str) -> int:
    """How many transactions wrote the run's ledger rows (their xmin)."""
    with db.connect(url) as conn:
        return conn.execute("select count(distinct xmin::text) from ops.messages "
                            "where run_id = %s", (run_id,)).fetchone()[0]


@pytest.mark.parametrize("sessions", [2, 3, len(CUSTOMERS)])
def test_a_step_planned_in_parts_makes_every_decision_the_same(shop, monkeypatch, sessions):
    """A large step's first plan runs in parts side by side, one session and transaction
    each (RETENTION_PLAN_SESSIONS): every decision, address, time and id is the one of a
    plan in one statement, with the caps of each member counted as before; the counts
    are those of all the parts."""
    _split(monkeypatch, sessions)
    campaign = _campaign("promo")
    run = start_run(campaign, AS_OF, shop, POLICY)
    counts = plan_step(campaign, run, "wave", shop, POLICY)
    assert _rows(shop, run.run_id) == CAMPAIGN_ROWS
    assert counts["audience"] == len(CAMPAIGN_ROWS)
    assert counts["suppressed_by_reason"] == {
        reason: sum(1 for r in CAMPAIGN_ROWS.values() if r[1] == reason)
        for reason in {r[1] for r in CAMPAIGN_ROWS.values() if r[0] == "suppressed"}}
    # parts without a member who gets a row (d_none, d_telegram) write nothing
    assert 2 <= _transactions(shop, run.run_id) <= sessions
    # planning again: one session, nothing new
    assert plan_step(campaign, run, "wave", shop, POLICY)["audience"] == len(CAMPAIGN_ROWS)
    assert _rows(shop, run.run_id) == CAMPAIGN_ROWS


def test_a_part_killed_mid_plan_is_completed_by_planning_again(shop, monkeypatch):
    """One part's database session is terminated while it writes (it waits on a row
    lock another session holds on one of its message ids): plan_step fails, the other
    part's rows stay committed, and planning the step again writes exactly the rows that
    are missing, with the same ids."""
    import threading
    import time as clock

    _split(monkeypatch, 2)
    campaign = _campaign("promo")
    run = start_run(campaign, AS_OF, shop, POLICY)
    members = dict(_members(shop, run.run_id))
    second_part = {c for c, n in members.items() if n > len(members) // 2}
    victim = min(c for c in second_part if c in CAMPAIGN_ROWS)
    with db.connect(shop) as blocker:
        blocker.execute(
            "insert into ops.messages (message_id, campaign_id, run_id, step, channel, "
            "customer_id, variant, status, planned_at, cap_class) values (%s, 'blocker', "
            "'blocker@x', 's', 'email', %s, 'A', 'failed', %s, 'promo')",
            (message_id_for(run.run_id, "wave", victim, members[victim]), victim, AS_OF))
        failure: list[BaseException] = []

        def plan() -> None:
            try:
                plan_step(campaign, run, "wave", shop, POLICY)
            except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
                failure.append(exc)

        planner = threading.Thread(target=plan)
        planner.start()
        # (pg_stat_activity read outside a transaction: inside one it is a snapshot)
        with db.connect(shop, autocommit=True) as watcher:
            deadline = clock.monotonic() + 60
            pid = None
            while pid is None and clock.monotonic() < deadline:
                pid = watcher.execute(
                    "select pid from pg_stat_activity where datname = current_database() "
                    "and wait_event_type = 'Lock' and wait_event = 'transactionid'"
                ).fetchone()
                clock.sleep(0.05)
            assert pid is not None, "no part waited on the blocked message id"
            assert watcher.execute("select pg_terminate_backend(%s)", pid).fetchone()[0]
        planner.join(60)
        assert not planner.is_alive()
        blocker.rollback()
    assert failure and isinstance(failure[0], psycopg.Error), failure
    first_part = {c: r for c, r in CAMPAIGN_ROWS.items() if c not in second_part}
    assert first_part and _rows(shop, run.run_id) == first_part
    counts = plan_step(campaign, run, "wave", shop, POLICY)
    assert counts["audience"] == len(CAMPAIGN_ROWS)
    assert _rows(shop, run.run_id) == CAMPAIGN_ROWS
