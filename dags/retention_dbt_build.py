"""
### dbt build: customer lifetime tables, after every ingest

Scheduled on the raw Assets the ingest DAG emits. One task per dbt layer, in order:
staging with intermediate, the marts (lifetime marts and product recommendations), the
campaign marts (attribution, results); then the predicted
customer value (BG/NBD + Gamma-Gamma) and the dbt docs. A data engineer sees which layer
failed in the grid and its failing models in the log; a retry re-runs only the nodes that
failed or were skipped (`dbt retry`), not the whole layer. The lifetime marts are
published as Assets for the campaign DAGs.

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
intermediate tables) goes with the lifetime marts, so it runs beside them. With that
layout the layer tasks take about as long as a plain `dbt build` of the same nodes; the
comparison with a plain build and with Cosmos is measured by bench/bench_build.py, in
bench/RESULTS.md, section "dbt build at 1,000,000 customers: per-customer purchase
tables, weekly recommendations" (and, for Cosmos, "dbt build (bench/bench_build.py):
Airflow per-layer DAG and Cosmos against a plain build").
Like `retention build`, the tasks leave out the dbt unit tests (CI runs them).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, get_current_context, task

from retention_airflow.assets import MARTS, PREDICTED_VALUE, RAW_TABLES
from retention_airflow.run_context import run_as_of

LAYERS = {
    # staging views and the intermediate tables in one dbt invocation: the tests of raw and
    # staging run beside the intermediate models (as in a plain `dbt build`), not before
    # them behind a barrier
    "staging_and_intermediate": {"select": "path:models/staging path:models/intermediate"},
    # product_recommendations reads only intermediate models: in this layer dbt's threads
    # run it beside the lifetime marts, as a plain `dbt build` would (a layer is a barrier)
    "lifetime_marts": {
        "select": ("customer_lifetime cohort_retention customer_category_affinity "
                   "customer_top_category_affinity ropo_purchases product_recommendations"),
    },
    # source:ops: the tests of the ops sources the campaign marts read, which no model
    # selection picks up (so the layers run exactly the tests of a plain `dbt build`)
    "campaign_marts": {"select": "message_attribution campaign_results source:ops"},
}


def build_layer(layer: str) -> dict:
    """`dbt build` of one layer; on a retry `dbt retry`, which re-runs only what failed.

    Only the tests whose every parent is in this layer or an earlier one run
    (`--indirect-selection buildable`): dbt's default would run a test of an intermediate
    model that also reads stg_customers with the staging layer, before that model is
    built (it fails on a new warehouse, and tests the previous build's table otherwise),
    and run a dozen tests twice."""
    from retention.warehouse.build import build
    from retention.warehouse.dbt_tasks import retry_failed

    ctx = get_current_context()
    if ctx["ti"].try_number > 1:
        return retry_failed(run_as_of())
    return build(as_of=run_as_of(), select=LAYERS[layer]["select"],
                 exclude=LAYERS[layer].get("exclude"), indirect_selection="buildable")


@dag(
    dag_id="retention_dbt_build",
    schedule=[RAW_TABLES["customers"], RAW_TABLES["orders"]],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    tags=["retention", "dbt"],
    doc_md=__doc__,
)
def retention_dbt_build():
    previous = None
    for layer in LAYERS:
        outlets = [MARTS[m] for m in MARTS] if layer == "lifetime_marts" else []
        current = task(task_id=f"dbt_{layer}", outlets=outlets)(build_layer)(layer)
        if previous is not None:
            previous >> current
        previous = current

    @task(outlets=[PREDICTED_VALUE])
    def predicted_value() -> dict:
        from retention.warehouse.predict import write_predictions

        return write_predictions(None, run_as_of())

    @task
    def dbt_docs() -> str:
        from retention.warehouse.dbt_tasks import generate_docs

        return str(generate_docs(run_as_of()))

    previous >> [predicted_value(), dbt_docs()]


retention_dbt_build()
