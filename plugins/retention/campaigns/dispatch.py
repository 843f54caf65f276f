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

Several processes (`processes=N`): one provider client is CPU-bound long before the
provider is (FCM pushes cost about 1 ms of client CPU each), so a wave can be sent by N
worker processes ("spawn"). The parent reconciles orphaned claims once, then starts the
workers with picklable arguments only (the campaign, the scope, the connections as dicts);
each builds its own channels with `build_channel` and runs the same claim/send/record loop
without reconciling, since a live sibling's claims are not orphans. A provider rate limit
in a connection (`max_per_second`) is shared out among the workers. A worker that dies
leaves its claimed batch for the next pass, like a killed single-process worker; the
others finish the wave, then the parent raises. Workers die with the parent (Linux
`PR_SET_PDEATHSIG`), so a retry never reconciles the claims of a worker still sending.

Claims take any `planned` rows of the scope (no order): ordering by message_id made every
claim sort all the step's planned rows, 2.7 s a claim on a 1M-row step. Outcomes are
recorded with one UPDATE per batch from arrays instead of one per message.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
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

from retention import db
from retention.campaigns.engine import RunInfo, step_counts, step_time
from retention.campaigns.render import context_for, render
from retention.campaigns.spec import Campaign
from retention.channels.base import Channel, OutboundMessage, SendResult

log = logging.getLogger(__name__)

UNKNOWN_OUTCOME = ("outcome unknown: the sending worker died after claiming; "
                   "not resent to avoid a duplicate")
NOTHING_RECONCILED = {"reconciled_sent": 0, "released": 0, "unknown": 0}
#: test hook: with several worker processes, only the one with this index honours
#: RETENTION_FAILPOINT (the others would inherit it and die too)
FAILPOINT_PROCESS_ENV = "RETENTION_FAILPOINT_PROCESS"


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
          limit %(limit)s
          for update skip locked)
        returning m.message_id, m.customer_id, m.address, m.variant, m.not_before, m.run_id,
                  m.planned_at
    """, dict(scope, token=token, release_at=release_at, limit=limit,
              channel=channel)).fetchall()


def _record(conn, results: Sequence[SendResult], sent_at_by_id: dict[str, datetime],
            channel: str) -> None:
    """One UPDATE for the batch's sent rows and one for its failed rows (arrays unnested,
    not one statement per message), the dead addresses, one commit."""
    sent = [r for r in results if r.status == "sent"]
    failed = [r for r in results if r.status != "sent"]
    with conn.cursor() as cur:
        if sent:
            cur.execute(
                "update ops.messages m set status = 'sent', provider_message_id = v.provider_id, "
                "sent_at = v.sent_at, claim_token = null "
                "from unnest(%s::text[], %s::text[], %s::timestamptz[]) "
                "as v(message_id, provider_id, sent_at) where m.message_id = v.message_id",
                ([r.message_id for r in sent], [r.provider_message_id for r in sent],
                 [sent_at_by_id[r.message_id] for r in sent]))
        if failed:
            cur.execute(
                "update ops.messages m set status = 'failed', reason = v.reason, claim_token = null "
                "from unnest(%s::text[], %s::text[]) as v(message_id, reason) "
                "where m.message_id = v.message_id",
                ([r.message_id for r in failed], [r.reason or "failed" for r in failed]))
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


def dispatch_threads() -> int:
    """RETENTION_DISPATCH_THREADS: sending threads per channel (at least 1)."""
    from retention.config import setting

    value = setting("RETENTION_DISPATCH_THREADS") or "1"
    try:
        threads = int(value)
    except ValueError:
        raise ValueError(f"RETENTION_DISPATCH_THREADS must be a whole number, not {value!r}") from None
    if threads < 1:
        raise ValueError(f"RETENTION_DISPATCH_THREADS must be at least 1, not {threads}")
    return threads


def dispatch_step(campaign: Campaign, run: RunInfo, step_name: str,
                  channels: Mapping[str, Channel], url: str | None = None, *,
                  release_at: datetime | None = None, workers: int = 1, processes: int = 1,
                  connections: Mapping[str, Mapping[str, Any]] | None = None,
                  on_batch: Callable[[str, int], None] | None = None) -> dict:
    """Send every planned row of a campaign run's step whose not_before <= release_at
    (default: the step's time). Returns the step's counts and what reconciliation did.

    `processes` > 1 sends with that many worker processes, each with `workers` threads
    per channel (see `dispatch`)."""
    step = campaign.step(step_name)
    at = step_time(campaign, run, step)
    release_at = release_at or at
    scope = {"campaign_id": campaign.id, "step": step.name, "run_id": run.run_id}
    result = dispatch(campaign, step_name, channels, scope, release_at, url=url,
                      workers=workers, processes=processes, connections=connections,
                      on_batch=on_batch)
    counts = step_counts(run.run_id, step.name, url)
    counts.update(result)
    return counts


def dispatch(campaign: Campaign, step_name: str, channels: Mapping[str, Channel], scope: dict,
             release_at: datetime, *, url: str | None = None, workers: int = 1,
             processes: int = 1, connections: Mapping[str, Mapping[str, Any]] | None = None,
             reconcile: bool = True,
             on_batch: Callable[[str, int], None] | None = None,
             extra_context: Callable[[object, list[tuple]], Mapping[str, dict]] | None = None,
             ) -> dict:
    """The send loop for any scope (a campaign run's step, or a chain step across its
    instances): claim, render, send, record; after reconciling orphaned claims.

    `extra_context(conn, claimed_rows)` may return template variables per message id
    (a trigger chain's cart, product, search query); they override the defaults.

    `processes` > 1: the parent reconciles (when `reconcile`), then that many worker
    processes send. They get `connections` (channel name -> connection dict, as
    `retention.connections.build_channel` takes; default: the `AIRFLOW_CONN_*` variables)
    and build their own channels; `channels` serve the parent's reconciliation only.
    `extra_context` must then be picklable (a module-level function). `on_batch` is
    called in the parent. `reconcile=False` is for a caller that knows no worker of this
    scope has died, e.g. a worker beside live siblings."""
    step = campaign.step(step_name)
    scope = {"run_id": None, **scope}
    reconciled = reconcile_orphans(scope, channels, url) if reconcile else dict(NOTHING_RECONCILED)
    with db.connect(url) as conn:
        channel_names = [r[0] for r in conn.execute(
            f"select distinct channel from ops.messages where {SCOPE} and status = 'planned'",
            scope).fetchall()]
    missing = [c for c in channel_names if c not in channels]
    if missing:
        raise RuntimeError(f"no channel configured for {', '.join(missing)} "
                           f"(campaign {campaign.id}, step {step.name})")
    if processes > 1 and channel_names:
        timings = _send_in_processes(
            processes, campaign, step_name, scope, release_at, url=url, workers=workers,
            connections=_connections_for(channel_names, connections, processes),
            on_batch=on_batch,
            extra_context=extra_context)
    else:
        timings = _send(campaign, step_name, {n: channels[n] for n in channel_names}, scope,
                        release_at, url=url, workers=workers, on_batch=on_batch,
                        extra_context=extra_context)
    with db.connect(url) as conn:
        waiting, nxt = conn.execute(
            f"select count(*) filter (where not_before > %(release_at)s), min(not_before) "
            f"from ops.messages where {SCOPE} and status = 'planned'",
            dict(scope, release_at=release_at)).fetchone()
    return {"reconciled": reconciled, "waiting": waiting,
            "next_release_at": nxt.isoformat() if nxt else None, "timings": timings}


def _new_timings() -> dict:
    return {"batches": 0, "messages": 0, "claim_s": 0.0, "render_s": 0.0, "send_s": 0.0,
            "record_s": 0.0}


def _send(campaign: Campaign, step_name: str, channels: Mapping[str, Channel], scope: dict,
          release_at: datetime, *, url: str | None, workers: int,
          on_batch: Callable[[str, int], None] | None,
          extra_context: Callable[[object, list[tuple]], Mapping[str, dict]] | None) -> dict:
    """`workers` threads per channel, each claiming, rendering, sending and recording
    batches until the scope has no planned row left for it. Returns the seconds spent in
    each phase, summed over the threads."""
    step = campaign.step(step_name)
    variants = {v.name: v for v in campaign.variants}
    discount = float(campaign.promo.get("discount_percent", 10))
    valid_days = int(campaign.promo.get("valid_days", 7))
    counter: dict = {}
    errors: list[BaseException] = []
    timings = _new_timings()
    timings_lock = threading.Lock()

    with db.connect(url) as conn:
        recs = load_recommendations(conn, release_at)
        has_lifetime = conn.execute(
            "select to_regclass('marts.customer_lifetime') is not null").fetchone()[0]

    def work(channel_name: str) -> None:
        channel = channels[channel_name]
        with db.connect(url) as conn:
            while True:
                t0 = time.perf_counter()
                token = uuid.uuid4().hex
                rows = _claim(conn, scope, release_at, channel.max_batch, channel_name, token)
                conn.commit()
                if not rows:
                    return
                _failpoint("dispatch.after_claim", counter)
                t1 = time.perf_counter()
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
                t2 = time.perf_counter()
                results = channel.send_batch(messages)
                _failpoint("dispatch.after_send", counter)
                t3 = time.perf_counter()
                _record(conn, results, sent_at, channel_name)
                t4 = time.perf_counter()
                with timings_lock:
                    timings["batches"] += 1
                    timings["messages"] += len(results)
                    timings["claim_s"] += t1 - t0
                    timings["render_s"] += t2 - t1
                    timings["send_s"] += t3 - t2
                    timings["record_s"] += t4 - t3
                if on_batch:
                    on_batch(channel_name, len(results))

    def guarded(channel_name: str) -> None:
        try:
            work(channel_name)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(name,), name=f"dispatch-{name}-{i}")
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
                       ) -> dict:
    ctx = multiprocessing.get_context("spawn")
    job = {"campaign": campaign, "step_name": step_name, "scope": scope,
           "release_at": release_at, "url": url, "workers": workers,
           "connections": connections, "extra_context": extra_context}
    children: list[tuple[int, multiprocessing.process.BaseProcess]] = []
    readers: dict[Any, int] = {}
    failures: dict[int, str] = {}
    timings = _new_timings()
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
    only = os.environ.get(FAILPOINT_PROCESS_ENV)
    if only not in (None, "", str(index)):
        os.environ.pop("RETENTION_FAILPOINT", None)
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
                        extra_context=job["extra_context"])
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
                     url: str | None = None) -> tuple[int, datetime | None]:
    """(planned rows left, the latest not_before that is due by `now`) for a step."""
    with db.connect(url) as conn:
        left, due = conn.execute(
            "select count(*), max(not_before) filter (where not_before <= %s) from ops.messages "
            "where run_id = %s and step = %s and status = 'planned'", (now, run_id, step)).fetchone()
    return left, due
