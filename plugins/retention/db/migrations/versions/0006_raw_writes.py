"""ops.raw_writes: the last write to each raw table, and whether a contract load made it.

A statement-level trigger on each table of schema raw (after INSERT, UPDATE, DELETE and
TRUNCATE; once per statement, whatever the number of rows) records in ops.raw_writes:

* `write_seq`, `load_id`, `written_at`: the last statement that wrote to the table, in
  the order of ops.raw_write_seq, and the contract load that ran it (the `load_id` the
  loader sets in its transaction as `retention.load_id`; NULL for any other writer: a
  hand edit, a script, an erasure);
* `other_write_seq`: the last of those statements that no load ran.

The loader reads it to know that a table holds exactly what a load wrote (its last write
was that load's and nobody wrote since), which lets it take an unchanged file as
unchanged without reading it (retention.ingest.load, "unchanged files"). A table without a
row here has not been written since this revision: nothing is taken as unchanged.

Idempotent like the baseline. The downgrade drops the triggers, the function, the table
and the sequence.

Revision ID: 0006_raw_writes
Revises: 0005_audience_run_check
"""

from __future__ import annotations

from retention.db.migrations import execute_script

revision = "0006_raw_writes"
down_revision = "0005_audience_run_check"
branch_labels = None
depends_on = None

#: the contract's tables as of this revision
RAW_TABLES = ("customers", "channel_subscriptions", "products", "product_changes", "orders",
              "order_items", "offline_receipts", "offline_receipt_items", "events")

UPGRADE = """
create sequence if not exists ops.raw_write_seq;

create table if not exists ops.raw_writes (
  table_name text primary key,
  write_seq bigint not null,
  load_id bigint,
  written_at timestamptz not null,
  other_write_seq bigint
);
comment on table ops.raw_writes is
  'the last write to each raw table (statement-level triggers); load_id NULL: not a load';

create or replace function ops.record_raw_write() returns trigger
language plpgsql as $$
declare
  seq bigint := nextval('ops.raw_write_seq');
  writer bigint := nullif(current_setting('retention.load_id', true), '')::bigint;
begin
  insert into ops.raw_writes as w (table_name, write_seq, load_id, written_at,
                                   other_write_seq)
  values (tg_table_name, seq, writer, now(), case when writer is null then seq end)
  on conflict (table_name) do update
    set write_seq = excluded.write_seq, load_id = excluded.load_id,
        written_at = excluded.written_at,
        other_write_seq = coalesce(excluded.other_write_seq, w.other_write_seq);
  return null;
end $$;
"""

TRIGGERS = """
drop trigger if exists raw_write on raw.{table};
create trigger raw_write after insert or update or delete on raw.{table}
  for each statement execute function ops.record_raw_write();
drop trigger if exists raw_write_truncate on raw.{table};
create trigger raw_write_truncate after truncate on raw.{table}
  for each statement execute function ops.record_raw_write();
"""

DOWNGRADE_TRIGGERS = """
drop trigger if exists raw_write on raw.{table};
drop trigger if exists raw_write_truncate on raw.{table};
"""

DOWNGRADE = """
drop function if exists ops.record_raw_write();
drop table if exists ops.raw_writes;
drop sequence if exists ops.raw_write_seq;
"""


def upgrade() -> None:
    execute_script(UPGRADE + "".join(TRIGGERS.format(table=t) for t in RAW_TABLES))


def downgrade() -> None:
    execute_script("".join(DOWNGRADE_TRIGGERS.format(table=t) for t in RAW_TABLES) + DOWNGRADE)
