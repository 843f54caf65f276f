"""The ledger: `ops.messages` (CONTRACT.md section 5) and the state around it.

`ops.messages` is the single truth of what was decided and sent. Ids are deterministic
(campaign, run, step, customer), so a re-run plans the same ids and `on conflict do
nothing` keeps the first decision. Sending claims rows (claim_token; the claim itself, its
owner, lease and whether its request went out, is a row of `ops.claims`) before the
provider call and records the outcome after it, only where its own claim still holds. A claim whose lease
expired and whose owner is gone is settled by the next pass (see dispatch.py), so a
message is never sent twice. `unknown`: the request went out and no answer came; never
resent automatically, counted against the caps like a sent message.

Contract columns come first; the rest are extensions (CONTRACT.md allows more columns).
"""

from __future__ import annotations

import hashlib

import psycopg

LEDGER_DDL = """
create schema if not exists ops;

create table if not exists ops.campaign_runs (
  run_id text primary key,
  campaign_id text not null,
  as_of timestamptz not null,
  spec_hash text not null,
  spec jsonb not null,
  audience_size integer not null,
  holdout_size integer not null,
  created_at timestamptz not null
);

create table if not exists ops.audience_members (
  run_id text not null references ops.campaign_runs (run_id),
  customer_id text not null,
  variant text not null,
  holdout_kind text,
  primary key (run_id, customer_id)
);

create table if not exists ops.messages (
  message_id text primary key,
  campaign_id text not null,
  run_id text not null,
  step text not null,
  channel text not null,
  customer_id text not null,
  variant text not null,
  status text not null constraint messages_status_check
    check (status in ('planned', 'sent', 'failed', 'suppressed', 'holdout', 'unknown')),
  reason text,
  provider_message_id text,
  planned_at timestamptz not null,
  sent_at timestamptz,
  -- extensions
  step_index integer not null default 0,
  cap_class text not null default 'promo',
  address text,
  not_before timestamptz,
  claim_token text,
  claimed_at timestamptz,
  attempts integer not null default 0,
  subject_key text,
  settle_after timestamptz
);
-- ledgers made before the unknown status
alter table ops.messages add column if not exists settle_after timestamptz;
do $$
begin
  if not exists (select 1 from pg_constraint
                 where conrelid = 'ops.messages'::regclass and conname = 'messages_status_check'
                   and pg_get_constraintdef(oid) like '%unknown%') then
    alter table ops.messages drop constraint if exists messages_status_check;
    alter table ops.messages add constraint messages_status_check
      check (status in ('planned', 'sent', 'failed', 'suppressed', 'holdout', 'unknown'));
  end if;
end $$;
create index if not exists messages_run_step on ops.messages (run_id, step, status);

-- one row per live claim (a batch of ops.messages rows with its claim_token): the
-- dispatcher that owns it (its session holds the advisory lock claim_owner), the lease it
-- renews, and when its request started going out (null: it never did)
create table if not exists ops.claims (
  claim_token text primary key,
  claim_owner bigint not null,
  lease_until timestamptz not null,
  sending_at timestamptz,
  claimed_at timestamptz not null
);
create index if not exists claims_owner on ops.claims (claim_owner);
create index if not exists messages_customer_planned on ops.messages (customer_id, planned_at);
create index if not exists messages_claimed on ops.messages (claim_token) where claim_token is not null;

create table if not exists ops.message_events (
  provider text not null,
  provider_event_id text not null,
  message_id text,
  event_type text not null,
  occurred_at timestamptz not null,
  address text,
  payload jsonb not null default '{}'::jsonb,
  received_at timestamptz not null,
  primary key (provider, provider_event_id)
);
create index if not exists message_events_message on ops.message_events (message_id, event_type);

create table if not exists ops.consent_changes (
  channel text not null,
  address text not null,
  unsubscribed_at timestamptz not null,
  source text not null,
  reason text,
  primary key (channel, address)
);
create index if not exists consent_changes_lower on ops.consent_changes (channel, lower(address));

create table if not exists ops.deactivated_addresses (
  channel text not null,
  address text not null,
  deactivated_at timestamptz not null,
  reason text not null,
  primary key (channel, address)
);
create index if not exists deactivated_addresses_lower
  on ops.deactivated_addresses (channel, lower(address));
"""


def ensure_ledger(conn: psycopg.Connection) -> None:
    conn.execute("select pg_advisory_xact_lock(hashtext('retention.ensure_ledger'))")
    conn.execute(LEDGER_DDL)


def run_id_for(campaign_id: str, as_of_iso: str) -> str:
    """A campaign run is keyed by its campaign and its as_of (the data interval end)."""
    return f"{campaign_id}@{as_of_iso}"


def message_id_for(run_id: str, step: str, customer_id: str) -> str:
    digest = hashlib.sha256(f"{run_id}|{step}|{customer_id}".encode()).hexdigest()
    return f"m_{digest[:32]}"
