"""Baseline: schemas raw, ops and the prediction tables of marts.

Every statement is idempotent (`if not exists`, `create or replace`, a guarded constraint
swap), so the baseline also adopts a database whose tables were created before the
pipeline had migrations: it adds what is missing and leaves tables and rows in place.

Revision ID: 0001_baseline
Revises:
"""

from __future__ import annotations

from retention.db.migrations import execute_script

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None

#: the contract's tables (docs/CONTRACT.md, retention.ingest.contract.TABLES): keys not
#: null, everything else nullable (the loader validates and quarantines instead)
RAW = """
create schema if not exists raw;
create table if not exists raw.customers (
  customer_id text not null,
  email text,
  phone text,
  loyalty_card_id text,
  created_at timestamptz,
  timezone text,
  city text,
  country text,
  primary key (customer_id)
);
create table if not exists raw.channel_subscriptions (
  customer_id text not null,
  channel text not null,
  address text not null,
  subscribed_at timestamptz,
  unsubscribed_at timestamptz,
  primary key (customer_id, channel, address)
);
create table if not exists raw.products (
  product_id text not null,
  name text,
  category_path text,
  brand text,
  price numeric(18,2),
  in_stock boolean,
  updated_at timestamptz,
  primary key (product_id)
);
create table if not exists raw.product_changes (
  product_id text not null,
  changed_at timestamptz not null,
  price numeric(18,2),
  in_stock boolean,
  primary key (product_id, changed_at)
);
create table if not exists raw.orders (
  order_id text not null,
  customer_id text,
  ordered_at timestamptz,
  status text,
  total_amount numeric(18,2),
  currency text,
  payment_method text,
  cancel_reason text,
  primary key (order_id)
);
create table if not exists raw.order_items (
  order_id text not null,
  line_no integer not null,
  product_id text,
  quantity integer,
  unit_price numeric(18,2),
  primary key (order_id, line_no)
);
create table if not exists raw.offline_receipts (
  receipt_id text not null,
  store_id text,
  purchased_at timestamptz,
  loyalty_card_id text,
  phone text,
  total_amount numeric(18,2),
  currency text,
  primary key (receipt_id)
);
create table if not exists raw.offline_receipt_items (
  receipt_id text not null,
  line_no integer not null,
  product_id text,
  quantity integer,
  unit_price numeric(18,2),
  primary key (receipt_id, line_no)
);
create table if not exists raw.events (
  event_id text not null,
  occurred_at timestamptz,
  event_type text,
  customer_id text,
  session_id text,
  product_id text,
  category_path text,
  price numeric(18,2),
  search_query text,
  primary key (event_id)
);
"""

#: lookups on raw beyond the keys: the daily dbt build reads only the last days of
#: raw.events (trg_events_time); the dispatcher's purchase exit reads a customer's orders
#: since a time (trg_orders_customer_time); the trigger scans (retention.triggers) read
#: per-customer, per-product and per-time ranges
RAW_INDEXES = """
create index if not exists trg_events_customer_time on raw.events (customer_id, occurred_at);
create index if not exists trg_events_time on raw.events (occurred_at);
create index if not exists trg_events_product_time on raw.events (product_id, occurred_at);
create index if not exists trg_orders_customer_time on raw.orders (customer_id, ordered_at);
create index if not exists trg_orders_time on raw.orders (ordered_at);
create index if not exists trg_product_changes_time on raw.product_changes (changed_at);
create index if not exists trg_subscriptions_time on raw.channel_subscriptions (subscribed_at);
"""

#: loads, their quarantined rows and the shop's settings (retention.ingest.load)
OPS_LOADS = """
create schema if not exists ops;

create table if not exists ops.shop_settings (
  key text primary key,
  value text not null,
  set_at timestamptz not null,
  set_by text not null
);

create table if not exists ops.loads (
  load_id bigserial primary key,
  source text not null,
  format text not null,
  loaded_at timestamptz not null,
  status text not null,
  summary jsonb not null default '{}'::jsonb,
  error text
);

create table if not exists ops.quarantine (
  table_name text not null,
  source_file text not null,
  line_no bigint not null,
  reason text not null,
  record jsonb not null,
  load_id bigint not null,
  quarantined_at timestamptz not null,
  primary key (table_name, source_file, line_no)
);
"""

#: NULL where the text is no valid ISO-8601 timestamp with an offset (the loader's cast,
#: retention.ingest.load.STRICT_TIMESTAMP). Pure SQL, inlined by the planner: a strict
#: pattern, then a day-of-month check against the month's length, then the cast, which
#: can no longer fail.
TRY_TIMESTAMPTZ = r"""
create or replace function ops.try_timestamptz(v text) returns timestamptz
language sql immutable parallel safe as $$
  select case
    when v ~ '^[1-9]\d{3}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[T ]([01]\d|2[0-3]):[0-5]\d(:([0-5]\d|60)(\.\d{1,6})?)?([Zz]|[+-](0\d|1[0-4])(:?[0-5]\d)?)$'
     and substr(v, 9, 2)::int <= extract(day from (make_date(substr(v, 1, 4)::int,
           substr(v, 6, 2)::int, 1) + interval '1 month - 1 day'))
    then v::timestamptz end
$$;
"""

#: results of the raw-layer checkpoint, one row per expectation (retention.ingest.quality)
OPS_QUALITY = """
create table if not exists ops.data_quality_results (
  run_key text not null,
  load_id bigint,
  as_of timestamptz not null,
  table_name text not null,
  expectation text not null,
  column_name text,
  severity text not null,
  success boolean not null,
  observed_value jsonb,
  kwargs jsonb not null default '{}'::jsonb,
  checked_at timestamptz not null
);
create unique index if not exists data_quality_results_key
  on ops.data_quality_results (run_key, table_name, expectation, coalesce(column_name, ''));
create index if not exists data_quality_results_as_of on ops.data_quality_results (as_of);
"""

#: the ledger (retention.campaigns.ledger, CONTRACT.md section 5): contract columns of
#: ops.messages first, extensions after. A ledger without settle_after or whose status
#: check lacks 'unknown' gets both.
OPS_LEDGER = """
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

#: trigger chains (retention.triggers.state): instances, hits, watermarks, health
OPS_TRIGGERS = """
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

#: webhook batches and weekly report deliveries (retention.results)
OPS_RESULTS = """
create table if not exists ops.webhook_batches (
  batch_id text primary key,
  provider text not null,
  received_at timestamptz not null,
  signature_verified boolean not null,
  events integer not null,
  inserted integer not null,
  duplicates integer not null,
  invalid integer not null,
  unmatched integer not null,
  consent_changes integer not null,
  deliveries integer not null default 1,
  source_file text
);

create table if not exists ops.report_deliveries (
  week_start date not null,
  recipient text not null,
  report_file text not null,
  provider_message_id text,
  sent_at timestamptz not null,
  primary key (week_start, recipient)
);
"""

#: the predicted customer value and its fits (retention.warehouse.predict); schema marts
#: is dbt's too, and dbt never drops these two tables (they are no models of it)
MARTS_PREDICT = """
create schema if not exists marts;

create table if not exists marts.customer_predicted_value (
  customer_id text not null,
  as_of timestamptz not null,
  purchases integer not null,
  frequency integer,
  recency double precision,
  age double precision,
  time_unit interval not null,
  probability_alive double precision,
  expected_purchases_90d double precision,
  expected_purchases_365d double precision,
  expected_avg_order_value double precision,
  predicted_value_12m double precision,
  primary key (as_of, customer_id)
);

create table if not exists marts.predicted_value_fits (
  as_of timestamptz not null,
  model text not null check (model in ('bgnbd', 'gamma_gamma')),
  params jsonb not null,
  log_likelihood double precision not null,
  customers integer not null,
  converged boolean not null,
  fitted_for timestamptz not null,
  run_id text,
  time_unit interval not null,
  distinct_rows integer not null,
  iterations integer not null,
  message text,
  primary key (as_of, model)
);
"""

SCRIPTS = (RAW, RAW_INDEXES, OPS_LOADS, TRY_TIMESTAMPTZ, OPS_QUALITY, OPS_LEDGER, OPS_TRIGGERS,
           OPS_RESULTS, MARTS_PREDICT)


def upgrade() -> None:
    for script in SCRIPTS:
        execute_script(script)


def downgrade() -> None:
    raise RuntimeError(
        "the baseline is not reverted: it would drop raw, ops and the prediction tables "
        "with the shop's data, ledger and consent records. Drop them by hand if that is "
        "what is wanted.")
