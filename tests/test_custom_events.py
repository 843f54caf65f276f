"""Custom event types (docs/CONTRACT.md section 1, include/events.yaml): the loader accepts
a declared type whose properties match its declaration and quarantines, with reason and
line, an undeclared type, a wrong-typed, missing or undeclared property and properties
that are no JSON object; a wrong events file fails the load naming file, line and field
and changes nothing; birth_date is loaded and checked; a trigger filters on the loaded
properties and finds the birthdays."""

from __future__ import annotations

import textwrap
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from retention import db
from retention.campaigns.spec import CampaignError
from retention.config import PROJECT_ROOT, settings
from retention.ingest.events import EventsFileError, PropertySpec, load_catalog, parse_catalog
from retention.ingest.load import LoadError, load_folder
from retention.triggers import run_triggers
from retention.triggers.definitions import declared_event_types
from test_load import quarantine, snapshot, write_csv
from test_trigger_language import campaign, moments
from test_triggers import DAY, POLICY, SETTINGS, at, shop  # noqa: F401

UTC = timezone.utc
LOADED_AT = at(23)  # 2026-11-02 23:00 UTC
EVENTS_HEADER = ["event_id", "occurred_at", "event_type", "customer_id", "session_id",
                 "product_id", "category_path", "price", "search_query", "properties"]
CUSTOMERS = [["customer_id", "email", "timezone", "created_at"],
             *[[f"c{i}", f"c{i}@example.com", "UTC", "2025-01-01T00:00:00Z"]
               for i in range(1, 7)]]
NO_ORDERS = [["order_id", "customer_id", "ordered_at", "status", "total_amount"]]


def event(eid: str, etype: str, customer: str = "c1", properties: str = "",
          product: str = "", hour: int = 10) -> list[str]:
    return [eid, f"2026-11-02T{hour:02d}:00:00Z", etype, customer, "s1", product, "", "", "",
            properties]


def shop_folder(tmp_path: Path, events: list[list[str]]) -> Path:
    folder = tmp_path / "shop"
    write_csv(folder, "customers", CUSTOMERS)
    write_csv(folder, "orders", NO_ORDERS)
    write_csv(folder, "events", [EVENTS_HEADER, *events])
    return folder


def raw_events(url: str) -> list[tuple]:
    with db.connect(url) as conn:
        return conn.execute("select event_id, event_type, properties from raw.events "
                            "order by event_id").fetchall()


# --------------------------------------------------------------------------- the file


@pytest.mark.unit
def test_the_shipped_events_file_declares_the_custom_types():
    assert settings().events_file == PROJECT_ROOT / "include" / "events.yaml"
    catalog = load_catalog()
    assert catalog.custom_types == ("bonus_credited", "subscription_renewed",
                                    "payment_method_chosen")
    bonus = catalog.declared["bonus_credited"]
    assert [(p.name, p.type, p.required) for p in bonus.properties] == [
        ("amount", "number", True), ("reason", "string", False)]
    assert catalog.declared["payment_method_chosen"].properties[0] == PropertySpec(
        "method", "string", True, "For example card, cash_on_delivery, installments.")
    # the trigger language knows the same types
    assert declared_event_types() == set(catalog.event_types)
    assert len(catalog.event_types) == 10


@pytest.mark.unit
def test_the_dbt_build_accepts_the_declared_types(tmp_path, monkeypatch):
    """`retention build` passes the declared custom types to dbt (var custom_event_types),
    which stg_events' accepted_values test adds to the contract's seven."""
    from retention.warehouse.build import _custom_event_types

    assert _custom_event_types() == ["bonus_credited", "subscription_renewed",
                                     "payment_method_chosen"]
    other = tmp_path / "events.yaml"
    other.write_text("events:\n  view: {}\n  points_expired: {}\n")
    monkeypatch.setenv("RETENTION_EVENTS_FILE", str(other))
    assert _custom_event_types() == ["points_expired"]
    models = (PROJECT_ROOT / "dbt_project" / "models" / "staging" /
              "_staging__models.yml").read_text()
    assert "+ var('custom_event_types') }}" in models


BAD_FILES = {
    "unknown property type": (
        "events:\n  a:\n    properties:\n      x: {type: money}\n",
        ":4: events.a.properties.x.type: unknown property type 'money' (expected one of "
        "string, number, integer, boolean, date, timestamp)"),
    "unknown type, short form": (
        "events:\n  a:\n    properties:\n      x: decimal\n",
        ":4: events.a.properties.x: unknown property type 'decimal'"),
    "duplicate name": (
        "events:\n  bonus:\n    description: one\n  other: {}\n  bonus:\n    description: two\n",
        ":5: events.bonus: duplicate event type 'bonus'"),
    "contract type with a column as property": (
        "events:\n  view:\n    properties:\n      product_id: string\n",
        ":4: events.view.properties.product_id: view is a contract event type: product_id "
        "is its column of raw.events, not a property"),
    "bad yaml": (
        "events:\n  a: {properties: [\n", ":3: not valid YAML"),
    "unknown field": (
        "events:\n  a:\n    propertes: {x: string}\n",
        ":3: events.a.propertes: unknown field (expected one of description, properties, "
        "additional_properties)"),
    "not lower case": (
        "events:\n  Bonus_Credited: {}\n",
        ":2: events.Bonus_Credited: bad event type name 'Bonus_Credited'"),
    "required not a boolean": (
        "events:\n  a:\n    properties:\n      x: {type: string, required: maybe}\n",
        ":4: events.a.properties.x.required: expected true or false"),
    "no type": (
        "events:\n  a:\n    properties:\n      x: {required: true}\n",
        ":4: events.a.properties.x: needs a type"),
    "other top-level key": (
        "types:\n  a: {}\n", ":1: types: unknown field (the file has one key, events)"),
}


@pytest.mark.unit
@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_a_wrong_events_file_names_file_line_and_field(kind, tmp_path):
    text, expected = BAD_FILES[kind]
    path = tmp_path / "events.yaml"
    path.write_text(text)
    with pytest.raises(EventsFileError) as err:
        load_catalog(path)
    assert str(err.value).startswith(f"{path}{expected}"), str(err.value)
    # the trigger language reports the same error
    with pytest.raises(CampaignError) as err:
        declared_event_types(path)
    assert str(err.value).startswith(f"{path}{expected}")


@pytest.mark.unit
def test_a_contract_type_may_declare_its_properties_and_an_empty_file_declares_none(tmp_path):
    catalog = parse_catalog("events:\n  app_open:\n    properties:\n      build: integer\n",
                            tmp_path / "e.yaml")
    assert catalog.custom_types == ()
    assert catalog.declared["app_open"].contract_type
    assert parse_catalog("", tmp_path / "e.yaml").declared == {}
    assert parse_catalog("events: {}\n", tmp_path / "e.yaml").event_types == (
        "view", "cart", "remove_from_cart", "wishlist", "search", "purchase", "app_open")


# --------------------------------------------------------------------------- loading


MIXED = [
    event("e01", "bonus_credited", "c1", '{"amount": 150, "reason": "birthday"}'),   # line 2
    event("e02", "bonus_credited", "c2", '{"amount": 50}'),                          # 3
    event("e03", "bonus_credted", "c1", '{"amount": 5}'),                            # 4
    event("e04", "bonus_credited", "c3", '{"amount": "150"}'),                       # 5
    event("e05", "bonus_credited", "c3", '{"reason": "review"}'),                    # 6
    event("e06", "payment_method_chosen", "c1", '["card"]'),                         # 7
    event("e07", "view", "c1", "", product="p1"),                                    # 8
    event("e08", "cart", "c1", '{"source": "app", "n": [1, 2]}', product="p1"),      # 9
    event("e09", "payment_method_chosen", "c4", '{"method": "card"}'),               # 10
    event("e10", "subscription_renewed", "c5",
          '{"plan": "gold", "period_months": 12, "renews_at": "2027-11-02"}'),       # 11
    event("e11", "subscription_renewed", "c5", '{"period_months": 1.5}'),            # 12
    event("e12", "bonus_credited", "c6", '{"amount": 10, "ammount": 5}'),            # 13
    event("e13", "payment_method_chosen", "c6", "{method: card"),                    # 14
    event("e14", "subscription_renewed", "c6", '{"renews_at": "2027-02-30"}'),       # 15
    event("e15", "bonus_credited", "c6", '{"amount": null}'),                        # 16
    event("e16", "payment_method_chosen", "c6", ""),                                 # 17
    event("e17", "PAYMENT_METHOD_CHOSEN", "c6", '{"method": "cash"}'),               # 18
    event("e18", "purchase", "c6", '{"amount": "free-form"}', product="p1"),         # 19
    event("e19", "subscription_renewed", "c6", "null"),                              # 20
    event("e20", "subscription_renewed", "c6", "{}"),                                # 21
    event("e21", "bonus_credited", "c2", '{"amount": 2.5, "reason": 7}'),            # 22
]


def test_custom_events_are_loaded_or_quarantined_with_reason_and_line(tmp_path, database_url):
    folder = shop_folder(tmp_path, MIXED)
    report = load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    events = next(t for t in report.tables if t.table == "events")
    assert (events.rows, events.accepted, events.quarantined) == (21, 9, 12)
    assert raw_events(database_url) == [
        ("e01", "bonus_credited", {"amount": 150, "reason": "birthday"}),
        ("e02", "bonus_credited", {"amount": 50}),
        ("e07", "view", None),
        ("e08", "cart", {"source": "app", "n": [1, 2]}),
        ("e09", "payment_method_chosen", {"method": "card"}),
        ("e10", "subscription_renewed",
         {"plan": "gold", "period_months": 12, "renews_at": "2027-11-02"}),
        ("e17", "payment_method_chosen", {"method": "cash"}),
        ("e18", "purchase", {"amount": "free-form"}),
        ("e20", "subscription_renewed", {}),
    ]
    file = str(folder / "events.csv")
    assert [q for q in quarantine(database_url) if q[0] == "events"] == [
        ("events", file, 4, "unknown event_type 'bonus_credted' (not a contract type, "
                            "not declared in events.yaml)"),
        ("events", file, 5, 'wrong type of property amount: bonus_credited declares number, '
                            'got "150"'),
        ("events", file, 6, "missing property amount (required for bonus_credited)"),
        ("events", file, 7, 'properties is not a JSON object: ["card"]'),
        ("events", file, 12, "wrong type of property period_months: subscription_renewed "
                             "declares integer, got 1.5"),
        ("events", file, 13, "undeclared property of bonus_credited: ammount"),
        ("events", file, 14, "unparsable jsonb in properties: '{method: card'"),
        ("events", file, 15, "wrong type of property renews_at: subscription_renewed declares "
                             'date, got "2027-02-30"'),
        ("events", file, 16, "missing property amount (required for bonus_credited)"),
        ("events", file, 17, "missing property method (required for payment_method_chosen)"),
        ("events", file, 20, "properties is not a JSON object: null"),
        ("events", file, 22, "wrong type of property reason: bonus_credited declares string, "
                             "got 7"),
    ]
    with db.connect(database_url) as conn:
        record = conn.execute("select record from ops.quarantine where line_no = 14"
                              ).fetchone()[0]
    assert record["properties"] == "{method: card"  # the original text is kept
    # re-loading the same file changes nothing
    again = load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    events = next(t for t in again.tables if t.table == "events")
    assert (events.inserted, events.updated, events.quarantined) == (0, 0, 12)


def test_a_file_without_the_properties_column_loads_as_before(tmp_path, database_url):
    folder = shop_folder(tmp_path, [])
    write_csv(folder, "events", [EVENTS_HEADER[:-1],
                                 event("e1", "view", product="p1")[:-1],
                                 event("e2", "subscription_renewed")[:-1],
                                 event("e3", "payment_method_chosen")[:-1]])
    report = load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    assert report.ignored_columns == {}
    assert raw_events(database_url) == [("e1", "view", None),
                                        ("e2", "subscription_renewed", None)]
    assert [q[2:] for q in quarantine(database_url)] == [
        (4, "missing property method (required for payment_method_chosen)")]


def test_a_wrong_events_file_fails_the_load_and_changes_nothing(tmp_path, database_url,
                                                               monkeypatch):
    folder = shop_folder(tmp_path, MIXED[:2])
    load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    before = snapshot(database_url)
    assert len(before["raw.events"]) == 2
    bad = tmp_path / "events.yaml"
    bad.write_text(textwrap.dedent("""\
        events:
          bonus_credited:
            properties:
              amount: {type: money, required: true}
        """))
    monkeypatch.setenv("RETENTION_EVENTS_FILE", str(bad))
    write_csv(folder, "customers", CUSTOMERS + [["c7", "c7@example.com", "UTC", ""]])
    write_csv(folder, "events", [EVENTS_HEADER, *MIXED])
    with pytest.raises(LoadError) as err:
        load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    assert str(err.value) == (
        f"{bad}:4: events.bonus_credited.properties.amount.type: unknown property type "
        "'money' (expected one of string, number, integer, boolean, date, timestamp)")
    assert snapshot(database_url) == before  # not even customer c7, nor a row in ops.loads
    monkeypatch.setenv("RETENTION_EVENTS_FILE", str(tmp_path / "nowhere.yaml"))
    with pytest.raises(LoadError, match=r"nowhere.yaml: no such events file"):
        load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    assert snapshot(database_url) == before
    # the file the setting names is the one read: a type declared only there is accepted
    other = tmp_path / "other.yaml"
    other.write_text("events:\n  bonus_credted: {additional_properties: true}\n")
    monkeypatch.setenv("RETENTION_EVENTS_FILE", str(other))
    write_csv(folder, "events", [EVENTS_HEADER, MIXED[2], MIXED[0]])
    load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    assert [r[:2] for r in raw_events(database_url)] == [
        ("e01", "bonus_credited"), ("e02", "bonus_credited"), ("e03", "bonus_credted")]
    assert [q[2:] for q in quarantine(database_url) if q[0] == "events"] == [
        (3, "unknown event_type 'bonus_credited' (not a contract type, not declared in "
            "other.yaml)")]


def test_birth_date_is_loaded_and_a_bad_one_quarantined(tmp_path, database_url):
    folder = tmp_path / "shop"
    write_csv(folder, "customers", [
        ["customer_id", "email", "birth_date"],
        ["c1", "c1@example.com", "1990-11-03"],
        ["c2", "c2@example.com", ""],
        ["c3", "c3@example.com", "1990-02-30"],
        ["c4", "c4@example.com", "03.11.1990"],
        ["c5", "c5@example.com", "2026-11-04"],   # two days after the load
        ["c6", "c6@example.com", "2026-11-03"],   # already today east of UTC
        ["c7", "c7@example.com", "2000-02-29"],
    ])
    write_csv(folder, "orders", NO_ORDERS)
    report = load_folder(folder, database_url, loaded_at=LOADED_AT, currency="UAH")
    customers = next(t for t in report.tables if t.table == "customers")
    assert (customers.accepted, customers.quarantined) == (4, 3)
    with db.connect(database_url) as conn:
        assert conn.execute("select customer_id, birth_date from raw.customers order by 1"
                            ).fetchall() == [("c1", date(1990, 11, 3)), ("c2", None),
                                             ("c6", date(2026, 11, 3)), ("c7", date(2000, 2, 29))]
    assert [q[2:] for q in quarantine(database_url)] == [
        (4, "unparsable date in birth_date: '1990-02-30'"),
        (5, "unparsable date in birth_date: '03.11.1990'"),
        (6, "date in the future of the load: birth_date"),
    ]


def test_rees46_import_leaves_properties_empty(sample_data, database_url):
    from retention.ingest.formats import load_path

    report = load_path(sample_data / "rees46_sample_2019-10-01.csv", database_url,
                       fmt="rees46", loaded_at=LOADED_AT)
    events = next(t for t in report.tables if t.table == "events")
    with db.connect(database_url) as conn:
        assert conn.execute("select count(*), count(properties) from raw.events").fetchone() == (
            events.accepted, 0)
    assert events.accepted > 4000


# --------------------------------------------------------------------------- triggers


def test_a_trigger_on_a_custom_event_filters_on_its_loaded_properties(tmp_path, shop):
    folder = shop_folder(tmp_path, [
        event("e1", "bonus_credited", "c1", '{"amount": 150}', hour=9),
        event("e2", "bonus_credited", "c2", '{"amount": 50}', hour=9),
        event("e3", "bonus_credited", "c3", '{"amount": 100, "reason": "review"}', hour=10),
        event("e4", "bonus_credited", "c4", '{"amount": "150"}', hour=10),     # quarantined
        event("e5", "bonus_credted", "c5", '{"amount": 500}', hour=10),        # quarantined
        event("e6", "payment_method_chosen", "c6", '{"method": "card"}', hour=10),
        event("e7", "cart", "c6", '{"amount": 900}', hour=11),                 # another type
        event("e8", "bonus_credited", "c6", '{"amount": 99.99}', hour=11),
    ])
    report = load_folder(folder, shop.url, loaded_at=LOADED_AT, currency="UAH")
    assert report.quarantined == 2
    c = campaign("""\
        entry:
          event: bonus_credited
          where:
            properties: {amount: {gte: 100}}
        """)
    assert c.definition.entry["event"] == "bonus_credited"
    # the compiled detector over the loaded rows
    got = moments(shop, c, at(8), at(12), columns={"properties"})
    assert [(m[0], m[1], m[3]) for m in got] == [("c1", "e1", at(9)), ("c3", "e3", at(10))]
    # and a run of the triggers, which finds the column in the database itself
    result = run_triggers(at(8), at(12), shop.url, policy=POLICY, settings=SETTINGS,
                          triggers=[c.id], campaigns={c.id: c})
    assert result["triggers"][c.id]["started"] == 2, result
    assert shop.rows("select customer_id, event_key, hit_at from ops.trigger_hits "
                     "where trigger = %s order by 1", (c.id,)) == [
        ("c1", "e1", at(9)), ("c3", "e3", at(10))]


def test_a_birthday_trigger_finds_the_loaded_birth_dates(tmp_path, shop):
    folder = tmp_path / "shop"
    write_csv(folder, "customers", [
        ["customer_id", "email", "timezone", "birth_date"],
        ["c1", "c1@example.com", "UTC", "1990-11-03"],
        ["c2", "c2@example.com", "Asia/Tokyo", "1985-11-04"],
        ["c3", "c3@example.com", "UTC", "1985-12-25"],
        ["c4", "c4@example.com", "UTC", "1990-11-31"],     # quarantined: no such day
        ["c5", "c5@example.com", "UTC", ""],
    ])
    write_csv(folder, "orders", NO_ORDERS)
    report = load_folder(folder, shop.url, loaded_at=LOADED_AT, currency="UAH")
    assert report.quarantined == 1
    c = campaign("entry: {date: birthday, per: birthday}\n")
    got = moments(shop, c, DAY, DAY + timedelta(days=2), columns={"birth_date"})
    # 09:00 local: in Tokyo 00:00 UTC of the same day
    assert [(m[0], m[1], m[3]) for m in got] == [
        ("c1", "date:2026", datetime(2026, 11, 3, 9, tzinfo=UTC)),
        ("c2", "date:2026", datetime(2026, 11, 4, 0, tzinfo=UTC))]
    assert got[0][4] == {"date": "birthday", "year": 2026}


def test_the_shipped_bonus_campaign_file_alone_sends_each_credit_once(tmp_path, shop,
                                                                       monkeypatch):
    """include/campaigns/bonus_credited.yaml is all there is of this trigger: a run of every
    trigger finds it, and each credited bonus goes out once, with its amount, through the
    provider stand-ins; a bonus of 0 and another custom type do not enter; a second run
    sends nothing."""
    import json

    from retention.connections import channels_from_env
    from retention.triggers.runner import definition_triggers
    from retention_dev.stack import local_provider_stack

    assert "bonus_credited" in definition_triggers()
    folder = shop_folder(tmp_path, [
        event("e1", "bonus_credited", "c1", '{"amount": 150, "reason": "birthday"}', hour=9),
        event("e2", "bonus_credited", "c2", '{"amount": 0}', hour=9),
        event("e3", "bonus_credited", "c3", '{"amount": 40}', hour=10),
        event("e4", "payment_method_chosen", "c4", '{"method": "card"}', hour=10),
    ])
    write_csv(folder, "channel_subscriptions", [
        ["customer_id", "channel", "address", "subscribed_at"],
        *[[c, "mobile_push", f"token-{c}", "2025-01-01T00:00:00Z"] for c in ("c1", "c2", "c4")],
        ["c3", "email", "c3@example.com", "2025-01-01T00:00:00Z"]])
    assert load_folder(folder, shop.url, loaded_at=LOADED_AT, currency="UAH").quarantined == 0
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    with local_provider_stack() as (handle, env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        channels = channels_from_env(["mobile_push", "telegram", "email"])
        first = run_triggers(at(8), at(12), shop.url, channels, policy=POLICY, settings=SETTINGS)
        run_triggers(at(8), at(12), shop.url, channels, policy=POLICY, settings=SETTINGS)
        pushes = handle.providers["fcm"].accepted_recipients()
        mails = handle.providers["sendgrid"].accepted_recipients()
        bodies = json.dumps([r.body for r in handle.accepted])
    assert first["triggers"]["bonus_credited"]["started"] == 2, first["triggers"]
    # after both runs: each credit accepted once at the stand-ins
    assert pushes == {"token-c1": 1} and mails == {"c3@example.com": 1}
    assert "Bonus credited: 150" in bodies and "(birthday)" in bodies
    assert "Bonus credited: 40 points" in bodies
    assert shop.rows("select customer_id, status from ops.messages "
                     "where campaign_id = 'bonus_credited' order by 1") == [
        ("c1", "sent"), ("c3", "sent")]
