"""The dbt project's layout, checked against what dbt itself parses and selects.

- Only staging models read sources.
- The marts are declared once, by the YAML of models/marts: selector `marts`, the build
  layers (the `layer_<name>` selectors), the Airflow Assets and the build DAG's outlets
  (plugins/retention_airflow/assets.py), the exposures and dbt_project/README.md agree
  with it.
- The tables Python writes into marts are dbt sources whose tests catch bad rows.

`dbt parse` and `dbt ls` run against a profile whose server does not exist: neither needs
a database.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ROOT / "dbt_project"
DBT = str(Path(sys.executable).with_name("dbt"))
AS_OF = datetime(2024, 7, 1, tzinfo=timezone.utc)

#: a profile pointing at no server: parse and ls must not need one
_NO_DATABASE = {"RETENTION_DBT_HOST": "/nonexistent-socket-dir", "RETENTION_DBT_PORT": "1",
                "RETENTION_DBT_USER": "nobody", "RETENTION_DBT_PASSWORD": "",
                "RETENTION_DBT_DBNAME": "none", "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}


def _dbt(target: Path, *args: str) -> list[str]:
    proc = subprocess.run(
        [DBT, *args, "--project-dir", str(PROJECT), "--profiles-dir", str(PROJECT),
         "--target-path", str(target), "--log-path", str(target / "logs")],
        env={**os.environ, **_NO_DATABASE}, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.split()


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dbt_target")
    _dbt(path, "parse", "--no-partial-parse")
    return path


@pytest.fixture(scope="module")
def manifest(target) -> dict:
    return json.loads((target / "manifest.json").read_text())


def _models(target: Path, selector: str) -> set[str]:
    return set(_dbt(target, "ls", "--selector", selector, "--resource-type", "model",
                    "--output", "name", "-q", "--vars", '{as_of: "2026-10-31T00:00:00Z"}'))


def _marts_of(manifest: dict) -> set[str]:
    return {n["name"] for n in manifest["nodes"].values() if n["resource_type"] == "model"
            and n["original_file_path"].startswith("models/marts/")}


def test_only_staging_models_read_sources(manifest):
    readers: dict[str, set[str]] = {}
    for node in manifest["nodes"].values():
        if node["resource_type"] != "model":
            continue
        sources = {d for d in node["depends_on"]["nodes"] if d.startswith("source.")}
        if sources:
            readers[node["original_file_path"]] = sources
    assert readers, "no model reads a source"
    assert {p for p in readers if not p.startswith("models/staging/")} == set()
    # the results marts read the ledger and its events through staging
    assert readers["models/staging/ops/stg_ops_messages.sql"] == {"source.retention.ops.messages"}
    assert readers["models/staging/ops/stg_ops_message_events.sql"] == {
        "source.retention.ops.message_events"}
    for mart in ("message_attribution", "campaign_results"):
        deps = manifest["nodes"][f"model.retention.{mart}"]["depends_on"]["nodes"]
        assert "model.retention.stg_ops_messages" in deps, mart


@pytest.mark.unit
def test_per_model_config_lives_in_the_model_yaml():
    """dbt_project.yml configures folders only: no key under a folder names a model."""
    config = yaml.safe_load((PROJECT / "dbt_project.yml").read_text())["models"]["retention"]
    models = {p.stem for p in (PROJECT / "models").rglob("*.sql")}
    for folder in ("staging", "intermediate", "marts"):
        named = {k for k in config[folder] if not k.startswith("+")}
        assert named & models == set(), f"dbt_project.yml configures models {named & models}"


def test_the_marts_are_declared_once_and_every_place_agrees(manifest, target):
    from retention_airflow import assets

    layers = assets.dbt_layers(PROJECT)
    declared = assets.mart_layers(PROJECT)
    marts = set(declared)
    assert len(marts) >= 8

    # dbt: the models of the marts folder, selector `marts`
    assert _marts_of(manifest) == marts
    assert _models(target, "marts") == marts
    # the build layers: each builds the marts its YAML tag names, and all marts are built
    built: set[str] = set()
    for layer, selector in layers.items():
        selected = _models(target, selector) & marts
        assert selected == {m for m, lay in declared.items() if lay == layer}, layer
        assert not selected & built, f"{layer} rebuilds {selected & built}"
        built |= selected
    assert built == marts
    # the Airflow Assets
    assert set(assets.MARTS) == marts
    python_tables = {s["name"] for s in manifest["sources"].values() if s["schema"] == "marts"}
    assert python_tables == set(assets.PREDICTED) == {"customer_predicted_value",
                                                      "predicted_value_fits"}
    # the exposures name only marts and the tables Python writes into marts
    allowed = ({f"model.retention.{m}" for m in marts}
               | {f"source.retention.predicted_value.{t}" for t in python_tables})
    exposures = manifest["exposures"].values()
    assert exposures
    for exposure in exposures:
        deps = set(exposure["depends_on"]["nodes"])
        assert deps and deps <= allowed, (exposure["name"], deps - allowed)
    # the README points to the list instead of repeating it, and names real models only
    readme = (PROJECT / "README.md").read_text()
    marts_row = next(line for line in readme.splitlines() if line.startswith("| `models/marts`"))
    assert not {m for m in marts if f"`{m}`" in marts_row}, "README's marts row lists marts"
    assert "selector `marts`" in marts_row and "assets.py" in marts_row
    models = {n["name"] for n in manifest["nodes"].values() if n["resource_type"] == "model"}
    named = set(re.findall(r"`((?:stg|int)_[a-z0-9_]+)`", readme))
    assert named and named <= models, named - models
    selectors = [s["name"] for s in yaml.safe_load((PROJECT / "selectors.yml").read_text())[
        "selectors"]]
    for name in selectors:
        if not name.startswith(assets.LAYER_SELECTOR_PREFIX):
            assert f"`{name}`" in readme, f"README does not describe selector {name}"


@pytest.mark.unit
def test_a_mart_without_a_layer_is_named(tmp_path):
    from retention_airflow import assets

    (tmp_path / "models" / "marts").mkdir(parents=True)
    (tmp_path / "selectors.yml").write_text((PROJECT / "selectors.yml").read_text())
    (tmp_path / "models" / "marts" / "orphan.yml").write_text(
        "version: 2\nmodels:\n  - name: orphan\n    config: {tags: [marts]}\n")
    with pytest.raises(ValueError, match="orphan.yml: model orphan must have exactly one "
                                         "build layer"):
        assets.mart_layers(tmp_path)


def test_build_dag_runs_the_layers_in_order_and_publishes_their_marts():
    from airflow.dag_processing.dagbag import DagBag

    from retention_airflow import assets

    bag = DagBag(dag_folder=str(ROOT / "dags" / "retention_dbt_build.py"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["retention_dbt_build"]
    layers = list(assets.dbt_layers(PROJECT))
    previous = None
    for layer in layers:
        task = dag.get_task(f"dbt_{layer}")
        assert task.upstream_task_ids == ({f"dbt_{previous}"} if previous else set())
        assert {o.name for o in task.outlets} == {
            f"marts.{m}" for m, lay in assets.mart_layers(PROJECT).items() if lay == layer}
        previous = layer
    predicted = dag.get_task("predicted_value")
    assert predicted.upstream_task_ids == {f"dbt_{layers[-1]}"}
    assert {o.name for o in predicted.outlets} == {f"marts.{t}" for t in assets.PREDICTED}
    assert dag.get_task("dbt_predicted_value_tests").upstream_task_ids == {"predicted_value"}


PURCHASES_DDL = """
create schema if not exists intermediate;
create table intermediate.int_purchases_unified (
  purchase_id text, source text, customer_id text, purchased_at timestamptz, revenue numeric
);
"""


def test_predicted_value_sources_are_tested_after_the_predictions(database_url):
    from retention import db
    from retention.warehouse.build import build
    from retention.warehouse.predict import write_predictions

    with db.connect(database_url) as conn:
        conn.execute(PURCHASES_DDL)
        for c in range(40):
            conn.execute("insert into raw.customers (customer_id) values (%s)", (f"c{c}",))
            for k in range(1 + c % 4):
                conn.execute(
                    "insert into intermediate.int_purchases_unified values (%s, 'online', %s, "
                    "%s::timestamptz - make_interval(days => %s), %s)",
                    (f"p{c}_{k}", f"c{c}", AS_OF, 5 + 40 * k + c, 20 + 3 * c + k))
        conn.commit()
    write_predictions(database_url, AS_OF)

    good = build(as_of=AS_OF, url=database_url, select="selector:predicted_value_tests")
    assert good["dbt"]["success"] and good["dbt"]["models"] == 0
    assert good["dbt"]["by_type"]["test"] == {"pass": 5}, good["dbt"]

    # rows no writer should leave: a second row for a customer, a model nobody fits
    with db.connect(database_url) as conn:
        conn.execute("alter table marts.customer_predicted_value "
                     "drop constraint customer_predicted_value_pkey")
        conn.execute("insert into marts.customer_predicted_value "
                     "select * from marts.customer_predicted_value where customer_id = 'c3'")
        conn.execute("alter table marts.predicted_value_fits "
                     "drop constraint predicted_value_fits_model_check")
        conn.execute("insert into marts.predicted_value_fits "
                     "select as_of, 'pareto_nbd', params, log_likelihood, customers, converged, "
                     "fitted_for, run_id, time_unit, distinct_rows, iterations, message "
                     "from marts.predicted_value_fits where model = 'bgnbd'")
        # a negative count: the column checks (not_null, not_negative) of one test fail
        conn.execute("update marts.customer_predicted_value set purchases = -1 "
                     "where customer_id = 'c5'")
        conn.commit()
    bad = build(as_of=AS_OF, url=database_url, select="selector:predicted_value_tests",
                raise_on_failure=False)
    failed = "; ".join(bad["dbt"]["failed"])
    assert not bad["dbt"]["success"]
    assert "unique_combination_of_columns_predicted_value_customer_predicted_value" in failed
    assert "accepted_values_predicted_value_predicted_value_fits_model" in failed
    assert "column_checks_predicted_value_customer_predicted_value" in failed
    assert bad["dbt"]["failures"] == 3, failed


def test_recommendations_are_tested_when_a_build_rewrote_them(database_url):
    """product_recommendations is replaced when its weekly snapshot moment moves and left
    as it is by the other builds of the week; the row `product_recommendations:rewritten`
    of intermediate.incremental_state, which its data tests' `where` reads, is there
    exactly after a build that rewrote the table."""
    from datetime import timedelta

    from retention import db
    from retention.warehouse.build import build

    def rewritten() -> list[datetime]:
        with db.connect(database_url) as conn:
            return [r[0] for r in conn.execute(
                "select as_of from intermediate.incremental_state "
                "where model_name = 'product_recommendations:rewritten'")]

    monday = datetime(2026, 11, 2, tzinfo=timezone.utc)
    for as_of, expected in ((monday + timedelta(days=1), [monday]),  # first build
                            (monday + timedelta(days=3), []),  # the same week: untouched
                            (monday + timedelta(days=8), [monday + timedelta(days=7)])):
        result = build(as_of=as_of, url=database_url, select="+product_recommendations",
                       indirect_selection="cautious")  # not the other marts' tests
        assert result["dbt"]["success"] and result["dbt"]["failures"] == 0, result["dbt"]
        assert result["dbt"]["by_type"]["test"].get("pass", 0) >= 2, result["dbt"]
        assert rewritten() == expected, as_of
