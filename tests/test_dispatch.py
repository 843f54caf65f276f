"""Sending exactly once, against the local provider servers with the real SDKs.

The ledger and what the servers accepted must agree one for one; nobody suppressed or in
a holdout receives anything; a worker killed mid-wave and retried sends nothing twice and
leaves nothing unsent; 429 and 5xx storms end with every message delivered once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from datetime import datetime, time, timedelta, timezone

import pytest

from retention import db
from retention.campaigns.dispatch import dispatch_step
from retention.campaigns.engine import plan_step, start_run
from retention.campaigns.policy import Policy
from retention.campaigns.runner import run_campaign
from retention.campaigns.spec import parse_campaign
from retention.connections import channels_from_env
from retention_dev.stack import accepted_message_ids, local_provider_stack

AS_OF = datetime(2026, 11, 2, 7, 0, tzinfo=timezone.utc)
POLICY = Policy(global_cap=3, global_cap_days=7, channel_cap=2, channel_cap_days=7,
                quiet_start=time(21), quiet_end=time(9), default_timezone="Europe/Kyiv",
                global_holdout=0.05)

CASCADE = textwrap.dedent("""\
    id: cascade
    kind: promo
    audience: {include_any: [{all_customers: true}]}
    steps:
      - {name: email, channel: email, template: weekly_promo}
      - {name: mobile_push, channel: mobile_push, template: weekly_promo, wait: 24h}
      - {name: telegram, channel: telegram, template: weekly_promo, wait: 24h}
    variants: [{name: A}, {name: B, subject: "B subject"}]
    holdout: 0.1
    """)


@pytest.fixture()
def providers(monkeypatch):
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    with local_provider_stack() as (handle, env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield handle


def _shop(url: str, n: int) -> None:
    """n customers: all e-mail, every 3rd push, every 5th telegram; every 7th e-mail
    unsubscribed; customers in New York wait for their morning."""
    with db.connect(url) as conn, conn.cursor() as cur:
        cur.executemany("insert into raw.customers (customer_id, timezone) values (%s, %s)",
                        [(f"c{i:05d}", "America/New_York" if i % 11 == 0 else "Europe/Kyiv")
                         for i in range(n)])
        subs = []
        for i in range(n):
            subs.append((f"c{i:05d}", "email", f"c{i:05d}@example.com",
                         "2026-10-01T00:00:00Z" if i % 7 == 0 else None))
            if i % 3 == 0:
                subs.append((f"c{i:05d}", "mobile_push", f"token-{i:05d}", None))
            if i % 5 == 0:
                subs.append((f"c{i:05d}", "telegram", str(100000 + i), None))
        cur.executemany("insert into raw.channel_subscriptions (customer_id, channel, address, "
                        "subscribed_at, unsubscribed_at) values (%s, %s, %s, '2025-01-01Z', %s)", subs)
        conn.commit()


def _ledger(url: str) -> list[tuple]:
    with db.connect(url) as conn:
        return conn.execute("select message_id, channel, status, reason, address, customer_id "
                            "from ops.messages").fetchall()


def test_cascade_ledger_and_servers_agree_one_for_one(database_url, providers):
    _shop(database_url, 300)
    campaign = parse_campaign(CASCADE, "cascade.yaml")
    result = run_campaign(campaign, AS_OF, channels_from_env(["email", "mobile_push", "telegram"]),
                          policy=POLICY)
    rows = _ledger(database_url)
    sent = {r[0] for r in rows if r[2] == "sent"}
    accepted = accepted_message_ids(providers)
    email_push_sent = {r[0] for r in rows if r[2] == "sent" and r[1] != "telegram"}
    assert accepted and set(accepted) == email_push_sent and max(accepted.values()) == 1
    telegram_chats = Counter(str(r.body["chat_id"]) for r in providers.providers["telegram"].accepted
                             if r.path.endswith("/sendMessage"))
    assert telegram_chats == Counter(r[4] for r in rows if r[2] == "sent" and r[1] == "telegram")
    # nobody unsubscribed, suppressed or in a holdout received anything
    received = {r[5] for r in rows if r[0] in accepted} | {
        r[5] for r in rows if r[1] == "telegram" and r[2] == "sent"}
    holdouts = {r[5] for r in rows if r[2] == "holdout"}
    unsubscribed = {f"c{i:05d}" for i in range(300) if i % 7 == 0}
    email_receivers = {r[5] for r in rows if r[0] in accepted and r[1] == "email"}
    assert holdouts and not (received & holdouts)
    assert not (email_receivers & unsubscribed)
    waves = {w["step"]: w for w in result["waves"]}
    assert waves["email"]["sent"] == len(email_receivers)
    assert waves["email"]["suppressed_by_reason"]["no consent"] == len(unsubscribed - holdouts)
    # later waves reach every push subscriber who did not engage (nobody opened here)
    push_receivers = {r[5] for r in rows if r[1] == "mobile_push" and r[2] == "sent"}
    assert push_receivers == {f"c{i:05d}" for i in range(0, 300, 3)} - holdouts
    assert len(sent) == sum(accepted.values()) + sum(telegram_chats.values())


def test_rerunning_the_campaign_sends_nothing_again(database_url, providers):
    _shop(database_url, 120)
    campaign = parse_campaign(CASCADE, "cascade.yaml")
    channels = channels_from_env(["email", "mobile_push", "telegram"])
    run_campaign(campaign, AS_OF, channels, policy=POLICY)
    before = _ledger(database_url)
    requests_before = len(providers.received)
    again = run_campaign(campaign, AS_OF, channels, policy=POLICY)
    assert again["reused_frozen_audience"]
    assert sorted(_ledger(database_url)) == sorted(before)
    assert len(providers.received) == requests_before


def _dispatch_in_subprocess(url: str, env: dict, kill_at: tuple[str, int]) -> int:
    """`dispatch_step` of the e-mail wave in a process of its own that dies (exit 137)
    at the `kill_at` = (point, nth) hit."""
    code = textwrap.dedent(f"""
        import sys
        from datetime import datetime, timezone
        from retention.campaigns.dispatch import dispatch_step
        from retention.campaigns.engine import start_run
        from retention.campaigns.policy import Policy
        from retention.campaigns.spec import parse_campaign
        from retention.connections import channels_from_env
        from retention_dev.faults import KillAt
        spec = {CASCADE!r}
        c = parse_campaign(spec, "cascade.yaml")
        policy = Policy(3, 7, 2, 7, __import__("datetime").time(21), __import__("datetime").time(9),
                        "Europe/Kyiv", 0.05)
        run = start_run(c, datetime(2026, 11, 2, 7, tzinfo=timezone.utc), {url!r}, policy)
        dispatch_step(c, run, "email", channels_from_env(["email"]), {url!r},
                      on_point=KillAt(*{kill_at!r}))
    """)
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True).returncode


@pytest.mark.parametrize("kill_at", [("dispatch.after_claim", 2), ("dispatch.after_send", 2)])
def test_worker_killed_mid_wave_then_retried_sends_each_email_once(kill_at, database_url,
                                                                    providers, monkeypatch):
    _shop(database_url, 2600)
    campaign = parse_campaign(CASCADE, "cascade.yaml")
    run = start_run(campaign, AS_OF, database_url, POLICY)
    plan_step(campaign, run, "email", database_url, POLICY)
    env = {k: v for k, v in os.environ.items() if k.startswith(("AIRFLOW_CONN_", "RETENTION_"))}
    assert _dispatch_in_subprocess(database_url, env, kill_at) == 137  # killed mid-wave
    with db.connect(database_url) as conn:
        claimed = conn.execute("select count(*) from ops.messages where claim_token is not null"
                               ).fetchone()[0]
    assert claimed > 0  # the dead worker left a claimed batch behind
    # the retry also releases the messages that waited for New York's morning
    counts = dispatch_step(campaign, run, "email", channels_from_env(["email"]), database_url,
                           release_at=AS_OF + timedelta(days=1))
    rows = _ledger(database_url)
    planned_to_send = [r for r in rows if r[1] == "email" and r[2] in ("sent", "planned", "failed")]
    accepted = accepted_message_ids(providers)
    assert len(planned_to_send) > 1500  # more than one provider request
    assert {r[0] for r in planned_to_send if r[2] == "sent"} == set(accepted)
    assert max(accepted.values()) == 1  # nothing twice
    assert not [r for r in planned_to_send if r[2] != "sent"], "something left unsent"
    assert counts["reconciled"]["released"] + counts["reconciled"]["reconciled_sent"] == claimed


def test_429_and_5xx_storm_ends_with_every_message_once(database_url, providers, monkeypatch):
    _shop(database_url, 60)
    from retention.channels import retry as retry_module

    monkeypatch.setattr(retry_module.RetryPolicy, "sleep", staticmethod(lambda s: None), raising=False)
    providers.providers["sendgrid"].configure(sequence=[429, 503, 500, 429, "ok", 503])
    providers.providers["fcm"].configure(sequence=[503] * 30)
    campaign = parse_campaign(CASCADE, "cascade.yaml")
    channels = channels_from_env(["email", "mobile_push", "telegram"])
    for ch in channels.values():
        ch.retry.sleep = lambda s: None
    run_campaign(campaign, AS_OF, channels, policy=POLICY)
    rows = _ledger(database_url)
    accepted = accepted_message_ids(providers)
    sent = {r[0] for r in rows if r[2] == "sent" and r[1] != "telegram"}
    assert sent == set(accepted) and max(accepted.values()) == 1
    assert not [r for r in rows if r[2] == "failed"]
    statuses = Counter(r.status for r in providers.providers["sendgrid"].received)
    assert statuses[429] >= 2 and statuses[503] >= 1  # the storm really happened

