"""dbt commands the orchestration runs besides `build`: retry of what failed, and docs.

The Airflow DAG runs one `dbt build` per layer (`retention.warehouse.build.build(select=...)`); when a
layer's task runs again (`build_or_retry`), `retry_failed` runs `dbt retry`, which
re-executes only the nodes that errored or were skipped in the previous invocation, with
its arguments (the same `as_of`), provided that invocation was this layer's build as of
the same time and had failures; otherwise (a cleared task, another command's results in the
target folder since) the layer is built again in full.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from retention.warehouse.build import (BuildError, as_of_literal, build, dbt_results,
                                      last_invocation, node_progress, run_dbt, target_dir)

#: node outcomes `dbt retry` runs again
RETRIED = {"error", "fail", "skipped", "runtime error"}


def last_build_failed(select: str, as_of: datetime) -> bool:
    """The target folder's last dbt invocation was `dbt build --select <select>` (or its
    retry) as of `as_of`, and some of its nodes failed or were skipped."""
    results, last_as_of = last_invocation()
    args = results.get("args") or {}
    return (args.get("which") in ("build", "retry")
            and list(args.get("select") or []) == [select]
            and last_as_of == as_of_literal(as_of)
            and any(r.get("status") in RETRIED for r in results.get("results") or []))


def build_or_retry(selector: str, as_of: datetime, url: str | None = None) -> dict:
    """One layer's task: `dbt retry` of its own failed build, else `dbt build` of the layer."""
    select = f"selector:{selector}"
    if last_build_failed(select, as_of):
        return retry_failed(as_of, url)
    return build(as_of=as_of, url=url, select=select)


def retry_failed(as_of: datetime, url: str | None = None) -> dict:
    bar, on_event = node_progress(f"dbt retry as of {as_of.isoformat()}")
    with bar:
        result = run_dbt(["retry"], url, as_of=as_of, callbacks=[on_event])
    summary = dbt_results(result)
    summary["as_of"] = as_of.isoformat()
    if not summary["success"]:
        raise BuildError(f"dbt retry as of {as_of.isoformat()} failed: "
                         + "; ".join(summary["failed"][:10]), summary)
    return summary


def generate_docs(as_of: datetime, url: str | None = None) -> Path:
    """`dbt docs generate` (catalog from the warehouse); returns the site's index.html."""
    result = run_dbt(["docs", "generate"], url, as_of=as_of)
    if not result.success:
        raise BuildError(f"dbt docs generate failed: {result.exception}", {})
    return target_dir() / "index.html"
