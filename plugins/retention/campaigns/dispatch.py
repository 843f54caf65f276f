"""Sending planned ledger rows exactly once.

Each pass repeats: claim up to one provider request's worth of `planned` rows, render
them, mark them as going out, send them with the channel, record each outcome. Several
dispatchers may run the loop on one step at once (a second CLI run, an Airflow retry
whose first attempt is still alive, the trigger and re-engagement runs overlapping,
sharded send tasks): each claims disjoint rows (`SKIP LOCKED`) and never touches another
live dispatcher's claims.

Claims and leases. A claim is a batch of rows carrying its claim_token and one row of
`ops.claims` (owner, lease, sending_at), written in one transaction. A dispatcher
(`ClaimOwner`, one per sending pass of a process, shared by its threads) has a random key
that it holds as a PostgreSQL session advisory lock for as long as it lives, and a
heartbeat that renews the lease of its claims. A claim is someone else's to settle only
when its lease expired AND its owner's key is free (the owner's database session is
gone: the process died or lost the database). A paused or slow owner keeps its session and so
its claims; a killed one frees its key at once, and its lease runs out within
RETENTION_CLAIM_LEASE_SECONDS. Outcomes are recorded only where the row's claim_token
and status = 'planned' still match, so a settled claim is never overwritten.

The claim itself re-checks consent, deactivated addresses and the purchase exit as of
the release time, so a message held by quiet hours is not sent to someone who
unsubscribed, bounced or bought meanwhile (`suppressed`, with the reason).

Before the provider call the claim gets `sending_at` in the same statement that checks it
still holds (one row a batch, not one a message), so a claim whose owner died before that
point is known never to have gone out and is simply released. After it:

* `sent`, `failed`: recorded;
* `unknown` (the request went out and no answer came): never resent blindly. Where the
  channel can ask its provider (`lookup_accepted(claim_token)`: SendGrid's e-mail
  activity by the claim's custom argument, addresses compared lower-cased) the rows are
  looked up once the provider can no longer take the request (its sending time plus the
  channel's `timeout`) and its activity log is sure to show it (then the channel's
  `activity_lag_seconds`: `settle_after`): accepted rows become `sent`, the rest are
  released and sent. Elsewhere (FCM, Telegram, gateways) they stay `unknown`, count against the
  caps and are shown by the CLI, the DAG log and the report;
* `deferred` (the provider asked for a longer pause than the retry policy allows): back
  to `planned`, left for a later pass.

A claim of a dead owner that had gone out becomes `unknown` the same way; its lookup
comes no sooner than the activity log's lag after the moment its client would have given
up on the request (`sending_at` plus the channel's `timeout`), since until then the
provider may still take it (an intake that is behind, bytes still in flight).

A dispatcher that has nothing left to claim waits, up to
RETENTION_DISPATCH_SETTLE_WAIT_SECONDS, for claims it cannot settle yet (another live
dispatcher's batch, a lookup not yet due), settling and sending what they release.

`sent_at` is the logical send time: the step's time, or the end of the customer's quiet
hours, never the wall clock, so attribution windows are reproducible.

Several processes (`processes=N`): one provider client is CPU-bound long before the
provider is (FCM pushes cost about 1 ms of client CPU each), so a wave can be sent by N
worker processes ("spawn"), each its own `ClaimOwner`. The parent settles; the workers
get picklable arguments only (the campaign, the scope, the connections as dicts), build
their own channels with `build_channel` and run the claim/send/record loop. A provider
rate limit in a connection (`max_per_second`) is shared out among the workers. Workers
die with the parent (Linux `PR_SET_PDEATHSIG`).

Claims take any `planned` rows of the scope (no order): ordering by message_id made every
claim sort all the step's planned rows. Outcomes are recorded with one UPDATE per batch
from arrays instead of one per message.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from retention import db
from retention.campaigns.engine import RunInfo, step_counts, step_time
from retention.campaigns.render import context_for, link_keys, render
from retention.campaigns.spec import Campaign
from retention.channels.base import Channel, OutboundMessage, SendResult
from retention.config import settings

log = logging.getLogger(__name__)

UNKNOWN_OUTCOME = ("outcome unknown: the sending worker died after the request went out; "
                   "not resent to avoid a duplicate")
NOTHING_RECONCILED = {"reconciled_sent": 0, "released": 0, "unknown": 0}
#: the points of the send loop at which `on_point` is called: a batch claimed (not yet
#: marked as going out), marked as going out (request not yet made), the provider answered
#: (outcomes not yet recorded)
POINTS = ("dispatch.after_claim", "dispatch.before_send", "dispatch.after_send")

#: `on_point(point, process)`: called at each of `POINTS` by the thread that reached it;
#: `process` is the index (0 .. processes - 1) of the worker process that reached it, None
#: in the dispatching process itself. Fault tests pass one that kills the process there
#: (retention_dev.faults.KillAt).
OnPoint = Callable[[str, int | None], None]


def lease_seconds() -> float:
    """RETENTION_CLAIM_LEASE_SECONDS (at least 1)."""
    return max(1.0, settings().claim_lease_seconds)


def settle_wait_seconds() -> float:
    return settings().dispatch_settle_wait_seconds


class ClaimLost(RuntimeError):
    """A dispatcher's claim no longer holds (its lease could not be renewed): it stops
    without sending that batch."""


class ClaimOwner:
    """One dispatcher's identity on its claims: a random key held as a session advisory
    lock on a connection of its own for as long as it lives, and a heartbeat thread that
    renews the lease of its claimed rows every quarter lease."""

    def __init__(self, url: str | None, lease: float | None = None) -> None:
        self.key = secrets.randbits(62) + 1
        self.lease = lease if lease is not None else lease_seconds()
        self._url = url
        self._conn = psycopg.connect(db.libpq_dsn(url), autocommit=True)
        self._conn.execute("select pg_advisory_lock(%s)", (self.key,))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(0.1, self.lease / 4)):
            try:
                with self._lock:
                    self._conn.execute(
                        "update ops.claims set lease_until = clock_timestamp() "
                        "+ make_interval(secs => %s) where claim_owner = %s",
                        (self.lease, self.key))
            except psycopg.Error as exc:  # the claims' leases run out; their batches stop
                log.warning("claim heartbeat failed (%s); claims of this dispatcher will "
                            "expire", type(exc).__name__)
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            try:
                self._conn.close()  # ends the session: the key is free
            except psycopg.Error:
                pass

    def __enter__(self) -> ClaimOwner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class Recommendations:
    """Top products per category, to fill templates (the recommendations model replaces
    popularity where it exists)."""

    by_category: dict[str, list[dict]]
    fallback: list[dict]

    def for_category(self, category: str | None, n: int = 3) -> list[dict]:
        if category:
            parts = category.split(".")
            for depth in range(len(parts), 0, -1):
                found = self.by_category.get(".".join(parts[:depth]))
                if found:
                    return found[:n]
        return self.fallback[:n]


def load_recommendations(conn, as_of: datetime, base_url: str = "https://shop.example/p/") -> Recommendations:
    rows = conn.execute("""
        with sold as (
          select oi.product_id, sum(oi.quantity) as units
          from raw.order_items oi join raw.orders o on o.order_id = oi.order_id
          where o.status in ('paid', 'delivered') and o.ordered_at <= %(as_of)s
            and o.ordered_at > %(as_of)s - interval '90 days'
          group by 1
        ), ranked as (
          select p.product_id, coalesce(p.name, p.product_id) as name, p.price, p.category_path,
                 row_number() over (partition by p.category_path
                                    order by s.units desc, p.product_id) as rank
          from sold s join raw.products p on p.product_id = s.product_id
          where coalesce(p.in_stock, true) and p.category_path is not null
        )
        select product_id, name, price, category_path from ranked where rank <= 3
        order by category_path, rank
    """, {"as_of": as_of}).fetchall()
    by_category: dict[str, list[dict]] = {}
    everything = []
    for product_id, name, price, category in rows:
        item = {"id": product_id, "name": name, "price": f"{price:.2f}" if price is not None else "",
                "url": f"{base_url}{product_id}"}
        everything.append(item)
        parts = category.split(".")
        for depth in range(1, len(parts) + 1):
            bucket = by_category.setdefault(".".join(parts[:depth]), [])
            if len(bucket) < 3:
                bucket.append(item)
    return Recommendations(by_category, everything[:3])



SCOPE = ("campaign_id = %(campaign_id)s and step = %(step)s "
         "and (%(run_id)s::text is null or run_id = %(run_id)s)")


def _claim_sql(offline_purchases: bool) -> str:
    offline = """
              or exists (select 1 from marts.ropo_purchases rp
                         where rp.customer_id = m.customer_id
                           and rp.purchased_at > m.planned_at
                           and rp.purchased_at <= %(release_at)s)""" if offline_purchases else ""
    return f"""
        with picked as (
          select message_id from ops.messages
          where {SCOPE} and channel = %(channel)s
            and status = 'planned' and claim_token is null and not_before <= %(release_at)s
          limit %(limit)s
          for update skip locked
        ), checked as materialized (  -- computed once per row, not once per SET column
          select m.message_id,
            case
              when exists (select 1 from ops.consent_changes cc
                           where cc.channel = m.channel and lower(cc.address) = lower(m.address)
                             and cc.unsubscribed_at <= %(release_at)s)
                   -- a scalar lookup by the key: an EXISTS here is planned as a hash of
                   -- every subscription, scanned at each claim
                   or (select s.unsubscribed_at from raw.channel_subscriptions s
                       where s.customer_id = m.customer_id and s.channel = m.channel
                         and s.address = m.address) <= %(release_at)s
                then 'no consent: unsubscribed before release'
              when exists (select 1 from ops.deactivated_addresses d
                           where d.channel = m.channel and lower(d.address) = lower(m.address))
                then 'no consent: address deactivated before release'
              when %(exit_on_purchase)s and (
                     exists (select 1 from raw.orders o
                             where o.customer_id = m.customer_id
                               and o.status in ('paid', 'delivered')
                               and o.ordered_at > m.planned_at
                               and o.ordered_at <= %(release_at)s){offline})
                then 'exited: purchase before release'
            end as reason
          from ops.messages m
          where m.message_id in (select message_id from picked)
        ), claim as (
          insert into ops.claims (claim_token, claim_owner, lease_until, claimed_at)
          select %(token)s, %(owner)s::bigint,
                 clock_timestamp() + make_interval(secs => %(lease)s), clock_timestamp()
          where exists (select 1 from checked where reason is null)
        )
        update ops.messages m set
          status = case when c.reason is null then 'planned' else 'suppressed' end,
          reason = c.reason,
          claim_token = case when c.reason is null then %(token)s end,
          claimed_at = case when c.reason is null then clock_timestamp() end,
          settle_after = null,
          attempts = m.attempts + case when c.reason is null then 1 else 0 end
        from checked c
        where m.message_id = c.message_id
        returning m.message_id, m.customer_id, m.address, m.variant, m.not_before, m.run_id,
                  m.planned_at, c.reason
    """


def _claim(conn, scope: dict, release_at: datetime, limit: int, channel: str, token: str,
           owner: ClaimOwner, *, exit_on_purchase: bool = True,
           offline_purchases: bool = False) -> tuple[list[tuple], int]:
    """Claim up to `limit` due rows; those that lost consent or whose customer bought
    since they were planned are suppressed in the same statement. Returns (claimed rows,
    number suppressed)."""
    rows = conn.execute(_claim_sql(offline_purchases), dict(
        scope, token=token, release_at=release_at, limit=limit, channel=channel,
        owner=owner.key, lease=owner.lease, exit_on_purchase=exit_on_purchase)).fetchall()
    claimed = [r[:7] for r in rows if r[7] is None]
    return claimed, len(rows) - len(claimed)


def _mark_sending(conn, token: str, owner: ClaimOwner) -> None:
    """Check the claim still holds, renew its lease and mark it as going out, in one
    committed statement; `ClaimLost` if it is no longer ours (a settler deletes a claim
    in the transaction that releases its rows)."""
    cur = conn.execute(
        "update ops.claims set sending_at = clock_timestamp(), "
        "lease_until = clock_timestamp() + make_interval(secs => %s) "
        "where claim_token = %s and claim_owner = %s",
        (owner.lease, token, owner.key))
    conn.commit()
    if cur.rowcount != 1:
        raise ClaimLost(f"claim {token} is no longer held by this dispatcher; the batch "
                        "was not sent")


_CLEAR_CLAIM = "claim_token = null, settle_after = null"


def _lookup_lag(channel: Channel | None) -> float | None:
    """Seconds after which the channel's provider can tell whether it accepted a request
    (`lookup_accepted`), or None when it cannot be asked."""
    if not callable(getattr(channel, "lookup_accepted", None)):
        return None
    return float(getattr(channel, "activity_lag_seconds", 0.0))


def _client_timeout(channel: Channel | None) -> float:
    """Seconds the channel's client waits for a provider's answer (0 when it has no
    such setting)."""
    return float(getattr(channel, "timeout", None) or 0.0)


def _record(conn, results: Sequence[SendResult], sent_at_by_id: dict[str, datetime],
            channel: Channel, token: str) -> int:
    """One UPDATE per outcome kind (arrays unnested, not one statement per message), the
    dead addresses, one commit. Only rows still claimed by `token` and `planned` change.
    Returns how many outcomes found their row no longer claimed (0 normally)."""
    by_kind: dict[str, list[SendResult]] = {"sent": [], "failed": [], "unknown": [],
                                            "deferred": []}
    for r in results:
        by_kind[r.status].append(r)
    lag = _lookup_lag(channel)
    guard = "m.message_id = v.message_id and m.claim_token = %(token)s and m.status = 'planned'"
    written = 0
    with conn.cursor() as cur:
        if by_kind["sent"]:
            sent = by_kind["sent"]
            cur.execute(
                f"update ops.messages m set status = 'sent', provider_message_id = v.provider_id, "
                f"sent_at = v.sent_at, reason = null, {_CLEAR_CLAIM} "
                "from unnest(%(ids)s::text[], %(pids)s::text[], %(at)s::timestamptz[]) "
                f"as v(message_id, provider_id, sent_at) where {guard}",
                {"ids": [r.message_id for r in sent], "pids": [r.provider_message_id for r in sent],
                 "at": [sent_at_by_id[r.message_id] for r in sent], "token": token})
            written += cur.rowcount
        if by_kind["failed"]:
            failed = by_kind["failed"]
            cur.execute(
                f"update ops.messages m set status = 'failed', reason = v.reason, {_CLEAR_CLAIM} "
                "from unnest(%(ids)s::text[], %(reasons)s::text[]) as v(message_id, reason) "
                f"where {guard}",
                {"ids": [r.message_id for r in failed],
                 "reasons": [r.reason or "failed" for r in failed], "token": token})
            written += cur.rowcount
        if by_kind["unknown"]:
            unknown = by_kind["unknown"]
            # the claim_token stays: it is what the provider's activity log is asked for,
            # once the request can no longer be taken (a lost connection comes before the
            # client's timeout: the provider may still be reading it) and the log shows it
            cur.execute(
                "update ops.messages m set status = 'unknown', reason = v.reason, "
                "settle_after = case when %(lag)s::float8 is null then null "
                "  else greatest(statement_timestamp(), coalesce((select c.sending_at "
                "    from ops.claims c where c.claim_token = %(token)s), statement_timestamp()) "
                "    + make_interval(secs => %(timeout)s::float8)) "
                "  + make_interval(secs => %(lag)s::float8) end "
                "from unnest(%(ids)s::text[], %(reasons)s::text[]) as v(message_id, reason) "
                f"where {guard}",
                {"ids": [r.message_id for r in unknown],
                 "reasons": [r.reason or "outcome unknown" for r in unknown], "token": token,
                 "lag": lag, "timeout": _client_timeout(channel)})
            written += cur.rowcount
        if by_kind["deferred"]:
            cur.execute(
                f"update ops.messages m set {_CLEAR_CLAIM} "
                f"from unnest(%(ids)s::text[]) as v(message_id) where {guard}",
                {"ids": [r.message_id for r in by_kind["deferred"]], "token": token})
            written += cur.rowcount
        dead = [r.message_id for r in results if r.deactivate_address]
        if dead:
            cur.execute("""
                insert into ops.deactivated_addresses (channel, address, deactivated_at, reason)
                select channel, address, sent_at_or_planned, 'provider: unregistered'
                from (select channel, address, coalesce(not_before, planned_at) as sent_at_or_planned
                      from ops.messages where message_id = any(%s) and address is not null) d
                on conflict do nothing""", (dead,))
        cur.execute("delete from ops.claims where claim_token = %s", (token,))
    conn.commit()
    lost = len(results) - written
    if lost:
        log.error("claim %s: %d outcomes were not recorded because the claim was settled "
                  "by another dispatcher meanwhile", token, lost)
    return lost


def _owner_gone(conn, key: int | None) -> bool:
    """True when no live session holds the owner's key (the key is then held by this
    session until `_free`)."""
    if key is None:  # a claim made before leases existed
        return True
    return bool(conn.execute("select pg_try_advisory_lock(%s)", (key,)).fetchone()[0])


def settle(scope: dict, channels: Mapping[str, Channel], url: str | None = None) -> dict[str, int]:
    """Settle what can be settled now in a scope:

    * claims whose lease expired and whose owner's session is gone: rows that never went
      out are released; rows that did become `unknown` (to be looked up where the channel
      can ask its provider);
    * `unknown` rows whose lookup is due: accepted addresses become `sent`, the rest are
      released to be sent.

    Live claims (another dispatcher at work) are left alone."""
    scope = {"run_id": None, **scope}
    out = {"reconciled_sent": 0, "released": 0, "unknown": 0}
    with db.connect(url, autocommit=True) as conn:
        expired = conn.execute(f"""
            select c.claim_token, c.claim_owner from ops.claims c
            where c.lease_until < clock_timestamp()
              and exists (select 1 from ops.messages
                          where claim_token = c.claim_token and {SCOPE} and status = 'planned')
            union all  -- rows whose claim row is missing: settled as if it had gone out
            select distinct m.claim_token, null::bigint from ops.messages m
            where {SCOPE} and m.status = 'planned' and m.claim_token is not null
              and not exists (select 1 from ops.claims c where c.claim_token = m.claim_token)
            """, scope).fetchall()
        by_owner: dict[int | None, list[str]] = {}
        for token, key in expired:
            by_owner.setdefault(key, []).append(token)
        for key, tokens in by_owner.items():
            if not _owner_gone(conn, key):
                continue
            try:
                for token in tokens:
                    _add(out, _settle_orphan(conn, token, key, channels))
            finally:
                if key is not None:
                    conn.execute("select pg_advisory_unlock(%s)", (key,))
        groups = conn.execute(f"""
            select claim_token, channel, array_agg(message_id), array_agg(address)
            from ops.messages
            where {SCOPE} and status = 'unknown' and claim_token is not null
              and settle_after <= clock_timestamp()
            group by 1, 2""", scope).fetchall()
        for token, channel_name, ids, addresses in groups:
            lookup = getattr(channels.get(channel_name), "lookup_accepted", None)
            if not callable(lookup):
                continue
            try:
                accepted = lookup(token)
            except Exception as exc:  # noqa: BLE001 - stays unknown; asked again next pass
                log.warning("provider lookup for claim %s failed (%s); its %d messages stay "
                            "unknown", token, type(exc).__name__, len(ids))
                continue
            sent = [(mid, accepted[(a or "").lower()]) for mid, a in zip(ids, addresses)
                    if (a or "").lower() in accepted]
            with conn.transaction():
                if sent:
                    out["reconciled_sent"] += conn.execute(f"""
                        update ops.messages m set status = 'sent', reason = null,
                          provider_message_id = v.pid,
                          sent_at = greatest(m.not_before, m.planned_at), {_CLEAR_CLAIM}
                        from unnest(%(ids)s::text[], %(pids)s::text[]) as v(message_id, pid)
                        where m.message_id = v.message_id and m.claim_token = %(token)s
                          and m.status = 'unknown'""",
                        {"ids": [s[0] for s in sent], "pids": [s[1] for s in sent],
                         "token": token}).rowcount
                # only the rows this lookup was for: rows of the claim that came due
                # later (or became unknown since) wait for a lookup of their own
                out["released"] += conn.execute(f"""
                    update ops.messages set status = 'planned', reason = null,
                      {_CLEAR_CLAIM}
                    where claim_token = %s and status = 'unknown'
                      and message_id = any(%s)""", (token, list(ids))).rowcount
    return out


def _settle_orphan(conn, token: str, key: int | None,
                   channels: Mapping[str, Channel]) -> dict[str, int]:
    """One claim of a gone owner, in one transaction: delete the claim (re-checking its
    lease), then release its rows if its request never went out, else make them
    `unknown` (due for a lookup where the channel can ask its provider)."""
    out = {"released": 0, "unknown": 0}
    with conn.transaction():
        sending_at = None  # (no claim row: the rows' claimed_at stands in for it)
        if key is None:
            went_out = True
        else:
            row = conn.execute("delete from ops.claims where claim_token = %s "
                               "and lease_until < clock_timestamp() returning sending_at",
                               (token,)).fetchone()
            if row is None:  # renewed or settled meanwhile
                return out
            went_out, sending_at = row[0] is not None, row[0]
        if not went_out:
            out["released"] += conn.execute(
                f"update ops.messages set {_CLEAR_CLAIM} "
                "where claim_token = %s and status = 'planned'", (token,)).rowcount
            return out
        for (channel_name,) in conn.execute(
                "select distinct channel from ops.messages "
                "where claim_token = %s and status = 'planned'", (token,)).fetchall():
            channel = channels.get(channel_name)
            lag = _lookup_lag(channel)
            # the provider may still take the dead owner's request until its client would
            # have given up on it (sent + the client's timeout): the lookup comes after
            # that, and after the activity log's lag
            made_unknown = conn.execute("""
                update ops.messages set status = 'unknown', reason = %(reason)s,
                  settle_after = case when %(lag)s::float8 is null then null
                    else greatest(statement_timestamp(),
                                  coalesce(%(sending_at)s::timestamptz, claimed_at)
                                  + make_interval(secs => %(timeout)s::float8))
                         + make_interval(secs => %(lag)s::float8) end
                where claim_token = %(token)s and status = 'planned'
                  and channel = %(channel)s""",
                dict(token=token, channel=channel_name, lag=lag, sending_at=sending_at,
                     timeout=_client_timeout(channel), reason=UNKNOWN_OUTCOME)).rowcount
            if lag is None:  # else a lookup settles them later
                out["unknown"] += made_unknown
    return out


def _unsettled(conn, scope: dict, release_at: datetime) -> dict:
    row = conn.execute(f"""
        select count(*) filter (where status = 'planned' and claim_token is null
                                  and not_before <= %(release_at)s),
               count(*) filter (where status = 'planned' and claim_token is not null),
               count(*) filter (where status = 'unknown' and settle_after is not null),
               min(settle_after) filter (where status = 'unknown'),
               clock_timestamp()
        from ops.messages where {SCOPE} and status in ('planned', 'unknown')""",
                       dict(scope, release_at=release_at)).fetchone()
    return {"claimable": row[0], "claimed": row[1], "awaiting_lookup": row[2],
            "next_lookup": row[3], "now": row[4]}


def dispatch_threads() -> int:
    """RETENTION_DISPATCH_THREADS: sending threads per channel (at least 1)."""
    return settings().dispatch_threads


def dispatch_step(campaign: Campaign, run: RunInfo, step_name: str,
                  channels: Mapping[str, Channel], url: str | None = None, *,
                  release_at: datetime | None = None, workers: int = 1, processes: int = 1,
                  connections: Mapping[str, Mapping[str, Any]] | None = None,
                  on_batch: Callable[[str, int], None] | None = None,
                  settle_wait: float | None = None, on_point: OnPoint | None = None) -> dict:
    """Send every planned row of a campaign run's step whose not_before <= release_at
    (default: the step's time). Returns the step's counts and what settling did.

    `processes` > 1 sends with that many worker processes, each with `workers` threads
    per channel; `on_point` is called at the send loop's `POINTS` (see `dispatch`)."""
    step = campaign.step(step_name)
    at = step_time(campaign, run, step)
    release_at = release_at or at
    scope = {"campaign_id": campaign.id, "step": step.name, "run_id": run.run_id}
    result = dispatch(campaign, step_name, channels, scope, release_at, url=url,
                      workers=workers, processes=processes, connections=connections,
                      on_batch=on_batch, settle_wait=settle_wait, on_point=on_point)
    counts = step_counts(run.run_id, step.name, url)
    counts.update(result)
    return counts


def _add(total: dict, part: Mapping[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, list):  # per worker process: added element-wise
            old = total.get(key) or [0] * len(value)
            total[key] = [a + b for a, b in zip(old, value)]
        else:
            total[key] = total.get(key, 0) + value


def dispatch(campaign: Campaign, step_name: str, channels: Mapping[str, Channel], scope: dict,
             release_at: datetime, *, url: str | None = None, workers: int = 1,
             processes: int = 1, connections: Mapping[str, Mapping[str, Any]] | None = None,
             reconcile: bool = True,
             on_batch: Callable[[str, int], None] | None = None,
             extra_context: Callable[[object, list[tuple]], Mapping[str, dict]] | None = None,
             settle_wait: float | None = None, on_point: OnPoint | None = None) -> dict:
    """The send loop for any scope (a campaign run's step, or a chain step across its
    instances): settle, then claim, render, send, record; then wait (up to `settle_wait`
    seconds, default RETENTION_DISPATCH_SETTLE_WAIT_SECONDS) for claims that cannot be
    settled yet, sending what they release.

    `extra_context(conn, claimed_rows)` may return template variables per message id
    (a trigger chain's cart, product, search query); they override the defaults.

    `processes` > 1: that many worker processes send. They get `connections` (channel
    name -> connection dict, as `retention.connections.build_channel` takes; default:
    the `AIRFLOW_CONN_*` variables) and build their own channels; `channels` serve the
    parent's settling only. `extra_context` and `on_point` must then be picklable (a
    module-level function or an instance of a module-level class; each worker gets its
    own copy). `on_batch` is called in the parent. `reconcile=False` sends without
    settling or waiting (one pass).

    `on_point(point, process)` (`OnPoint`), when given, is called at each of `POINTS` as
    the send loop reaches it."""
    step = campaign.step(step_name)
    scope = {"run_id": None, **scope}
    wait_budget = settle_wait_seconds() if settle_wait is None else settle_wait
    deadline = time.monotonic() + wait_budget
    reconciled = dict(NOTHING_RECONCILED)
    timings = _new_timings()
    for _ in range(1000):  # each round sends or waits; bounded against a livelock
        if reconcile:
            _add(reconciled, settle(scope, channels, url))
        with db.connect(url) as conn:
            channel_names = [r[0] for r in conn.execute(
                f"select distinct channel from ops.messages where {SCOPE} and status = 'planned' "
                "and claim_token is null and not_before <= %(release_at)s",
                dict(scope, release_at=release_at)).fetchall()]
        missing = [c for c in channel_names if c not in channels and processes <= 1]
        if missing:
            raise RuntimeError(f"no channel configured for {', '.join(missing)} "
                               f"(campaign {campaign.id}, step {step.name})")
        if channel_names:
            if processes > 1:
                part = _send_in_processes(
                    processes, campaign, step_name, scope, release_at, url=url, workers=workers,
                    connections=_connections_for(channel_names, connections, processes),
                    on_batch=on_batch, extra_context=extra_context, on_point=on_point)
            else:
                part = _send(campaign, step_name, {n: channels[n] for n in channel_names}, scope,
                             release_at, url=url, workers=workers, on_batch=on_batch,
                             extra_context=extra_context, on_point=on_point)
            _add(timings, part)
            if part.get("deferred"):
                break  # the provider asked for a pause: the rest waits for a later pass
        else:
            part = _new_timings()
        if not reconcile:
            break
        with db.connect(url) as conn:
            state = _unsettled(conn, scope, release_at)
        if state["claimable"]:
            if not part["batches"] and not part["suppressed_at_claim"]:
                time.sleep(0.1)  # rows locked by another dispatcher's claim in progress
            continue
        lookups_possible = state["awaiting_lookup"] and any(
            _lookup_lag(c) is not None for c in channels.values())
        if not state["claimed"] and not lookups_possible:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if not state["claimed"] and (state["next_lookup"] is None or (
                state["next_lookup"] - state["now"]).total_seconds() > left):
            break  # the next lookup falls after the wait: the next pass does it
        pause = 0.25 if state["claimed"] else (
            (state["next_lookup"] - state["now"]).total_seconds() + 0.05
            if state["next_lookup"] else 0.25)
        time.sleep(min(max(pause, 0.05), left, 5.0))
    with db.connect(url) as conn:
        waiting, nxt = conn.execute(
            f"select count(*) filter (where not_before > %(release_at)s), min(not_before) "
            f"from ops.messages where {SCOPE} and status = 'planned'",
            dict(scope, release_at=release_at)).fetchone()
        state = _unsettled(conn, scope, release_at)
        unknown = conn.execute(f"select count(*) from ops.messages where {SCOPE} "
                               "and status = 'unknown'", scope).fetchone()[0]
    if state["claimed"] or state["awaiting_lookup"]:
        log.warning("campaign %s step %s: %d rows still claimed by another dispatcher, %d "
                    "unknown outcomes awaiting the provider's activity log; the next pass "
                    "settles them", campaign.id, step.name, state["claimed"],
                    state["awaiting_lookup"])
    if unknown:
        log.warning("campaign %s step %s: %d messages of unknown outcome (the request went "
                    "out, no answer came); they are not resent", campaign.id, step.name,
                    unknown)
    return {"reconciled": reconciled, "waiting": waiting,
            "next_release_at": nxt.isoformat() if nxt else None, "timings": timings,
            "unknown": unknown, "claimed_elsewhere": state["claimed"],
            "awaiting_lookup": state["awaiting_lookup"]}


def _new_timings() -> dict:
    return {"batches": 0, "messages": 0, "claim_s": 0.0, "render_s": 0.0, "send_s": 0.0,
            "record_s": 0.0, "suppressed_at_claim": 0, "deferred": 0, "lost_claims": 0}


def _send(campaign: Campaign, step_name: str, channels: Mapping[str, Channel], scope: dict,
          release_at: datetime, *, url: str | None, workers: int,
          on_batch: Callable[[str, int], None] | None,
          extra_context: Callable[[object, list[tuple]], Mapping[str, dict]] | None,
          on_point: OnPoint | None = None, process: int | None = None) -> dict:
    """`workers` threads per channel, each claiming, rendering, sending and recording
    batches until the scope has no planned row left for it, under one `ClaimOwner`.
    Returns the seconds spent in each phase, summed over the threads. `process`: this
    worker process's index, passed to `on_point`."""
    step = campaign.step(step_name)
    variants = {v.name: v for v in campaign.variants}
    discount = float(campaign.promo.get("discount_percent", 10))
    valid_days = int(campaign.promo.get("valid_days", 7))
    exit_on_purchase = "purchase" in campaign.exit_on
    errors: list[BaseException] = []
    timings = _new_timings()
    timings_lock = threading.Lock()
    deferred = threading.Event()

    with db.connect(url) as conn:
        recs = load_recommendations(conn, release_at)
        has_lifetime, has_ropo = conn.execute(
            "select to_regclass('marts.customer_lifetime') is not null, "
            "to_regclass('marts.ropo_purchases') is not null").fetchone()

    def work(channel_name: str, owner: ClaimOwner) -> None:
        channel = channels[channel_name]
        with db.connect(url) as conn:
            while not deferred.is_set():
                t0 = time.perf_counter()
                token = uuid.uuid4().hex
                rows, suppressed = _claim(conn, scope, release_at, channel.max_batch,
                                          channel_name, token, owner,
                                          exit_on_purchase=exit_on_purchase,
                                          offline_purchases=has_ropo)
                conn.commit()
                if suppressed:
                    with timings_lock:
                        timings["suppressed_at_claim"] += suppressed
                if not rows:
                    if suppressed:
                        continue
                    return
                if on_point is not None:
                    on_point("dispatch.after_claim", process)
                t1 = time.perf_counter()
                categories = dict(conn.execute(
                    "select customer_id, preferred_category from marts.customer_lifetime "
                    "where customer_id = any(%s)", ([r[1] for r in rows],)).fetchall()) \
                    if has_lifetime else {}
                extras = extra_context(conn, rows) if extra_context else {}
                messages, sent_at = [], {}
                keys = link_keys()  # the settings, once for the batch
                for message_id, customer_id, address, variant, not_before, run_id, planned_at in rows:
                    v = variants.get(variant)
                    template = (v.template if v and v.template else step.template)
                    ctx = context_for(
                        campaign_id=campaign.id, campaign_name=campaign.name, run_id=run_id,
                        message_id=message_id, customer_id=customer_id, variant=variant,
                        preferred_category=categories.get(customer_id),
                        products=recs.for_category(categories.get(customer_id)),
                        discount_percent=discount,
                        expires_on=(planned_at + timedelta(days=valid_days)).date(),
                        keys=keys)
                    ctx.update(extras.get(message_id, {}))
                    rendered = render(channel_name, template, ctx)
                    subject = (v.subject if v and v.subject and channel_name == "email"
                               else rendered.subject)
                    messages.append(OutboundMessage(
                        message_id=message_id, customer_id=customer_id, channel=channel_name,
                        address=address, subject=subject, body_text=rendered.body_text,
                        body_html=rendered.body_html,
                        data={"message_id": message_id, "claim": token,
                              "campaign_id": campaign.id, "step": step.name},
                        unsubscribe_url=ctx["unsubscribe_url"]))
                    sent_at[message_id] = max(not_before or planned_at, planned_at)
                _mark_sending(conn, token, owner)
                if on_point is not None:
                    on_point("dispatch.before_send", process)
                t2 = time.perf_counter()
                results = channel.send_batch(messages)
                if on_point is not None:
                    on_point("dispatch.after_send", process)
                t3 = time.perf_counter()
                lost = _record(conn, results, sent_at, channel, token)
                t4 = time.perf_counter()
                n_deferred = sum(1 for r in results if r.status == "deferred")
                if n_deferred:
                    deferred.set()
                with timings_lock:
                    timings["batches"] += 1
                    timings["messages"] += len(results)
                    timings["claim_s"] += t1 - t0
                    timings["render_s"] += t2 - t1
                    timings["send_s"] += t3 - t2
                    timings["record_s"] += t4 - t3
                    timings["deferred"] += n_deferred
                    timings["lost_claims"] += lost
                if on_batch:
                    on_batch(channel_name, len(results))

    def guarded(channel_name: str, owner: ClaimOwner) -> None:
        try:
            work(channel_name, owner)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    with ClaimOwner(url) as owner:
        threads = [threading.Thread(target=guarded, args=(name, owner),
                                    name=f"dispatch-{name}-{i}")
                   for name in channels for i in range(max(1, workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return timings


# --------------------------------------------------------------------------- processes

#: `max_per_second` when a connection's extra names none (retention.connections)
DEFAULT_MAX_PER_SECOND = {"telegram": 30.0}


def _connections_for(channel_names: Sequence[str],
                     connections: Mapping[str, Mapping[str, Any]] | None,
                     processes: int = 1) -> dict[str, dict]:
    """Each channel's connection for the worker processes. A provider's rate limit
    (extra `max_per_second`: Telegram, SMS/Viber gateways) holds for the whole wave, so
    each of the `processes` workers gets its share of it."""
    from retention.connections import CONNECTION_FOR, connection_from_env

    out = {}
    for name in channel_names:
        conn = (connections or {}).get(name)
        if conn is None:
            conn = connection_from_env(CONNECTION_FOR[name])
        if conn is None:
            raise RuntimeError(f"sending {name} with several processes needs its connection: "
                               f"pass connections={{{name!r}: ...}} or set "
                               f"AIRFLOW_CONN_{CONNECTION_FOR[name].upper()}")
        conn = dict(conn)
        extra = conn.get("extra") or {}
        extra = json.loads(extra) if isinstance(extra, str) else dict(extra)
        rate = extra.get("max_per_second", DEFAULT_MAX_PER_SECOND.get(name))
        if rate:
            conn["extra"] = dict(extra, max_per_second=float(rate) / max(1, processes))
        out[name] = conn
    return out


class WorkerProcessError(RuntimeError):
    """A dispatch worker process failed or died; its claimed batch (if any) is settled by
    the next pass's reconciliation."""


def _send_in_processes(processes: int, campaign: Campaign, step_name: str, scope: dict,
                       release_at: datetime, *, url: str | None, workers: int,
                       connections: dict[str, dict],
                       on_batch: Callable[[str, int], None] | None,
                       extra_context: Callable[[object, list[tuple]], Mapping[str, dict]] | None,
                       on_point: OnPoint | None = None) -> dict:
    ctx = multiprocessing.get_context("spawn")
    job = {"campaign": campaign, "step_name": step_name, "scope": scope,
           "release_at": release_at, "url": url, "workers": workers,
           "connections": connections, "extra_context": extra_context,
           "on_point": on_point}
    children: list[tuple[int, multiprocessing.process.BaseProcess]] = []
    readers: dict[Any, int] = {}
    failures: dict[int, str] = {}
    timings: dict[str, Any] = _new_timings()
    timings["messages_by_process"] = [0] * processes
    try:
        for index in range(processes):
            reader, writer = ctx.Pipe(duplex=False)
            process = ctx.Process(target=_process_main, args=(index, os.getpid(), writer, job),
                                  name=f"dispatch-{campaign.id}-{step_name}-{index}")
            process.start()
            writer.close()  # the child holds it; EOF here when the child is gone
            children.append((index, process))
            readers[reader] = index
        while readers:
            for reader in multiprocessing.connection.wait(list(readers), timeout=1.0):
                index = readers[reader]
                try:
                    kind, *payload = reader.recv()
                except (EOFError, OSError):  # the child exited (or died mid-message)
                    reader.close()
                    del readers[reader]
                    continue
                if kind == "batch" and on_batch:
                    on_batch(*payload)
                elif kind == "done":
                    for key, value in payload[0].items():
                        timings[key] += value
                    timings["messages_by_process"][index] = payload[0]["messages"]
                elif kind == "error":
                    failures[index] = payload[0]
        for index, process in children:
            process.join()
            if process.exitcode != 0 and index not in failures:
                failures[index] = (f"exited with code {process.exitcode}" if process.exitcode > 0
                                   else f"killed by signal {-process.exitcode}")
    finally:
        for _, process in children:
            if process.is_alive():  # only when the parent itself is interrupted
                process.terminate()
                process.join(timeout=10)
    if failures:
        detail = "; ".join(f"worker {i}: {failures[i]}" for i in sorted(failures))
        raise WorkerProcessError(f"{len(failures)} of {processes} dispatch worker processes "
                                 f"failed ({detail}); their claimed rows are reconciled "
                                 "by the next pass")
    return timings


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the parent dies (Linux), so that no worker outlives the
    dispatcher and keeps sending while a retry reconciles its claims."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _process_main(index: int, parent_pid: int, writer, job: dict) -> None:
    """A worker process: build the channels from their connections, send without
    reconciling, report batches and timings to the parent through `writer`."""
    _die_with_parent(parent_pid)
    from retention.connections import build_channel

    lock = threading.Lock()

    def report(*message: Any) -> None:
        with lock:
            writer.send(message)

    channels: dict[str, Channel] = {}
    try:
        for name, conn in job["connections"].items():
            channels[name] = build_channel(name, conn)
        timings = _send(job["campaign"], job["step_name"], channels, job["scope"],
                        job["release_at"], url=job["url"], workers=job["workers"],
                        on_batch=lambda name, n: report("batch", name, n),
                        extra_context=job["extra_context"], on_point=job["on_point"],
                        process=index)
        report("done", timings)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit 1
        log.error("dispatch worker %s failed: %s", index, traceback.format_exc())
        try:
            report("error", f"{type(exc).__name__}: {exc}"[:2000])
        except OSError:
            pass
        sys.exit(1)
    finally:
        for channel in channels.values():
            close = getattr(channel, "close", None)
            if callable(close):
                close()
        writer.close()


def pending_releases(run_id: str, step: str, now: datetime,
                     url: str | None = None) -> tuple[int, datetime | None, int]:
    """(rows still to settle: planned, or unknown awaiting a lookup; the latest not_before
    that is due by `now`; how many of them need settling rather than a release: claimed
    by a dispatcher, or awaiting a lookup) for a step."""
    with db.connect(url) as conn:
        left, due, settling = conn.execute(
            "select count(*), max(not_before) filter (where status = 'planned' "
            "  and not_before <= %s), "
            "count(*) filter (where claim_token is not null) from ops.messages "
            "where run_id = %s and step = %s and (status = 'planned' "
            "  or (status = 'unknown' and settle_after is not null))",
            (now, run_id, step)).fetchone()
    return left, due, settling
