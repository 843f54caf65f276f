"""Shared pieces of the fault-injection tests: a shop, a one-step campaign, a dispatcher
in its own process, and the tally of what the provider stand-ins accepted per recipient
against what the ledger says.

The judge is the provider: `tally` counts at the local servers how often each eligible
recipient was accepted (`accepted_recipients()`), never the ledger alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time as clock
from collections import Counter
from datetime import datetime, time, timezone
from pathlib import Path

from retention import db
from retention.campaigns.engine import plan_step, start_run
from retention.campaigns.policy import Policy
from retention.campaigns.spec import parse_campaign

ROOT = Path(__file__).resolve().parents[1]
AS_OF = datetime(2026, 11, 2, 10, 0, tzinfo=timezone.utc)  # noon in Kyiv: no quiet hours
POLICY = Policy(global_cap=100, global_cap_days=7, channel_cap=100, channel_cap_days=7,
                quiet_start=time(21), quiet_end=time(9), default_timezone="Europe/Kyiv",
                global_holdout=0.0)
#: which local provider takes each channel, and how its recipients are named there
PROVIDER_OF = {"email": "sendgrid", "mobile_push": "fcm", "telegram": "telegram",
               "sms": "gateway"}


def wait_for(condition, what: str, seconds: float = 60.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `seconds`."""
    deadline = clock.monotonic() + seconds
    while not condition():
        if clock.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        clock.sleep(0.02)


def campaign_yaml(channel: str, campaign_id: str | None = None) -> str:
    return textwrap.dedent(f"""\
        id: {campaign_id or 'fault_' + channel}
        kind: promo
        audience: {{include_any: [{{all_customers: true}}]}}
        steps:
          - {{name: wave, channel: {channel}, template: weekly_promo}}
        holdout: 0
        """)


def make_shop(url: str, n: int, *, timezone_name: str = "Europe/Kyiv") -> None:
    """n customers, each with an e-mail address (every 7th with capitals, as shops store
    them), a push token and a Telegram chat."""
    with db.connect(url) as conn:
        conn.execute("""insert into raw.customers (customer_id, timezone)
                        select 'c' || lpad(i::text, 6, '0'), %s
                        from generate_series(1, %s) i""", (timezone_name, n))
        conn.execute("""
            insert into raw.channel_subscriptions (customer_id, channel, address, subscribed_at)
            select 'c' || lpad(i::text, 6, '0'), ch,
                   case ch
                     when 'email' then case when i %% 7 = 0
                                            then 'Olena.K' || lpad(i::text, 6, '0') || '@Example.com'
                                            else 'c' || lpad(i::text, 6, '0') || '@example.com' end
                     when 'mobile_push' then 'token-' || lpad(i::text, 6, '0')
                     else (100000 + i)::text end,
                   '2025-01-01Z'
            from generate_series(1, %s) i, unnest(array['email', 'mobile_push', 'telegram']) ch""",
                     (n,))
        conn.commit()


def plan(url: str, channel: str, *, as_of: datetime = AS_OF, campaign_id: str | None = None):
    campaign = parse_campaign(campaign_yaml(channel, campaign_id), "fault.yaml")
    run = start_run(campaign, as_of, url, POLICY)
    plan_step(campaign, run, "wave", url, POLICY)
    return campaign, run


def dispatcher_process(url: str, env: dict[str, str], channel: str, *,
                       as_of: datetime = AS_OF, campaign_id: str | None = None,
                       release_at: datetime | None = None, threads: int = 1,
                       settle_wait: float | None = None) -> subprocess.Popen:
    """`dispatch_step` of the one-step campaign in a process of its own (as a second CLI
    run or an Airflow task would be); it prints its result as JSON on its last line."""
    code = textwrap.dedent(f"""
        import json, sys
        from datetime import datetime
        from retention.campaigns.dispatch import dispatch_step
        from retention.campaigns.engine import start_run
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from faults import POLICY, campaign_yaml
        from retention.campaigns.spec import parse_campaign
        from retention.connections import channels_from_env
        campaign = parse_campaign(campaign_yaml({channel!r}, {campaign_id!r}), "fault.yaml")
        run = start_run(campaign, datetime.fromisoformat({as_of.isoformat()!r}), {url!r}, POLICY)
        release = {release_at.isoformat() if release_at else None!r}
        result = dispatch_step(campaign, run, "wave", channels_from_env([{channel!r}]), {url!r},
                               workers={threads},
                               release_at=datetime.fromisoformat(release) if release else None,
                               settle_wait={settle_wait!r})
        print(json.dumps({{"messages": result["timings"]["messages"],
                          "batches": result["timings"]["batches"],
                          "sent": result["sent"], "unknown": result["unknown"],
                          "reconciled": result["reconciled"]}}), flush=True)
    """)
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT / "plugins")}
    return subprocess.Popen([sys.executable, "-c", code], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def result_of(process: subprocess.Popen, timeout: float = 300) -> dict:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"dispatcher failed ({process.returncode}): {err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def eligible(url: str, campaign_id: str) -> dict[str, tuple[str, str]]:
    """message_id -> (recipient as the provider names it, ledger status), for every
    message the campaign decided to send (planned, sent, failed or unknown)."""
    with db.connect(url) as conn:
        rows = conn.execute("""
            select message_id, channel, address, status from ops.messages
            where campaign_id = %s and status in ('planned', 'sent', 'failed', 'unknown')""",
                            (campaign_id,)).fetchall()
    return {mid: ((address or "").lower() if channel == "email" else address, status)
            for mid, channel, address, status in rows}


def tally(handle, url: str, campaign_id: str, channel: str) -> dict:
    """Per scenario: recipients, accepted once, accepted twice (or more), unknown in the
    ledger, lost (eligible, never accepted, and not failed for a reason the provider
    gave); and whether the ledger agrees with the provider (sent <=> accepted)."""
    accepted: Counter = handle.providers[PROVIDER_OF[channel]].accepted_recipients()
    rows = eligible(url, campaign_id)
    recipients = Counter(r for r, _ in rows.values())
    out = {"recipients": len(rows),
           "accepted_once": sum(1 for r in recipients if accepted[r] == 1),
           "accepted_twice": sum(1 for r in recipients if accepted[r] > 1),
           "unknown": sum(1 for _, s in rows.values() if s == "unknown"),
           "lost": sum(1 for r, s in rows.values() if accepted[r] == 0 and s != "failed"),
           "ledger_disagrees": sum(1 for r, s in rows.values()
                                   if (s == "sent") != (accepted[r] > 0) and s != "unknown"),
           "statuses": dict(Counter(s for _, s in rows.values()))}
    print(f"\nTALLY {campaign_id}: " + json.dumps(out))
    return out
