"""Every DAG file parses cleanly and follows the house rules; the ingest DAG runs for real."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from retention import db

ROOT = Path(__file__).resolve().parents[1]
DAG_FILES = sorted(p for p in (ROOT / "dags").glob("*.py"))


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_integrity(path, airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    text = path.read_text().lower()
    assert "airflow" in text and "dag" in text, "the DAG processor skips files without both words"
    bag = DagBag(dag_folder=str(path))
    assert bag.import_errors == {}, bag.import_errors
    assert bag.dags, f"{path.name} defines no DAG"
    for dag in bag.dags.values():
        assert dag.tags, f"{dag.dag_id} has no tags"
        assert dag.doc_md, f"{dag.dag_id} has no doc_md (the module docstring)"
        assert dag.catchup is False or "backfill" in (dag.doc_md or "").lower()
        for t in dag.tasks:
            assert t.retries >= 2, f"{dag.dag_id}.{t.task_id} retries < 2"


def _write(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def _drop(landing: Path, name: str, ready: bool = True) -> Path:
    drop = landing / "incoming" / name
    _write(drop, "customers.csv",
           "customer_id,email,created_at\nc1,a@example.com,2026-10-01T00:00:00Z\n"
           "c2,b@example.com,2026-10-02T00:00:00Z\n")
    _write(drop, "orders.csv",
           "order_id,customer_id,ordered_at,status,total_amount,currency\n"
           "o1,c1,2026-10-30T10:00:00Z,paid,10,UAH\n"
           "o2,c2,2026-10-30T11:00:00Z,paid,-3,UAH\n")
    if ready:
        (drop / "_SUCCESS").write_text("")
    return drop


def test_ingest_dag_loads_ready_drops_and_checks_them(airflow_db, database_url, tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    landing = tmp_path / "landing"
    monkeypatch.setenv("RETENTION_LANDING_DIR", str(landing))
    monkeypatch.setenv("RETENTION_CURRENCY", "UAH")
    monkeypatch.setenv("RETENTION_HOME", str(tmp_path / "home"))
    ready = _drop(landing, "2026-10-31T00")
    not_ready = _drop(landing, "2026-10-31T01", ready=False)

    dag = DagBag(dag_folder=str(ROOT / "dags" / "retention_ingest.py"),
                 ).dags["retention_ingest"]
    run = dag.test(logical_date=datetime(2026, 10, 31, tzinfo=timezone.utc))
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states == {"find_ready_drops": "success", "load_drops": "success",
                      "check_quality": "success"}, states
    with db.connect(database_url) as conn:
        assert conn.execute("select order_id from raw.orders").fetchall() == [("o1",)]
        reason, = conn.execute("select reason from ops.quarantine").fetchone()
        loaded_at, = conn.execute("select loaded_at from ops.loads").fetchone()
    assert reason == "negative total_amount"
    # the load's time is the run's data interval end, stored and read back as an aware
    # instant; the cron schedule triggers runs with a zero-length interval, so the end is
    # the logical date
    assert loaded_at.tzinfo is not None, loaded_at
    assert loaded_at == run.data_interval_end, (loaded_at, run.data_interval_end)
    assert loaded_at == datetime(2026, 10, 31, tzinfo=timezone.utc), loaded_at
    assert not ready.exists() and (landing / "loaded" / ready.name / "orders.csv").exists()
    assert not_ready.exists(), "a drop without _SUCCESS must wait"


def _dbt_ls(args: list[str]) -> set[str]:
    from retention.warehouse.build import run_dbt

    # models and data tests: build() leaves the unit tests out, in the DAG as on the CLI
    result = run_dbt(["ls", "--resource-type", "model", "--resource-type", "test",
                      "--output", "name",
                      "--vars", '{as_of: "2026-10-31T00:00:00Z"}', "-q", *args])
    assert result.success, result.exception
    return set(result.result)


def test_dbt_build_layers_run_every_node_exactly_once():
    """The layer tasks of retention_dbt_build (the `layer_<name>` selectors of
    dbt_project/selectors.yml) together select exactly the models and data tests of a
    plain `dbt build` (selector `default`), none of them twice; with the tests of the
    tables Python writes, run after them, that is every node of the project (unit tests
    run in CI, not in production builds: tests/test_dbt_lifetime.py)."""
    from retention_airflow.assets import dbt_layers

    everything = _dbt_ls([])
    assert len(everything) > 100
    seen: list[str] = []
    for selector in dbt_layers().values():
        seen += sorted(_dbt_ls(["--selector", selector]))
    assert sorted(seen) == sorted(everything)  # the same nodes, each once
    after = _dbt_ls(["--selector", "predicted_value_tests"])
    assert after and not after & everything
    assert everything | after == _dbt_ls(["--select", "fqn:*"])


def test_dbt_build_dag_builds_the_marts_as_of_the_interval_end(airflow_db, database_url, tmp_path,
                                                             monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    from retention_dev.generate import generate_shop
    from retention.ingest.load import load_folder

    monkeypatch.setenv("RETENTION_HOME", str(tmp_path / "home"))
    shop = tmp_path / "shop"
    generate_shop(shop, customers=150, seed=5)
    end = datetime(2026, 10, 31, tzinfo=timezone.utc)
    load_folder(shop, database_url, loaded_at=end, currency="UAH")
    dag = DagBag(dag_folder=str(ROOT / "dags" / "retention_dbt_build.py")).dags["retention_dbt_build"]
    from retention_airflow.assets import dbt_layers

    layers = [f"dbt_{layer}" for layer in dbt_layers()]
    run = dag.partial_subset(task_ids=layers, include_upstream=False,
                             include_downstream=False).test(logical_date=end)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states == {t: "success" for t in layers}, states
    with db.connect(database_url) as conn:
        for mart in ("customer_lifetime", "customer_category_affinity", "product_recommendations"):
            assert conn.execute(f"select count(*) from marts.{mart}").fetchone()[0] > 0, mart
        as_of, = conn.execute("select max(as_of) from marts.customer_lifetime").fetchone()
    assert as_of == end  # dag.test's data interval end for a schedule on Assets
