"""The results-back steps the DAGs run, as plain functions (no Airflow import).

* `load_results`: webhook batches still in the landing folder, then the send results of
  push, Telegram, SMS and Viber, into `ops.message_events` (both idempotent);
* `build_attribution`: dbt builds marts.message_attribution and marts.campaign_results
  (with the staging and intermediate models they read) as of a timestamp. The windows
  come from the same place as the uplift's (`RETENTION_ATTRIBUTION_WINDOWS`, read by the
  model itself).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from retention.results.webhook import load_landed_batches, record_send_results

ATTRIBUTION_MODELS = ("message_attribution", "campaign_results")
#: send results older than this are settled already; the scan stays small
SEND_RESULTS_LOOKBACK = timedelta(days=14)


class AttributionBuildError(RuntimeError):
    pass


def load_results(as_of: datetime | None = None, url: str | None = None,
                 root: Path | None = None) -> dict:
    webhook = load_landed_batches(root, url)
    since = as_of - SEND_RESULTS_LOOKBACK if as_of else None
    sends = record_send_results(url, since)
    return {"webhook": webhook, "send_results": sends}


def build_attribution(as_of: datetime, url: str | None = None, *,
                      with_parents: bool = True) -> dict:
    """`dbt build` of the two results marts as of `as_of`, by default with the staging and
    intermediate models they read (purchases up to as_of); `with_parents=False` rebuilds
    only the two marts over the purchases of the last full build (new events and sends
    between builds), unless that build has not happened yet.

    Only tests whose every parent is built run (`--indirect-selection buildable`): a test
    that also reads a mart this selection leaves alone (a lifetime mart) waits for the
    full build."""
    from retention import db
    from retention.warehouse.build import as_of_literal, run_dbt
    from retention.results.webhook import ensure_results_tables
    from retention.db.schema import ensure_schemas

    with db.connect(url) as conn:
        ensure_schemas(conn)
        ensure_results_tables(conn)
        conn.commit()
        # the purchases and the staging views of the ledger and its events
        parents_built = conn.execute(
            "select to_regclass('intermediate.int_purchases_unified') is not null"
            " and to_regclass('staging.stg_ops_messages') is not null"
            " and to_regclass('staging.stg_ops_message_events') is not null").fetchone()[0]
    prefix = "+" if with_parents or not parents_built else ""
    result = run_dbt(["build", "--select", *(prefix + m for m in ATTRIBUTION_MODELS),
                      "--indirect-selection", "buildable"], url, as_of=as_of)
    nodes = getattr(result.result, "results", None) or []
    failed = [f"{r.node.name}: {getattr(r.status, 'value', r.status)}" for r in nodes
              if str(getattr(r.status, "value", r.status)) in ("error", "fail")]
    if not result.success or result.exception is not None:
        detail = str(result.exception) if result.exception else "; ".join(failed[:10])
        raise AttributionBuildError(f"dbt build of the results marts as of "
                                    f"{as_of_literal(as_of)} failed: {detail}")
    return {"as_of": as_of_literal(as_of), "nodes": len(nodes), "failed": failed,
            "with_parents": bool(prefix)}
