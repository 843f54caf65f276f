"""Schemas the pipeline owns outside dbt: raw (the contract's input) and ops (its own state)."""

from __future__ import annotations

import psycopg

from retention.ingest.contract import raw_ddl

OPS_DDL = """
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


def ensure_schemas(conn: psycopg.Connection) -> None:
    """Create raw and ops if missing. Safe to call on every command."""
    conn.execute("select pg_advisory_xact_lock(hashtext('retention.ensure_schemas'))")
    conn.execute(raw_ddl())
    conn.execute(OPS_DDL)
    from retention.campaigns.ledger import LEDGER_DDL

    conn.execute(LEDGER_DDL)
