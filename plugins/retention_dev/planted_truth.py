"""The engagement history of a generated shop whose ground truth the generator planted
(`generate_shop(..., plant_preferences=True)` writes `_truth.csv`: each customer's
favourite hour of the week and channel, activity, proxy reading and churn date).

The generated shop has orders, sessions and channel subscriptions but no messages: after
the shop is loaded, `write_history` sends every customer one message a week on each
channel they are subscribed to at the send (a fixed UTC slot per channel) over `weeks`
weeks before `as_of`, and writes their opens and clicks with the model of
retention_dev.preference_sim (`engagement`: opened with probability activity x 0.6 on the
favourite channel, x 0.15 elsewhere; the open in the favourite hour with probability
`hour_loyalty`; half of the opens clicked; a proxy reader's e-mails machine-opened a
minute after the send). Its draws are a function of the message id (`DigestDraws`), so
the history of a customer does not depend on who else is in the shop. The customers keep
engaging after they stop buying: the planted churn is about orders only.

Nothing here is used outside tests and benchmarks.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from retention import db
from retention_dev.generate import TRUTH_COLUMNS, TRUTH_FILE
from retention_dev.preference_sim import SEND_SLOTS as SIM_SLOTS, engagement

#: each channel's weekly send: (weekday, hour) in UTC, Monday = 0 (preference_sim's for
#: its three channels)
SEND_SLOTS = {**SIM_SLOTS, "web_push": (4, 10), "sms": (0, 11), "viber": (5, 13)}
CAMPAIGN = "planted_history"


@dataclass(frozen=True)
class Truth:
    """One customer's row of `_truth.csv` (the attribute names of preference_sim.Planted,
    so its `engagement`, `recovery` and `respond` take these too)."""

    customer_id: str
    timezone: str
    hour_of_week: int  # local, Monday 00:00 = 0
    channel: str | None  # None: subscribed to nothing at the shop's end
    activity: float
    proxy_reader: bool
    orders: int
    churned_at: datetime | None  # the order after which they stopped; None: never did


def read_truth(folder: str | Path) -> dict[str, Truth]:
    """The ground truth a shop generated into `folder` with plant_preferences planted."""
    path = Path(folder) / TRUTH_FILE
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != TRUTH_COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {TRUTH_COLUMNS}")
        return {r["customer_id"]: Truth(
            r["customer_id"], r["timezone"], int(r["favourite_hour_of_week"]),
            r["favourite_channel"] or None, float(r["activity"]), r["proxy_reader"] == "true",
            int(r["orders"]),
            datetime.fromisoformat(r["churned_at"]) if r["churned_at"] else None)
            for r in reader}


class DigestDraws:
    """Uniform draws that are a function of `key` alone: the n-th is a digest of
    (key, n). Has the numpy Generator methods preference_sim.engagement uses."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.n = 0

    def random(self) -> float:
        digest = hashlib.sha256(f"{self.key}|{self.n}".encode()).digest()
        self.n += 1
        return int.from_bytes(digest[:8], "big") / 2**64

    def integers(self, low: int, high: int) -> int:
        return low + int(self.random() * (high - low))

    def uniform(self, low: float, high: float) -> float:
        return low + self.random() * (high - low)


def _weekly(channel: str, start: datetime, weeks: int) -> list[datetime]:
    weekday, hour = SEND_SLOTS[channel]
    first = (start + timedelta(days=(weekday - start.weekday()) % 7)).replace(
        hour=hour, minute=0, second=0, microsecond=0)
    return [first + timedelta(weeks=w) for w in range(weeks)]


def write_history(url: str, truth: dict[str, Truth], as_of: datetime, *, weeks: int = 12,
                  hour_loyalty: float = 0.7) -> dict[str, int]:
    """Write the sent messages (ops.messages, campaign `planted_history`) and their opens
    and clicks (ops.message_events, provider `sim`) of the module docstring into the
    database at `url`, which holds the shop's raw.channel_subscriptions. A message goes
    out while a subscription row of its customer and channel is live (subscribed at or
    before the send, not unsubscribed by then), up to 3 days before `as_of`. Returns the
    messages and events written."""
    as_of = as_of.astimezone(timezone.utc)
    start = as_of - timedelta(weeks=weeks)
    with db.connect(url) as conn:
        subscriptions = conn.execute(
            "select customer_id, channel, subscribed_at, unsubscribed_at "
            "from raw.channel_subscriptions where customer_id = any(%s) "
            "order by customer_id, channel, subscribed_at", (list(truth),)).fetchall()
    live: dict[tuple[str, str], list[tuple[datetime | None, datetime | None]]] = {}
    for cid, channel, subscribed, unsubscribed in subscriptions:
        if channel in SEND_SLOTS:
            live.setdefault((cid, channel), []).append((subscribed, unsubscribed))
    slots = {channel: [s for s in _weekly(channel, start, weeks)
                       if s <= as_of - timedelta(days=3)] for channel in SEND_SLOTS}
    messages, events = [], []
    for (cid, channel), spans in live.items():
        p = truth[cid]
        for w, sent in enumerate(slots[channel]):
            if not any((s is None or s <= sent) and (u is None or u > sent) for s, u in spans):
                continue
            mid = f"hist_{cid}_{channel}_{w}"
            messages.append((mid, CAMPAIGN, f"{CAMPAIGN}@{channel}", channel, channel, cid,
                             "A", "sent", sent, sent, "promo"))
            events += engagement(p, channel, mid, sent, as_of, hour_loyalty, DigestDraws(mid))
    with db.connect(url) as conn:
        with conn.cursor() as cur:
            with cur.copy("copy ops.messages (message_id, campaign_id, run_id, step, channel, "
                          "customer_id, variant, status, planned_at, sent_at, cap_class) "
                          "from stdin") as copy:
                for row in messages:
                    copy.write_row(row)
            with cur.copy("copy ops.message_events (provider, provider_event_id, message_id, "
                          "event_type, occurred_at, payload, received_at) from stdin") as copy:
                for mid, kind, at, machine in events:
                    copy.write_row(("sim", f"{mid}:{kind}" + (":machine" if machine else ""), mid,
                                    kind, at,
                                    json.dumps({"sg_machine_open": True} if machine else {}),
                                    at))
        conn.commit()
        # statistics now, as autovacuum would give them later (see preference_sim.plant)
        for table in ("ops.messages", "ops.message_events"):
            conn.execute(f"analyze {table}")
        conn.commit()
    return {"messages": len(messages), "events": len(events)}
