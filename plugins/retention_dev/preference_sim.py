"""A simulated engagement history with a planted favourite hour and channel per customer:
the ground truth that the send-time and best-channel marts (marts.customer_send_time,
marts.customer_channel_engagement) should recover, and a simulated response to a step
planned with `send_time: optimal` or `channel: best`.

Separate from the shop generator (retention_dev.generate), whose output stays as it is:
this writes its own customers straight into a database at the head of the migrations.

Each customer gets a time zone, an RFM segment (a hand-made marts.customer_lifetime with
only customer_id and rfm_segment, when the database has none), a favourite hour of the
week (local time) and a favourite channel, and an activity level in [0.1, 1] (thin to rich
histories). Over `weeks` weeks before `as_of` every channel sends one message a week at a
fixed UTC time. A message is engaged with (opened, half of those also clicked) with
probability activity x 0.6 on the favourite channel and activity x 0.15 elsewhere; the open
falls at the next start of the favourite hour after the send (plus 0-59 minutes) with
probability `hour_loyalty`, else at a uniform time in the 72 hours after the send. A third
of the customers read mail through a privacy proxy: every e-mail they get has a machine
open a minute after the send (flagged `sg_machine_open`, as SendGrid flags it), which the
marts must ignore. Site sessions: Poisson(activity x 8), each at the favourite hour with
probability `hour_loyalty`, else at a uniform time. Everything is a function of `seed`.

The engagement with one message is `engagement`; retention_dev.planted_truth applies it to
the customers a generated shop planted (generate_shop(plant_preferences=True)), with draws
that are a function of the message id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Protocol
from zoneinfo import ZoneInfo

import numpy as np

from retention import db

ZONES = ("Europe/Kyiv", "America/New_York", "Asia/Tokyo", "Europe/London", "UTC")
SEGMENTS = ("champions", "loyal", "at_risk", "hibernating")
CHANNELS = ("email", "mobile_push", "telegram")
#: each channel's weekly send: (weekday, hour) in UTC, Monday = 0
SEND_SLOTS = {"email": (1, 8), "mobile_push": (2, 12), "telegram": (3, 15)}


@dataclass(frozen=True)
class Planted:
    customer_id: str
    timezone: str
    segment: str
    hour_of_week: int  # local, Monday 00:00 = 0
    channel: str
    activity: float
    proxy_reader: bool


def next_local_hour(after: datetime, hour_of_week: int, tz: str) -> datetime:
    """The next start of `hour_of_week` (local in `tz`) at or after `after` (UTC)."""
    local = after.astimezone(ZoneInfo(tz))
    start = local.replace(minute=0, second=0, microsecond=0)
    current = start.weekday() * 24 + start.hour
    wall = start.replace(tzinfo=None) + timedelta(hours=(hour_of_week - current) % 168)
    at = wall.replace(tzinfo=ZoneInfo(tz)).astimezone(timezone.utc)
    return at if at >= after else at + timedelta(days=7)


def plant(url: str, as_of: datetime, *, customers: int = 400, weeks: int = 12,
          seed: int = 7, hour_loyalty: float = 0.7) -> dict[str, Planted]:
    """Write the customers, subscriptions, ledger, provider events and site sessions of the
    module docstring into the database at `url`; returns the planted truth by customer."""
    rng = np.random.default_rng(seed)
    truth: dict[str, Planted] = {}
    for i in range(customers):
        cid = f"s{i:05d}"
        # favourite hours: mostly weekday mornings and evenings, some anywhere
        if rng.random() < 0.8:
            day = int(rng.integers(0, 7))
            hour = int(rng.choice([8, 9, 12, 13, 18, 19, 20, 21]))
            how = day * 24 + hour
        else:
            how = int(rng.integers(0, 168))
        truth[cid] = Planted(cid, str(rng.choice(ZONES)), str(rng.choice(SEGMENTS)), how,
                             str(rng.choice(CHANNELS)), float(rng.uniform(0.1, 1.0)),
                             bool(rng.random() < 1 / 3))
    messages, events, sessions = [], [], []
    start = as_of - timedelta(weeks=weeks)
    for p in truth.values():
        for channel in CHANNELS:
            weekday, hour = SEND_SLOTS[channel]
            first = (start + timedelta(days=(weekday - start.weekday()) % 7)).replace(
                hour=hour, minute=0, second=0, microsecond=0)
            for w in range(weeks):
                sent = first + timedelta(weeks=w)
                if sent > as_of - timedelta(days=3):
                    break
                mid = f"sim_{p.customer_id}_{channel}_{w}"
                messages.append((mid, channel, p.customer_id, sent))
                events += engagement(p, channel, mid, sent, as_of, hour_loyalty, rng)
        for k in range(int(rng.poisson(p.activity * 8))):
            if rng.random() < hour_loyalty:
                week = int(rng.integers(1, weeks + 1))
                at = next_local_hour(as_of - timedelta(weeks=week), p.hour_of_week, p.timezone)
                at += timedelta(minutes=int(rng.integers(0, 50)))
            else:
                at = as_of - timedelta(seconds=float(rng.uniform(3600, weeks * 7 * 86400)))
            if at <= as_of:
                sessions.append((f"ev_{p.customer_id}_{k}", at, p.customer_id,
                                 f"ses_{p.customer_id}_{k}"))
    with db.connect(url) as conn:
        with conn.cursor() as cur:
            cur.executemany("insert into raw.customers (customer_id, email, timezone, created_at) "
                            "values (%s, %s, %s, %s)",
                            [(p.customer_id, f"{p.customer_id}@example.com", p.timezone,
                              start - timedelta(days=30)) for p in truth.values()])
            cur.executemany("insert into raw.channel_subscriptions (customer_id, channel, address, "
                            "subscribed_at) values (%s, %s, %s, %s)",
                            [(p.customer_id, ch, f"{ch}:{p.customer_id}", start - timedelta(days=30))
                             for p in truth.values() for ch in CHANNELS])
            cur.executemany("insert into ops.messages (message_id, campaign_id, run_id, step, "
                            "channel, customer_id, variant, status, planned_at, sent_at, cap_class) "
                            "values (%s, 'sim_history', 'sim_history@' || %s, %s, %s, %s, 'A', "
                            "'sent', %s, %s, 'promo')",
                            [(mid, ch, ch, ch, cid, sent, sent) for mid, ch, cid, sent in messages])
            cur.executemany("insert into ops.message_events (provider, provider_event_id, "
                            "message_id, event_type, occurred_at, payload, received_at) "
                            "values ('sim', %s, %s, %s, %s, %s, %s)",
                            [(f"{mid}:{kind}:{i}", mid, kind, at,
                              json.dumps({"sg_machine_open": True} if machine else {}), at)
                             for i, (mid, kind, at, machine) in enumerate(events)])
            cur.executemany("insert into raw.events (event_id, occurred_at, event_type, "
                            "customer_id, session_id) values (%s, %s, 'view', %s, %s)", sessions)
        if conn.execute("select to_regclass('marts.customer_lifetime') is null").fetchone()[0]:
            conn.execute("create table marts.customer_lifetime "
                         "(customer_id text primary key, rfm_segment text)")
        with conn.cursor() as cur:
            cur.executemany("insert into marts.customer_lifetime (customer_id, rfm_segment) "
                            "values (%s, %s)", [(p.customer_id, p.segment) for p in truth.values()])
        conn.commit()
        # statistics now, as autovacuum would give them later: without them the planner
        # takes the freshly filled tables for empty and nests loops over them
        for table in ("raw.customers", "raw.channel_subscriptions", "raw.events",
                      "ops.messages", "ops.message_events", "marts.customer_lifetime"):
            conn.execute(f"analyze {table}")
        conn.commit()
    return truth


class Draws(Protocol):
    """What `engagement` draws from: a numpy Generator, or anything with these three."""

    def random(self) -> float: ...
    def integers(self, low: int, high: int) -> int: ...
    def uniform(self, low: float, high: float) -> float: ...


def engagement(p, channel: str, mid: str, sent: datetime, as_of: datetime,
               hour_loyalty: float, draws: Draws) -> list[tuple[str, str, datetime, bool]]:
    """The events (message id, open or click, time, machine open) of customer `p` (with
    hour_of_week, timezone, channel, activity, proxy_reader) for message `mid` sent on
    `channel` at `sent`, up to `as_of`: the model of the module docstring."""
    events = []
    if channel == "email" and p.proxy_reader:
        events.append((mid, "open", sent + timedelta(minutes=1), True))
    rate = p.activity * (0.6 if channel == p.channel else 0.15)
    if draws.random() >= rate:
        return events
    if draws.random() < hour_loyalty:
        at = next_local_hour(sent, p.hour_of_week, p.timezone) + timedelta(
            minutes=int(draws.integers(0, 60)))
    else:
        at = sent + timedelta(seconds=float(draws.uniform(60, 72 * 3600)))
    if at > as_of:
        return events
    events.append((mid, "open", at, False))
    if draws.random() < 0.5:
        events.append((mid, "click", at + timedelta(minutes=2), False))
    return events


@dataclass(frozen=True)
class Recovery:
    customers: int
    recovered: int

    @property
    def rate(self) -> float:
        return self.recovered / self.customers if self.customers else float("nan")


def recovery(url: str, truth: dict[str, Planted], min_signals: int = 8) -> dict[str, Recovery]:
    """How often the marts found the planted favourite: `hour_of_week` among the customers
    whose `any` row has at least `min_signals` signals, `hour_of_week_thin` among the
    others, `channel` among the customers with a best channel."""
    with db.connect(url) as conn:
        hours = conn.execute("select customer_id, preferred_hour_of_week, signals "
                             "from marts.customer_send_time where channel = 'any'").fetchall()
        best = dict(conn.execute("select customer_id, channel from marts.customer_channel_engagement "
                                 "where is_best").fetchall())
    rich = [(c, h) for c, h, n in hours if c in truth and n >= min_signals]
    thin = [(c, h) for c, h, n in hours if c in truth and n < min_signals]
    return {
        "hour_of_week": Recovery(len(rich), sum(truth[c].hour_of_week == h for c, h in rich)),
        "hour_of_week_thin": Recovery(len(thin), sum(truth[c].hour_of_week == h for c, h in thin)),
        "channel": Recovery(len(best), sum(truth[c].channel == ch for c, ch in best.items()
                                           if c in truth)),
    }


def respond(url: str, run_id: str, step: str, truth: dict[str, Planted], *,
            seed: int = 11, base: float = 0.15, boost: float = 0.25) -> int:
    """Send and answer a planned step's messages as the planted customers would: each
    planned message is `sent` at its release time (not_before), and opened with probability
    `base`, plus `boost` when it went out on the customer's favourite channel or in their
    favourite hour (both: twice). Returns the opens written."""
    rng = np.random.default_rng(seed)
    with db.connect(url) as conn:
        rows = conn.execute("select message_id, customer_id, channel, coalesce(not_before, "
                            "planned_at) from ops.messages where run_id = %s and step = %s "
                            "and status = 'planned' order by message_id",
                            (run_id, step)).fetchall()
        opens = []
        for mid, cid, channel, at in rows:
            p = truth[cid]
            local = at.astimezone(ZoneInfo(p.timezone))
            rate = base + boost * (channel == p.channel) \
                + boost * (local.weekday() * 24 + local.hour == p.hour_of_week)
            if rng.random() < rate:
                opens.append(("sim", f"{mid}:open", mid, "open", at + timedelta(minutes=5),
                              at + timedelta(minutes=5)))
        conn.execute("update ops.messages set status = 'sent', sent_at = coalesce(not_before, "
                     "planned_at) where run_id = %s and step = %s and status = 'planned'",
                     (run_id, step))
        with conn.cursor() as cur:
            cur.executemany("insert into ops.message_events (provider, provider_event_id, "
                            "message_id, event_type, occurred_at, received_at) "
                            "values (%s, %s, %s, %s, %s, %s)", opens)
        conn.commit()
    return len(opens)
