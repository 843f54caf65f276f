"""The durable state of trigger chains, in schema `ops`.

* `ops.chain_instances`: one row per chain instance (a campaign of the engine run for one
  customer and one subject: a cart, a product, a category, a search, an order). Its id is
  deterministic (trigger, customer, subject, start), it is the `run_id` of every message
  it plans, so message ids (chain, step, customer) are the same on every re-run. At most
  one instance per (trigger, customer, subject) is `active` (a partial unique index).
* `ops.trigger_hits`: every trigger moment that started or extended a chain, keyed by
  (trigger, customer, event key): a re-run, a restart or an overlapping late-event scan
  finds the key and does nothing. Moments that started nothing are not recorded: they
  are re-evaluated by later scans, so a late event can still change their outcome.
* `ops.trigger_watermarks`: per trigger, the end of the last interval scanned; the next
  scan starts at the earlier of its interval start and the watermark (minus lateness),
  so a run that never happened (scheduler down, catchup off) leaves no gap.
* `ops.trigger_health`: per trigger and run, chains started and extended, the norm of
  recent runs, and a flag when the count falls far below it.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import psycopg


def ensure_trigger_tables(conn: psycopg.Connection) -> None:
    """The chain tables and the raw indexes the scans use exist: the database is at the
    head of the migrations (retention.db.schema, the baseline's OPS_TRIGGERS)."""
    from retention.db.schema import ensure_schemas

    ensure_schemas(conn)


def chain_id_for(trigger: str, customer_id: str, subject: str, started_at: datetime) -> str:
    """Deterministic chain id; the SQL twin is CHAIN_ID_SQL."""
    stamp = started_at.isoformat()
    digest = hashlib.sha256(f"{trigger}|{customer_id}|{subject}|{stamp}".encode()).hexdigest()
    return f"ch_{digest[:24]}"


#: SQL of chain_id_for, over columns trigger, customer_id, subject and a timestamptz
#: (rendered in UTC as Python's isoformat() would: 2026-11-02T07:00:00+00:00).
CHAIN_ID_SQL = ("'ch_' || left(encode(sha256(convert_to({trigger} || '|' || {customer} || '|' "
                "|| {subject} || '|' || to_char({started} at time zone 'UTC', "
                "'YYYY-MM-DD\"T\"HH24:MI:SS') || "
                "case when mod(extract(microseconds from {started})::bigint, 1000000) <> 0 "
                "then '.' || to_char({started} at time zone 'UTC', 'US') else '' end "
                "|| '+00:00', 'UTF8')), 'hex'), 24)")
