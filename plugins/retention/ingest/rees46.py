"""Importer for the public REES46 "eCommerce behavior data from multi category store".

Its nine columns (event_time, event_type, product_id, category_id, category_code, brand,
price, user_id, user_session) map onto `raw.events`, and the product fields it carries onto
`raw.products` (the latest event per product gives price, brand and category). The rows
then go through the same contract checks and quarantine as any other load.

Mapping choices:
- event_id: REES46 has none, so it is `r46-` + md5 of the whole record, with `-<n>` added
  for the n-th identical record, so re-loading the same file upserts the same ids.
- customer_id: user_id (REES46 users are logged-in ids); session_id: user_session.
- category_path: category_code (NULL where REES46 leaves it empty).
- occurred_at: event_time, whose ` UTC` suffix becomes `Z`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from psycopg import sql

from retention import db
from retention.ingest.contract import TABLE_BY_NAME
from retention.ingest.load import (
    LoadError,
    LoadReport,
    PlannedFile,
    check_and_write,
    lock_loads,
    read_header,
    stage_file,
    tune_session,
)
from retention.db.schema import ensure_schemas

REES46_COLUMNS = ["event_time", "event_type", "product_id", "category_id", "category_code",
                  "brand", "price", "user_id", "user_session"]

_EVENTS_FROM_REES46 = """
create temp table stage on commit drop as
select _rec_no,
       'r46-' || md5(concat_ws('|', event_time, event_type, product_id, category_id,
                               category_code, brand, price, user_id, user_session))
         || case when n > 1 then '-' || n else '' end as event_id,
       regexp_replace(event_time, ' UTC$', 'Z') as occurred_at,
       event_type, user_id as customer_id, user_session as session_id, product_id,
       nullif(category_code, '') as category_path, price, null::text as search_query
from (select r.*, row_number() over (
        partition by event_time, event_type, product_id, category_id, category_code, brand,
                     price, user_id, user_session order by _rec_no) as n
      from r46 r) numbered
"""

_PRODUCTS_FROM_REES46 = """
create temp table stage on commit drop as
select distinct on (product_id)
       _rec_no, product_id, null::text as name, nullif(category_code, '') as category_path,
       nullif(brand, '') as brand, price, null::text as in_stock,
       regexp_replace(event_time, ' UTC$', 'Z') as updated_at
from r46
where nullif(btrim(product_id), '') is not null
  and regexp_replace(event_time, ' UTC$', 'Z') ~ '^\\d{4}-'
order by product_id, event_time desc, _rec_no desc
"""


def load_rees46(path: Path, url: str | None = None, *, loaded_at: datetime) -> LoadReport:
    header = read_header(path)
    missing = [c for c in REES46_COLUMNS if c not in header]
    if missing:
        raise LoadError(f"{path}: required REES46 column {missing[0]!r} is missing "
                        f"(expected {', '.join(REES46_COLUMNS)})")
    events, products = TABLE_BY_NAME["events"], TABLE_BY_NAME["products"]
    source = str(path)
    with db.connect(url) as conn:
        ensure_schemas(conn)
        conn.commit()
        lock_loads(conn)
        tune_session(conn)
        conn.execute("select pg_advisory_xact_lock(hashtext('retention.ingest.load'))")
        load_id = conn.execute(
            "insert into ops.loads (source, format, loaded_at, status) values "
            "(%s, 'rees46', %s, 'running') returning load_id", (source, loaded_at)).fetchone()[0]
        stage_file(conn, PlannedFile(events, path, header))
        conn.execute("alter table stage rename to r46")
        results = []
        for table, build in ((products, _PRODUCTS_FROM_REES46), (events, _EVENTS_FROM_REES46)):
            conn.execute("drop table if exists stage, checked_stage")
            conn.execute(sql.SQL(build))
            conn.execute("analyze stage")
            results.append(check_and_write(conn, PlannedFile(table, path, table.column_names),
                                           None, loaded_at, load_id, f"{source}#{table.name}"))
        report = LoadReport(load_id, source, loaded_at, None, results)
        conn.execute("update ops.loads set status = 'succeeded', summary = %s where load_id = %s",
                     (json.dumps(report.as_dict()), load_id))
        conn.commit()
    return report
