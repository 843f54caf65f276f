"""Sending with several worker processes, exactly once, against the local provider servers.

The workers are real "spawn" processes that build their channels from the connections
(the AIRFLOW_CONN_* variables of the local stack), so the SDKs, the ledger and the
servers are the same as in production; a worker killed at a point of the send loop
(`retention_dev.faults.KillAt`, pickled into the workers) leaves its claimed
batch behind and the retry settles it without a duplicate.
"""

from __future__ import annotations

import textwrap
from datetime import datetime, time, timezone

import pytest

from retention import db
from retention.campaigns.dispatch import WorkerProcessError, dispatch_step
from retention.campaigns.engine import plan_step, start_run
from retention.campaigns.policy import Policy
from retention.campaigns.spec import parse_campaign
from retention.connections import channels_from_env
from retention_dev.faults import KillAt
from retention_dev.samples import insert_subscribed_customers
from retention_dev.stack import accepted_message_ids, local_provider_stack

# one after another on one pytest-xdist worker: worker processes racing for claims
# under short leases
pytestmark = pytest.mark.xdist_group("serial")

AS_OF = datetime(2026, 11, 2, 10, 0, tzinfo=timezone.utc)  # noon in Kyiv: no quiet hours
POLICY = Policy(global_cap=100, global_cap_days=7, channel_cap=100, channel_cap_days=7,
                quiet_start=time(21), quiet_end=time(9), default_timezone="Europe/Kyiv",
                global_holdout=0.0)


def _campaign(channel: str):
    return parse_campaign(textwrap.dedent(f"""\
        id: wave_{channel}
        kind: promo
        audience: {{include_any: [{{all_customers: true}}]}}
        steps:
          - {{name: wave, channel: {channel}, template: weekly_promo}}
        holdout: 0
        """), f"wave_{channel}.yaml")


def _shop(url: str, n: int) -> None:
    """n customers in Kyiv, each with an e-mail address and a push token (set-wise)."""
    with db.connect(url) as conn:
        insert_subscribed_customers(conn, n)
        conn.commit()


@pytest.fixture()
def providers(monkeypatch, request):
    """The local stack; its connections in the environment, which spawned workers inherit."""
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    latency = getattr(request, "param", 0)
    with local_provider_stack(latency_ms=latency) as (handle, env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield handle


def _statuses(url: str, campaign_id: str) -> dict[str, str]:
    with db.connect(url) as conn:
        return dict(conn.execute("select message_id, status from ops.messages "
                                 "where campaign_id = %s", (campaign_id,)).fetchall())


def _plan(url: str, channel: str):
    campaign = _campaign(channel)
    run = start_run(campaign, AS_OF, url, POLICY)
    plan_step(campaign, run, "wave", url, POLICY)
    return campaign, run


@pytest.mark.parametrize("providers", [300], indirect=True)  # ms a request: both get work
def test_two_processes_send_3000_emails_each_exactly_once(database_url, providers):
    _shop(database_url, 3000)
    campaign, run = _plan(database_url, "email")
    batches: list[tuple[str, int]] = []
    counts = dispatch_step(campaign, run, "wave", channels_from_env(["email"]), database_url,
                           processes=2, on_batch=lambda name, n: batches.append((name, n)))
    statuses = _statuses(database_url, campaign.id)
    accepted = accepted_message_ids(providers)
    assert len(statuses) == 3000 and set(statuses.values()) == {"sent"}
    assert set(accepted) == set(statuses) and max(accepted.values()) == 1
    assert counts["sent"] == 3000 and counts["reconciled"] == {
        "reconciled_sent": 0, "released": 0, "unknown": 0}
    by_process = counts["timings"]["messages_by_process"]
    assert len(by_process) == 2 and min(by_process) > 0, by_process  # both sent a share
    # the workers' batches reach the parent's on_batch, and their timings add up
    assert sum(n for _, n in batches) == 3000 and {name for name, _ in batches} == {"email"}
    assert counts["timings"]["messages"] == 3000 and counts["timings"]["batches"] == len(batches)
    # a second pass finds nothing to send
    requests_before = len(providers.received)
    again = dispatch_step(campaign, run, "wave", channels_from_env(["email"]), database_url,
                          processes=2)
    assert again["sent"] == 3000 and len(providers.received) == requests_before


@pytest.mark.parametrize("providers", [300], indirect=True)
def test_two_processes_send_pushes_each_exactly_once(database_url, providers):
    _shop(database_url, 1200)
    campaign, run = _plan(database_url, "mobile_push")
    counts = dispatch_step(campaign, run, "wave", channels_from_env(["mobile_push"]),
                           database_url, processes=2, workers=2)
    by_process = counts["timings"]["messages_by_process"]
    assert len(by_process) == 2 and min(by_process) > 0, by_process
    statuses = _statuses(database_url, campaign.id)
    accepted = accepted_message_ids(providers)
    assert len(statuses) == 1200 and set(statuses.values()) == {"sent"}
    assert set(accepted) == set(statuses) and max(accepted.values()) == 1


@pytest.mark.parametrize("providers", [300], indirect=True)  # ms a request: both workers get work
@pytest.mark.parametrize("point", ["dispatch.after_claim", "dispatch.after_send"])
def test_one_worker_process_killed_then_retried_sends_each_email_once(
        point, database_url, providers):
    _shop(database_url, 6000)
    campaign, run = _plan(database_url, "email")
    with pytest.raises(WorkerProcessError, match="worker 1: exited with code 137"):
        dispatch_step(campaign, run, "wave", channels_from_env(["email"]), database_url,
                      processes=2, on_point=KillAt(point, 1, process=1))  # only worker 1 dies
    with db.connect(database_url) as conn:
        claimed, sent = conn.execute(
            "select count(*) filter (where claim_token is not null), "
            "count(*) filter (where status = 'sent') from ops.messages").fetchone()
    assert claimed == 1000  # the dead worker's batch; its sibling sent the rest
    assert sent == 5000
    accepted_before = accepted_message_ids(providers)
    assert len(accepted_before) == (6000 if point == "dispatch.after_send" else 5000)

    counts = dispatch_step(campaign, run, "wave", channels_from_env(["email"]), database_url,
                           processes=2)
    statuses = _statuses(database_url, campaign.id)
    accepted = accepted_message_ids(providers)
    assert set(statuses.values()) == {"sent"} and len(statuses) == 6000
    assert set(accepted) == set(statuses) and max(accepted.values()) == 1  # nothing twice
    reconciled = counts["reconciled"]
    if point == "dispatch.after_send":  # the provider had taken it: recorded, not resent
        assert reconciled == {"reconciled_sent": 1000, "released": 0, "unknown": 0}
    else:  # never sent: released and sent by the retry
        assert reconciled == {"reconciled_sent": 0, "released": 1000, "unknown": 0}


def test_several_processes_need_each_channels_connection(database_url, providers, monkeypatch):
    _shop(database_url, 10)
    campaign, run = _plan(database_url, "email")
    channels = channels_from_env(["email"])
    monkeypatch.delenv("AIRFLOW_CONN_RETENTION_SENDGRID")
    with pytest.raises(RuntimeError, match="AIRFLOW_CONN_RETENTION_SENDGRID"):
        dispatch_step(campaign, run, "wave", channels, database_url, processes=2)
    assert not providers.received


def test_a_worker_leaves_a_live_siblings_claim_alone(database_url, providers):
    """Workers run with reconcile=False: rows another worker has claimed (and may be
    sending right now) are neither released, resent nor failed."""
    from retention.campaigns.dispatch import dispatch

    _shop(database_url, 1500)
    campaign, run = _plan(database_url, "email")
    with db.connect(database_url) as conn:
        sibling = [r[0] for r in conn.execute(
            "update ops.messages set claim_token = 'live-sibling', claimed_at = now() "
            "where message_id in (select message_id from ops.messages order by message_id "
            "limit 400) returning message_id").fetchall()]
        conn.commit()
    scope = {"campaign_id": campaign.id, "step": "wave", "run_id": run.run_id}
    result = dispatch(campaign, "wave", channels_from_env(["email"]), scope, AS_OF,
                      url=database_url, reconcile=False)
    statuses = _statuses(database_url, campaign.id)
    accepted = accepted_message_ids(providers)
    assert result["reconciled"] == {"reconciled_sent": 0, "released": 0, "unknown": 0}
    assert {statuses[m] for m in sibling} == {"planned"}
    assert set(accepted) == set(statuses) - set(sibling) and max(accepted.values()) == 1
    with db.connect(database_url) as conn:
        assert conn.execute("select count(*) from ops.messages where claim_token = 'live-sibling'"
                            ).fetchone()[0] == 400


PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY",
                   "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def test_push_channel_applies_the_environments_proxy_resolved_when_built(monkeypatch):
    """FirebaseChannel looks the proxy variables up once (not on every push, which cost
    a fifth of its CPU): a channel built under a proxy keeps using it, one built with the
    host in NO_PROXY goes direct, whatever the environment says later."""
    import socket

    from retention.channels import FirebaseChannel, OutboundMessage, RetryPolicy
    from retention_dev.servers import fake_service_account, start

    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    url, handle = start("fcm", project_id="proxy-test")
    channels = []
    try:
        info, public_pem = fake_service_account(f"{url}/token", "proxy-test")
        handle.configure(public_keys=[public_pem])
        with socket.socket() as s:  # a proxy that refuses every connection
            s.bind(("127.0.0.1", 0))
            dead_proxy = f"http://127.0.0.1:{s.getsockname()[1]}"
        monkeypatch.setenv("http_proxy", dead_proxy)
        via_proxy = FirebaseChannel(info, base_url=url, retry=RetryPolicy(max_attempts=1))
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        direct = FirebaseChannel(info, base_url=url, retry=RetryPolicy(max_attempts=1))
        channels += [via_proxy, direct]
        for name in PROXY_VARIABLES:  # the token endpoint is reached directly from now on
            monkeypatch.delenv(name, raising=False)
        push = OutboundMessage("p1", "c1", "mobile_push", "token-1", "Hi", "Body", None, {}, None)
        [refused] = via_proxy.send_batch([push])
        [sent] = direct.send_batch([push])
        assert (refused.status, refused.reason) == ("failed", "retries exhausted: connection error")
        assert sent.status == "sent"
        sends = [r for r in handle.received if r.path.endswith("/messages:send")]
        assert len(sends) == 1  # only the direct one reached the server
    finally:
        for channel in channels:
            channel.close()
        handle.stop()


@pytest.mark.unit
def test_worker_processes_share_a_providers_rate_limit():
    """Telegram's 30 messages/s (or a gateway's max_per_second) hold for the wave: with
    4 worker processes each builds its channel with a quarter of it."""
    import json

    from retention.campaigns.dispatch import _connections_for
    from retention.connections import build_channel

    gateway = {"url": "http://127.0.0.1:9/gateway/sms", "payload_template": {"to": "{address}"},
               "max_per_second": 50}
    conns = _connections_for(
        ["telegram", "sms", "email"],
        {"telegram": {"password": "123:abc"}, "sms": {"extra": json.dumps(gateway)},
         "email": {"password": "SG.x", "extra": {"from_email": "shop@example.com"}}},
        processes=4)
    assert conns["telegram"]["extra"]["max_per_second"] == 7.5  # the default 30, shared
    assert conns["sms"]["extra"]["max_per_second"] == 12.5
    assert "max_per_second" not in conns["email"]["extra"]
    assert build_channel("telegram", conns["telegram"]).limiter.rate == 7.5
    assert build_channel("sms", conns["sms"]).limiter.rate == 12.5
