"""The per-step control arms of the intelligence layer: two columns of ops.messages.

A campaign step with `send_time: optimal` or with `best` in its channel rule splits its
members once more, by hashing (campaign, step, customer): the `treated` members get the
learned hour or channel, the `control` members the step's own time or channel order
(retention.campaigns.engine, docs/campaigns.md). Each ledger row of such a step records
its member's arm:

* `send_time_arm`: `optimal` or `default` on the rows of a `send_time: optimal` step;
* `channel_arm`: `best` or `default` on the rows of a step whose channel rule says `best`;

NULL on every other row (and on the rows written before these columns).

Idempotent like the baseline (`if not exists`).

Revision ID: 0004_step_arms
Revises: 0003_churn_risk
"""

from __future__ import annotations

from retention.db.migrations import execute_script

revision = "0004_step_arms"
down_revision = "0003_churn_risk"
branch_labels = None
depends_on = None

UPGRADE = """
alter table ops.messages
  add column if not exists send_time_arm text
    constraint messages_send_time_arm_check check (send_time_arm in ('optimal', 'default')),
  add column if not exists channel_arm text
    constraint messages_channel_arm_check check (channel_arm in ('best', 'default'));
"""

DOWNGRADE = """
alter table ops.messages
  drop column if exists channel_arm,
  drop column if exists send_time_arm;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
