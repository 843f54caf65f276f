"""Sending planned ledger rows exactly once.

Each pass repeats: claim up to one provider request's worth of `planned` rows (a
`claim_token`, committed), render them, send them with the channel, record each outcome
(committed). Several workers may run the loop at once (`SKIP LOCKED` keeps them apart).

A worker killed between claim and record leaves claimed rows behind. The next pass
reconciles them before sending anything:

* when the channel can ask its provider whether a request was accepted
  (`lookup_accepted(claim_token)`; SendGrid's e-mail activity by custom argument), the rows
  become `sent` if it was, or are released to be sent now if it was not;
* otherwise the outcome is unknown and the rows become `failed` with reason
  `outcome unknown: ...`: never sent twice, and visible to an operator.

`sent_at` is the logical send time: the step's time, or the end of the customer's quiet
hours, never the wall clock, so attribution windows are reproducible.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from retention import db
from retention.campaigns.engine import RunInfo, step_counts, step_time
from retention.campaigns.render import context_for, render
from retention.campaigns.spec import Campaign
from retention.channels.base import Channel, OutboundMessage, SendResult

log = logging.getLogger(__name__)

UNKNOWN_OUTCOME = ("outcome unknown: the sending worker died after claiming; "
                   "not resent to avoid a duplicate")


class Failpoint(SystemExit):
    pass


def _failpoint(name: str, counter: dict) -> None:
    """Test hook: RETENTION_FAILPOINT=<name>:<n> kills the process at the n-th hit."""
    spec = os.environ.get("RETENTION_FAILPOINT", "")
    if not spec.startswith(name + ":"):
        return
    counter[name] = counter.get(name, 0) + 1
    if counter[name] == int(spec.split(":", 1)[1]):
        log.error("failpoint %s reached: exiting", name)
        os._exit(137)


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


def _claim(conn, scope: dict, release_at: datetime, limit: int, channel: str,
           token: str) -> list[tuple]:
    return conn.execute(f"""
        update ops.messages m set claim_token = %(token)s, claimed_at = clock_timestamp(),
                                  attempts = m.attempts + 1
        where m.message_id in (
          select message_id from ops.messages
          where {SCOPE} and channel = %(channel)s
            and status = 'planned' and claim_token is null and not_before <= %(release_at)s
          order by message_id
          limit %(limit)s
          for update skip locked)
        returning m.message_id, m.customer_id, m.address, m.variant, m.not_before, m.run_id,
                  m.planned_at
    """, dict(scope, token=token, release_at=release_at, limit=limit,
              channel=channel)).fetchall()


def _record(conn, results: Sequence[SendResult], sent_at_by_id: dict[str, datetime],
            channel: str) -> None:
    sent = [(r.message_id, r.provider_message_id, sent_at_by_id[r.message_id])
            for r in results if r.status == "sent"]
    failed = [(r.message_id, r.reason or "failed") for r in results if r.status != "sent"]
    with conn.cursor() as cur:
        if sent:
            cur.executemany(
                "update ops.messages set status = 'sent', provider_message_id = %s, sent_at = %s, "
                "claim_token = null where message_id = %s",
                [(pid, at, mid) for mid, pid, at in sent])
        if failed:
            cur.executemany(
                "update ops.messages set status = 'failed', reason = %s, claim_token = null "
                "where message_id = %s", [(reason, mid) for mid, reason in failed])
        dead = [r.message_id for r in results if r.deactivate_address]
        if dead:
            cur.execute("""
                insert into ops.deactivated_addresses (channel, address, deactivated_at, reason)
                select channel, address, sent_at_or_planned, 'provider: unregistered'
                from (select channel, address, coalesce(not_before, planned_at) as sent_at_or_planned
                      from ops.messages where message_id = any(%s) and address is not null) d
                on conflict do nothing""", (dead,))
    conn.commit()


def reconcile_orphans(scope: dict, channels: Mapping[str, Channel],
                      url: str | None = None) -> dict[str, int]:
    """Settle rows claimed by a worker that died. Call before a pass, with no live worker.

    Where the channel can ask its provider (`lookup_accepted(claim) -> {address:
    provider id}`), accepted rows become sent and the rest are released for sending;
    elsewhere the outcome is unknown and the rows fail visibly rather than risk a duplicate.
    """
    out = {"reconciled_sent": 0, "released": 0, "unknown": 0}
    with db.connect(url) as conn:
        groups = conn.execute(f"""
            select claim_token, channel,
                   array_agg(message_id order by message_id), array_agg(address order by message_id)
            from ops.messages
            where {SCOPE} and status = 'planned' and claim_token is not null
            group by 1, 2""", scope).fetchall()
        for token, channel_name, ids, addresses in groups:
            channel = channels.get(channel_name)
            lookup = getattr(channel, "lookup_accepted", None)
            if lookup is None:
                conn.execute("update ops.messages set status = 'failed', reason = %s, "
                             "claim_token = null where claim_token = %s", (UNKNOWN_OUTCOME, token))
                out["unknown"] += len(ids)
                conn.commit()
                continue
            accepted = lookup(token)
            sent = [(accepted[a], mid) for mid, a in zip(ids, addresses) if a in accepted]
            with conn.cursor() as cur:
                cur.executemany("""update ops.messages set status = 'sent', provider_message_id = %s,
                                     sent_at = greatest(not_before, planned_at), claim_token = null
                                   where message_id = %s""", sent)
            conn.execute("update ops.messages set claim_token = null where claim_token = %s "
                         "and status = 'planned'", (token,))
            out["reconciled_sent"] += len(sent)
            out["released"] += len(ids) - len(sent)
            conn.commit()
    return out


def dispatch_step(campaign: Campaign, run: RunInfo, step_name: str,
                  channels: Mapping[str, Channel], url: str | None = None, *,
                  release_at: datetime | None = None, workers: int = 1,
                  on_batch: Callable[[str, int], None] | None = None) -> dict:
    """Send every planned row of a campaign run's step whose not_before <= release_at
    (default: the step's time). Returns the step's counts and what reconciliation did."""
    step = campaign.step(step_name)
    at = step_time(campaign, run, step)
    release_at = release_at or at
    scope = {"campaign_id": campaign.id, "step": step.name, "run_id": run.run_id}
    result = dispatch(campaign, step_name, channels, scope, release_at, url=url,
                      workers=workers, on_batch=on_batch)
    counts = step_counts(run.run_id, step.name, url)
    counts.update(result)
    return counts


def dispatch(campaign: Campaign, step_name: str, channels: Mapping[str, Channel], scope: dict,
             release_at: datetime, *, url: str | None = None, workers: int = 1,
             on_batch: Callable[[str, int], None] | None = None,
             extra_context: Callable[[object, list[tuple]], Mapping[str, dict]] | None = None,
             ) -> dict:
    """The send loop for any scope (a campaign run's step, or a chain step across its
    instances): claim, render, send, record; after reconciling orphaned claims.

    `extra_context(conn, claimed_rows)` may return template variables per message id
    (a trigger chain's cart, product, search query); they override the defaults."""
    step = campaign.step(step_name)
    scope = {"run_id": None, **scope}
    reconciled = reconcile_orphans(scope, channels, url)
    variants = {v.name: v for v in campaign.variants}
    discount = float(campaign.promo.get("discount_percent", 10))
    valid_days = int(campaign.promo.get("valid_days", 7))
    counter: dict = {}
    errors: list[BaseException] = []

    with db.connect(url) as conn:
        recs = load_recommendations(conn, release_at)
        has_lifetime = conn.execute(
            "select to_regclass('marts.customer_lifetime') is not null").fetchone()[0]
        channel_names = [r[0] for r in conn.execute(
            f"select distinct channel from ops.messages where {SCOPE} and status = 'planned'",
            scope).fetchall()]
    missing = [c for c in channel_names if c not in channels]
    if missing:
        raise RuntimeError(f"no channel configured for {', '.join(missing)} "
                           f"(campaign {campaign.id}, step {step.name})")

    def work(channel_name: str) -> None:
        channel = channels[channel_name]
        with db.connect(url) as conn:
            while True:
                token = uuid.uuid4().hex
                rows = _claim(conn, scope, release_at, channel.max_batch, channel_name, token)
                conn.commit()
                if not rows:
                    return
                _failpoint("dispatch.after_claim", counter)
                categories = dict(conn.execute(
                    "select customer_id, preferred_category from marts.customer_lifetime "
                    "where customer_id = any(%s)", ([r[1] for r in rows],)).fetchall()) \
                    if has_lifetime else {}
                extras = extra_context(conn, rows) if extra_context else {}
                messages, sent_at = [], {}
                for message_id, customer_id, address, variant, not_before, run_id, planned_at in rows:
                    v = variants.get(variant)
                    template = (v.template if v and v.template else step.template)
                    ctx = context_for(
                        campaign_id=campaign.id, campaign_name=campaign.name, run_id=run_id,
                        message_id=message_id, customer_id=customer_id, variant=variant,
                        preferred_category=categories.get(customer_id),
                        products=recs.for_category(categories.get(customer_id)),
                        discount_percent=discount,
                        expires_on=(planned_at + timedelta(days=valid_days)).date())
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
                results = channel.send_batch(messages)
                _failpoint("dispatch.after_send", counter)
                _record(conn, results, sent_at, channel_name)
                if on_batch:
                    on_batch(channel_name, len(results))

    def guarded(channel_name: str) -> None:
        try:
            work(channel_name)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(name,), name=f"dispatch-{name}-{i}")
               for name in channel_names for i in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    with db.connect(url) as conn:
        waiting, nxt = conn.execute(
            f"select count(*) filter (where not_before > %(release_at)s), min(not_before) "
            f"from ops.messages where {SCOPE} and status = 'planned'",
            dict(scope, release_at=release_at)).fetchone()
    return {"reconciled": reconciled, "waiting": waiting,
            "next_release_at": nxt.isoformat() if nxt else None}


def pending_releases(run_id: str, step: str, now: datetime,
                     url: str | None = None) -> tuple[int, datetime | None]:
    """(planned rows left, the latest not_before that is due by `now`) for a step."""
    with db.connect(url) as conn:
        left, due = conn.execute(
            "select count(*), max(not_before) filter (where not_before <= %s) from ops.messages "
            "where run_id = %s and step = %s and status = 'planned'", (now, run_id, step)).fetchone()
    return left, due
