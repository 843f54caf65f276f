"""
### dbt build: customer lifetime tables, after every ingest

Scheduled on the raw Assets the ingest DAG emits. One task per dbt layer, in order: the
layers are the selectors of dbt_project/selectors.yml named `layer_<name>` (task
`dbt_<name>`; each selector's description says what it builds). Then the predicted customer
value (BG/NBD + Gamma-Gamma), the tests of the tables it writes (selector
`predicted_value_tests`), and the dbt docs. A data engineer sees which layer failed in the
grid and its failing models in the log; a retry re-runs only the nodes that failed or
were skipped (`dbt retry`), not the whole layer. Each layer task publishes the marts it
builds as Assets (the marts and their layers: plugins/retention_airflow/assets.py).

Everything is built as of the run's data interval end (dbt var `as_of`), so a re-run or a
backfill for a past date gives what that date would have given.

Why per layer and not one task per model (as astronomer-cosmos renders it): every task
starts dbt and loads the project; with one task per model that cost is paid per model,
and the models run one at a time, so a per-model DAG is much slower than a plain
`dbt build` of the same project. The cost of layers is not start-up (Airflow import and
DAG parse, one dbt parse per layer) but the barriers: a layer waits for its slowest
model while dbt's other thread idles. Hence as few layers as still show a data engineer
where a build failed, cut where the barrier costs least: the staging models and their
tests go with the intermediate models (their tests of raw then run beside the
intermediate models, as in `dbt build`), and product_recommendations (it reads only
intermediate tables) goes with the lifetime marts, so it runs beside them.
bench/bench_build.py compares the layer tasks with a plain build and with Cosmos
(figures in bench/RESULTS.md).
Like `retention build`, the tasks leave out the dbt unit tests (CI runs them).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import get_current_context, task

from retention_airflow.assets import MARTS, PREDICTED, RAW_TABLES, dbt_layers, mart_layers
from retention_airflow.run_context import run_as_of
from retention_airflow.dags import retention_dag

#: {layer: selector} in build order (dbt_project/selectors.yml)
LAYERS = dbt_layers()
PREDICTED_VALUE_TESTS = "predicted_value_tests"


def build_layer(selector: str) -> dict:
    """`dbt build` of one selector of selectors.yml; on a later try, `dbt retry` (only what
    failed) when the target folder's last invocation is this layer's failed build as of
    the same time, else the layer's build again (a task cleared in the UI, say).

    The layer selectors run only the tests whose every parent is in this layer or an
    earlier one (`indirect_selection: buildable`): dbt's default would run a test of an
    intermediate model that also reads stg_customers with the staging layer, before that
    model is built (it fails on a new warehouse, and tests the previous build's table
    otherwise), and run a dozen tests twice."""
    from retention.warehouse.build import build
    from retention.warehouse.dbt_tasks import build_or_retry

    if get_current_context()["ti"].try_number > 1:
        return build_or_retry(selector, run_as_of())
    return build(as_of=run_as_of(), select=f"selector:{selector}")


@retention_dag(
    "retention_dbt_build",
    schedule=[RAW_TABLES["customers"], RAW_TABLES["orders"]],
    retry_delay=timedelta(minutes=1),
    tags=["dbt"],
    doc_md=__doc__,
)
def retention_dbt_build():
    previous = None
    built_by = mart_layers()
    for layer, selector in LAYERS.items():
        outlets = [MARTS[m] for m, mart_layer in built_by.items() if mart_layer == layer]
        current = task(task_id=f"dbt_{layer}", outlets=outlets)(build_layer)(selector)
        if previous is not None:
            previous >> current
        previous = current

    @task(outlets=list(PREDICTED.values()))
    def predicted_value() -> dict:
        from retention.warehouse.predict import write_predictions

        return write_predictions(None, run_as_of())

    @task
    def dbt_docs() -> str:
        from retention.warehouse.dbt_tasks import generate_docs

        return str(generate_docs(run_as_of()))

    predictions = predicted_value()
    tests = task(task_id=f"dbt_{PREDICTED_VALUE_TESTS}")(build_layer)(PREDICTED_VALUE_TESTS)
    previous >> [predictions, dbt_docs()]
    predictions >> tests


retention_dbt_build()
