"""A layer task's later try runs `dbt retry` only over its own failed build: the target
folder's last invocation must be that layer's `dbt build` as of the same time, with nodes
that failed or were skipped. Anything else (a task cleared in the UI after a green build,
another layer's or command's results written since) builds the layer again."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from retention.warehouse.build import as_of_literal
from retention.warehouse.dbt_tasks import last_build_failed

pytestmark = pytest.mark.unit

AS_OF = datetime(2026, 10, 26, 7, tzinfo=timezone.utc)
LAYER = "selector:layer_staging"


def _results(project, *, which="build", select=(LAYER,), as_of=AS_OF, statuses=("error",)):
    target = project / "target"
    target.mkdir(parents=True, exist_ok=True)
    (target / "run_results.json").write_text(json.dumps({
        "args": {"which": which, "select": list(select), "vars": {"as_of": as_of_literal(as_of)}},
        "results": [{"unique_id": f"model.x.m{i}", "status": s} for i, s in enumerate(statuses)],
    }))


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("RETENTION_DBT_PROJECT_DIR", str(tmp_path))
    return tmp_path


def test_its_own_failed_build_is_retried(project):
    _results(project, statuses=("success", "error", "skipped"))
    assert last_build_failed(LAYER, AS_OF)
    _results(project, which="retry", statuses=("fail",))
    assert last_build_failed(LAYER, AS_OF)


@pytest.mark.parametrize("change", [
    dict(statuses=("success", "pass")),                  # green: a cleared task builds again
    dict(select=("selector:layer_marts",)),              # another layer ran since
    dict(as_of=datetime(2026, 10, 27, tzinfo=timezone.utc)),  # another run's time
    dict(which="docs"),                                   # another command ran since
])
def test_anything_else_builds_the_layer_again(project, change):
    _results(project, **change)
    assert not last_build_failed(LAYER, AS_OF)


def test_no_results_builds_the_layer(project):
    assert not last_build_failed(LAYER, AS_OF)
    (project / "target").mkdir()
    (project / "target" / "run_results.json").write_text("{not json")
    assert not last_build_failed(LAYER, AS_OF)
