"""ops.audience_members' reference to its campaign run, checked once per statement.

The foreign key audience_members.run_id -> ops.campaign_runs ran its check once per
inserted row (an SPI query and a row lock per member: a million of them when a run
freezes a million-customer audience, all for the same run). This revision replaces it by
statement-level triggers that keep the same integrity:

* after an INSERT or UPDATE of ops.audience_members: the distinct run_ids of the new
  rows (a transition table) must all be in ops.campaign_runs; those runs are locked FOR
  KEY SHARE, as the foreign key's check locks them, so a concurrent transaction cannot
  delete or re-key a run while members are being added to it;
* after a DELETE or UPDATE of ops.campaign_runs: no run_id of the old rows that is gone
  from ops.campaign_runs may still have members;
* after a TRUNCATE of ops.campaign_runs (alone or with other tables): ops.audience_members
  must be empty.

A violation raises SQLSTATE 23503 (foreign_key_violation), the error the foreign key
raised, at the end of the statement, as the foreign key's NO ACTION check did.

Idempotent like the baseline. The downgrade drops the triggers and restores the foreign
key (validated against the rows then present).

Revision ID: 0005_audience_run_check
Revises: 0004_step_arms
"""

from __future__ import annotations

from retention.db.migrations import execute_script

revision = "0005_audience_run_check"
down_revision = "0004_step_arms"
branch_labels = None
depends_on = None

UPGRADE = """
alter table ops.audience_members drop constraint if exists audience_members_run_id_fkey;

create or replace function ops.audience_members_check_run() returns trigger
language plpgsql as $$
declare
  runs text[];
  missing text;
begin
  select array_agg(d.run_id) into runs from (select distinct n.run_id from new_rows n) d;
  if runs is null then
    return null;
  end if;
  perform 1 from ops.campaign_runs r where r.run_id = any(runs) for key share of r;
  select u.run_id into missing from unnest(runs) as u(run_id)
  where not exists (select 1 from ops.campaign_runs r where r.run_id = u.run_id)
  limit 1;
  if found then
    raise exception 'insert or update on table "audience_members" violates its run check'
      using errcode = 'foreign_key_violation',
            detail = format('Key (run_id)=(%s) is not present in table "campaign_runs".',
                            missing),
            schema = 'ops', table = 'audience_members';
  end if;
  return null;
end $$;

create or replace function ops.campaign_runs_check_members() returns trigger
language plpgsql as $$
declare
  kept text;
begin
  if tg_op = 'TRUNCATE' then
    select m.run_id into kept from ops.audience_members m limit 1;
  else
    select o.run_id into kept from old_rows o
    where not exists (select 1 from ops.campaign_runs r where r.run_id = o.run_id)
      and exists (select 1 from ops.audience_members m where m.run_id = o.run_id)
    limit 1;
  end if;
  if found then
    raise exception 'update or delete on table "campaign_runs" violates the run check of '
                    'table "audience_members"'
      using errcode = 'foreign_key_violation',
            detail = format('Key (run_id)=(%s) is still referenced from table '
                            '"audience_members".', kept),
            schema = 'ops', table = 'campaign_runs';
  end if;
  return null;
end $$;

drop trigger if exists audience_members_run_insert on ops.audience_members;
create trigger audience_members_run_insert after insert on ops.audience_members
  referencing new table as new_rows
  for each statement execute function ops.audience_members_check_run();
drop trigger if exists audience_members_run_update on ops.audience_members;
create trigger audience_members_run_update after update on ops.audience_members
  referencing new table as new_rows
  for each statement execute function ops.audience_members_check_run();
drop trigger if exists campaign_runs_members_delete on ops.campaign_runs;
create trigger campaign_runs_members_delete after delete on ops.campaign_runs
  referencing old table as old_rows
  for each statement execute function ops.campaign_runs_check_members();
drop trigger if exists campaign_runs_members_update on ops.campaign_runs;
create trigger campaign_runs_members_update after update on ops.campaign_runs
  referencing old table as old_rows
  for each statement execute function ops.campaign_runs_check_members();
drop trigger if exists campaign_runs_members_truncate on ops.campaign_runs;
create trigger campaign_runs_members_truncate after truncate on ops.campaign_runs
  for each statement execute function ops.campaign_runs_check_members();
"""

DOWNGRADE = """
drop trigger if exists audience_members_run_insert on ops.audience_members;
drop trigger if exists audience_members_run_update on ops.audience_members;
drop trigger if exists campaign_runs_members_delete on ops.campaign_runs;
drop trigger if exists campaign_runs_members_update on ops.campaign_runs;
drop trigger if exists campaign_runs_members_truncate on ops.campaign_runs;
drop function if exists ops.audience_members_check_run();
drop function if exists ops.campaign_runs_check_members();
do $$
begin
  if not exists (select 1 from pg_constraint
                 where conname = 'audience_members_run_id_fkey'
                   and conrelid = 'ops.audience_members'::regclass) then
    alter table ops.audience_members add constraint audience_members_run_id_fkey
      foreign key (run_id) references ops.campaign_runs (run_id);
  end if;
end $$;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
