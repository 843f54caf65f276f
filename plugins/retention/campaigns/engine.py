"""Campaign runs: freeze the audience, plan each step into the ledger with eligibility.

A run is keyed by (campaign, as_of). `start_run` selects the audience once and freezes it
in `ops.audience_members` with each member's arm: the global holdout (no marketing
campaign touches them), the campaign's holdout, or an A/B variant, all assigned by hashing
(campaign, customer), so the same customer gets the same arm on every re-run. Later steps
and the attribution read the frozen snapshot, never the rules again.

`plan_step` writes one ledger row per member the step concerns, in one set-wise INSERT:

* holdout members get a `holdout` row on the first step only (one per run);
* on later steps of a cascade (`only_unengaged`), members an earlier step reached and who
  engaged (open or click) are left out, as are members without any subscription to the
  step's channels (the wave goes only to members who have that channel);
* a member who purchased after the run started has exited: `suppressed`, `exited: purchase`;
* no live address on the step's channels (unsubscribed, bounced, deactivated token):
  `suppressed`, `no consent`;
* the frequency caps of the contact policy, counted over the marketing messages planned,
  sent or of unknown outcome (they may have been delivered) within the cap's window on
  either side of the step, rows planned for a later time included: `suppressed`,
  `frequency cap: global|channel`;
* otherwise `planned`, with `not_before` at the end of quiet hours in the customer's own
  time zone when the step's time falls inside them (messages wait, they are not dropped).

A row's message id is made of the run, the step and the member's number (start_run
numbers the members in the byte order of their customer ids, and the rows are written in
that order, so a step's ids enter the ledger's primary key in order); members of runs
frozen before the numbers, and chain instances, keep ids hashed from the customer
(ledger.message_id_for).

The channel is the first of the step's channel rule for which the member has a live
address (push if there is a live token, else e-mail, ...). Transactional campaigns skip
holdouts, caps and quiet hours, never consent.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psycopg
from psycopg.types.json import Jsonb

from retention import db
from retention.campaigns.audience import compile_audience
from retention.campaigns.ledger import ensure_ledger, message_id_prefix, run_id_for
from retention.campaigns.policy import Policy, load_policy
from retention.campaigns.spec import Campaign, Step, Variant


def hash01(expr: str) -> str:
    """A uniform number in [0, 1) from md5 of an SQL text expression (stable everywhere)."""
    return f"(('x' || substr(md5({expr}), 1, 8))::bit(32)::bigint / 4294967296.0)"


#: work_mem of the planning statements (per sort or hash; a million members' two million
#: subscriptions sort in memory, about 400MB, and their cap counts hash in it)
PLAN_WORK_MEM = "512MB"

#: SQL of the message id of a ledger row whose member has no number (a chain instance, or
#: a run frozen before migration 0007): 'm_' and the first 32 hex digits of the sha256 of
#: '<run_id>|<step>|<customer>' (ledger.message_id_for); the first 16 bytes are
#: hex-encoded rather than all 32 and cut
MESSAGE_ID_SQL = ("'m_' || encode(substr(sha256(convert_to({run_id} || '|' || %(step)s || '|' "
                  "|| {customer}, 'UTF8')), 1, 16), 'hex')")

#: SQL of the message id of a numbered member's row: the run's and step's prefix
#: %(id_prefix)s (ledger.message_id_prefix) and the member number as 8 hex digits
NUMBERED_ID_SQL = "%(id_prefix)s || lpad(to_hex({member_no}), 8, '0')"


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    campaign_id: str
    as_of: datetime
    audience_size: int
    holdout_size: int
    created: bool


def as_utc(ts: datetime) -> datetime:
    if ts.tzinfo is None:
        return ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc)


#: per connection, the server's time zone names (pg_timezone_names), read once: reading
#: them opens every zone file of the server, tens of milliseconds per call
_ZONE_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _zone_names(conn: psycopg.Connection) -> list[str]:
    if conn not in _ZONE_NAMES:
        _ZONE_NAMES[conn] = [r[0] for r in conn.execute(
            "select name from pg_timezone_names").fetchall()]
    return _ZONE_NAMES[conn]


def _relation_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("select to_regclass(%s) is not null", (name,)).fetchone()[0]


def variant_case(variants: Sequence[Variant], value: str, params: dict, prefix: str) -> str:
    """SQL: the name of the variant whose share of [0, 1) holds `value` (SQL, a hash in
    [0, 1)); the variants share it in proportion to their weights, in their order. Their
    names and upper bounds go to `params` as `<prefix>_name_<i>` and `<prefix>_upto_<i>`."""
    total = sum(v.weight for v in variants)
    cases, acc = [], 0.0
    for i, v in enumerate(variants):
        acc += v.weight / total
        params[f"{prefix}_name_{i}"] = v.name
        params[f"{prefix}_upto_{i}"] = acc
        cases.append(f"when {value} < %({prefix}_upto_{i})s then %({prefix}_name_{i})s")
    last = len(variants) - 1
    return (f"case {' '.join(cases[:-1])} else %({prefix}_name_{last})s end" if last
            else f"%({prefix}_name_0)s")


#: the keys (SQL) hashed with the customer for the global holdout, the campaign's holdout
#: and the variant
GLOBAL_KEY = "'global:'"
HOLDOUT_KEY = "%(campaign_id)s || ':holdout:'"
VARIANT_KEY = "%(campaign_id)s || ':variant:'"

#: audience tables joined to raw.customers (compile_audience's `needs`)
JOINED_AUDIENCE = {"marts.customer_lifetime", "marts.customer_predicted_value"}


def arm_sql(variants: Sequence[Variant], customer: str, params: dict, *,
            global_holdout: bool, holdout: bool) -> tuple[str, str, str]:
    """SQL of a member's arm: its holdout kind ('global', 'campaign' or null: hashes of
    'global:<customer>' below %(global_holdout)s, then of '<campaign>:holdout:<customer>'
    below %(holdout)s), its variant (by the variant hash `v`, see variant_case), and the
    select-list item computing `v` (empty with one variant, whose name needs no hash).
    A share that is zero is not hashed at all: no hash in [0, 1) is below it."""
    cases = []
    if global_holdout:
        cases.append(f"when {hash01(f'{GLOBAL_KEY} || {customer}')} < %(global_holdout)s "
                     "then 'global'")
    if holdout:
        cases.append(f"when {hash01(f'{HOLDOUT_KEY} || {customer}')} < %(holdout)s "
                     "then 'campaign'")
    holdout_sql = f"case {' '.join(cases)} end" if cases else "null::text"
    variant_sql = variant_case(variants, "v", params, "variant")
    hashed = f", {hash01(f'{VARIANT_KEY} || {customer}')} as v" if len(variants) > 1 else ""
    return holdout_sql, variant_sql, hashed


def start_run(campaign: Campaign, as_of: datetime, url: str | None = None,
              policy: Policy | None = None) -> RunInfo:
    """Select and freeze the run's audience (once; a re-run returns the frozen one)."""
    as_of = as_utc(as_of)
    policy = policy or load_policy()
    run_id = run_id_for(campaign.id, as_of.isoformat().replace("+00:00", "Z"))
    with db.connect(url) as conn:
        ensure_ledger(conn)
        conn.commit()
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (run_id,))
        conn.execute("select set_config('work_mem', %s, true), set_config('jit', 'off', true)",
                     (PLAN_WORK_MEM,))
        row = conn.execute("select audience_size, holdout_size from ops.campaign_runs "
                           "where run_id = %s", (run_id,)).fetchone()
        if row:
            return RunInfo(run_id, campaign.id, as_of, row[0], row[1], created=False)
        audience_sql, params, needs = compile_audience(campaign.audience)
        missing = sorted(n for n in needs if not _relation_exists(conn, n))
        if missing:
            raise RuntimeError(f"campaign {campaign.id}: its audience reads {', '.join(missing)}, "
                               "which does not exist yet: run `retention build` first")
        marketing = campaign.kind != "transactional"
        params.update(as_of=as_of, run_id=run_id, campaign_id=campaign.id,
                      global_holdout=policy.global_holdout if marketing else 0.0,
                      holdout=campaign.holdout if marketing else 0.0)
        holdout_sql, variant_sql, hashed = arm_sql(
            campaign.variants, "a.customer_id", params,
            global_holdout=params["global_holdout"] > 0, holdout=params["holdout"] > 0)
        if needs & JOINED_AUDIENCE:
            # the published tables it joins are one row per customer (and snapshot); a
            # duplicate would still count once
            audience_sql = f"select distinct d.customer_id from ({audience_sql}) d"
        conn.execute(
            "insert into ops.campaign_runs (run_id, campaign_id, as_of, spec_hash, spec, "
            "audience_size, holdout_size, created_at) values (%s, %s, %s, %s, %s, 0, 0, %s)",
            (run_id, campaign.id, as_of, campaign.spec_hash, Jsonb(campaign.raw), as_of))
        # a new run (its row was just inserted under the run's lock) has no members yet,
        # and the audience selects each customer once: a plain INSERT (no ON CONFLICT
        # arbitration per row). The run check of ops.audience_members runs once for the
        # statement (migration 0005). Members are numbered in the byte order of their
        # customer ids (migration 0007: their ledger rows' ids), and go in in that order.
        size, holdout = conn.execute(f"""
            with inserted as (
            insert into ops.audience_members (run_id, customer_id, variant, holdout_kind,
                                              member_no)
            select %(run_id)s, customer_id,
                   case when holdout_kind is not null then 'holdout' else {variant_sql} end,
                   holdout_kind,
                   row_number() over (order by customer_id collate "C")
            from (
              -- OFFSET 0: each hash is worked out once per customer (flattened, the
              -- holdout's expression would be evaluated once per reference)
              select a.customer_id, {holdout_sql} as holdout_kind{hashed}
              from ({audience_sql}) a
              offset 0
            ) assigned
            returning holdout_kind)
            select count(*), count(*) filter (where holdout_kind is not null) from inserted
            """, params).fetchone()
        conn.execute("update ops.campaign_runs set audience_size = %s, holdout_size = %s "
                     "where run_id = %s", (size, holdout, run_id))
        conn.commit()
        # fresh statistics for the new run's members before any step is planned: with
        # the table's old ones (one row for an unseen run_id) the planner nests a loop
        # over the whole audience inside another (minutes instead of seconds at 100,000)
        conn.execute("analyze ops.audience_members")
        conn.commit()
    return RunInfo(run_id, campaign.id, as_of, size, holdout, created=True)


def step_time(campaign: Campaign, run: RunInfo, step: Step) -> datetime:
    return run.as_of + campaign.step_offset(step)


def plan_step(campaign: Campaign, run: RunInfo, step_name: str, url: str | None = None,
              policy: Policy | None = None) -> dict:
    """Write the step's ledger rows for the run's frozen audience (idempotent); counts."""
    step = campaign.step(step_name)
    members_sql = """select m.customer_id, m.variant, m.holdout_kind,
                            %(member_run_id)s::text as run_id,
                            %(member_run_as_of)s::timestamptz as run_as_of, m.member_no
                     from ops.audience_members m where m.run_id = %(member_run_id)s"""
    params = {"member_run_id": run.run_id, "member_run_as_of": run.as_of}
    at = step_time(campaign, run, step)
    with db.connect(url) as conn:
        ensure_ledger(conn)
        conn.commit()
        tally: list = []
        parts = _plan_parts(conn, run, step)
        if parts:
            _plan_in_parts(campaign, step, at, members_sql, params, policy, run, parts, url,
                           tally)
        else:
            plan_members(conn, campaign, step, at, members_sql, params, policy,
                         run_id=run.run_id, members=run.audience_size, numbered=True,
                         tally=tally)
        conn.commit()
    if tally:
        return counts_of(tally[0])
    return step_counts(run.run_id, step.name, url)


def _plan_parts(conn: psycopg.Connection, run: RunInfo,
                step: Step) -> list[tuple[int, int, str, str]]:
    """The parts a step's first plan is split into, one database session each
    (RETENTION_PLAN_SESSIONS, from RETENTION_PLAN_SPLIT_MEMBERS members on): (first and
    last member number, first and last customer id) of equal runs of member numbers.
    start_run numbers the members in the byte order of their customer ids, so a run of
    numbers holds the members whose customer ids lie between its ends (compared "C").
    Empty (one session) when the run is smaller, its members have no numbers (frozen
    before migration 0007), or the step has ledger rows already (planned again in one
    session, `on conflict do nothing`). Takes the planning lock in the caller's
    transaction, which holds it until the parts are done."""
    from retention.config import settings

    conf = settings()
    n, sessions = run.audience_size, conf.plan_sessions
    if sessions < 2 or n < max(conf.plan_split_members, sessions):
        return []
    conn.execute("select pg_advisory_xact_lock(hashtext('retention.plan'))")
    if conn.execute("select 1 from ops.messages where run_id = %s and step = %s limit 1",
                    (run.run_id, step.name)).fetchone():
        return []
    bounds = [(i * n // sessions + 1, (i + 1) * n // sessions) for i in range(sessions)]
    wanted = sorted({b for pair in bounds for b in pair})
    found = dict(conn.execute(
        "select member_no, customer_id from ops.audience_members "
        "where run_id = %s and member_no = any(%s)", (run.run_id, wanted)).fetchall())
    if len(found) != len(wanted):
        return []
    return [(lo, hi, found[lo], found[hi]) for lo, hi in bounds]


def _plan_in_parts(campaign: Campaign, step: Step, at: datetime, members_sql: str,
                   params: dict, policy: Policy | None, run: RunInfo,
                   parts: list[tuple[int, int, str, str]], url: str | None,
                   tally: list) -> None:
    """A step's first plan with its parts side by side, each in a session and transaction
    of its own (one statement runs on one core). The caller's transaction holds the
    planning lock meanwhile, so no other plan counts caps in between, and the parts'
    customers are disjoint, so no part's caps read another part's rows. Each part commits
    on its own: when one fails, the step keeps the rows of the others and the error is
    raised; planning the step again (one session, `on conflict do nothing`) writes the
    rows that are missing, with the same ids, and nothing twice. `tally` gets the counts
    of all the parts."""
    from concurrent.futures import ThreadPoolExecutor

    def plan_part(part: tuple[int, int, str, str]) -> list:
        lo, hi, first, last = part
        rows: list = []
        with db.connect(url) as part_conn:
            plan_members(part_conn, campaign, step, at,
                         members_sql + " and m.member_no between %(part_lo)s and %(part_hi)s",
                         {**params, "part_lo": lo, "part_hi": hi}, policy,
                         run_id=run.run_id, members=run.audience_size, numbered=True,
                         tally=rows, part=(first, last))
            part_conn.commit()
        return rows[0]

    with ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="plan-part") as pool:
        futures = [pool.submit(plan_part, part) for part in parts]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]
    # counts_of adds up groups that repeat across the parts
    tally.append([row for future in futures for row in future.result()])


def quiet_not_before_sql(tz: str, at: str = "%(step_time)s") -> str:
    """SQL: when a message due at `at` (SQL, by default the step's time %(step_time)s) may
    go out in time zone `tz` (SQL): the end of the quiet hours (%(quiet_start)s to
    %(quiet_end)s, local) when that time falls inside them, else that time."""
    local = f"({at} at time zone {tz})"
    return f"""case
            when %(quiet_start)s::time > %(quiet_end)s::time
                 and ({local}::time >= %(quiet_start)s::time or {local}::time < %(quiet_end)s::time)
              then (({local}::date + case when {local}::time >= %(quiet_start)s::time then 1 else 0 end)
                    + %(quiet_end)s::time) at time zone {tz}
            when %(quiet_start)s::time < %(quiet_end)s::time
                 and {local}::time >= %(quiet_start)s::time and {local}::time < %(quiet_end)s::time
              then ({local}::date + %(quiet_end)s::time) at time zone {tz}
            else {at}
          end"""


def step_control_sql(customer: str) -> str:
    """SQL: true when the customer (SQL) is in the step's control arm: a hash of (campaign,
    step, customer) below the step's control share %(step_control)s."""
    key = f"%(campaign_id)s || ':' || %(step)s || ':control:' || {customer}"
    return f"({hash01(key)} < %(step_control)s)"


def _hour_of_week(local: str) -> str:
    return f"((extract(isodow from {local})::int - 1) * 24 + extract(hour from {local})::int)"


def optimal_time_sql(control: str) -> tuple[list[str], str]:
    """The lateral joins and the SQL of the time a `send_time: optimal` step's message is
    due: the next start of the member's preferred hour of the week (marts.customer_send_time,
    the chosen channel's row, else the customer's `any` row; in the zone it was learned in)
    at or after the step's time, when it comes within %(send_window)s; else the next start
    of the preferred hour of the day, when that does; else (or in the control arm, or
    without a preference) the step's time. A preferred hour that has begun counts from the
    step's time."""
    step_time = "%(step_time)s::timestamptz"
    # `%%`: the modulo operator in a statement with placeholders
    wk_hours = f"(((pr.how - {_hour_of_week('pr.local')}) %% 168 + 168) %% 168)"
    dy_hours = "(((pr.hod - extract(hour from pr.local)::int) %% 24 + 24) %% 24)"
    joins = [
        f"""cross join lateral (
            select pr0.*, {step_time} at time zone pr0.tz as local
            from (select coalesce(p.timezone, pa.timezone, z.name, %(default_tz)s) as tz,
                         coalesce(p.preferred_hour_of_week, pa.preferred_hour_of_week) as how,
                         coalesce(p.preferred_hour_of_day, pa.preferred_hour_of_day) as hod) pr0
          ) pr""",
        f"""cross join lateral (
            select greatest({step_time}, (date_trunc('hour', pr.local)
                     + make_interval(hours => {wk_hours})) at time zone pr.tz) as wk,
                   greatest({step_time}, (date_trunc('hour', pr.local)
                     + make_interval(hours => {dy_hours})) at time zone pr.tz) as dy
          ) cand""",
    ]
    at = f"""case when {control} or pr.how is null then {step_time}
                 when cand.wk < {step_time} + %(send_window)s then cand.wk
                 when cand.dy < {step_time} + %(send_window)s then cand.dy
                 else {step_time} end"""
    return joins, at


def plan_members(conn: psycopg.Connection, campaign: Campaign, step: Step, at: datetime,
                 members_sql: str, members_params: dict, policy: Policy | None = None,
                 run_id: str | None = None, members: int | None = None,
                 numbered: bool = False, tally: list | None = None,
                 part: tuple[str, str] | None = None) -> int:
    """The eligibility rules of the module docstring, set-wise, for any member source.

    `members_sql` selects (customer_id, variant, holdout_kind, run_id, run_as_of): the
    run's audience for a campaign, or the chain instances due for this step for a trigger
    chain (run_id = the chain instance). Message ids are (run_id, step, member number or
    customer), so planning again inserts nothing. Runs in the caller's transaction; returns rows written.
    `run_id`: the one run all members belong to (a campaign run), if so; `members`: how
    many members there are, if known. `numbered`: `members_sql` also selects `member_no`
    (with `run_id` given): rows of numbered members get the run's and step's prefixed ids
    (NUMBERED_ID_SQL), the others those of MESSAGE_ID_SQL. `tally`: a list that gets the
    step's counts (status, reason, channel, rows) when the statement wrote the step's first
    rows (then they are all its rows); otherwise it is left empty. `part`: (first, last
    customer id, "C" order) of one part of a step's first plan (plan_step's split, whose
    caller holds the planning lock, and of whose step no row exists yet): the members
    are those customers' and the subscriptions and caps are read for them only.

    One INSERT ... SELECT: the member source is inlined where it is read (so the planner
    sees its statistics), each member's channel comes from one ordered pass over the
    customers' subscriptions, the frequency caps from one aggregate of the ledger over the
    members' customers (minus each member's own rows of this step), and the quiet hours
    are worked out once per time zone.
    """
    policy = policy or load_policy()
    transactional = campaign.cap_class == "transactional"
    only_unengaged = step.only_unengaged and step.index > 0
    exit_on_purchase = "purchase" in campaign.exit_on
    # planning is serialised so that caps see the rows of a concurrent campaign (a part's
    # caller holds the lock for all the parts)
    if part is None:
        conn.execute("select pg_advisory_xact_lock(hashtext('retention.plan'))")
    params = dict(
        members_params, step=step.name, step_index=step.index, step_time=at,
        channels=list(step.channels), campaign_id=campaign.id,
        cap_class=campaign.cap_class, global_cap=policy.global_cap,
        global_window=timedelta(days=policy.global_cap_days), channel_cap=policy.channel_cap,
        channel_window=timedelta(days=policy.channel_cap_days),
        quiet_start=policy.quiet_start, quiet_end=policy.quiet_end,
        default_tz=policy.default_timezone, step_control=step.control,
        send_window=step.send_window,
    )
    optimal = step.send_time == "optimal"
    params.update(optimal=optimal, best_channel=step.best_channel)
    control = step_control_sql("m.customer_id")
    # the subscriptions and the ledger rows read are those of the members' customers;
    # when the members are most of the shop's customers, reading them all is cheaper
    # than a semi-join with the members (the members' own join keeps only theirs)
    subs_of_members = "and s.customer_id in (select customer_id from members)"
    caps_of_members = "x.customer_id in (select customer_id from members) and"
    if members is not None:
        customers = conn.execute("select reltuples from pg_class "
                                 "where oid = 'raw.customers'::regclass").fetchone()[0]
        if 0 < customers <= 2 * members:  # reltuples < 0: never analysed
            subs_of_members = caps_of_members = ""
    if part is not None:
        params.update(part_first=part[0], part_last=part[1])
        subs_of_members += (' and s.customer_id collate "C" '
                            'between %(part_first)s and %(part_last)s')
        caps_of_members += (' x.customer_id collate "C" '
                            'between %(part_first)s and %(part_last)s and')
    ctes = [f"members as not materialized ({members_sql})"]
    joins, keep = [], ""
    if only_unengaged:
        ctes.append("""reached as (
          select distinct x.run_id, x.customer_id from ops.messages x
          where x.run_id in (select run_id from members) and x.step_index < %(step_index)s
            and x.status in ('sent', 'planned', 'unknown')  -- planned: waiting for the morning
        )""")
        ctes.append("""engaged as (
          select distinct msg.run_id, msg.customer_id
          from ops.messages msg
          join ops.message_events ev on ev.message_id = msg.message_id
          where msg.run_id in (select run_id from members) and msg.step_index < %(step_index)s
            and ev.event_type in ('open', 'click') and ev.occurred_at <= %(step_time)s
        )""")
        keep = """and not ((m.run_id, m.customer_id) in (select run_id, customer_id from reached)
                     and (m.run_id, m.customer_id) in (select run_id, customer_id from engaged))"""
    exited = "false"
    if exit_on_purchase:
        offline_purchases = ""
        if _relation_exists(conn, "marts.ropo_purchases"):
            offline_purchases = """or exists (select 1 from marts.ropo_purchases rp
                where rp.customer_id = mb.customer_id
                  and rp.purchased_at > mb.run_as_of and rp.purchased_at <= %(step_time)s)"""
        ctes.append(f"""purchased as materialized (
          select mb.run_id, mb.customer_id from members mb
          where exists (select 1 from raw.orders o
                        where o.customer_id = mb.customer_id and o.status in ('paid', 'delivered')
                          and o.ordered_at > mb.run_as_of and o.ordered_at <= %(step_time)s)
          {offline_purchases}
        )""")
        # a join, not `in (select ...)`: the condition is read by both the status and
        # the reason, and a hashed subplan is probed once per read
        joins.append("left join purchased px on px.run_id = m.run_id "
                     "and px.customer_id = m.customer_id")
        exited = "px.customer_id is not null"
    # one row per customer with any subscription to the step's channels: the first live
    # address in the channel rule's order (the latest subscribed on that channel), if any.
    # Customers are grouped in byte order (the same groups, a cheaper sort than the
    # database's collation); the address, a tie-breaker, keeps the database's order.
    # `channel: best`: outside the step's control arm, the customer's best channel
    # (marts.customer_channel_engagement) goes before the rule's order
    best_first, best_join = "", ""
    if step.best_channel and _relation_exists(conn, "marts.customer_channel_engagement"):
        best_first = (f"case when s.channel = s.best and not {step_control_sql('s.customer_id')}"
                      " then 0 else 1 end,")
        best_join = """left join marts.customer_channel_engagement b
              on b.customer_id = s.customer_id and b.is_best"""
    ctes.append(f"""subs as (
          select distinct on (s.customer_id collate "C") s.customer_id,
                 case when s.live then s.channel end as channel,
                 case when s.live then s.address end as address
          from (
            select s.customer_id, s.channel, s.address, s.subscribed_at,
                   {'b.channel' if best_join else 'null::text'} as best,
                   coalesce(s.subscribed_at <= %(step_time)s, true)
                     and (s.unsubscribed_at is null or s.unsubscribed_at > %(step_time)s)
                     and cc.channel is null and d.channel is null as live
            from raw.channel_subscriptions s
            left join ops.consent_changes cc
              on cc.channel = s.channel and cc.address = s.address
             and cc.unsubscribed_at <= %(step_time)s
            left join ops.deactivated_addresses d
              on d.channel = s.channel and d.address = s.address
            {best_join}
            where s.channel = any(%(channels)s)
              {subs_of_members}
          ) s
          order by s.customer_id collate "C", s.live desc, {best_first}
                   array_position(%(channels)s::text[], s.channel),
                   s.subscribed_at desc nulls last, s.address
        )""")
    status_cases = [("m.holdout_kind is not null", "'holdout'", "m.holdout_kind || ' holdout'"),
                    (exited, "'suppressed'", "'exited: purchase'"),
                    ("a.channel is null", "'suppressed'", "'no consent'")]
    if not transactional:
        counted = ("x.status in ('planned', 'sent', 'unknown') and x.cap_class <> 'transactional'")
        g_window = ("coalesce(x.not_before, x.planned_at) > %(step_time)s - %(global_window)s "
                    "and x.planned_at < %(step_time)s + %(global_window)s")
        c_window = ("coalesce(x.not_before, x.planned_at) > %(step_time)s - %(channel_window)s "
                    "and x.planned_at < %(step_time)s + %(channel_window)s")
        per_channel = []
        for i, channel in enumerate(step.channels):
            params[f"cap_channel_{i}"] = channel
            per_channel.append(f"count(*) filter (where x.channel = %(cap_channel_{i})s "
                               f"and {c_window}) as c_{i}")
        counts = ", ".join([f"count(*) filter (where {g_window}) as g", *per_channel])
        # only customers whose count reaches a cap can be capped (the member's own rows of
        # the step are subtracted from it): the others are left out of the hash joined
        reaches = " or ".join(
            [f"count(*) filter (where {g_window}) >= %(global_cap)s",
             *(f"count(*) filter (where x.channel = %(cap_channel_{i})s and {c_window}) "
               ">= %(channel_cap)s" for i in range(len(step.channels)))])
        ctes.append(f"""caps as (
          select x.customer_id, {counts} from ops.messages x
          where {caps_of_members} {counted}
            and (({g_window}) or ({c_window}))
          group by x.customer_id
          having {reaches}
        )""")
        ctes.append(f"""own as (
          select x.run_id, x.customer_id, {counts} from ops.messages x
          where x.run_id in (select run_id from members) and x.step = %(step)s and {counted}
            and (({g_window}) or ({c_window}))
          group by x.run_id, x.customer_id
        )""")
        joins.append("left join caps k on k.customer_id = m.customer_id")
        joins.append("left join own o on o.run_id = m.run_id and o.customer_id = m.customer_id")
        channel_count = "case a.channel " + " ".join(
            f"when %(cap_channel_{i})s then coalesce(k.c_{i}, 0) - coalesce(o.c_{i}, 0)"
            for i in range(len(step.channels))) + " end"
        status_cases += [
            ("coalesce(k.g, 0) - coalesce(o.g, 0) >= %(global_cap)s", "'suppressed'",
             "'frequency cap: global'"),
            (f"{channel_count} >= %(channel_cap)s", "'suppressed'", "'frequency cap: channel'")]
        # the server's zone names (pg_timezone_names, read once per connection): a
        # customer's zone that is not one of them gets the default zone's hours
        params["zone_names"] = _zone_names(conn)
        ctes.append(f"""quiet as (
          select tz.name, {quiet_not_before_sql('tz.name')} as not_before
          from unnest(%(zone_names)s::text[]) as tz(name)
        )""")
        not_before = (f"coalesce(q.not_before, "
                      f"{quiet_not_before_sql('%(default_tz)s::text')})")
        # zone names are ASCII: byte order ("C") compares them as the database's
        # collation does, and sorts them cheaper if the planner merges the two
        joins.append('left join quiet q on q.name = cu.timezone collate "C"')
    else:
        not_before = "%(step_time)s"
    if optimal:
        # the member's preferred hour within the window, then still the quiet hours in
        # the customer's own zone; the control arm keeps the step's time as above
        params["zone_names"] = _zone_names(conn)
        joins.append("left join unnest(%(zone_names)s::text[]) as z(name) on z.name = cu.timezone")
        if _relation_exists(conn, "marts.customer_send_time"):
            joins.append("left join marts.customer_send_time p "
                         "on p.customer_id = m.customer_id and p.channel = a.channel")
            joins.append("left join marts.customer_send_time pa "
                         "on pa.customer_id = m.customer_id and pa.channel = 'any'")
        else:
            joins.append("cross join (select null::text as timezone, "
                         "null::int as preferred_hour_of_week, "
                         "null::int as preferred_hour_of_day) p "
                         "cross join (select null::text as timezone, "
                         "null::int as preferred_hour_of_week, "
                         "null::int as preferred_hour_of_day) pa")
        lateral, at = optimal_time_sql(control)
        joins += lateral
        joins.append(f"cross join lateral (select {at} as at) due")
        released = ("due.at" if transactional else
                    quiet_not_before_sql("coalesce(z.name, %(default_tz)s::text)", "due.at"))
        not_before = f"case when {control} then {not_before} else {released} end"
    member_arm = f"case when m.holdout_kind is null then {control} end"
    # one big statement: sorts and hashes in memory, no JIT compilation (it costs more
    # than it saves here), and no merge joins (the planner, not knowing how few distinct
    # zones the quiet hours have, sorted all members by time zone to merge them in);
    # the caller's own settings come back after it
    saved = conn.execute("select current_setting('work_mem'), current_setting('jit'), "
                         "current_setting('enable_mergejoin')").fetchone()
    conn.execute("select set_config('work_mem', %s, true), set_config('jit', 'off', true), "
                 "set_config('enable_mergejoin', 'off', true)", (PLAN_WORK_MEM,))
    status = ("case " + " ".join(f"when {cond} then {st}" for cond, st, _ in status_cases)
              + " else 'planned' end")
    reason = "case " + " ".join(f"when {cond} then {why}" for cond, _, why in status_cases) + " end"
    # a step of a run with no ledger rows yet can conflict with none (its message ids are
    # the run's and the step's; planners hold the lock above): a plain INSERT, without ON
    # CONFLICT's arbitration per row. Planning again, or chains, keep `do nothing`.
    conflict, planned_id = "on conflict (message_id) do nothing", None
    if part is not None:
        conflict = ""
    elif run_id is not None:
        planned = conn.execute("select message_id from ops.messages where run_id = %s "
                               "and step = %s limit 1", (run_id, step.name)).fetchone()
        if planned is None:
            conflict = ""
        else:
            planned_id = planned[0]
    # `offset 0` keeps the decisions a subquery of their own, worked out once per member
    # (flattened into the select list, the status would be evaluated again for each of
    # its three reads); the rows go in by customer (byte order), the order of the
    # ledger's customer index and, for numbered members, of their message ids
    message_id = MESSAGE_ID_SQL.format(run_id="d.run_id", customer="d.customer_id")
    member_no, order = "", 'd.customer_id collate "C"'
    prefix = message_id_prefix(run_id, step.name) if run_id is not None else ""
    # a step planned before, with ids not of the numbered kind (by code that did not number
    # the members), is planned again with the ids it got then
    if numbered and run_id is not None and (planned_id is None
                                            or planned_id.startswith(prefix)):
        params["id_prefix"] = prefix
        numbered_id = NUMBERED_ID_SQL.format(member_no="d.member_no")
        message_id = f"case when d.member_no is null then {message_id} else {numbered_id} end"
        # numbered in the customers' byte order: the same order, an integer sort
        member_no, order = ", m.member_no", f"d.member_no, {order}"
    insert = "insert"
    counted_rows = tally is not None and not conflict
    if counted_rows:
        # every row of the step is written by this statement: its counts come from the
        # rows written instead of a second read of them
        insert = "written as (insert"
    cur = conn.execute(f"""
        with {(','+chr(10)+'        ').join(ctes)}{',' if counted_rows else ''}
        {insert} into ops.messages (message_id, campaign_id, run_id, step, channel, customer_id,
            variant, status, reason, planned_at, step_index, cap_class, address, not_before,
            send_time_arm, channel_arm)
        select {message_id},
               %(campaign_id)s, d.run_id, %(step)s,
               coalesce(d.channel, (%(channels)s::text[])[1]), d.customer_id,
               d.variant, d.status, d.reason, %(step_time)s, %(step_index)s, %(cap_class)s,
               case when d.status = 'planned' then d.address end,
               case when d.status = 'planned' then d.not_before end,
               case when %(optimal)s then case d.in_control when true then 'default'
                                                            when false then 'optimal' end end,
               case when %(best_channel)s then case d.in_control when true then 'default'
                                                                 when false then 'best' end end
        from (
          select m.run_id, m.customer_id, m.variant, a.channel, a.address{member_no},
                 {status} as status, {reason} as reason, {not_before} as not_before,
                 {member_arm if step.has_control_arm else 'null::boolean'} as in_control
          from members m
          join raw.customers cu on cu.customer_id = m.customer_id
          left join subs a on a.customer_id = m.customer_id
          {chr(10).join(joins)}
          where ((m.holdout_kind is not null and %(step_index)s = 0)
                 or (m.holdout_kind is null and a.customer_id is not null))
            {keep}
          offset 0
        ) d
        order by {order}
        {conflict}
        {"returning status, reason, channel) select status, coalesce(reason, ''), channel, "
          "count(*) from written group by 1, 2, 3"
         if counted_rows else ""}
    """, params)
    if counted_rows:
        rows = cur.fetchall()
        tally.append(rows)
        written = sum(r[3] for r in rows)
    else:
        written = cur.rowcount
    conn.execute("select set_config('work_mem', %s, true), set_config('jit', %s, true), "
                 "set_config('enable_mergejoin', %s, true)", saved)
    return written


def step_counts(run_id: str, step: str, url: str | None = None) -> dict:
    """Audience, sent, failed, unknown, holdout, planned (waiting) and suppressed by reason."""
    with db.connect(url) as conn:
        rows = conn.execute(
            "select status, coalesce(reason, ''), channel, count(*) from ops.messages "
            "where run_id = %s and step = %s group by 1, 2, 3", (run_id, step)).fetchall()
    return counts_of(rows)


def counts_of(rows: Sequence[tuple]) -> dict:
    """step_counts' dict from (status, reason or '', channel, rows) groups."""
    counts: dict = {"audience": 0, "planned": 0, "sent": 0, "failed": 0, "holdout": 0,
                    "unknown": 0, "suppressed": 0, "suppressed_by_reason": {}, "failed_by_reason": {},
                    "channels": {}}
    for status, reason, channel, n in rows:
        counts["audience"] += n
        counts[status] += n
        if status == "suppressed":
            counts["suppressed_by_reason"][reason] = counts["suppressed_by_reason"].get(reason, 0) + n
        if status == "failed":
            key = reason.split(":")[0]
            counts["failed_by_reason"][key] = counts["failed_by_reason"].get(key, 0) + n
        if status in ("sent", "planned"):
            counts["channels"][channel] = counts["channels"].get(channel, 0) + n
    return counts
