"""The ledger: `ops.messages` (CONTRACT.md section 5) and the state around it.

`ops.messages` is the single truth of what was decided and sent. Ids are deterministic
(run, step, and the member's number in the frozen audience or else the customer), so a
re-run plans the same ids and `on conflict do
nothing` keeps the first decision. Sending claims rows (claim_token; the claim itself, its
owner, lease and whether its request went out, is a row of `ops.claims`) before the
provider call and records the outcome after it, only where its own claim still holds. A claim whose lease
expired and whose owner is gone is settled by the next pass (see dispatch.py), so a
message is never sent twice. `unknown`: the request went out and no answer came; never
resent automatically, counted against the caps like a sent message.

The tables are created by the migrations (retention.db.schema, the baseline's
OPS_LEDGER): contract columns come first, the rest are extensions (CONTRACT.md allows
more columns).
"""

from __future__ import annotations

import hashlib

import psycopg

def ensure_ledger(conn: psycopg.Connection) -> None:
    """The ledger's tables exist: the database is at the head of the migrations."""
    from retention.db.schema import ensure_schemas

    ensure_schemas(conn)


def run_id_for(campaign_id: str, as_of_iso: str) -> str:
    """A campaign run is keyed by its campaign and its as_of (the data interval end)."""
    return f"{campaign_id}@{as_of_iso}"


def message_id_prefix(run_id: str, step: str) -> str:
    """The first 26 characters of the message ids of a run's step for numbered members."""
    return "m_" + hashlib.sha256(f"{run_id}|{step}".encode()).hexdigest()[:24]


def message_id_for(run_id: str, step: str, customer_id: str,
                   member_no: int | None = None) -> str:
    """The message id of a ledger row: with the member's number (runs frozen since
    migration 0007), the run's and step's prefix and the number as 8 hex digits, so that
    a step's rows, written in member order, enter the primary key in order; without (chain
    instances, older runs), 32 hex digits of sha256('<run_id>|<step>|<customer>')."""
    if member_no is not None:
        return f"{message_id_prefix(run_id, step)}{member_no:08x}"
    digest = hashlib.sha256(f"{run_id}|{step}|{customer_id}".encode()).hexdigest()
    return f"m_{digest[:32]}"
