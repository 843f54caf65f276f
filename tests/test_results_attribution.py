"""Attribution end to end: raw rows and ledger rows -> dbt (ROPO match, unified purchases,
message_attribution, campaign_results) -> exactly the expected rows."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from retention import db
from retention.results.webhook import ingest_sendgrid_events

T = datetime(2026, 11, 2, 7, 0, tzinfo=timezone.utc)  # the cascade's Monday e-mail
AS_OF = datetime(2026, 11, 10, tzinfo=timezone.utc)
RUN = "weekly_promo@2026-11-02T07:00:00Z"


def _rows(conn, sql: str, rows: list[tuple]) -> None:
    with conn.cursor() as cur:
        cur.executemany(sql, rows)


def _scenario(url: str) -> None:
    with db.connect(url) as conn:
        _rows(conn, "insert into raw.customers (customer_id, email, phone, created_at) values "
              "(%s, %s, %s, '2025-01-01Z')",
              [("c1", "c1@example.com", None), ("c2", "c2@example.com", "+380671234567"),
               ("c3", "c3@example.com", None), ("c4", "c4@example.com", None),
               ("c5", "c5@example.com", None)])
        ledger = [
            # c1: an e-mail, then a push the next day, then an online order 3 h after the push
            ("m1_email", "email", 0, "email", "c1", "A", "sent", T, T),
            ("m1_push", "mobile_push", 1, "mobile_push", "c1", "A", "sent", T + timedelta(days=1),
             T + timedelta(days=1)),
            # c2: an e-mail, then a till receipt 59 h later with her phone in national format
            ("m2_email", "email", 0, "email", "c2", "B", "sent", T, T),
            # c3: Telegram, then an order 50 h later: outside Telegram's 48 h window
            ("m3_telegram", "telegram", 3, "telegram", "c3", "A", "sent", T + timedelta(days=3),
             T + timedelta(days=3)),
            # c4: holdout, buys 5 h after the wave would have gone
            ("m4_holdout", "email", 0, "email", "c4", "holdout", "holdout", T, None),
            # c5: the e-mail failed; the order after it is nobody's
            ("m5_email", "email", 0, "email", "c5", "A", "failed", T, None),
        ]
        _rows(conn, "insert into ops.messages (message_id, campaign_id, run_id, step, step_index, "
              "channel, customer_id, variant, status, planned_at, sent_at, cap_class) values "
              "(%s, 'weekly_promo', %s, %s, %s, %s, %s, %s, %s, %s, %s, 'promo')",
              [(m, RUN, step, i, ch, c, v, s, p, a) for m, step, i, ch, c, v, s, p, a in ledger])
        _rows(conn, "insert into raw.orders (order_id, customer_id, ordered_at, status, "
              "total_amount, currency) values (%s, %s, %s, %s, %s, 'UAH')", [
                  ("o1", "c1", T + timedelta(days=1, hours=3), "paid", "120.00"),
                  ("o1_cancelled", "c1", T + timedelta(days=1, hours=4), "cancelled", "99.00"),
                  ("o3", "c3", T + timedelta(days=3, hours=50), "delivered", "80.00"),
                  ("o4", "c4", T + timedelta(hours=5), "paid", "55.50"),
                  ("o5", "c5", T + timedelta(hours=2), "paid", "20.00"),
                  ("o_after_as_of", "c1", AS_OF + timedelta(hours=1), "paid", "1000.00")])
        _rows(conn, "insert into raw.offline_receipts (receipt_id, store_id, purchased_at, "
              "phone, total_amount, currency) values (%s, 'kyiv-1', %s, %s, %s, 'UAH')",
              [("r1", T + timedelta(hours=59), "067 123 45 67", "300.00"),
               ("r_unmatched", T + timedelta(hours=10), "+380999999999", "70.00")])
        conn.commit()


def test_attribution_of_the_hand_made_scenario(database_url, monkeypatch):
    from retention.results.pipeline import build_attribution

    _scenario(database_url)
    batch = [{"event": e, "sg_event_id": f"{e}-{m}", "message_id": m, "email": f"{c}@example.com",
              "timestamp": int((T + timedelta(minutes=k)).timestamp())}
             for k, (e, m, c) in enumerate([("delivered", "m1_email", "c1"),
                                            ("open", "m1_email", "c1"),
                                            ("delivered", "m2_email", "c2"),
                                            ("click", "m2_email", "c2")])]
    for received in (T + timedelta(hours=1), T + timedelta(hours=2)):  # delivered twice
        with db.connect(database_url) as conn:
            ingest_sendgrid_events(conn, json.loads(json.dumps(batch)), received_at=received,
                                   batch_id="b1", verified=True)
            conn.commit()

    build_attribution(AS_OF, url=database_url)

    with db.connect(database_url) as conn:
        attributed = conn.execute("""
            select message_id, customer_id, conversion_id, conversion_source, converted_at,
                   revenue, is_holdout
            from marts.message_attribution order by message_id""").fetchall()
        results = conn.execute("""
            select step, channel, variant, audience, sent, delivered, opened, clicked, converted,
                   revenue, offline_revenue
            from marts.campaign_results order by step_index, variant""").fetchall()
    assert attributed == [
        ("m1_push", "c1", "o1", "online", T + timedelta(days=1, hours=3), Decimal("120.00"), False),
        ("m2_email", "c2", "r1", "offline", T + timedelta(hours=59), Decimal("300.00"), False),
        ("m4_holdout", "c4", "o4", "online", T + timedelta(hours=5), Decimal("55.50"), True),
    ]
    assert results == [
        ("email", "email", "A", 2, 1, 1, 1, 0, 0, Decimal("0"), Decimal("0")),
        ("email", "email", "B", 1, 1, 1, 1, 1, 1, Decimal("300.00"), Decimal("300.00")),
        ("email", "email", "holdout", 1, 0, 0, 0, 0, 1, Decimal("55.50"), Decimal("0")),
        ("mobile_push", "mobile_push", "A", 1, 1, 0, 0, 0, 1, Decimal("120.00"), Decimal("0")),
        ("telegram", "telegram", "A", 1, 1, 0, 0, 0, 0, Decimal("0"), Decimal("0")),
    ]

    # windows are configurable: with 72 h for Telegram, c3's order 50 h later is credited
    monkeypatch.setenv("RETENTION_ATTRIBUTION_WINDOWS", '{"telegram": 72}')
    from retention.warehouse.build import build

    build(as_of=AS_OF, url=database_url, select="message_attribution", unit_tests=True)
    with db.connect(database_url) as conn:
        telegram = conn.execute("select conversion_id, window_hours from marts.message_attribution "
                                "where message_id = 'm3_telegram'").fetchall()
    assert telegram == [("o3", 72.0)]


def test_results_dag_loads_landed_batches_and_rebuilds_the_marts(database_url, airflow_db,
                                                                 tmp_path, monkeypatch):
    from pathlib import Path

    from airflow.dag_processing.dagbag import DagBag

    from retention.results.webhook import land_batch

    _scenario(database_url)
    monkeypatch.setenv("RETENTION_WEBHOOK_DIR", str(tmp_path / "webhooks"))
    # the receiver landed this batch but the database was down: it waits in incoming/
    batch = [{"event": "delivered", "sg_event_id": "late-1", "message_id": "m2_email",
              "email": "c2@example.com", "timestamp": int(T.timestamp()) + 9}]
    land_batch(json.dumps(batch).encode(), T + timedelta(minutes=1), verified=True,
               root=tmp_path / "webhooks")
    root = Path(__file__).resolve().parents[1]
    dag = DagBag(dag_folder=str(root / "dags" / "retention_results.py")).dags["retention_results"]
    run = dag.test(logical_date=AS_OF)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states == {"load_results": "success", "build_attribution": "success"}, states
    assert not list((tmp_path / "webhooks" / "incoming").glob("*.json"))
    with db.connect(database_url) as conn:
        results = dict(conn.execute("select variant || ':' || step, delivered + 10 * sent "
                                    "from marts.campaign_results"))
        as_of = conn.execute("select distinct as_of from marts.campaign_results").fetchall()
    # m2's delivery from the landed file; the push and Telegram sends as delivered events
    assert results == {"A:email": 10, "B:email": 11, "holdout:email": 0,
                       "A:mobile_push": 11, "A:telegram": 11}
    assert as_of == [(AS_OF,)]
