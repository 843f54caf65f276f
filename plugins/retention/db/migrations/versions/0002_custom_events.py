"""Custom events and birthdays: raw.events.properties (jsonb) and raw.customers.birth_date
(date), both nullable, and the loader's casts for them.

`properties` holds an event's properties as a JSON object (which types carry which is
the shop's declaration in the events file, retention.ingest.events); `birth_date` is the
contract's optional column the birthday trigger reads. `ops.try_jsonb` and `ops.try_date`
are NULL where the text is no JSON (no valid YYYY-MM-DD date), so the loader quarantines
such a value instead of failing the load.

Idempotent like the baseline (`if not exists`, `create or replace`): a database that
already has the columns keeps them and their values.

Revision ID: 0002_custom_events
Revises: 0001_baseline
"""

from __future__ import annotations

from retention.db.migrations import execute_script

revision = "0002_custom_events"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

UPGRADE = r"""
alter table raw.events add column if not exists properties jsonb;
alter table raw.customers add column if not exists birth_date date;

create or replace function ops.try_jsonb(v text) returns jsonb
language plpgsql immutable parallel safe as $$
begin
  return v::jsonb;
exception when others then
  return null;
end
$$;

create or replace function ops.try_date(v text) returns date
language sql immutable parallel safe as $$
  select case
    when v ~ '^[1-9]\d{3}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$'
     and substr(v, 9, 2)::int <= extract(day from (make_date(substr(v, 1, 4)::int,
           substr(v, 6, 2)::int, 1) + interval '1 month - 1 day'))
    then v::date end
$$;
"""

DOWNGRADE = """
drop function if exists ops.try_date(text);
drop function if exists ops.try_jsonb(text);
alter table raw.customers drop column if exists birth_date;
alter table raw.events drop column if exists properties;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
