"""dbt commands the orchestration runs besides `build`: retry of what failed, and docs.

The Airflow DAG runs one `dbt build` per layer (`retention.warehouse.build.build(select=...)`); when a
layer's task is retried, `retry_failed` runs `dbt retry`, which re-executes only the
nodes that errored or were skipped in the previous invocation, with its arguments (the
same `as_of`).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from retention.warehouse.build import (BuildError, as_of_literal, dbt_results, node_progress,
                                      run_dbt, target_dir)


def retry_failed(as_of: datetime, url: str | None = None) -> dict:
    bar, on_event = node_progress(f"dbt retry as of {as_of.isoformat()}")
    with bar:
        result = run_dbt(["retry"], url, callbacks=[on_event])
    summary = dbt_results(result)
    summary["as_of"] = as_of.isoformat()
    if not summary["success"]:
        raise BuildError(f"dbt retry as of {as_of.isoformat()} failed: "
                         + "; ".join(summary["failed"][:10]), summary)
    return summary


def generate_docs(as_of: datetime, url: str | None = None) -> Path:
    """`dbt docs generate` (catalog from the warehouse); returns the site's index.html."""
    import json

    result = run_dbt(["docs", "generate", "--vars", json.dumps({"as_of": as_of_literal(as_of)})],
                     url)
    if not result.success:
        raise BuildError(f"dbt docs generate failed: {result.exception}", {})
    return target_dir() / "index.html"
