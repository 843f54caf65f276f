"""The ledger: `ops.messages` (CONTRACT.md section 5) and the state around it.

`ops.messages` is the single truth of what was decided and sent. Ids are deterministic
(campaign, run, step, customer), so a re-run plans the same ids and `on conflict do
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


def message_id_for(run_id: str, step: str, customer_id: str) -> str:
    digest = hashlib.sha256(f"{run_id}|{step}|{customer_id}".encode()).hexdigest()
    return f"m_{digest[:32]}"
