"""Assets that chain the pipeline's stages, defined once for producers and consumers.

URIs follow the postgres Asset scheme (postgres://host:port/database/schema/table). The
host and database are logical names (RETENTION_ASSET_HOST, RETENTION_ASSET_DATABASE), so
parsing a DAG file never needs the warehouse.
"""

from __future__ import annotations

from airflow.sdk import Asset

from retention.config import settings
from retention.ingest.contract import LOAD_ORDER

_HOST = settings().asset_host
_DATABASE = settings().asset_database


def table_asset(schema: str, table: str) -> Asset:
    return Asset(name=f"{schema}.{table}",
                 uri=f"postgres://{_HOST}:5432/{_DATABASE}/{schema}/{table}",
                 group="retention")


RAW_TABLES: dict[str, Asset] = {name: table_asset("raw", name) for name in LOAD_ORDER}

MART_TABLES = ("customer_lifetime", "cohort_retention", "customer_category_affinity",
               "customer_top_category_affinity", "ropo_purchases")
MARTS: dict[str, Asset] = {name: table_asset("marts", name) for name in MART_TABLES}
PREDICTED_VALUE = table_asset("marts", "customer_predicted_value")
