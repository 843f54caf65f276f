"""Trigger definitions: the `entry:` block of a campaign file compiled to detector SQL.

A campaign file with `entry:` (docs/triggers.md) is a trigger without code. This module
validates the blocks that go with it (`entry`, `unless`, `wait`, `reentry`; the schema is
`campaigns.spec.TRIGGER_SCHEMAS`, what a schema cannot say is checked here with the same
`file:line: field: message` errors) and compiles them to one SQL query with the columns of
`detect.COLUMNS`, so a definition plugs into the runner exactly where a detector does:

* the entry is a moment at time `t` (an event, an order, a matched offline receipt, a
  channel subscription, a product change); the trigger fires at `hit_at = t + wait`
  unless something of `unless` happened in `(t, t + wait]`;
* the query returns the moments with `lo < hit_at <= hi` and reads nothing after `hi`,
  the scan range the runner widens by lateness; `ops.trigger_hits` makes a moment seen
  by two scans a no-op;
* every value of the file is a bind parameter (`%(d<n>)s`); only fixed fragments are SQL
  text. A value may name a setting of `_triggers.yaml` instead (`$abandoned_cart_window`),
  read from the run's TriggerSettings when compiled;
* the campaign's `audience` filters the customers as of each moment (the audience rules
  of campaigns.audience; `all_customers` alone filters nothing), and `reentry` limits how
  often one customer enters.

The unless conditions reuse detect.py's fragments (`checked_out`, `bought_product`), so
"purchase" means exactly what it means for the code triggers; so do the entries where a
code trigger has the same step (the product changes and the customers interested in them,
new arrivals and their category's viewers, a cart's contents, an order's products).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path

from retention.campaigns.audience import _like_prefix, compile_audience
from retention.campaigns.spec import CampaignError
from retention.ingest.contract import EVENT_TYPES
from retention.ingest.events import EventsFileError, load_catalog
from retention.triggers.config import TriggerSettings, parse_window
from retention.triggers.detect import (PROBE, back_in_stock_changes, bought_product,
                                      cart_contents_ctes, checked_out, interested_ctes,
                                      launch_viewers_ctes, order_products, price_drops)

#: the kinds of entry, one per definition
ENTRY_KINDS = ("event", "order", "receipt", "subscription", "product_change", "date",
               "predicted", "stage", "next_order")
#: the contract's event types; a shop declares its own in the events file (setting
#: events_file, include/events.yaml; retention.ingest.events)
BUILTIN_EVENTS = EVENT_TYPES
#: `per` words with a meaning; any other word is a label (one chain per customer)
PER_BY_KIND = {
    "event": ("product", "category", "search", "top_category"),
    "order": ("order",),
    "receipt": ("receipt",),
    "subscription": (),
    "product_change": ("product", "category"),
    "date": (),
    "predicted": (),
    "stage": (),
    "next_order": (),
}
RESERVED_PER = {"product", "category", "search", "top_category", "order", "receipt"}
DEFAULT_KEY = {"event": "event", "order": "order", "receipt": "receipt",
               "subscription": "subscription", "price_drop": "price", "back_in_stock": "stock",
               "new_in_category": "new", "date": "date", "predicted": "predicted",
               "stage": "stage", "next_order": "next_order"}
#: the values of the measures a `stage` entry compares (customer_lifetime.sql; the
#: accepted_values of customer_lifetime.yml and customer_stage_history.yml)
STAGE_VALUES = {
    "rfm_segment": ("champions", "loyal", "potential_loyalist", "new", "promising", "cant_lose",
                    "at_risk", "hibernating", "lost", "no_purchase"),
    "lifecycle_stage": ("subscriber_no_purchase", "prospect", "new", "one_time", "repeat",
                        "loyal", "at_risk", "lapsed"),
}
#: optional columns a definition may need (the contract's optional ones)
OPTIONAL_COLUMNS = {"properties": ("raw", "events", "properties"),
                    "birth_date": ("raw", "customers", "birth_date")}

_SETTING_TYPES = {f.name: f.type for f in fields(TriggerSettings)}
LineOf = Callable[[list], int]


@dataclass(frozen=True)
class Definition:
    """A validated trigger definition (values as written: durations and `$settings`
    are resolved when compiled)."""

    source: str
    kind: str
    entry: dict
    unless: tuple[dict, ...]
    wait: str | None
    reentry: str | dict
    per: str
    key: str
    #: the campaign's audience rules, applied as of each moment
    audience: dict = field(default_factory=dict)
    #: line of each field a compile-time check may name (optional columns)
    lines: dict = field(default_factory=dict, compare=False)

    @property
    def change(self) -> str | None:
        return self.entry.get("product_change")

    @property
    def merge_products(self) -> bool:
        """New arrivals in one category add up in one chain."""
        return self.change == "new_in_category"


@dataclass(frozen=True)
class Compiled:
    sql: str
    params: dict
    #: SQL counting the raw rows the definition feeds on in (start, end] (trigger health),
    #: and its bind parameters besides start and end
    source_sql: str
    source_params: dict
    merge_products: bool


# --- validation ----------------------------------------------------------------------


def declared_event_types(path: Path | None = None) -> set[str]:
    """The contract's event types and the custom ones the events file declares (None:
    the configured file, the one the loader checks events against); a wrong file is a
    CampaignError naming its line and field."""
    try:
        return set(load_catalog(path).event_types)
    except EventsFileError as exc:
        raise CampaignError(str(exc)) from None


def setting_value(raw, settings: TriggerSettings):
    """A value as written, or the TriggerSettings field a `$name` names."""
    if isinstance(raw, str) and raw.startswith("$"):
        return getattr(settings, raw[1:])
    return raw


def window_value(raw, settings: TriggerSettings) -> timedelta:
    """A duration as written (`30m`, `2d`) or named by a `$setting`."""
    value = setting_value(raw, settings)
    return value if isinstance(value, timedelta) else parse_window(str(value))


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def parse_definition(data: dict, source: str, line_of: LineOf) -> Definition:
    """Validate the trigger blocks of a schema-valid campaign; CampaignError names the
    file, the line and the field."""

    def fail(path: list, message: str):
        dotted = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path)
        raise CampaignError(f"{source}:{line_of(path)}: {dotted.replace('.[', '[')}: {message}")

    entry = data.get("entry")
    if entry is None:
        fail([k for k in ("unless", "wait", "reentry") if k in data][:1],
             "needs an entry block (what starts the trigger)")
    if data["kind"] == "promo":
        fail(["entry"], "a promo campaign is scheduled, it has no entry")
    kinds = [k for k in ENTRY_KINDS if k in entry]
    if len(kinds) != 1:
        fail(["entry"], f"exactly one of {', '.join(ENTRY_KINDS)} (found "
                        f"{', '.join(kinds) or 'none'})")
    kind = kinds[0]
    allowed = {"event": {"where", "session", "cart_contents"},
               "product_change": {"min_drop", "interest"}, "date": {"at"}}.get(kind, set())
    for key in entry:
        if key not in ENTRY_KINDS and key not in ("key", "per") and key not in allowed:
            fail(["entry", key], f"not an option of {_a(kind)} entry")

    def setting(path: list, value, want: str):
        if isinstance(value, str) and value.startswith("$"):
            name = value[1:]
            if name not in _SETTING_TYPES:
                fail(path, f"no trigger setting {name!r} (plugins/retention/triggers/config.py)")
            if (_SETTING_TYPES[name] == "timedelta") != (want == "duration"):
                fail(path, f"setting {name!r} is not a {want}")
        elif want == "duration":
            try:
                parse_window(str(value))
            except ValueError as exc:
                fail(path, str(exc))

    if kind == "event":
        known = declared_event_types()
        for i, name in enumerate(_as_list(entry["event"])):
            if name not in known:
                path = ["entry", "event"] + ([i] if isinstance(entry["event"], list) else [])
                fail(path, f"unknown event type {name!r} (the contract's: "
                           f"{', '.join(BUILTIN_EVENTS)}; a shop declares more in "
                           f"include/events.yaml)")
        if "session" in entry:
            setting(["entry", "session", "min_views"], entry["session"]["min_views"], "number")
            if "span" in entry["session"]:
                setting(["entry", "session", "span"], entry["session"]["span"], "duration")
            if entry.get("per", "top_category") != "top_category":
                fail(["entry", "per"], "a session entry is per top_category")
        elif entry.get("per") == "top_category":
            fail(["entry", "per"], "top_category needs a session: block")
        if "cart_contents" in entry:
            if _as_list(entry["event"]) != ["cart"]:
                fail(["entry", "cart_contents"], "only for an entry on cart events")
            if "lookback" in entry["cart_contents"]:
                setting(["entry", "cart_contents", "lookback"],
                        entry["cart_contents"]["lookback"], "duration")
    if kind == "product_change":
        if "min_drop" in entry:
            if entry["product_change"] != "price_drop":
                fail(["entry", "min_drop"], "only for a price_drop")
            setting(["entry", "min_drop"], entry["min_drop"], "number")
        if "within" in entry.get("interest", {}):
            setting(["entry", "interest", "within"], entry["interest"]["within"], "duration")
        for i, name in enumerate(_as_list(entry.get("interest", {}).get("events", []))):
            if name not in declared_event_types():
                fail(["entry", "interest", "events"], f"unknown event type {name!r}")
    if kind == "predicted":
        for side in ("above", "below"):
            if side in entry["predicted"]:
                setting(["entry", "predicted", side], entry["predicted"][side], "number")
    if kind == "stage":
        opts, seen = entry["stage"], {}
        values = STAGE_VALUES[opts["measure"]]
        for side in ("from", "to"):
            for i, value in enumerate(_as_list(opts.get(side, []))):
                path = ["entry", "stage", side] + ([i] if isinstance(opts[side], list) else [])
                if value not in values:
                    fail(path, f"unknown {opts['measure']} {value!r} (one of "
                               f"{', '.join(values)})")
                if seen.setdefault(value, side) != side:
                    fail(path, f"{value!r} is in both from and to: a move goes between "
                               "different values")

    per = entry.get("per")
    if per is None:
        per = {"event": "top_category" if "session" in entry else data["id"],
               "order": "order", "receipt": "receipt",
               "product_change": "category" if entry.get("product_change") == "new_in_category"
               else "product"}.get(kind, data["id"])
    if per in RESERVED_PER and per not in PER_BY_KIND[kind]:
        fail(["entry", "per"], f"{_a(kind)} entry can be per "
                               f"{', '.join(PER_BY_KIND[kind]) or 'a label only'}")
    if kind == "product_change" and per != ("category" if entry["product_change"] ==
                                            "new_in_category" else "product"):
        fail(["entry", "per"], f"a {entry['product_change']} entry is per "
                               f"{'category' if entry['product_change'] == 'new_in_category' else 'product'}")

    wait = data.get("wait")
    if wait is not None:
        setting(["wait"], wait, "duration")
    unless = tuple(data.get("unless", ()))
    if unless and wait is None:
        fail(["unless"], "needs a wait: the time after the entry in which these cancel it")
    for i, item in enumerate(unless):
        what = [k for k in ("event", "purchase", "order") if k in item]
        if len(what) != 1:
            fail(["unless", i], "exactly one of event, purchase, order")
        if "purchase" in item and ("where" in item or "same" in item):
            fail(["unless", i], "a purchase takes its options inside: purchase: {same: product}")
        if "order" in item and ("where" in item or "same" in item):
            fail(["unless", i], "an order takes its filters inside: order: {payment_method: card}")
        if "event" in item:
            declared = declared_event_types()  # reads the events file: once per item
            for name in _as_list(item["event"]):
                if name not in declared:
                    fail(["unless", i, "event"], f"unknown event type {name!r}")
        same = item.get("same") or item.get("purchase", {}).get("same")
        if same == "product" and kind not in ("event", "product_change"):
            fail(["unless", i], f"{_a(kind)} entry has no product to compare")
        if same == "category" and kind != "event":
            fail(["unless", i], f"{_a(kind)} entry has no category to compare")
        if item.get("since") == "session_start" and "session" not in entry:
            fail(["unless", i, "since"], "session_start needs a session: entry")
    reentry = data.get("reentry", "always")
    if isinstance(reentry, dict):
        setting(["reentry", "every"], reentry["every"], "duration")
    key = entry.get("key") or DEFAULT_KEY.get(entry.get("product_change", kind), kind)
    lines = {}
    if "properties" in entry.get("where", {}):
        lines["properties"] = line_of(["entry", "where", "properties"])
    for i, item in enumerate(unless):
        if "properties" in item.get("where", {}) and "properties" not in lines:
            lines["properties"] = line_of(["unless", i, "where", "properties"])
    if kind == "date" and entry["date"] == "birthday":
        lines["birth_date"] = line_of(["entry", "date"])
    return Definition(source=source, kind=kind, entry=dict(entry), unless=unless, wait=wait,
                      reentry=reentry, per=per, key=key, audience=data.get("audience", {}),
                      lines=lines)


# --- compiling -----------------------------------------------------------------------


def _normalise_reason(text: str) -> str:
    return re.sub(r"[^a-z]+", "_", text.lower())


class _Sql:
    """Bind parameters and the filter fragments shared by entries and unless items."""

    def __init__(self, definition: Definition, settings: TriggerSettings,
                 columns: set[str], relations: set[str]) -> None:
        self.d, self.settings, self.columns, self.relations = (definition, settings, columns,
                                                               relations)
        self.params: dict = {}
        self.entry_events = "raw.events"

    def bind(self, value) -> str:
        name = f"d{len(self.params)}"
        self.params[name] = value
        return f"%({name})s"

    def value(self, raw):
        return setting_value(raw, self.settings)

    def window(self, raw) -> timedelta:
        return window_value(raw, self.settings)

    def types(self, column: str, names) -> str:
        names = _as_list(names)
        if len(names) == 1:
            return f"{column} = {self.bind(names[0])}"
        return f"{column} = any({self.bind(names)})"

    def one_of(self, column: str, values) -> str:
        return f"{column} = any({self.bind([str(v) for v in _as_list(values)])})"

    def prefix(self, column: str, category: str) -> str:
        return f"({column} = {self.bind(category)} or {column} like {self.bind(_like_prefix(category))})"

    def range(self, column: str, r: dict) -> str:
        parts = []
        if r.get("min") is not None:
            parts.append(f"{column} >= {self.bind(r['min'])}")
        if r.get("max") is not None:
            parts.append(f"{column} <= {self.bind(r['max'])}")
        return " and ".join(parts) or "true"

    def properties(self, alias: str, tests: dict) -> list[str]:
        if "properties" not in self.columns:
            raise CampaignError(
                f"{self.d.source}:{self.d.lines.get('properties', 1)}: properties: raw.events "
                "has no properties column in this database (custom event properties need the "
                "migration that adds it: retention db upgrade)")
        out = []
        for name, test in tests.items():
            text = f"({alias}.properties ->> {self.bind(name)})"
            number = f"({alias}.properties -> {self.bind(name)})"
            if not isinstance(test, dict):
                test = {"eq": test}
            for op, arg in test.items():
                if op == "exists":
                    out.append(f"{'' if arg else 'not '}({alias}.properties ? {self.bind(name)})")
                elif op in ("eq", "ne"):
                    sym = "=" if op == "eq" else "<>"
                    # a JSON comparison: 5 matches 5 and 5.0, "5" only "5", true only true
                    out.append(f"coalesce({number} {sym} {self.bind(_json(arg))}::jsonb, false)")
                elif op == "in":
                    out.append(f"coalesce({number} = any({self.bind([_json(a) for a in arg])}"
                               f"::jsonb[]), false)")
                else:
                    sym = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}[op]
                    out.append(f"(case when jsonb_typeof({number}) = 'number' "
                               f"then {text}::numeric {sym} {self.bind(arg)} else false end)")
        return out

    def event_filters(self, e: str, p: str, where: dict) -> list[str]:
        """Conditions on event alias `e` (with its product left-joined as `p`)."""
        out = []
        if "product" in where:
            out.append(self.one_of(f"{e}.product_id", where["product"]))
        if "category" in where:
            out.append(self.prefix(f"coalesce({e}.category_path, {p}.category_path)",
                                   where["category"]))
        if "price" in where:
            out.append(self.range(f"coalesce({e}.price, {p}.price)", where["price"]))
        if "brand" in where:
            out.append(self.one_of(f"{p}.brand", where["brand"]))
        if "properties" in where:
            out.extend(self.properties(e, where["properties"]))
        return out

    def order_filters(self, o: str, where: dict) -> list[str]:
        out = []
        if "status" in where:
            out.append(self.one_of(f"{o}.status", where["status"]))
        if "payment_method" in where:
            out.append(self.one_of(f"{o}.payment_method", where["payment_method"]))
        if "amount" in where:
            out.append(self.range(f"{o}.total_amount", where["amount"]))
        if "cancel_reason" in where:
            out.append("regexp_replace(lower(coalesce(" + o + ".cancel_reason, '')), '[^a-z]+', "
                       f"'_', 'g') = {self.bind(_normalise_reason(where['cancel_reason']))}")
        if "category" in where:
            out.append(f"""exists (select 1 from raw.order_items fi
                           join raw.products fp on fp.product_id = fi.product_id
                           where fi.order_id = {o}.order_id
                             and {self.prefix('fp.category_path', where['category'])})""")
        return out


def _json(value) -> str:
    return json.dumps(value)


def _needs_product_join(where: dict) -> bool:
    return any(k in where for k in ("category", "price", "brand"))


@dataclass
class _Moment:
    """How the unless conditions see an entry row (SQL over the alias `m`)."""

    customer: str
    at: str
    event_id: str | None = None
    product: str | None = None
    category: str | None = None
    session_start: str | None = None


def _unless(q: _Sql, m: _Moment, until: str, has_ropo: bool, session: bool) -> tuple[str, str]:
    """SQL conditions (each prefixed `and not`): the first those that do not need the
    session's start, the second those that do."""
    plain, late = [], []
    for i, item in enumerate(q.d.unless):
        since = item.get("since", "entry")
        start = m.session_start if since == "session_start" else m.at
        if "order" in item:
            # an online order of the customer's after the entry, filtered as an order entry is
            u = f"u{i}"
            op = ">=" if since == "session_start" or m.event_id is not None else ">"
            parts = [f"{u}.customer_id = {m.customer}", f"{u}.ordered_at {op} {start}",
                     f"{u}.ordered_at <= {until}"] + q.order_filters(u, item["order"])
            cond = (f"exists (select 1 from raw.orders {u}\n                 where "
                    + "\n                   and ".join(parts) + f" {PROBE})")
        elif "purchase" in item:
            if item["purchase"].get("same") == "product":
                cond = bought_product(m.customer, m.product, m.at, until)
            else:
                cond = checked_out(m.customer, start, until,
                                   inclusive=since == "session_start" or m.event_id is not None,
                                   has_ropo=has_ropo)
        else:
            u = f"u{i}"
            where = item.get("where", {})
            join = (f" left join raw.products {u}p on {u}p.product_id = {u}.product_id"
                    if _needs_product_join(where) or item.get("same") == "category" else "")
            parts = [f"{u}.customer_id = {m.customer}", q.types(f"{u}.event_type", item["event"]),
                     f"{u}.occurred_at <= {until}"]
            if since == "session_start":
                parts.append(f"{u}.occurred_at >= {start}")
            elif m.event_id is not None:
                # after the entry event: later in time, or at the same time with a larger id
                parts.append(f"{u}.occurred_at >= {m.at} and ({u}.occurred_at > {m.at} "
                             f"or {u}.event_id > {m.event_id})")
            else:
                parts.append(f"{u}.occurred_at > {m.at}")
            if item.get("same") == "product":
                parts.append(f"{u}.product_id = {m.product}")
            elif item.get("same") == "category":
                path = f"coalesce({u}.category_path, {u}p.category_path)"
                parts.append(f"({path} = {m.category} or {path} like {m.category} || '.%%')")
            parts += q.event_filters(u, f"{u}p", where)
            cond = (f"exists (select 1 from raw.events {u}{join}\n                 where "
                    + "\n                   and ".join(parts) + f" {PROBE})")
        (late if since == "session_start" else plain).append(f"\n      and not {cond}")
    return "".join(plain), "".join(late)


def _event_entry(q: _Sql, has_ropo: bool) -> str:
    d, entry = q.d, q.d.entry
    where = entry.get("where", {})
    wait = q.bind(q.window(d.wait or "0s"))
    types = entry["event"]
    product_join = _needs_product_join(where) or d.per == "category"
    conds = [q.types("e.event_type", types), "e.customer_id is not null",
             f"e.occurred_at > %(lo)s - {wait}", f"e.occurred_at <= %(hi)s - {wait}"]
    conds += q.event_filters("e", "ep", where)
    category = "coalesce(e.category_path, ep.category_path)"
    if d.per == "product":
        conds.append("e.product_id is not null")
    elif d.per == "category":
        conds.append(f"{category} is not null")
    elif d.per == "search":
        conds.append("nullif(btrim(e.search_query), '') is not null")
    with_properties = "properties" in q.columns
    cols = ("e.event_id, e.customer_id, e.session_id, e.product_id, e.occurred_at, "
            f"{category if product_join else 'e.category_path'} as category_path, "
            "lower(btrim(e.search_query)) as query"
            + (", e.properties" if with_properties else ""))
    join = " left join raw.products ep on ep.product_id = e.product_id" if product_join else ""
    session = "session" in entry
    m = _Moment("m.customer_id", "m.occurred_at", "m.event_id", "m.product_id", "m.category_path",
                "ss.started" if session else None)
    until = f"m.occurred_at + {wait}"
    plain, late = _unless(q, m, until, has_ropo, session)
    ctes = [f"entries as (\n      select {cols}\n      from {q.entry_events} e{join}\n      where "
            + "\n        and ".join(conds) + "\n    )",
            f"kept as (\n      select m.* from entries m where true{plain}\n    )"]
    subject = {"product": "'product:' || m.product_id", "category": "'category:' || m.category_path",
               "search": "'search:' || m.query"}.get(d.per, q.bind(d.per) + '::text')
    context = ("jsonb_build_object('sessions', jsonb_build_array(m.session_id), 'products', "
               "case when m.product_id is null then '[]'::jsonb "
               "else jsonb_build_array(m.product_id) end)")
    if d.per == "search":
        context = ("jsonb_build_object('query', m.query, 'sessions', "
                   "jsonb_build_array(m.session_id))")
    joins, final = "", ["true"]
    if session:
        span = q.bind(q.window(entry["session"].get("span", "$cart_lookback")))
        min_views = q.bind(q.value(entry["session"]["min_views"]))
        b_filters = "".join(f"\n       and {c}" for c in q.event_filters("b", "bp", where))
        # the session's events: a probe per kept entry (PROBE), not a join over raw.events
        ctes += [f"""session_events as (
      select lv.event_id, b.product_id, b.occurred_at,
             coalesce('category:' || coalesce(b.category_path, bp.category_path),
                      'product:' || b.product_id) as subject
      from kept lv
      cross join lateral (
        select b.* from raw.events b
        where b.customer_id = lv.customer_id and {q.types('b.event_type', types)}
          and b.occurred_at <= lv.occurred_at and b.occurred_at > lv.occurred_at - {span}
          and (b.session_id = lv.session_id or lv.session_id is null) {PROBE}) b
      left join raw.products bp on bp.product_id = b.product_id
      where (b.product_id is not null or b.category_path is not null){b_filters}
    )""", """subjects as (
      select event_id, subject, count(*) as views, max(occurred_at) as last_at
      from session_events group by event_id, subject
    )""", f"""top_subject as (
      select distinct on (event_id) event_id, subject, views
      from subjects where views >= {min_views}
      order by event_id, views desc, last_at desc, subject
    )""", """session_start as (
      select event_id, min(occurred_at) as started from session_events group by event_id
    )""", """session_products as materialized (
      select event_id, subject, jsonb_agg(product_id order by n desc, product_id) as products
      from (select sv.event_id, sv.subject, sv.product_id, count(*) as n from session_events sv
            where sv.product_id is not null
            group by sv.event_id, sv.subject, sv.product_id) p
      group by event_id, subject
    )"""]
        # the products are aggregated once and joined (a subquery per moment would scan
        # the whole CTE for each)
        joins = ("\n    join top_subject ts on ts.event_id = m.event_id"
                 "\n    join session_start ss on ss.event_id = m.event_id"
                 "\n    left join session_products sp on sp.event_id = m.event_id"
                 " and sp.subject = ts.subject")
        subject = "ts.subject"
        context = """jsonb_build_object(
             'sessions', jsonb_build_array(m.session_id), 'views', ts.views,
             'products', coalesce(sp.products, '[]'::jsonb))"""
    if "cart_contents" in entry:
        lookback = q.bind(q.window(entry["cart_contents"].get("lookback", "$cart_lookback")))
        ctes.append(cart_contents_ctes("kept", lookback, wait))
        ctes.append("""cart_products as materialized (
      select i.event_id, jsonb_agg(i.product_id order by i.carted_at desc, i.product_id) as products
      from in_cart i group by i.event_id
    )""")
        joins += "\n    left join cart_products cp on cp.event_id = m.event_id"
        context = """jsonb_build_object(
             'sessions', jsonb_build_array(m.session_id),
             'products', coalesce(cp.products, '[]'::jsonb))"""
        # a cart emptied by removals (or purchases) is not abandoned
        final.append("(m.product_id is null or cp.event_id is not null)")
    if with_properties:  # a custom event's properties, for its messages' templates
        context = (f"({context} || case when m.properties is null then '{{}}'::jsonb "
                   "else jsonb_build_object('properties', m.properties) end)")
    return (f"with {', '.join(ctes)}\n"
            f"    select m.customer_id, m.event_id as event_key, {subject} as subject,\n"
            f"           m.occurred_at + {wait} as hit_at, m.occurred_at as anchor_at,\n"
            f"           null::timestamptz as first_step_at, {context} as context\n"
            f"    from kept m{joins}\n    where " + " and ".join(final) + late)


def _order_entry(q: _Sql, has_ropo: bool) -> str:
    d = q.d
    wait = q.bind(q.window(d.wait or "0s"))
    conds = ["oe.customer_id is not null", f"oe.ordered_at > %(lo)s - {wait}",
             f"oe.ordered_at <= %(hi)s - {wait}"] + q.order_filters("oe", d.entry["order"])
    m = _Moment("oe.customer_id", "oe.ordered_at")
    plain, _ = _unless(q, m, f"oe.ordered_at + {wait}", has_ropo, False)
    subject = "'order:' || oe.order_id" if d.per == "order" else q.bind(d.per) + "::text"
    return f"""
    select oe.customer_id, {q.bind(d.key + ':')}::text || oe.order_id as event_key, {subject} as subject,
           oe.ordered_at + {wait} as hit_at, oe.ordered_at as anchor_at,
           null::timestamptz as first_step_at,
           jsonb_build_object(
             'order_id', oe.order_id,
             'products', {order_products('oe.order_id')}) as context
    from raw.orders oe
    where {' and '.join(conds)}{plain}
    """


def _receipt_entry(q: _Sql, has_ropo: bool) -> str:
    d, where = q.d, q.d.entry["receipt"]
    if not has_ropo:
        # receipts are matched to customers by the ROPO model (retention build): none yet
        return _NOTHING
    wait = q.bind(q.window(d.wait or "0s"))
    conds = [f"rc.purchased_at > %(lo)s - {wait}", f"rc.purchased_at <= %(hi)s - {wait}",
             "rc.purchased_at <= %(hi)s"]
    if "amount" in where:
        conds.append(q.range("rc.total_amount", where["amount"]))
    if "store" in where:
        conds.append(q.one_of("r.store_id", where["store"]))
    if "category" in where:
        conds.append(f"""exists (select 1 from raw.offline_receipt_items fi
                         join raw.products fp on fp.product_id = fi.product_id
                         where fi.receipt_id = rc.receipt_id
                           and {q.prefix('fp.category_path', where['category'])})""")
    m = _Moment("rc.customer_id", "rc.purchased_at")
    plain, _ = _unless(q, m, f"rc.purchased_at + {wait}", has_ropo, False)
    subject = "'receipt:' || rc.receipt_id" if d.per == "receipt" else q.bind(d.per) + '::text'
    return f"""
    select rc.customer_id, {q.bind(d.key + ':')}::text || rc.receipt_id as event_key,
           {subject} as subject, rc.purchased_at + {wait} as hit_at,
           rc.purchased_at as anchor_at, null::timestamptz as first_step_at,
           jsonb_build_object(
             'receipt_id', rc.receipt_id,
             'products', coalesce((select jsonb_agg(ri.product_id order by ri.line_no)
                                   from raw.offline_receipt_items ri
                                   where ri.receipt_id = rc.receipt_id), '[]'::jsonb)) as context
    from marts.ropo_purchases rc join raw.offline_receipts r on r.receipt_id = rc.receipt_id
    where {' and '.join(conds)}{plain}
    """


def _subscription_entry(q: _Sql, has_ropo: bool) -> str:
    d, opts = q.d, q.d.entry["subscription"]
    wait = q.bind(q.window(d.wait or "0s"))
    channel = (f" and {q.one_of('cs.channel', opts['channel'])}" if "channel" in opts else "")
    earlier = (f" and {q.one_of('e.channel', opts['channel'])}" if "channel" in opts else "")
    first = opts.get("first", False)
    key = (q.bind(d.key) + "::text" if first else
           f"{q.bind(d.key + ':')}::text || cs.channel || '@' || extract(epoch from cs.subscribed_at)::text")
    m = _Moment("m.customer_id", "m.anchor_at")
    plain, _ = _unless(q, m, f"m.anchor_at + {wait}", has_ropo, False)
    inner = f"""
      select {'distinct on (cs.customer_id)' if first else ''}
             cs.customer_id, {key} as event_key, {q.bind(d.per)}::text as subject,
             cs.subscribed_at + {wait} as hit_at, cs.subscribed_at as anchor_at,
             null::timestamptz as first_step_at,
             jsonb_build_object('channel', cs.channel) as context
      from raw.channel_subscriptions cs
      where cs.subscribed_at > %(lo)s - {wait} and cs.subscribed_at <= %(hi)s - {wait}{channel}
      {f'''and not exists (select 1 from raw.channel_subscriptions e
                      where e.customer_id = cs.customer_id
                        and e.subscribed_at < cs.subscribed_at{earlier})''' if first else ''}
      {'order by cs.customer_id, cs.subscribed_at, cs.channel' if first else ''}"""
    return f"select m.* from ({inner}) m where true{plain}"


def _product_change_entry(q: _Sql, has_ropo: bool) -> str:
    d, entry = q.d, q.d.entry
    change = entry["product_change"]
    wait = q.bind(q.window(d.wait or "0s"))
    interest = entry.get("interest", {})
    lookback = q.bind(q.window(interest.get(
        "within", "$replenished_lookback" if change == "new_in_category" else "$interest_lookback")))
    lo, hi = f"%(lo)s - {wait}", f"%(hi)s - {wait}"
    m = _Moment("m.customer_id", "m.anchor_at", product="m.product_id")
    plain, _ = _unless(q, m, f"m.anchor_at + {wait}", has_ropo, False)
    if change == "new_in_category":
        types = q.types("v.event_type", interest.get("events", "view"))
        inner = f"""{launch_viewers_ctes(lo, hi, lookback, types)}
    select w.customer_id, {q.bind(d.key + ':')}::text || w.product_id as event_key,
           'category:' || w.category_path as subject, w.launched_at + {wait} as hit_at,
           w.launched_at as anchor_at, null::timestamptz as first_step_at,
           jsonb_build_object('products', jsonb_build_array(w.product_id),
                              'category', w.category_path) as context,
           w.product_id
    from viewers w
    where not {checked_out('w.customer_id', f'w.launched_at - {lookback}', 'w.launched_at',
                           inclusive=False, has_ropo=has_ropo)}"""
    else:
        if change == "price_drop":
            min_drop = q.bind(q.value(entry.get("min_drop", "$min_price_drop")))
            changes = price_drops(lo, hi, min_drop)
        else:
            changes = back_in_stock_changes(lo, hi)
        types = q.types("e.event_type", interest.get("events", ["view", "cart", "wishlist"]))
        inner = f"""{interested_ctes(changes, lookback, types)}
    select i.customer_id,
           {q.bind(d.key + ':')}::text || i.product_id || '@' || extract(epoch from i.changed_at)::text
             as event_key,
           'product:' || i.product_id as subject,
           i.changed_at + {wait} as hit_at, i.changed_at as anchor_at,
           null::timestamptz as first_step_at,
           jsonb_build_object('products', jsonb_build_array(i.product_id),
                              'old_price', i.old_price, 'new_price', i.price) as context,
           i.product_id
    from interested i
    where not {bought_product('i.customer_id', 'i.product_id', 'i.last_interest', 'i.changed_at')}"""
    return f"""select m.customer_id, m.event_key, m.subject, m.hit_at, m.anchor_at,
           m.first_step_at, m.context from ({inner}) m where true{plain}"""


def _date_entry(q: _Sql, has_ropo: bool) -> str:
    """A date of the customer's in their own time zone: their birthday, or the
    anniversary of their first purchase, at `at` local time (09:00 by default); the
    key carries the year, so a customer enters once a year."""
    d, entry = q.d, q.d.entry
    if entry["date"] == "birthday" and "birth_date" not in q.columns:
        raise CampaignError(f"{d.source}:{d.lines.get('birth_date', 1)}: entry.date: raw.customers "
                            "has no birth_date column in this database")
    wait = q.bind(q.window(d.wait or "0s"))
    at = q.bind(timedelta(hours=int(entry.get("at", "09:00")[:2]),
                          minutes=int(entry.get("at", "09:00")[3:]))) + "::interval"
    tz = "coalesce(c.timezone, 'UTC')"
    if entry["date"] == "birthday":
        dates = "select c.customer_id, c.timezone, c.birth_date as origin from raw.customers c"
    else:
        ropo = ("union all select rp.customer_id, rp.purchased_at from marts.ropo_purchases rp "
                "where rp.purchased_at <= %(hi)s" if has_ropo else "")
        dates = f"""select c.customer_id, c.timezone, (min(p.at) at time zone {tz})::date as origin
          from (select customer_id, ordered_at as at from raw.orders
                where status in ('paid', 'delivered') and ordered_at <= %(hi)s {ropo}) p
          join raw.customers c on c.customer_id = p.customer_id
          group by c.customer_id, c.timezone"""
    m = _Moment("m.customer_id", "m.anchor_at")
    plain, _ = _unless(q, m, f"m.anchor_at + {wait}", has_ropo, False)
    # the anniversaries in the years the scan range touches (in the customer's zone);
    # 29 February falls on 28 February in other years (make_date would fail)
    inner = f"""
      with origins as ({dates}),
      candidates as (
        select o.customer_id, y.year,
               ((o.origin + make_interval(years => y.year - extract(year from o.origin)::int))::date
                + {at}) at time zone coalesce(o.timezone, 'UTC') as moment
        from origins o
        cross join lateral generate_series(
          extract(year from ((%(lo)s - {wait}) at time zone coalesce(o.timezone, 'UTC')))::int,
          extract(year from ((%(hi)s - {wait}) at time zone coalesce(o.timezone, 'UTC')))::int
        ) as y(year)
        where o.origin is not null and y.year > extract(year from o.origin)
      )
      select c.customer_id, {q.bind(d.key + ':')}::text || c.year::text as event_key,
             {q.bind(d.per)}::text as subject, c.moment + {wait} as hit_at, c.moment as anchor_at,
             null::timestamptz as first_step_at,
             jsonb_build_object('date', {q.bind(entry['date'])}::text, 'year', c.year) as context
      from candidates c
      where c.moment > %(lo)s - {wait} and c.moment <= %(hi)s - {wait}
        and c.moment <= %(hi)s"""
    return f"select m.* from ({inner}) m where true{plain}"


def _predicted_entry(q: _Sql, has_ropo: bool) -> str:
    """A measure of the customer's predicted value (marts.customer_predicted_value, one
    snapshot per fit) crossing a threshold: above it in a snapshot, not above it (or
    below, for `below`) in the customer's previous snapshot. The moment is the
    snapshot's as_of; a customer's first snapshot crosses nothing."""
    d, opts = q.d, q.d.entry["predicted"]
    wait = q.bind(q.window(d.wait or "0s"))
    column = {m: m for m in ("predicted_value_12m", "probability_alive", "expected_purchases_90d",
                             "expected_purchases_365d", "expected_avg_order_value",
                             "expected_purchases_30d", "churn_probability")}[opts["measure"]]
    if "above" in opts:
        threshold = q.bind(q.value(opts["above"]))
        now, before = f"p.{column} > {threshold}", f"prev.value <= {threshold}"
    else:
        threshold = q.bind(q.value(opts["below"]))
        now, before = f"p.{column} < {threshold}", f"prev.value >= {threshold}"
    return _snapshot_moves(q, has_ropo, wait, "marts.customer_predicted_value", column,
                           f"{now} and {before}")


def _next_order_entry(q: _Sql, has_ropo: bool) -> str:
    """The expected date of the customer's next order passing with nothing bought: each
    snapshot of marts.customer_predicted_value names a date (expected_next_order_at); the
    moment is that date when the customer checked out nothing after the snapshot's as_of
    up to it. Every snapshot names its own date (one moment each, key by the snapshot's
    as_of); `reentry` limits how often a customer who stays quiet enters."""
    d = q.d
    wait = q.bind(q.window(d.wait or "0s"))
    m = _Moment("m.customer_id", "m.anchor_at")
    plain, _ = _unless(q, m, f"m.anchor_at + {wait}", has_ropo, False)
    bought = checked_out("p.customer_id", "p.as_of", "p.expected_next_order_at",
                         inclusive=False, has_ropo=has_ropo)
    inner = f"""
      select p.customer_id, {q.bind(d.key + ':')}::text || extract(epoch from p.as_of)::text as event_key,
             {q.bind(d.per)}::text as subject, p.expected_next_order_at + {wait} as hit_at,
             p.expected_next_order_at as anchor_at, null::timestamptz as first_step_at,
             jsonb_build_object('as_of', p.as_of, 'expected_next_order_at',
                                p.expected_next_order_at, 'churn_risk', p.churn_risk,
                                'probability_alive', p.probability_alive) as context
      from marts.customer_predicted_value p
      where p.expected_next_order_at > %(lo)s - {wait}
        and p.expected_next_order_at <= %(hi)s - {wait}
        and not {bought}"""
    return f"select m.* from ({inner}) m where true{plain}"


def _stage_entry(q: _Sql, has_ropo: bool) -> str:
    """A move of the customer's lifecycle stage or RFM segment
    (marts.customer_stage_history, one snapshot per build as_of): in a `to` value in a
    snapshot, in a `from` value (without `from`: any value not in `to`) in the customer's
    previous snapshot, the greatest earlier as_of. The moment is the snapshot's as_of; a
    customer's first snapshot moves nothing."""
    d, opts = q.d, q.d.entry["stage"]
    wait = q.bind(q.window(d.wait or "0s"))
    column = {m: m for m in STAGE_VALUES}[opts["measure"]]
    to = q.bind([str(v) for v in _as_list(opts["to"])])
    before = (f"prev.value = any({q.bind([str(v) for v in _as_list(opts['from'])])})"
              if "from" in opts else f"not (prev.value = any({to}))")
    return _snapshot_moves(q, has_ropo, wait, "marts.customer_stage_history", column,
                           f"p.{column} = any({to}) and {before}", previous_as_of=True)


def _snapshot_moves(q: _Sql, has_ropo: bool, wait: str, table: str, column: str,
                    condition: str, previous_as_of: bool = False) -> str:
    """Moments of a per-customer snapshot table (one row per customer and as_of): the
    snapshots `p` in the scan range whose `condition` holds against the customer's
    previous snapshot `prev` (its `column` as `prev.value`, the greatest earlier as_of).
    The moment is the snapshot's as_of; a first snapshot has no previous one."""
    d = q.d
    m = _Moment("m.customer_id", "m.anchor_at")
    plain, _ = _unless(q, m, f"m.anchor_at + {wait}", has_ropo, False)
    extra = ", 'previous_as_of', prev.as_of" if previous_as_of else ""
    inner = f"""
      select p.customer_id, {q.bind(d.key + ':')}::text || extract(epoch from p.as_of)::text as event_key,
             {q.bind(d.per)}::text as subject, p.as_of + {wait} as hit_at, p.as_of as anchor_at,
             null::timestamptz as first_step_at,
             jsonb_build_object('measure', {q.bind(column)}::text, 'value', p.{column},
                                'previous', prev.value{extra}) as context
      from {table} p
      cross join lateral (
        select h.{column} as value, h.as_of from {table} h
        where h.customer_id = p.customer_id and h.as_of < p.as_of
        order by h.as_of desc limit 1) prev
      where p.as_of > %(lo)s - {wait} and p.as_of <= %(hi)s - {wait}
        and {condition}"""
    return f"select m.* from ({inner}) m where true{plain}"


_NOTHING = ("select null::text as customer_id, null::text as event_key, null::text as subject, "
            "null::timestamptz as hit_at, null::timestamptz as anchor_at, "
            "null::timestamptz as first_step_at, null::jsonb as context where false")

_ENTRIES = {"predicted": _predicted_entry, "event": _event_entry, "order": _order_entry, "receipt": _receipt_entry,
            "subscription": _subscription_entry, "product_change": _product_change_entry,
            "date": _date_entry, "stage": _stage_entry, "next_order": _next_order_entry}

_SOURCES = {
    "order": "select count(*) from raw.orders where ordered_at > %(start)s and ordered_at <= %(end)s",
    "receipt": ("select count(*) from raw.offline_receipts "
                "where purchased_at > %(start)s and purchased_at <= %(end)s"),
    "subscription": ("select count(*) from raw.channel_subscriptions "
                     "where subscribed_at > %(start)s and subscribed_at <= %(end)s"),
    "product_change": ("select count(*) from raw.product_changes "
                       "where changed_at > %(start)s and changed_at <= %(end)s"),
    "date": "select count(*) from raw.customers",
    "predicted": ("select count(*) from marts.predicted_value_fits "
                  "where as_of > %(start)s and as_of <= %(end)s"),
    "stage": ("select count(*) from marts.customer_stage_history "
              "where as_of > %(start)s and as_of <= %(end)s"),
    "next_order": ("select count(*) from marts.customer_predicted_value "
                   "where expected_next_order_at > %(start)s "
                   "and expected_next_order_at <= %(end)s"),
}
#: the published table an entry reads: where it does not exist, the entry finds no moment
#: and its source count is 0
_SOURCE_RELATIONS = {"predicted": "marts.customer_predicted_value",
                     "stage": "marts.customer_stage_history",
                     "next_order": "marts.customer_predicted_value"}

TRIVIAL_AUDIENCE = {"include_any": [{"all_customers": True}]}


def compile_definition(definition: Definition, trigger: str, settings: TriggerSettings,
                       has_ropo: bool, columns: set[str] = frozenset(),
                       relations: set[str] | None = None,
                       entry_events: str = "raw.events") -> Compiled:
    """The detector SQL of a definition (bind parameters plus the runner's `lo`, `hi`).

    `columns`: the optional columns the database has (OPTIONAL_COLUMNS keys); a
    definition that needs a missing one fails with its file and line. `relations`: the
    published tables that exist, for an audience that reads them (None: not checked).
    `entry_events`: the relation an event entry's own events are read from: raw.events,
    or a copy of its rows that holds at least the entry's scan range (the runner's
    events of the interval); unless clauses and lookbacks read raw.events."""
    q = _Sql(definition, settings, set(columns),
             set(relations) if relations is not None else set(_SOURCE_RELATIONS.values()))
    q.entry_events = entry_events
    needed = _SOURCE_RELATIONS.get(definition.kind)
    missing = needed is not None and needed not in q.relations
    core = _NOTHING if missing else _ENTRIES[definition.kind](q, has_ropo)
    sql = f"select x.* from ({core}) x where true"
    audience = _audience(definition, q, relations)
    if audience:
        sql += f"\n  and {audience}"
    sql = _reentry(definition, q, trigger, sql)
    source, source_params = _SOURCES.get(definition.kind), {}
    if missing:
        source = "select 0::bigint"
    if source is None:
        source = ("select count(*) from raw.events where event_type = any(%(source_types)s) "
                  "and occurred_at > %(start)s and occurred_at <= %(end)s")
        source_params = {"source_types": _as_list(definition.entry["event"])}
    return Compiled(sql, q.params, source, source_params, definition.merge_products)


def _audience(definition: Definition, q: _Sql, relations: set[str] | None) -> str:
    audience = definition.audience
    if not audience or audience == TRIVIAL_AUDIENCE:
        return ""
    sql, params, needs = compile_audience(audience)
    if relations is not None and needs - relations:
        raise CampaignError(f"{definition.source}: audience: needs "
                            f"{', '.join(sorted(needs - relations))} (retention build)")
    # the audience's own bind names (p<n>) are kept apart from the definition's (d<n>)
    for name, value in params.items():
        q.params[f"a_{name}"] = value
        sql = sql.replace(f"%({name})s", f"%(a_{name})s")
    # as of each moment
    sql = sql.replace("%(as_of)s", "x.hit_at")
    return f"exists (select 1 from ({sql}) aud where aud.customer_id = x.customer_id)"


def _reentry(definition: Definition, q: _Sql, trigger: str, sql: str) -> str:
    """At most one entry per customer ever (`once`) or per period (`every`): a moment
    within the period after a chain of this trigger started for the customer (or after
    an earlier moment of the same scan that enters) is dropped, entry and extension
    alike."""
    reentry = definition.reentry
    if reentry == "always":
        return sql
    name = q.bind(trigger)
    if reentry == "once":
        return f"""
    select distinct on (y.customer_id) y.* from ({sql}) y
    where not exists (select 1 from ops.chain_instances ci
                      where ci.trigger = {name} and ci.customer_id = y.customer_id
                        and ci.started_at <= y.hit_at)
    order by y.customer_id, y.hit_at, y.event_key"""
    period = q.bind(q.window(reentry["every"]))
    return f"""
    with recursive found as ({sql}),
    eligible as (
      select f.*, row_number() over (partition by f.customer_id order by f.hit_at, f.event_key) as rn
      from found f
      where not exists (select 1 from ops.chain_instances ci
                        where ci.trigger = {name} and ci.customer_id = f.customer_id
                          and ci.started_at > f.hit_at - {period} and ci.started_at <= f.hit_at)
    ),
    walk as (
      select e.customer_id, e.rn, e.hit_at as last_at, true as keep from eligible e where e.rn = 1
      union all
      select e.customer_id, e.rn,
             case when e.hit_at >= w.last_at + {period} then e.hit_at else w.last_at end,
             e.hit_at >= w.last_at + {period}
      from walk w join eligible e on e.customer_id = w.customer_id and e.rn = w.rn + 1
    )
    select e.customer_id, e.event_key, e.subject, e.hit_at, e.anchor_at, e.first_step_at,
           e.context
    from eligible e join walk w on w.customer_id = e.customer_id and w.rn = e.rn
    where w.keep"""
