"""Churn risk and the next order: more columns of marts.customer_predicted_value, and
ops.predicted_value_backtests, the out-of-time backtest of each prediction run.

The new columns (retention.warehouse.predict, docs/predicted_value.md) are nullable and
NULL on the rows written before them: expected_purchases_30d, churn_probability,
churn_risk (high, medium, low), expected_next_order_at (indexed: the next_order trigger
entry scans it), predicted_value_rank.
ops.predicted_value_backtests holds per as_of and measure (churn_risk, next_order) the
cutoff the models were fitted at, the outcome window, the customers scored, how many had
the outcome, AUC and lift quality.

Idempotent like the baseline (`if not exists`): a database that already has them keeps
them and their values.

Revision ID: 0003_churn_risk
Revises: 0002_custom_events
"""

from __future__ import annotations

from retention.db.migrations import execute_script

revision = "0003_churn_risk"
down_revision = "0002_custom_events"
branch_labels = None
depends_on = None

UPGRADE = """
alter table marts.customer_predicted_value
  add column if not exists expected_purchases_30d double precision,
  add column if not exists churn_probability double precision,
  add column if not exists churn_risk text
    constraint customer_predicted_value_churn_risk_check
    check (churn_risk in ('high', 'medium', 'low')),
  add column if not exists expected_next_order_at timestamptz,
  add column if not exists predicted_value_rank double precision;

-- the next_order trigger entry scans the dates that fall in its range
create index if not exists customer_predicted_value_next_order
  on marts.customer_predicted_value (expected_next_order_at);

create table if not exists ops.predicted_value_backtests (
  as_of timestamptz not null,
  measure text not null check (measure in ('churn_risk', 'next_order')),
  cutoff timestamptz not null,
  outcome_window interval not null,
  customers integer not null,
  positives integer not null,
  auc double precision,
  lift_quality double precision,
  params jsonb not null,
  run_id text,
  primary key (as_of, measure)
);
"""

DOWNGRADE = """
drop table if exists ops.predicted_value_backtests;
drop index if exists marts.customer_predicted_value_next_order;
alter table marts.customer_predicted_value
  drop column if exists predicted_value_rank,
  drop column if exists expected_next_order_at,
  drop column if exists churn_risk,
  drop column if exists churn_probability,
  drop column if exists expected_purchases_30d;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
