"""The floors of bench/bench_floors.py (bench/floors/*.sql, their _fragments expanded)
equal the marts dbt builds, row for row and column for column, on a small generated shop
with the benchmark's synthetic ledger, as of a moment inside a day (windows that end
mid-day, rows after as_of present). A floor that drifts from its mart fails here before
its benchmark figure means anything."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from retention import db
from retention.db.schema import ensure_schemas
from retention.ingest import load
from retention.warehouse.build import build
from retention_dev import generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_floors  # noqa: E402

AS_OF = datetime(2026, 9, 15, 13, 45, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def built_shop(make_database, tmp_path_factory):
    folder = tmp_path_factory.mktemp("floors_shop")
    generate.generate_shop(folder, 800, seed=31)
    url = make_database("floors")
    with db.connect(url) as conn:
        ensure_schemas(conn)
        conn.commit()
    load.load_folder(folder, url=url, loaded_at=generate.DEFAULT_END + timedelta(days=1))
    ledger = bench_floors.write_ledger(url, AS_OF, share=60)
    assert ledger["messages"] > 5000 and ledger["events"] > 5000
    marts = " ".join(f"+{m}" for m in bench_floors.FLOORS)
    # "buildable": the tests of these marts and their parents, not those of other children
    # of the parents (product_recommendations is not built here)
    result = build(as_of=AS_OF, url=url, select=marts, indirect_selection="buildable")
    assert result["dbt"]["success"] and result["dbt"]["failures"] == 0, result["dbt"]
    return url


def test_every_floor_equals_its_mart(built_shop):
    floors = bench_floors.run_floors(built_shop, AS_OF, list(bench_floors.FLOORS), repeat=1)
    assert set(floors) == set(bench_floors.FLOORS)
    for mart, f in floors.items():
        assert f["rows"] > 0, mart  # an empty mart would prove nothing
        assert (f["rows"], f["only_mart"], f["only_floor"]) == (f["mart_rows"], 0, 0), (mart, f)


def test_the_shop_exercises_the_floors(built_shop):
    """The rows the floors are compared on include the cases their rules are about."""
    with db.connect(built_shop) as conn:
        def one(sql: str):
            return conn.execute(sql).fetchone()

        holdout, sent = one("select count(*) filter (where is_holdout), count(*) filter (where not is_holdout) "
                            "from marts.message_attribution")
        assert holdout > 0 and sent > 0
        assert one("select count(*) from marts.message_attribution where conversion_source = 'offline'")[0] > 0
        assert one("select count(*) from marts.campaign_results where waiting > 0 and converted > 0 "
                   "and unsubscribed > 0")[0] > 0
        assert one("select count(*) from marts.customer_channel_engagement where is_best")[0] > 0
        assert one("select count(distinct channel) from marts.customer_send_time")[0] >= 5
        assert one("select bool_or(is_ropo) and bool_or(not is_ropo) from marts.ropo_purchases")[0]
        assert one("select count(*) from marts.cohort_retention where not is_complete_90d")[0] > 0
        # rows after as_of exist and are left out
        assert one(f"select count(*) from raw.events where occurred_at > '{AS_OF.isoformat()}'")[0] > 0
        assert one(f"select count(*) from ops.messages where planned_at > '{AS_OF.isoformat()}'")[0] > 0
