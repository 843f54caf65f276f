"""Chain instances: start or extend them from trigger moments, exit them, plan due steps.

A chain is a campaign of the engine (include/campaigns/<trigger>.yaml) run for one
customer and one subject. Its life:

1. `record_hits`: the detector's moments not yet in `ops.trigger_hits` start a chain,
   or extend the active one of the same trigger, customer and subject (a second
   abandoned cart does not start another chain: the chain's anchor moves to the new
   cart, its context takes the new cart's contents, and its next step is pushed to at
   least the new moment plus that step's wait).
2. `apply_exits`: before any step is planned, an active chain whose customer did what
   the campaign's `exit_on` lists (purchase, the action asked for, unsubscribe) after
   its anchor ends with status `exited` and the reason.
3. `plan_due_steps`: chains whose next step is due are planned through
   `engine.plan_members` (consent, shared frequency caps, quiet hours, holdouts, channel
   fallback) with run_id = chain id, then move to the next step (due at the time the
   message goes out plus the next step's wait) or complete.

Arms are assigned like the engine's frozen runs: global holdout, campaign holdout and
variant by hashing (campaign, customer), so a customer has the same arm in every chain
of a campaign.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime

import psycopg

from retention.campaigns.engine import MESSAGE_ID_SQL, hash01, plan_members, variant_case
from retention.campaigns.policy import Policy
from retention.campaigns.spec import Campaign, Step
from retention.triggers.state import CHAIN_ID_SQL

#: the chains planned by one plan_members call, as its members (a temp table of the
#: transaction, keyed by run_id = chain_id)
DUE_CHAINS = "trg_due_chains"

#: the member source of a chain step: the rows of DUE_CHAINS. A small keyed table, not
#: ops.chain_instances filtered by an array of ids: the engine reads its member source
#: in several places, and may probe it once per ledger row, where a probe of
#: `chain_id = any(<thousands of ids>)` goes through the whole array each time
MEMBERS_SQL = f"""
    select d.customer_id, d.variant, d.holdout_kind, d.run_id, d.run_as_of from {DUE_CHAINS} d
"""


def due_chains(conn: psycopg.Connection, chain_ids: Sequence[str]) -> None:
    """Copy the chains' member columns into DUE_CHAINS (dropped at commit), analysed."""
    conn.execute(f"drop table if exists {DUE_CHAINS}")
    conn.execute(f"""
        create temp table {DUE_CHAINS} on commit drop as
        select ci.chain_id as run_id, ci.customer_id, ci.variant, ci.holdout_kind,
               ci.anchor_at as run_as_of
        from ops.chain_instances ci where ci.chain_id = any(%s)""", (list(chain_ids),))
    conn.execute(f"alter table {DUE_CHAINS} add primary key (run_id)")
    conn.execute(f"analyze {DUE_CHAINS}")


def _arms_sql(campaign: Campaign, policy: Policy, params: dict) -> tuple[str, str]:
    """SQL expressions (over `h.customer_id`) of holdout_kind and variant: the same
    hashes as engine.start_run, so a customer's arm is the same in runs and chains."""
    marketing = campaign.kind != "transactional"
    params.update(arm_campaign=campaign.id,
                  arm_global=policy.global_holdout if marketing else 0.0,
                  arm_holdout=campaign.holdout if marketing else 0.0)
    variant = variant_case(campaign.variants,
                           hash01("%(arm_campaign)s || ':variant:' || h.customer_id"), params,
                           "arm")
    g_hash = hash01("'global:' || h.customer_id")
    h_hash = hash01("%(arm_campaign)s || ':holdout:' || h.customer_id")
    holdout = (f"case when {g_hash} < %(arm_global)s then 'global' "
               f"when {h_hash} < %(arm_holdout)s then 'campaign' end")
    return holdout, variant


def _waits(campaign: Campaign) -> list[float]:
    return [s.wait.total_seconds() for s in campaign.steps]


def record_hits(conn: psycopg.Connection, trigger: str, campaign: Campaign, detect_sql: str,
                params: dict, run_end: datetime, policy: Policy,
                merge_products: bool = False) -> dict[str, int]:
    """Start or extend chains for the detector's new moments (one transaction, the
    caller's). Returns counts: hits (new moments), started, extended.

    The newest moment's context describes the chain (a cart's contents are complete in
    its last moment); with `merge_products` the products of all its moments add up,
    newest first (several new arrivals in one category)."""
    conn.execute("drop table if exists trg_new_hits, trg_groups")
    conn.execute(f"""
        create temp table trg_new_hits on commit drop as
        select distinct on (d.customer_id, d.event_key) d.*
        from ({detect_sql}) d
        where not exists (select 1 from ops.trigger_hits t
                          where t.trigger = %(trigger)s and t.customer_id = d.customer_id
                            and t.event_key = d.event_key)
        order by d.customer_id, d.event_key, d.hit_at
    """, dict(params, trigger=trigger))
    hits = conn.execute("select count(*) from trg_new_hits").fetchone()[0]
    if not hits:
        return {"hits": 0, "started": 0, "extended": 0}
    # one group per chain subject; the latest moment's context wins, sessions accumulate
    conn.execute("""
        create temp table trg_groups on commit drop as
        select h.customer_id, h.subject, min(h.hit_at) as first_hit, max(h.hit_at) as last_hit,
               max(h.anchor_at) as anchor_at, min(h.first_step_at) as first_step_at,
               (array_agg(h.context order by h.hit_at desc, h.event_key desc))[1] as context,
               coalesce(jsonb_agg(s.session) filter (where s.session is not null), '[]'::jsonb)
                 as sessions,
               count(*) as hits,
               (select ci.chain_id from ops.chain_instances ci
                 where ci.trigger = %(trigger)s and ci.customer_id = h.customer_id
                   and ci.subject = h.subject and ci.status = 'active') as active_chain
        from trg_new_hits h
        left join lateral jsonb_array_elements(coalesce(h.context -> 'sessions', '[]'::jsonb))
          as s(session) on true
        group by h.customer_id, h.subject
    """, {"trigger": trigger})
    if merge_products:
        # each group reads its own moments: by index, not a scan of all of them per group
        conn.execute("create index on trg_new_hits (customer_id, subject)")
        conn.execute("analyze trg_new_hits")
        conn.execute("""
            update trg_groups g set context = g.context || jsonb_build_object('products', (
              select coalesce(jsonb_agg(p.product_id order by p.last_hit desc, p.product_id),
                              '[]'::jsonb)
              from (select e.product_id, max(h.hit_at) as last_hit
                    from trg_new_hits h
                    cross join lateral jsonb_array_elements_text(
                      coalesce(h.context -> 'products', '[]'::jsonb)) as e(product_id)
                    where h.customer_id = g.customer_id and h.subject = g.subject
                    group by e.product_id) p))
        """)
    waits = _waits(campaign)
    merge = ("|| jsonb_build_object('products', (select coalesce(jsonb_agg(distinct x), '[]'::jsonb) "
             "from jsonb_array_elements(coalesce(g.context -> 'products', '[]'::jsonb) "
             "|| coalesce(ci.context -> 'products', '[]'::jsonb)) as x))") if merge_products else ""
    extended = conn.execute(f"""
        update ops.chain_instances ci set
          anchor_at = greatest(ci.anchor_at, g.anchor_at),
          context = ci.context || g.context || jsonb_build_object(
            'sessions', coalesce(ci.context -> 'sessions', '[]'::jsonb) || g.sessions) {merge},
          extensions = ci.extensions + g.hits,
          next_step_at = greatest(
            ci.next_step_at,
            g.last_hit + make_interval(secs => (%(waits)s::float8[])[ci.next_step + 1])),
          updated_at = %(run_end)s
        from trg_groups g
        where g.active_chain is not null and ci.chain_id = g.active_chain
    """, {"waits": waits, "run_end": run_end}).rowcount
    arm_params: dict = {}
    holdout_sql, variant_sql = _arms_sql(campaign, policy, arm_params)
    chain_id = CHAIN_ID_SQL.format(trigger="%(trigger)s", customer="h.customer_id",
                                   subject="h.subject", started="h.first_hit")
    started = conn.execute(f"""
        insert into ops.chain_instances (chain_id, trigger, campaign_id, customer_id, subject,
            status, started_at, anchor_at, next_step, next_step_at, variant, holdout_kind,
            context, created_by_run, updated_at)
        select {chain_id}, %(trigger)s, %(campaign_id)s, h.customer_id, h.subject, 'active',
               h.first_hit, h.anchor_at, 0,
               coalesce(h.first_step_at, h.first_hit + make_interval(secs => %(first_wait)s)),
               case when a.holdout_kind is not null then 'holdout' else a.variant end,
               a.holdout_kind,
               h.context || jsonb_build_object('sessions', h.sessions), %(run_end)s, %(run_end)s
        from trg_groups h
        cross join lateral (select {holdout_sql} as holdout_kind, {variant_sql} as variant) a
        where h.active_chain is null
        on conflict do nothing
    """, dict(arm_params, trigger=trigger, campaign_id=campaign.id, first_wait=waits[0],
              run_end=run_end)).rowcount
    conn.execute(f"""
        insert into ops.trigger_hits (trigger, customer_id, event_key, subject, hit_at, anchor_at,
                                      chain_id, outcome, run_end)
        select %(trigger)s, h.customer_id, h.event_key, h.subject, h.hit_at, h.anchor_at,
               coalesce(g.active_chain, {CHAIN_ID_SQL.format(trigger="%(trigger)s",
                                                             customer="g.customer_id",
                                                             subject="g.subject",
                                                             started="g.first_hit")}),
               case when g.active_chain is null then 'started' else 'extended' end, %(run_end)s
        from trg_new_hits h
        join trg_groups g on g.customer_id = h.customer_id and g.subject = h.subject
        on conflict do nothing
    """, {"trigger": trigger, "run_end": run_end})
    return {"hits": hits, "started": started, "extended": extended}


def _subject_match(event: str) -> str:
    """SQL: event {event} concerns the chain c's subject (any event for subjects that
    are not a product or a category)."""
    return f"""(c.subject not like 'product:%%' and c.subject not like 'category:%%'
             or c.subject = 'product:' || {event}.product_id
             or (c.subject like 'category:%%'
                 and exists (select 1 from (select coalesce({event}.category_path,
                                     (select p.category_path from raw.products p
                                      where p.product_id = {event}.product_id)) as path) x
                             where x.path = substr(c.subject, 10)
                                or x.path like substr(c.subject, 10) || '.%%')))"""


def campaigns_with_active_chains(conn: psycopg.Connection, campaign_ids: Sequence[str],
                                 at: datetime) -> set[str]:
    return {r[0] for r in conn.execute(
        "select distinct campaign_id from ops.chain_instances "
        "where status = 'active' and campaign_id = any(%s) and anchor_at < %s",
        (list(campaign_ids), at)).fetchall()}


def apply_exits(conn: psycopg.Connection, campaign: Campaign, at: datetime,
                has_ropo: bool) -> dict[str, int]:
    """End the campaign's active chains whose exit rule fired by `at`; counts by reason.

    purchase: the customer checked out after the anchor; unsubscribe: any of their
    addresses unsubscribed after the chain started (contract rows or the ledger's
    consent changes); cart / view / wishlist / search / remove_from_cart / app_open: that
    event on the chain's subject after the anchor (any such event of the customer's for a
    chain per label); 'review' has no source in the contract and never fires.
    """
    from retention.triggers.detect import checked_out

    reasons = []
    if "purchase" in campaign.exit_on:
        reasons.append(("purchase", checked_out("c.customer_id", "c.anchor_at", "%(at)s",
                                                inclusive=False, has_ropo=has_ropo)))
    if "unsubscribe" in campaign.exit_on:
        reasons.append(("unsubscribe", """(exists (
              select 1 from raw.channel_subscriptions s
              where s.customer_id = c.customer_id and s.unsubscribed_at > c.started_at
                and s.unsubscribed_at <= %(at)s)
            or exists (
              select 1 from ops.consent_changes cc
              join raw.channel_subscriptions s on s.channel = cc.channel and s.address = cc.address
              where s.customer_id = c.customer_id and cc.unsubscribed_at > c.started_at
                and cc.unsubscribed_at <= %(at)s))"""))
    for event in ("cart", "view", "wishlist", "search", "remove_from_cart", "app_open"):
        if event in campaign.exit_on:
            reasons.append((event, f"""exists (
              select 1 from raw.events e
              where e.customer_id = c.customer_id and e.event_type = '{event}'
                and e.occurred_at > c.anchor_at and e.occurred_at <= %(at)s
                and {_subject_match('e')})"""))
    if not reasons:
        return {}
    case = " ".join(f"when {cond} then '{name}'" for name, cond in reasons)
    rows = conn.execute(f"""
        with decided as (
          select c.chain_id, case {case} end as reason
          from ops.chain_instances c
          where c.campaign_id = %(campaign_id)s and c.status = 'active' and c.anchor_at < %(at)s
        )
        update ops.chain_instances ci set status = 'exited', exit_reason = d.reason,
               ended_at = %(at)s, next_step = null, next_step_at = null, updated_at = %(at)s
        from decided d
        where d.chain_id = ci.chain_id and d.reason is not null
        returning d.reason
    """, {"campaign_id": campaign.id, "at": at}).fetchall()
    out: dict[str, int] = defaultdict(int)
    for (reason,) in rows:
        out[reason] += 1
    return dict(out)


ChannelOrders = Callable[[psycopg.Connection, Sequence[str], Step, datetime],
                         Mapping[tuple[str, ...], list[str]]]


def plan_due_steps(conn: psycopg.Connection, campaign: Campaign, at: datetime,
                   policy: Policy, channel_orders: ChannelOrders | None = None,
                   commit: bool = True) -> dict[str, int]:
    """Plan every step due by `at` and advance the chains; chains due per step.

    A customer with two instances of the campaign due at once (price drops on two
    products) is planned in two passes, so the second sees the first in the frequency
    caps. `channel_orders` may split the due chains by a per-customer channel order (the
    re-engagement sequence: the channel where each customer engaged most first).
    """
    due_by_step: dict[str, int] = {s.name: 0 for s in campaign.steps}
    first_due = conn.execute("""
        select min(next_step) from ops.chain_instances
        where campaign_id = %s and status = 'active' and next_step_at <= %s""",
                             (campaign.id, at)).fetchone()[0]
    if first_due is None:
        return due_by_step
    for step in campaign.steps[first_due:]:
        rows = conn.execute("""
            select chain_id, row_number() over (partition by customer_id
                                                order by next_step_at, chain_id)
            from ops.chain_instances
            where campaign_id = %s and status = 'active' and next_step = %s
              and next_step_at <= %s
        """, (campaign.id, step.index, at)).fetchall()
        due_by_step[step.name] = len(rows)
        if not rows:
            continue
        by_rank: dict[int, list[str]] = defaultdict(list)
        for chain_id, rank in rows:
            by_rank[rank].append(chain_id)
        for rank in sorted(by_rank):
            ids = by_rank[rank]
            groups = (channel_orders(conn, ids, step, at) if channel_orders
                      else {step.channels: ids})
            for channels, group in groups.items():
                planned_step = step if tuple(channels) == step.channels else replace(
                    step, channels=tuple(channels))
                due_chains(conn, group)
                plan_members(conn, campaign, planned_step, at, MEMBERS_SQL, {}, policy)
        _advance(conn, campaign, step, [r[0] for r in rows], at)
        if commit:
            conn.commit()
    return due_by_step


def _advance(conn: psycopg.Connection, campaign: Campaign, step: Step, chain_ids: list[str],
             at: datetime) -> None:
    is_last = step.index == len(campaign.steps) - 1
    next_wait = 0.0 if is_last else campaign.steps[step.index + 1].wait.total_seconds()
    message_id = MESSAGE_ID_SQL.format(run_id="c.chain_id", customer="c.customer_id")
    # each chain's message of the step: a probe of the ledger's key per chain (OFFSET 0
    # keeps it one), not a join over the whole ledger
    conn.execute(f"""
        with outcome as (
          select c.chain_id, m.not_before, m.reason = 'exited: purchase' as exited
          from ops.chain_instances c
          left join lateral (
            select m.not_before, m.reason from ops.messages m
            where m.message_id = {message_id} offset 0) m on true
          where c.chain_id = any(%(chain_ids)s)
        )
        update ops.chain_instances ci set
          status = case when o.exited then 'exited' when %(is_last)s then 'completed'
                        else 'active' end,
          exit_reason = case when o.exited then 'purchase' end,
          next_step = case when o.exited or %(is_last)s then null else ci.next_step + 1 end,
          next_step_at = case when o.exited or %(is_last)s then null
                              else greatest(coalesce(o.not_before, %(at)s), %(at)s)
                                   + make_interval(secs => %(next_wait)s) end,
          ended_at = case when o.exited or %(is_last)s then %(at)s end,
          updated_at = %(at)s
        from outcome o
        where o.chain_id = ci.chain_id and ci.status = 'active' and ci.next_step = %(step_index)s
    """, {"chain_ids": chain_ids, "is_last": is_last, "next_wait": next_wait, "at": at,
          "step": step.name, "step_index": step.index})


def _empty_counts() -> dict:
    return {"messages": 0, "planned": 0, "sent": 0, "failed": 0, "holdout": 0, "unknown": 0,
            "suppressed": 0, "suppressed_by_reason": {}, "channels": {}}


def step_report(conn: psycopg.Connection, campaigns: Sequence[Campaign],
                at: datetime) -> dict[str, dict[str, dict]]:
    """Per campaign and step, the ledger rows planned at `at` (this run) by status."""
    rows = conn.execute("""
        select campaign_id, step, status, coalesce(reason, ''), channel, count(*)
        from ops.messages where campaign_id = any(%s) and planned_at = %s
        group by 1, 2, 3, 4, 5
    """, ([c.id for c in campaigns], at)).fetchall()
    out = {c.id: {s.name: _empty_counts() for s in c.steps} for c in campaigns}
    for campaign_id, step, status, reason, channel, n in rows:
        c = out[campaign_id].setdefault(step, _empty_counts())
        c["messages"] += n
        c[status] += n
        if status == "suppressed":
            c["suppressed_by_reason"][reason] = c["suppressed_by_reason"].get(reason, 0) + n
        if status in ("planned", "sent"):
            c["channels"][channel] = c["channels"].get(channel, 0) + n
    return out

