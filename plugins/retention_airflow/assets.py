"""Assets that chain the pipeline's stages, defined once for producers and consumers.

URIs follow the postgres Asset scheme (postgres://host:port/database/schema/table). The
host and database are logical names (RETENTION_ASSET_HOST, RETENTION_ASSET_DATABASE), so
parsing a DAG file never needs the warehouse.

The marts and the dbt build layers are read from the dbt project (RETENTION_DBT_PROJECT_DIR)
when a DAG file is parsed, from its YAML alone (no dbt run, no database):

- the build layers are the selectors of `selectors.yml` named `layer_<name>`, in file order;
- the marts are the models declared in `models/marts/*.yml`, each tagged in its `config:`
  with the name of the layer that builds it (`lifetime_marts`, `campaign_marts`);
- the tables Python writes into `marts` are the tables of the sources declared there
  (`_predicted_value__sources.yml`).

tests/test_dbt_project.py checks these against what dbt itself selects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow.sdk import Asset

from retention.config import settings
from retention.ingest.contract import LOAD_ORDER

_HOST = settings().asset_host
_DATABASE = settings().asset_database

#: selectors.yml names a build layer's selector `layer_<layer>`
LAYER_SELECTOR_PREFIX = "layer_"


def table_asset(schema: str, table: str) -> Asset:
    return Asset(name=f"{schema}.{table}",
                 uri=f"postgres://{_HOST}:5432/{_DATABASE}/{schema}/{table}",
                 group="retention")


def _project() -> Path:
    from retention.warehouse.build import project_dir

    return project_dir()


def _yaml(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: RETENTION_DBT_PROJECT_DIR must name the dbt project") from None
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}


def dbt_layers(project: Path | None = None) -> dict[str, str]:
    """The dbt build layers in build order: {layer: selector name}."""
    path = (project or _project()) / "selectors.yml"
    layers = {s["name"][len(LAYER_SELECTOR_PREFIX):]: s["name"]
              for s in _yaml(path).get("selectors", [])
              if s["name"].startswith(LAYER_SELECTOR_PREFIX)}
    if not layers:
        raise ValueError(f"{path}: no selector named {LAYER_SELECTOR_PREFIX}<layer>")
    return layers


def mart_layers(project: Path | None = None) -> dict[str, str]:
    """{mart: the layer that builds it} for every model declared in models/marts/*.yml."""
    project = project or _project()
    layers = set(dbt_layers(project))
    marts: dict[str, str] = {}
    for path in sorted((project / "models" / "marts").glob("*.yml")):
        for model in _yaml(path).get("models") or []:
            tags = (model.get("config") or {}).get("tags") or []
            found = [t for t in tags if t in layers]
            if len(found) != 1:
                raise ValueError(
                    f"{path}: model {model['name']} must have exactly one build layer among "
                    f"its config tags (one of {sorted(layers)}), has {found or 'none'}")
            marts[model["name"]] = found[0]
    if not marts:
        raise ValueError(f"{project / 'models' / 'marts'}: no model declared")
    return marts


def python_mart_tables(project: Path | None = None) -> tuple[str, ...]:
    """The tables in schema marts that Python writes: the tables of the sources declared
    in models/marts/*.yml."""
    project = project or _project()
    return tuple(table["name"]
                 for path in sorted((project / "models" / "marts").glob("*.yml"))
                 for source in _yaml(path).get("sources") or []
                 if source.get("schema") == "marts"
                 for table in source.get("tables") or [])


RAW_TABLES: dict[str, Asset] = {name: table_asset("raw", name) for name in LOAD_ORDER}

#: every mart dbt builds, in the order of models/marts/*.yml
MARTS: dict[str, Asset] = {name: table_asset("marts", name) for name in mart_layers()}
#: the tables in marts that Python writes (the build DAG's predicted value task)
PREDICTED: dict[str, Asset] = {name: table_asset("marts", name) for name in python_mart_tables()}
