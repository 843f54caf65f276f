"""Exactly once under concurrency, timeouts and kills, judged at the provider stand-ins.

Each scenario runs the real dispatcher (in processes of its own where the fault is a
process's: a second dispatcher, a SIGKILL) against the local SendGrid and FCM servers,
which count every recipient they accepted. Each ends with every eligible recipient
accepted exactly once and the ledger agreeing with the provider (`faults.tally`); where
the outcome of a push cannot be known, the row is `unknown` and the push was still
accepted once, never twice.
"""

from __future__ import annotations

import os
import signal
from datetime import datetime, timedelta, timezone

import pytest

from faults import (AS_OF, PROVIDER_OF, dispatcher_process, make_shop, plan, result_of, tally,
                    wait_for)
from retention import db
from retention.campaigns.dispatch import dispatch_step
from retention.connections import channels_from_env
from retention_dev.stack import local_provider_stack

# one after another on one pytest-xdist worker: faults timed against provider latency
pytestmark = pytest.mark.xdist_group("serial")


@pytest.fixture()
def stack(monkeypatch, request):
    """The local providers with the options a test asks for (indirect parameter), their
    connections in the environment (which dispatcher processes inherit)."""
    options = dict(getattr(request, "param", {}))
    client_timeout = options.pop("client_timeout", None)
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    with local_provider_stack(client_timeout=client_timeout, **options) as (handle, env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield handle, env


def _total_accepted(handle, channel: str) -> int:
    return sum(handle.providers[PROVIDER_OF[channel]].accepted_recipients().values())


# --------------------------------------------------------------------------- 1

@pytest.mark.parametrize("stack", [{"latency_ms": 400}], indirect=True)
@pytest.mark.parametrize("channel, n", [("email", 3000), ("mobile_push", 2000)])
def test_two_dispatchers_on_one_step_each_send_disjoint_rows(database_url, stack, channel, n):
    handle, env = stack
    make_shop(database_url, n)
    campaign, _ = plan(database_url, channel)
    first = dispatcher_process(database_url, env, channel)
    second = dispatcher_process(database_url, env, channel)
    a, b = result_of(first), result_of(second)
    # both did work, and neither settled the other's live claims
    assert a["messages"] > 0 and b["messages"] > 0, (a, b)
    assert a["messages"] + b["messages"] == n
    for r in (a, b):
        assert r["reconciled"] == {"reconciled_sent": 0, "released": 0, "unknown": 0}
    t = tally(handle, database_url, campaign.id, channel)
    assert t["recipients"] == n and t["accepted_once"] == n
    assert t["accepted_twice"] == 0 and t["lost"] == 0 and t["ledger_disagrees"] == 0
    assert t["statuses"] == {"sent": n}


@pytest.mark.parametrize("stack", [{"latency_ms": 1500}], indirect=True)
def test_a_second_run_started_while_a_request_is_in_flight_leaves_it_alone(database_url,
                                                                          stack):
    """The original report: a slow provider, a second `campaign run` of the same run while
    the first one's only request is on the wire. The second finds the claim live, waits
    for it, and sends nothing."""
    handle, env = stack
    make_shop(database_url, 600)
    campaign, _ = plan(database_url, "email")
    first = dispatcher_process(database_url, env, "email")
    with db.connect(database_url, autocommit=True) as conn:
        wait_for(lambda: first.poll() is not None or conn.execute(
            "select count(*) from ops.claims where sending_at is not null").fetchone()[0] == 1,
            "the first dispatcher's request to go out")
    assert first.poll() is None, first.communicate()
    second = dispatcher_process(database_url, env, "email")
    a, b = result_of(first), result_of(second)
    assert a["messages"] == 600 and b["messages"] == 0
    assert b["reconciled"] == {"reconciled_sent": 0, "released": 0, "unknown": 0}
    t = tally(handle, database_url, campaign.id, "email")
    assert t["accepted_once"] == 600 and t["accepted_twice"] == 0 and t["lost"] == 0


# --------------------------------------------------------------------------- 3

@pytest.mark.parametrize("stack", [{"sequence": ["ok", "accept_timeout"], "hang_seconds": 60,
                                    "activity_lag_seconds": 1.0}], indirect=True)
@pytest.mark.parametrize("channel, n, batch", [("email", 2500, 1000),
                                              ("mobile_push", 1500, 500)])
def test_dispatcher_killed_mid_wave_then_run_again(database_url, stack, channel, n, batch):
    """The provider takes the second request and the dispatcher is SIGKILLed while it
    waits for the answer. Run again: e-mail is looked up (addresses compared
    lower-cased: every 7th is stored with capitals) and recorded sent; the push of the
    killed request is `unknown` and not resent; the rest is sent once."""
    handle, env = stack
    make_shop(database_url, n)
    campaign, _ = plan(database_url, channel)
    provider = handle.providers[PROVIDER_OF[channel]]
    if channel == "mobile_push":  # FCM: one HTTP request per push; hold the 2nd batch
        provider.configure(sequence=["ok"] * batch + ["accept_timeout"] * batch)
    victim = dispatcher_process(database_url, env, channel)
    wait_for(lambda: _total_accepted(handle, channel) >= 2 * batch,
              "the provider to take the second batch")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    with db.connect(database_url) as conn:
        claimed = conn.execute("select count(*) from ops.messages where claim_token is not null "
                               "and status = 'planned'").fetchone()[0]
    assert claimed == batch  # the dead dispatcher's claim, its request taken by the provider
    provider.configure(sequence=[])
    again = result_of(dispatcher_process(database_url, env, channel))
    t = tally(handle, database_url, campaign.id, channel)
    assert t["recipients"] == n and t["accepted_once"] == n and t["accepted_twice"] == 0
    assert t["lost"] == 0 and t["ledger_disagrees"] == 0
    if channel == "email":
        assert again["reconciled"]["reconciled_sent"] == batch
        assert t["statuses"] == {"sent": n}
    else:
        assert again["reconciled"]["unknown"] == batch
        assert t["statuses"] == {"sent": n - batch, "unknown": batch}
    # a third run changes nothing
    before = _total_accepted(handle, channel)
    result_of(dispatcher_process(database_url, env, channel))
    assert _total_accepted(handle, channel) == before


# --------------------------------------------------------------------------- 3b

# the provider's intake is 4 s behind; the client would wait 8 s for an answer; the killed
# dispatcher's claim expires after 1 s and the activity log lags 1 s (1.5 s for the client)
@pytest.mark.parametrize("stack", [{"activity_lag_seconds": 1.0, "client_timeout": 8.0}],
                         indirect=True)
def test_a_killed_dispatchers_request_taken_late_is_not_sent_again(database_url, stack,
                                                                   monkeypatch):
    """The dispatcher is SIGKILLed while the provider holds its second request, received in
    full but not yet processed (an intake that is behind). A second dispatcher started at
    once settles the dead claim: it must not ask the activity log before the dead client
    would itself have given up on the request (its sending time plus the client's
    timeout), else it finds nothing, resends, and the held request is delivered too."""
    handle, env = stack
    n, batch = 2000, 1000  # the held request is the last: the second dispatcher has
    env = {**env, "RETENTION_CLAIM_LEASE_SECONDS": "1"}  # nothing else to do meanwhile
    make_shop(database_url, n)
    campaign, _ = plan(database_url, "email")
    provider = handle.providers["sendgrid"]
    victim = dispatcher_process(database_url, env, "email")
    wait_for(lambda: _total_accepted(handle, "email") >= batch,
             "the provider to take the first batch")
    provider.configure(accept_delay_seconds=4.0)
    wait_for(lambda: provider.waiting_to_process == 1, "the second request to be held")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert _total_accepted(handle, "email") == batch  # the second one is not processed yet
    again = result_of(dispatcher_process(database_url, env, "email"))
    wait_for(lambda: provider.waiting_to_process == 0, "the held requests to be processed")
    t = tally(handle, database_url, campaign.id, "email")
    assert t["recipients"] == n and t["accepted_once"] == n and t["accepted_twice"] == 0, t
    assert t["lost"] == 0 and t["ledger_disagrees"] == 0
    assert again["reconciled"]["reconciled_sent"] == batch, again
    assert t["statuses"] == {"sent": n}


# --------------------------------------------------------------------------- 3c

@pytest.mark.parametrize("stack", [{"sequence": ["ok", "accept_timeout"], "hang_seconds": 60,
                                    "activity_lag_seconds": 0.5, "client_timeout": 2.0}],
                         indirect=True)
def test_rows_of_one_claim_due_apart_are_each_looked_up_before_release(database_url, stack):
    """The rows of a dead dispatcher's claim come due for their lookup at different
    moments (the clock moves while a large statement writes them; a loaded machine
    stretches it). The lookup of the rows due first finds the whole request accepted;
    the rows due later must wait for their own lookup, not be released and sent again.
    The provider took the killed dispatcher's second request and never answered it."""
    from retention.campaigns.dispatch import settle

    handle, env = stack
    n, batch = 2000, 1000
    env = {**env, "RETENTION_CLAIM_LEASE_SECONDS": "1"}
    make_shop(database_url, n)
    campaign, _ = plan(database_url, "email")
    victim = dispatcher_process(database_url, env, "email")
    wait_for(lambda: _total_accepted(handle, "email") >= 2 * batch,
             "the provider to take the second batch")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    scope = {"campaign_id": campaign.id, "step": "wave", "run_id": None}
    channels = channels_from_env(["email"])
    # the dead claim becomes `unknown` once its lease is over, due for a lookup
    wait_for(lambda: settle(scope, channels)["unknown"] == 0 and _unknown(database_url) == batch,
             "the dead claim to be settled as unknown")
    with db.connect(database_url) as conn:
        later = conn.execute("""
            update ops.messages set settle_after = settle_after + interval '3 seconds'
            where message_id in (select message_id from ops.messages where status = 'unknown'
                                 order by message_id limit 400)""").rowcount
        conn.commit()
    assert later == 400
    provider = handle.providers["sendgrid"]
    provider.configure(sequence=[])
    again = result_of(dispatcher_process(database_url, env, "email", settle_wait=30))
    t = tally(handle, database_url, campaign.id, "email")
    assert t["recipients"] == n and t["accepted_once"] == n and t["accepted_twice"] == 0, t
    assert t["lost"] == 0 and t["ledger_disagrees"] == 0
    assert t["statuses"] == {"sent": n}
    assert again["reconciled"]["reconciled_sent"] == batch, again
    assert again["reconciled"]["released"] == 0, again


def _unknown(url: str) -> int:
    with db.connect(url) as conn:
        return conn.execute("select count(*) from ops.messages where status = 'unknown'"
                            ).fetchone()[0]


# --------------------------------------------------------------------------- 4

# the client's timeout leaves room for a loaded machine's ordinary answers (a timeout on an
# answered request would be one more `unknown`); the held requests outlast it by far
@pytest.mark.parametrize("stack", [{"sequence": ["ok", "accept_timeout"], "hang_seconds": 8,
                                    "late_answer": True, "activity_lag_seconds": 1.0,
                                    "client_timeout": 4.0}], indirect=True)
@pytest.mark.parametrize("channel, n, batch", [("email", 2500, 1000),
                                              ("mobile_push", 1500, 500)])
def test_provider_answers_after_the_client_timeout(database_url, stack, channel, n, batch):
    """The provider takes a request and answers only after the client gave up. E-mail:
    the rows are `unknown`, then the activity log settles them to sent (no resend).
    Push: they stay `unknown` and are not resent, by this run or the next."""
    handle, env = stack
    make_shop(database_url, n)
    campaign, run = plan(database_url, channel)
    provider = handle.providers[PROVIDER_OF[channel]]
    if channel == "mobile_push":
        provider.configure(sequence=["ok"] * batch + ["accept_timeout"] * batch)
    counts = dispatch_step(campaign, run, "wave", channels_from_env([channel]), database_url)
    if channel == "email":
        assert counts["reconciled"]["reconciled_sent"] == batch and counts["unknown"] == 0
    else:
        assert counts["unknown"] == batch
    again = dispatch_step(campaign, run, "wave", channels_from_env([channel]), database_url)
    assert again["timings"]["messages"] == 0
    t = tally(handle, database_url, campaign.id, channel)
    assert t["recipients"] == n and t["accepted_once"] == n and t["accepted_twice"] == 0
    assert t["lost"] == 0 and t["ledger_disagrees"] == 0
    assert t["statuses"] == ({"sent": n} if channel == "email"
                             else {"sent": n - batch, "unknown": batch})
    if channel == "mobile_push":  # the marketer sees them in the weekly report
        from retention.results.report import collect, week_start_of

        data = collect(week_start_of(AS_OF.date()), database_url)
        assert data.unknown_in_week == batch
        assert any(note.startswith(f"{batch:,} messages went out without an answer")
                   for note in data.notes)


# --------------------------------------------------------------------------- 7

NIGHT = datetime(2026, 11, 2, 20, 0, tzinfo=timezone.utc)  # 22:00 in Kyiv: quiet hours
MORNING = datetime(2026, 11, 3, 7, 0, tzinfo=timezone.utc)  # 09:00 in Kyiv


def test_consent_and_exit_are_checked_again_when_a_held_message_is_released(database_url,
                                                                           stack):
    handle, _ = stack
    make_shop(database_url, 200)
    campaign, run = plan(database_url, "email", as_of=NIGHT)
    with db.connect(database_url) as conn:
        held = conn.execute("select count(*) from ops.messages where status = 'planned' "
                            "and not_before = %s", (MORNING,)).fetchone()[0]
        assert held == 200  # everyone waits for the morning
        before_release = NIGHT + timedelta(hours=4)
        # an unsubscribe through the webhook path's table, with the provider's lower case
        conn.execute("insert into ops.consent_changes values ('email', 'olena.k000007@example.com', "
                     "%s, 'sendgrid', 'unsubscribe')", (before_release,))
        conn.execute("insert into ops.consent_changes values ('email', 'c000001@example.com', "
                     "%s, 'sendgrid', 'hard bounce')", (before_release,))
        conn.execute("insert into ops.deactivated_addresses values ('email', 'c000002@example.com', "
                     "%s, 'provider: invalid')", (before_release,))
        conn.execute("update raw.channel_subscriptions set unsubscribed_at = %s "
                     "where customer_id = 'c000003' and channel = 'email'", (before_release,))
        conn.execute("insert into raw.orders (order_id, customer_id, ordered_at, status, "
                     "total_amount) values ('o1', 'c000004', %s, 'paid', 10)", (before_release,))
        # after the release: no effect on this morning's send
        conn.execute("insert into raw.orders (order_id, customer_id, ordered_at, status, "
                     "total_amount) values ('o2', 'c000005', %s, 'paid', 10)",
                     (MORNING + timedelta(hours=1),))
        conn.commit()
    night = dispatch_step(campaign, run, "wave", channels_from_env(["email"]), database_url,
                          release_at=NIGHT)
    assert night["timings"]["messages"] == 0  # nothing is due at night
    dispatch_step(campaign, run, "wave", channels_from_env(["email"]), database_url,
                  release_at=MORNING)
    accepted = handle.providers["sendgrid"].accepted_recipients()
    for address in ("olena.k000007@example.com", "c000001@example.com", "c000002@example.com",
                    "c000003@example.com", "c000004@example.com"):
        assert accepted[address] == 0, address
    assert accepted["c000005@example.com"] == 1
    with db.connect(database_url) as conn:
        reasons = dict(conn.execute("select customer_id, reason from ops.messages "
                                    "where status = 'suppressed'").fetchall())
    assert reasons == {
        "c000007": "no consent: unsubscribed before release",
        "c000001": "no consent: unsubscribed before release",
        "c000002": "no consent: address deactivated before release",
        "c000003": "no consent: unsubscribed before release",
        "c000004": "exited: purchase before release"}
    t = tally(handle, database_url, campaign.id, "email")
    assert t["recipients"] == 195 and t["accepted_once"] == 195 and t["accepted_twice"] == 0
    assert t["lost"] == 0 and t["ledger_disagrees"] == 0


# --------------------------------------------------------------------------- caps

def test_caps_count_unknown_rows_and_rows_planned_for_later(database_url, stack):
    """A message of unknown outcome may have been delivered, and a message planned for a
    later time will be: both count against the frequency cap."""
    from retention.campaigns.engine import plan_step, start_run
    from retention.campaigns.policy import Policy
    from retention.campaigns.spec import parse_campaign
    from faults import campaign_yaml

    make_shop(database_url, 3)
    policy = Policy(global_cap=1, global_cap_days=7, channel_cap=1, channel_cap_days=7,
                    quiet_start=AS_OF.time(), quiet_end=AS_OF.time(),
                    default_timezone="Europe/Kyiv", global_holdout=0.0)
    first = parse_campaign(campaign_yaml("email", "cap_first"), "a.yaml")
    run = start_run(first, AS_OF + timedelta(days=2), database_url, policy)
    plan_step(first, run, "wave", database_url, policy)  # planned two days later
    with db.connect(database_url) as conn:
        conn.execute("update ops.messages set status = 'unknown' where customer_id = 'c000001'")
        conn.execute("update ops.messages set planned_at = %s, not_before = %s "
                     "where customer_id = 'c000001'", (AS_OF - timedelta(days=1),) * 2)
        conn.commit()
    second = parse_campaign(campaign_yaml("email", "cap_second"), "b.yaml")
    run = start_run(second, AS_OF, database_url, policy)
    plan_step(second, run, "wave", database_url, policy)
    with db.connect(database_url) as conn:
        rows = dict(conn.execute("select customer_id, reason from ops.messages "
                                 "where campaign_id = 'cap_second'").fetchall())
    assert rows == {"c000001": "frequency cap: global", "c000002": "frequency cap: global",
                    "c000003": "frequency cap: global"}
