"""The durable state of trigger chains, in schema `ops`.

* `ops.chain_instances`: one row per chain instance (a campaign of the engine run for one
  customer and one subject: a cart, a product, a category, a search, an order). Its id is
  deterministic (trigger, customer, subject, start), it is the `run_id` of every message
  it plans, so message ids (chain, step, customer) are the same on every re-run. At most
  one instance per (trigger, customer, subject) is `active` (a partial unique index).
* `ops.trigger_hits`: every trigger moment that started or extended a chain, keyed by
  (trigger, customer, event key): a re-run, a restart or an overlapping late-event scan
  finds the key and does nothing. Moments that started nothing are not recorded: they
  are re-evaluated by later scans, so a late event can still change their outcome.
* `ops.trigger_watermarks`: per trigger, the end of the last interval scanned; the next
  scan starts at the earlier of its interval start and the watermark (minus lateness),
  so a run that never happened (scheduler down, catchup off) leaves no gap.
* `ops.trigger_health`: per trigger and run, chains started and extended, the norm of
  recent runs, and a flag when the count falls far below it.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import psycopg

from retention.campaigns.ledger import ensure_ledger

TRIGGER_DDL = """
create schema if not exists ops;

create table if not exists ops.chain_instances (
  chain_id text primary key,
  trigger text not null,
  campaign_id text not null,
  customer_id text not null,
  subject text not null,
  status text not null check (status in ('active', 'completed', 'exited')),
  started_at timestamptz not null,      -- the trigger moment (e.g. cart + window)
  anchor_at timestamptz not null,       -- the latest subject event; exits count after it
  next_step integer,                    -- index of the next step; null when ended
  next_step_at timestamptz,
  variant text not null,
  holdout_kind text,
  context jsonb not null default '{}'::jsonb,
  extensions integer not null default 0,
  exit_reason text,
  ended_at timestamptz,
  created_by_run timestamptz not null,  -- interval end of the run that started it
  updated_at timestamptz not null
);
create unique index if not exists chain_instances_one_active
  on ops.chain_instances (trigger, customer_id, subject) where status = 'active';
create index if not exists chain_instances_due
  on ops.chain_instances (campaign_id, next_step, next_step_at) where status = 'active';
create index if not exists chain_instances_customer on ops.chain_instances (customer_id);

create table if not exists ops.trigger_hits (
  trigger text not null,
  customer_id text not null,
  event_key text not null,
  subject text not null,
  hit_at timestamptz not null,
  anchor_at timestamptz not null,
  chain_id text not null,
  outcome text not null check (outcome in ('started', 'extended')),
  run_end timestamptz not null,
  primary key (trigger, customer_id, event_key)
);
create index if not exists trigger_hits_run on ops.trigger_hits (trigger, run_end);
create index if not exists trigger_hits_chain on ops.trigger_hits (chain_id);

create table if not exists ops.trigger_watermarks (
  trigger text primary key,
  scanned_until timestamptz not null
);

create table if not exists ops.trigger_health (
  trigger text not null,
  interval_start timestamptz not null,
  interval_end timestamptz not null,
  source_rows bigint,
  started integer not null,
  extended integer not null,
  expected double precision,
  history_runs integer not null,
  flagged boolean not null,
  note text,
  primary key (trigger, interval_end)
);
"""

#: The lookups the detection SQL makes on raw tables. Additive: raw tables are the
#: loader's; these only speed up per-customer time-range lookups.
RAW_INDEXES = """
create index if not exists trg_events_customer_time on raw.events (customer_id, occurred_at);
create index if not exists trg_events_time on raw.events (occurred_at);
create index if not exists trg_events_product_time on raw.events (product_id, occurred_at);
create index if not exists trg_orders_customer_time on raw.orders (customer_id, ordered_at);
create index if not exists trg_orders_time on raw.orders (ordered_at);
create index if not exists trg_product_changes_time on raw.product_changes (changed_at);
create index if not exists trg_subscriptions_time on raw.channel_subscriptions (subscribed_at);
"""


def ensure_trigger_tables(conn: psycopg.Connection) -> None:
    """Create the chain tables (and the ledger) if missing. Safe on every run."""
    present = conn.execute("select to_regclass('ops.trigger_health') is not null "
                           "and to_regclass('ops.messages') is not null "
                           "and to_regclass('raw.trg_subscriptions_time') is not null").fetchone()[0]
    if present:
        return
    ensure_ledger(conn)
    conn.execute("select pg_advisory_xact_lock(hashtext('retention.ensure_triggers'))")
    conn.execute(TRIGGER_DDL)
    conn.execute(RAW_INDEXES)


def chain_id_for(trigger: str, customer_id: str, subject: str, started_at: datetime) -> str:
    """Deterministic chain id; the SQL twin is CHAIN_ID_SQL."""
    stamp = started_at.isoformat()
    digest = hashlib.sha256(f"{trigger}|{customer_id}|{subject}|{stamp}".encode()).hexdigest()
    return f"ch_{digest[:24]}"


#: SQL of chain_id_for, over columns trigger, customer_id, subject and a timestamptz
#: (rendered in UTC as Python's isoformat() would: 2026-11-02T07:00:00+00:00).
CHAIN_ID_SQL = ("'ch_' || left(encode(sha256(convert_to({trigger} || '|' || {customer} || '|' "
                "|| {subject} || '|' || to_char({started} at time zone 'UTC', "
                "'YYYY-MM-DD\"T\"HH24:MI:SS') || "
                "case when mod(extract(microseconds from {started})::bigint, 1000000) <> 0 "
                "then '.' || to_char({started} at time zone 'UTC', 'US') else '' end "
                "|| '+00:00', 'UTF8')), 'hex'), 24)")
