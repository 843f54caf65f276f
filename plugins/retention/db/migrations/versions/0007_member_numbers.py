"""A number for each member of a campaign run, from which its ledger rows' ids are made.

`ops.audience_members.member_no`: 1, 2, ... in the byte order of the run's customer ids,
assigned once by `engine.start_run` when it freezes the audience (and so as frozen as the
audience). A step's ledger rows of a numbered member get the message id
'm_' + the first 24 hex digits of sha256('<run_id>|<step>') + the member number as 8 hex
digits (ledger.message_id_for): the ids of one run's step share a prefix and follow the
customers' order, in which the rows are written, so the ledger's primary key takes them
in order (one place of the index) instead of at a million random places.

Members without a number (runs frozen before this revision, and chain instances, which are
not audience members) keep the ids of sha256('<run_id>|<step>|<customer>'): a re-plan of
such a run plans the same ids as before.

Idempotent like the baseline. The downgrade drops the column. After a downgrade, the
code of the earlier revisions would plan a not yet planned step of a numbered run with
the older ids (unique all the same), but re-planning a step that this revision's code
planned would add rows beside the numbered ones: re-plan such steps before downgrading,
or not at all.

Revision ID: 0007_member_numbers
Revises: 0006_raw_writes
"""

from __future__ import annotations

from retention.db.migrations import execute_script

revision = "0007_member_numbers"
down_revision = "0006_raw_writes"
branch_labels = None
depends_on = None

UPGRADE = """
alter table ops.audience_members add column if not exists member_no integer;
"""

DOWNGRADE = """
alter table ops.audience_members drop column if exists member_no;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
