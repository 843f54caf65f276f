"""One run of the triggers (every 15 minutes) or of the re-engagement sequence (daily).

A run is keyed by its data interval (start, end]; `end` is the as_of of everything it
decides, never the wall clock. In order:

1. exits: active chains whose customer purchased, did what the chain asks, or
   unsubscribed by `end` end now (before anything else can extend or plan them);
2. detection, per trigger: the moments in (scan_from, end], where scan_from is the
   interval start, or the watermark when runs were missed, minus the lateness, found by
   the campaign file's definition (`entry:`, triggers.definitions) or else the trigger's
   code (triggers.detect); new moments start or extend chains (`ops.trigger_hits` makes
   old ones no-ops); health. The events the event entries scan (each its scan range
   shifted back by its wait) are copied once into a temp table that every event entry
   reads, rather than each trigger reading them from raw.events; unless clauses and
   lookbacks, which reach other times, read raw.events;
3. exits again (a chain just started may already be void), then every due step is
   planned through the campaign engine in the triggers' priority order, so the first
   chain due for a customer takes the shared frequency cap first;
4. sending, when channels are given: every planned message of the chains' steps whose
   quiet hours are over by `end`, exactly once (campaigns.dispatch).

Re-running an interval finds every moment already recorded and every step already
advanced: it plans and sends nothing new.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from time import perf_counter

import psycopg

from retention import db
from retention.campaigns.dispatch import OnPoint
from retention.campaigns.engine import as_utc
from retention.campaigns.policy import Policy, load_policy
from retention.campaigns.spec import Campaign, CampaignError, Step, load_campaign
from retention.ingest.contract import CHANNELS
from retention.triggers.chains import (apply_exits, campaigns_with_active_chains, plan_due_steps,
                                       record_hits, step_report)
from retention.triggers.config import REENGAGEMENT, TRIGGERS, TriggerSettings, load_settings
from retention.triggers.definitions import OPTIONAL_COLUMNS, compile_definition, window_value
from retention.triggers.detect import DETECTORS, Detector
from retention.triggers.health import record_health
from retention.triggers.norms import cohort_norms, nudge_days
from retention.triggers.state import ensure_trigger_tables


#: how many customers who entered a trigger the report names
SAMPLE_CUSTOMERS = 5

#: the points of a run at which `on_point` is called: every trigger's moments recorded
#: (committed) and no step planned yet; one flow's due steps planned
POINTS = ("triggers.after_detect", "triggers.after_plan")


class LazyChannels(Mapping):
    """Channel clients built on first use, so a shop without, say, a Viber connection
    only fails if a Viber message is actually due. `factory(name)` builds one."""

    def __init__(self, factory: Callable[[str], object], names: Sequence[str] = CHANNELS) -> None:
        self._factory, self._names, self._built = factory, tuple(names), {}

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(name)
        if name not in self._built:
            self._built[name] = self._factory(name)
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _has(conn: psycopg.Connection, relation: str) -> bool:
    return conn.execute("select to_regclass(%s) is not null", (relation,)).fetchone()[0]


def _scan_from(conn: psycopg.Connection, trigger: str, start: datetime,
               settings: TriggerSettings) -> datetime:
    row = conn.execute("select scanned_until from ops.trigger_watermarks where trigger = %s",
                       (trigger,)).fetchone()
    since = start
    if row and row[0] < start:
        since = max(row[0], start - settings.max_catchup)
    return since - settings.lateness


#: the run's copy of the events its event entries scan (a temp table of the session)
INTERVAL_EVENTS = "trg_interval_events"


def _entry_wait(campaign: Campaign, settings: TriggerSettings) -> timedelta:
    """The wait of the campaign's definition: its entry events are those in the scan
    range shifted back by it."""
    return window_value(campaign.definition.wait or "0s", settings)


def _merged(ranges: Sequence[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """The union of the ranges (lo, hi] as disjoint ranges, in order."""
    out: list[list[datetime]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def materialise_interval_events(conn: psycopg.Connection,
                                ranges: Sequence[tuple[datetime, datetime]]) -> int:
    """Copy the events of known customers in the union of the ranges (lo, hi] into the
    temp table INTERVAL_EVENTS (indexed by type and time, analysed) and commit; the
    run's event entries read it instead of raw.events, so the events of the interval are
    read once per run, not once per trigger. Returns the rows copied."""
    conn.execute(f"drop table if exists {INTERVAL_EVENTS}")
    conn.execute(f"create temp table {INTERVAL_EVENTS} (like raw.events)")
    rows = 0
    for lo, hi in _merged(ranges):
        rows += conn.execute(f"""
            insert into {INTERVAL_EVENTS} select * from raw.events
            where occurred_at > %s and occurred_at <= %s and customer_id is not null""",
                             (lo, hi)).rowcount
    conn.execute(f"create index on {INTERVAL_EVENTS} (event_type, occurred_at)")
    conn.execute(f"analyze {INTERVAL_EVENTS}")
    conn.commit()
    return rows


def _norm_params(conn: psycopg.Connection, trigger: str, end: datetime,
                 settings: TriggerSettings, cache: dict) -> dict:
    if "norms" not in cache:
        cache["norms"] = cohort_norms(conn, end, settings)
    norms, default, source = cache["norms"]
    if trigger == "second_purchase_nudge":
        return {"norms": {m: nudge_days(v, settings) for m, v in norms.items()},
                "default_days": nudge_days(default, settings), "norm_source": source}
    return {"norms": norms, "default_days": default, "norm_source": source}


def _detect(conn: psycopg.Connection, name: str, campaign: Campaign, start: datetime,
            end: datetime, settings: TriggerSettings, policy: Policy, has_ropo: bool,
            cache: dict, scan_from: datetime, entry_events: str = "raw.events") -> dict:
    if campaign.definition is not None:
        detector = definition_detector(conn, name, campaign, settings, has_ropo,
                                       entry_events=entry_events)
        sql, params = detector.build(settings, has_ropo)
    else:
        detector = DETECTORS[name]
        sql, params = detector.build(settings, has_ropo)
    params = dict(params, lo=scan_from, hi=end)
    if detector.needs_norms:
        extra = _norm_params(conn, name, end, settings, cache)
        from psycopg.types.json import Jsonb

        params.update(norms=Jsonb(extra["norms"]), default_days=extra["default_days"])
    counts = record_hits(conn, name, campaign, sql, params, end, policy,
                         merge_products=detector.merge_products)
    # who entered: the customers of the new moments (the table lives until the commit)
    entered = [r[0] for r in conn.execute(
        "select customer_id from trg_new_hits group by customer_id "
        "order by min(hit_at), customer_id limit %s", (SAMPLE_CUSTOMERS,)).fetchall()]
    customers = conn.execute("select count(distinct customer_id) from trg_new_hits").fetchone()[0]
    conn.execute("""
        insert into ops.trigger_watermarks (trigger, scanned_until) values (%s, %s)
        on conflict (trigger) do update
          set scanned_until = greatest(ops.trigger_watermarks.scanned_until, excluded.scanned_until)
    """, (name, end))
    source_rows = conn.execute(detector.source_sql, dict(detector.source_params, start=start,
                                                         end=end)).fetchone()[0]
    health = record_health(conn, name, start, end, source_rows, settings)
    conn.commit()
    return {"scanned_from": scan_from.isoformat(), "new_moments": counts["hits"],
            "started": health["started"], "extended": health["extended"],
            "source_rows": source_rows, "expected": health["expected"],
            "flagged": health["flagged"], "note": health["note"],
            "customers": customers, "customers_sample": entered,
            "source": "definition" if campaign.definition is not None else "code"}


def definition_detector(conn: psycopg.Connection, name: str, campaign: Campaign,
                        settings: TriggerSettings, has_ropo: bool,
                        entry_events: str = "raw.events") -> Detector:
    """The campaign's definition compiled for this database (its optional columns and
    published tables), in the shape of a code Detector; an event entry reads its events
    from `entry_events` (compile_definition)."""
    columns = {key for key, (schema, table, column) in OPTIONAL_COLUMNS.items()
               if conn.execute("select 1 from information_schema.columns where table_schema = %s "
                               "and table_name = %s and column_name = %s",
                               (schema, table, column)).fetchone()}
    relations = {r for r in ("marts.customer_lifetime", "marts.customer_category_affinity",
                             "marts.customer_predicted_value", "marts.customer_stage_history",
                             "marts.ropo_purchases") if _has(conn, r)}
    compiled = compile_definition(campaign.definition, name, settings, has_ropo, columns,
                                  relations, entry_events=entry_events)
    return Detector(name, lambda s, r: (compiled.sql, compiled.params), compiled.source_sql,
                    merge_products=compiled.merge_products, source_params=compiled.source_params)


def _analyze_if_grown(conn: psycopg.Connection, added: int,
                      table: str = "ops.chain_instances") -> bool:
    """Analyse the table when the rows just added are a tenth or more of what its
    statistics know (True if it did): planning reads the due chains by id and the
    ledger rows of their customers, and statistics of a table that was (nearly) empty
    make the planner nest loops over all of them."""
    known = conn.execute("select reltuples from pg_class where oid = %s::regclass",
                         (table,)).fetchone()[0]
    if known < 0 or added >= 0.1 * known:
        conn.execute(f"analyze {table}")
        conn.commit()
        return True
    return False


def definition_triggers(directory=None) -> list[str]:
    """The campaign files with a trigger definition that are not one of the code
    triggers (TRIGGERS): they run after those, by file name."""
    from retention.campaigns.spec import load_all

    return [n for n, c in load_all(directory).items()
            if c.definition is not None and n not in TRIGGERS and n != REENGAGEMENT]


def _send(campaigns: Sequence[Campaign], end: datetime, channels, url: str | None,
          on_point: OnPoint | None) -> dict:
    from retention.campaigns.dispatch import dispatch
    from retention.triggers.recommend import chain_context

    sent: dict = {}
    with db.connect(url) as conn:
        due = conn.execute("""
            select distinct campaign_id, step from ops.messages
            where campaign_id = any(%s)
              and ((status = 'planned' and (claim_token is not null or not_before <= %s))
                   or (status = 'unknown' and settle_after is not null))""",
            ([c.id for c in campaigns], end)).fetchall()
    due = set(due)
    for campaign in campaigns:
        for step in campaign.steps:
            if (campaign.id, step.name) not in due:
                continue
            sent[f"{campaign.id}.{step.name}"] = dispatch(
                campaign, step.name, channels, {"campaign_id": campaign.id, "step": step.name},
                end, url=url, extra_context=chain_context, on_point=on_point)
    return sent


def _run(names: Sequence[str], start: datetime, end: datetime, url: str | None, channels,
         policy: Policy | None, settings: TriggerSettings | None,
         campaigns: Mapping[str, Campaign] | None, lock: str,
         channel_orders=None, release_also: Sequence[str] = (),
         on_point: OnPoint | None = None) -> dict:
    start, end = as_utc(start), as_utc(end)
    if end <= start:
        raise ValueError(f"empty interval: {start.isoformat()} .. {end.isoformat()}")
    settings = settings or load_settings()
    policy = policy or load_policy()
    loaded = {n: (campaigns or {}).get(n) or load_campaign(n) for n in names}
    result: dict = {"flow": "re-engagement" if names == [REENGAGEMENT] else "triggers",
                    "interval_start": start.isoformat(), "interval_end": end.isoformat(),
                    "triggers": {}, "exits": {}, "steps": {}, "sent": channels is not None}
    with db.connect(url) as conn:
        # many small lookups whose row estimates can look huge: compiling them with JIT
        # costs far more (~0.5 s each) than running them
        conn.execute("set jit = off")
        ensure_trigger_tables(conn)
        conn.commit()
        # one run at a time per flow (the DAG has max_active_runs=1; the CLI may overlap it)
        conn.execute("select pg_advisory_lock(hashtext(%s))", (lock,))
        try:
            has_ropo = _has(conn, "marts.ropo_purchases")
            exits: dict[str, dict[str, int]] = {n: {} for n in names}

            def exit_pass() -> None:
                active = campaigns_with_active_chains(conn, [loaded[n].id for n in names], end)
                for n in names:
                    if loaded[n].id not in active:
                        continue
                    for reason, k in apply_exits(conn, loaded[n], end, has_ropo).items():
                        exits[n][reason] = exits[n].get(reason, 0) + k
                conn.commit()

            seconds = result["seconds"] = {}
            clock = perf_counter()
            exit_pass()
            seconds["exits"] = perf_counter() - clock
            cache: dict = {}
            clock = perf_counter()
            scan_from = {n: _scan_from(conn, n, start, settings) for n in names}
            # the entry scans of the event definitions, (scan_from - wait, end - wait]
            entries = {n: (scan_from[n] - w, end - w) for n in names
                       if loaded[n].definition is not None and loaded[n].definition.kind == "event"
                       for w in (_entry_wait(loaded[n], settings),)}
            events = "raw.events"
            if len(entries) > 1:
                result["interval_events"] = materialise_interval_events(conn, list(entries.values()))
                events = INTERVAL_EVENTS
            seconds["interval_events"] = perf_counter() - clock
            clock = perf_counter()
            for n in names:
                began = perf_counter()
                result["triggers"][n] = _detect(conn, n, loaded[n], start, end, settings, policy,
                                                has_ropo, cache, scan_from[n],
                                                events if n in entries else "raw.events")
                result["triggers"][n]["seconds"] = perf_counter() - began
            seconds["detect"] = perf_counter() - clock
            if any(t["started"] for t in result["triggers"].values()):
                _analyze_if_grown(conn, sum(t["started"] for t in result["triggers"].values()))
            if "norms" in cache:
                result["cohort_norm_source"] = cache["norms"][2]
            if on_point is not None:
                on_point("triggers.after_detect", None)
            clock = perf_counter()
            exit_pass()
            seconds["exits"] += perf_counter() - clock
            clock = perf_counter()
            due: dict[str, dict[str, int]] = {}
            planned = 0  # ledger rows (about one per due chain) since ops.messages was analysed
            for n in names:
                due[n] = plan_due_steps(conn, loaded[n], end, policy,
                                        channel_orders=channel_orders)
                planned += sum(due[n].values())
                if planned and _analyze_if_grown(conn, planned, "ops.messages"):
                    planned = 0
                if on_point is not None:
                    on_point("triggers.after_plan", None)
            seconds["plan"] = perf_counter() - clock
            result["exits"] = exits
        finally:
            conn.rollback()
            conn.execute(f"drop table if exists {INTERVAL_EVENTS}")
            conn.execute("select pg_advisory_unlock(hashtext(%s))", (lock,))
            conn.commit()
    if channels is not None:
        senders = [loaded[n] for n in names]
        if release_also:
            # messages of other flows that waited for the customer's morning go out with
            # the next 15-minute run, not the next day's
            senders += [load_campaign(n) for n in release_also if n not in loaded]
        result["dispatch"] = _send(senders, end, channels, url, on_point)
    with db.connect(url) as conn:
        report = step_report(conn, [loaded[n] for n in names], end)
    for n in names:
        for step_name, counts in report[loaded[n].id].items():
            counts["due"] = due[n].get(step_name, 0)
        result["steps"][n] = report[loaded[n].id]
    return result


def run_triggers(interval_start: datetime, interval_end: datetime, url: str | None = None,
                 channels: Mapping | None = None, *, policy: Policy | None = None,
                 settings: TriggerSettings | None = None,
                 triggers: Sequence[str] | None = None,
                 campaigns: Mapping[str, Campaign] | None = None,
                 on_point: OnPoint | None = None) -> dict:
    """One run of every trigger and lifecycle flow over (interval_start, interval_end].

    Without `channels` the run plans (ledger rows) and does not send; with them it also
    releases re-engagement messages whose quiet hours ended. Returns, per
    trigger, the moments found and chains started / extended / exited with the health
    verdict, and per chain step the messages planned at interval_end by status.

    `on_point(point, None)` is called at each of `POINTS` (and passed to the dispatch,
    `retention.campaigns.dispatch.OnPoint`).
    """
    settings = settings or load_settings()
    names = list(triggers or [*settings.priority, *definition_triggers()])

    def defined(n: str) -> bool:
        if campaigns and n in campaigns:
            return campaigns[n].definition is not None
        try:
            return load_campaign(n).definition is not None
        except CampaignError:
            return False

    unknown = [n for n in names if n == REENGAGEMENT or (n not in DETECTORS and not defined(n))]
    if unknown:
        raise ValueError(f"unknown trigger(s): {', '.join(unknown)}")
    return _run(names, interval_start, interval_end, url, channels, policy, settings, campaigns,
                "retention.triggers", release_also=() if triggers else (REENGAGEMENT,),
                on_point=on_point)


def channel_orders_by_engagement(conn: psycopg.Connection, chain_ids: Sequence[str], step: Step,
                                 at: datetime) -> dict[tuple[str, ...], list[str]]:
    """Split chains by their customer's channel order: the channels the customer has,
    the one with most opens and clicks (up to `at`) first, ties in the step's order."""
    rows = conn.execute("""
        with members as (
          select chain_id, customer_id from ops.chain_instances where chain_id = any(%(ids)s)
        ), has as (
          select distinct s.customer_id, s.channel from raw.channel_subscriptions s
          where s.customer_id in (select customer_id from members) and s.channel = any(%(order)s)
        ), engagement as (
          select msg.customer_id, msg.channel, count(*) as n
          from ops.messages msg join ops.message_events ev on ev.message_id = msg.message_id
          where msg.customer_id in (select customer_id from members)
            and ev.event_type in ('open', 'click') and ev.occurred_at <= %(at)s
          group by 1, 2
        )
        select m.chain_id,
               array_agg(h.channel order by coalesce(e.n, 0) desc,
                                            array_position(%(order)s::text[], h.channel))
                 filter (where h.channel is not null)
        from members m
        left join has h on h.customer_id = m.customer_id
        left join engagement e on e.customer_id = h.customer_id and e.channel = h.channel
        group by m.chain_id
    """, {"ids": list(chain_ids), "order": list(step.channels), "at": at}).fetchall()
    groups: dict[tuple[str, ...], list[str]] = {}
    for chain_id, order in rows:
        groups.setdefault(tuple(order) if order else step.channels, []).append(chain_id)
    return groups


def run_reengagement(as_of: datetime, url: str | None = None, channels: Mapping | None = None,
                     *, policy: Policy | None = None, settings: TriggerSettings | None = None,
                     campaign: Campaign | None = None, on_point: OnPoint | None = None) -> dict:
    """The daily re-engagement run over (as_of - 1 day, as_of]: lapsed customers enter
    (reminder, then a personal offer with an expiring code, then a feedback request),
    each step on the channel where the customer engaged most. `on_point` as for
    `run_triggers`."""
    as_of = as_utc(as_of)
    return _run([REENGAGEMENT], as_of - timedelta(days=1), as_of, url, channels, policy,
                settings, {REENGAGEMENT: campaign} if campaign else None,
                "retention.reengagement", channel_orders=channel_orders_by_engagement,
                on_point=on_point)


def format_report(result: dict) -> str:
    """The run as a table: per trigger, then per chain step."""
    lines = [f"{result.get('flow', 'triggers')} over {result['interval_start']} .. "
             f"{result['interval_end']}"
             + ("" if result.get("sent") else " (planned only, not sent)")]
    lines.append(f"  {'trigger':<24}{'source':>9}{'moments':>9}{'started':>9}{'extended':>10}"
                 f"{'exited':>8}{'norm':>8}  health")
    for name, t in result["triggers"].items():
        exited = sum(result["exits"].get(name, {}).values())
        norm = "-" if t["expected"] is None else f"{t['expected']:.1f}"
        lines.append(f"  {name:<24}{t['source_rows']:>9,}{t['new_moments']:>9,}{t['started']:>9,}"
                     f"{t['extended']:>10,}{exited:>8,}{norm:>8}  "
                     + ("FLAGGED: " + t["note"] if t["flagged"] else "ok"))
    for name, t in result["triggers"].items():
        sample = t.get("customers_sample") or []
        if sample:
            more = t["customers"] - len(sample)
            lines.append(f"  entered {name} ({t.get('source', 'code')}): {t['customers']:,} "
                         f"customer(s): {', '.join(sample)}" + (f" and {more:,} more" if more else ""))
    lines.append(f"  {'chain step':<36}{'due':>6}{'planned':>9}{'sent':>7}{'failed':>8}"
                 f"{'unknown':>9}{'holdout':>9}{'suppressed':>12}  by reason")
    for name, steps in result["steps"].items():
        for step, c in steps.items():
            if not (c["due"] or c["messages"]):
                continue
            reasons = ", ".join(f"{k}: {v:,}" for k, v in sorted(c["suppressed_by_reason"].items()))
            lines.append(f"  {name + '.' + step:<36}{c['due']:>6,}{c['planned']:>9,}{c['sent']:>7,}"
                         f"{c['failed']:>8,}{c['unknown']:>9,}{c['holdout']:>9,}"
                         f"{c['suppressed']:>12,}  {reasons}")
    exits = {f"{n}: {r}": k for n, rs in result["exits"].items() for r, k in rs.items()}
    if exits:
        lines.append("  exits: " + ", ".join(f"{k} {v:,}" for k, v in sorted(exits.items())))
    return "\n".join(lines)
