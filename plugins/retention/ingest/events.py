"""The shop's own event types: the declarations of the events file and the SQL that checks
a row's `properties` against them.

The file (setting `events_file`, `RETENTION_EVENTS_FILE`; include/events.yaml in the
repository) declares each custom event type under `events:`, with an optional
description and its properties:

    events:
      bonus_credited:
        description: Loyalty bonus credited to the customer's account.
        properties:
          amount: {type: number, required: true}
          reason: string                      # short form: the type, not required

A property's type is one of `PROPERTY_TYPES`. A row of a declared type must carry every
required property (a JSON null counts as missing), each property it carries with a value
of the declared type, and no property the declaration does not name (unless the type
says `additional_properties: true`). The contract's seven types (`EVENT_TYPES`) keep
their meaning and columns: their properties are free-form unless the file declares the
type too, and then they are checked like a custom type's (such a declaration may not
name a column of raw.events as a property).

A wrong file (not YAML, an unknown field or property type, a duplicate name, a bad name,
a conflicting declaration of a contract type) raises `EventsFileError` naming the file,
the line and the field (`file:line: field: message`, as campaign files do); the loader
reads the file once per load, before it writes anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from psycopg import sql

from retention.campaigns.spec import _field, _line_of, parse_yaml
from retention.ingest.contract import EVENT_TYPES, TABLE_BY_NAME

#: property type -> what a value of it is (a JSON value; dates and timestamps are strings)
PROPERTY_TYPES = {
    "string": "a JSON string",
    "number": "a JSON number",
    "integer": "a JSON number without a fraction",
    "boolean": "true or false",
    "date": "a string YYYY-MM-DD",
    "timestamp": "an ISO-8601 string with offset or Z",
}
NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
PROPERTY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$")
EVENT_FIELDS = ("description", "properties", "additional_properties")
PROPERTY_FIELDS = ("type", "required", "description")


class EventsFileError(ValueError):
    """The events file cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class PropertySpec:
    name: str
    type: str
    required: bool = False
    description: str = ""


@dataclass(frozen=True)
class EventSpec:
    name: str
    description: str
    properties: tuple[PropertySpec, ...]
    additional_properties: bool = False
    line: int = 0

    @property
    def contract_type(self) -> bool:
        return self.name in EVENT_TYPES


@dataclass(frozen=True)
class EventCatalog:
    """The declarations of one events file (`path`), by name."""

    path: Path
    declared: dict[str, EventSpec]

    @property
    def custom_types(self) -> tuple[str, ...]:
        """The declared types that are not the contract's, in file order."""
        return tuple(n for n in self.declared if n not in EVENT_TYPES)

    @property
    def event_types(self) -> tuple[str, ...]:
        """Every event type a row may have: the contract's, then the custom ones."""
        return EVENT_TYPES + self.custom_types


# --------------------------------------------------------------------------- the file


def _duplicate_key(node: yaml.Node, path: list) -> tuple[list, int] | None:
    """The path and line of the first key repeated in a mapping (YAML keeps the last)."""
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key, value in node.value:
            if key.value in seen:
                return [*path, key.value], key.start_mark.line + 1
            seen.add(key.value)
            found = _duplicate_key(value, [*path, key.value])
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate_key(item, [*path, i])
            if found:
                return found
    return None


def parse_catalog(text: str, path: Path) -> EventCatalog:
    """Validate the text of an events file; EventsFileError names `path`, line and field."""
    source = str(path)
    node, data = parse_yaml(text, source, EventsFileError)

    def fail(where: list, message: str):
        line = _line_of(node, where) if node is not None else 1
        raise EventsFileError(f"{source}:{line}: {_field(where)}: {message}")

    if node is None or data is None:
        return EventCatalog(path, {})
    duplicate = _duplicate_key(node, [])
    if duplicate:
        where, line = duplicate
        what = "event type" if len(where) == 2 and where[0] == "events" else "key"
        raise EventsFileError(f"{source}:{line}: {_field(where)}: duplicate {what} "
                              f"{where[-1]!r}")
    if not isinstance(data, dict):
        fail([], "expected a mapping with the key events")
    for key in data:
        if key != "events":
            fail([key], "unknown field (the file has one key, events)")
    events = data.get("events") or {}
    if not isinstance(events, dict):
        fail(["events"], "expected a mapping of event type name: declaration")
    declared: dict[str, EventSpec] = {}
    columns = set(TABLE_BY_NAME["events"].all_column_names)
    for name, body in events.items():
        where = ["events", name]
        if not isinstance(name, str) or not NAME.match(name):
            fail(where, f"bad event type name {name!r} (lower case letters, digits and _, "
                        "starting with a letter)")
        body = {} if body is None else body
        if not isinstance(body, dict):
            fail(where, "expected a mapping (description, properties)")
        for key in body:
            if key not in EVENT_FIELDS:
                fail([*where, key], f"unknown field (expected one of {', '.join(EVENT_FIELDS)})")
        description = body.get("description", "")
        if not isinstance(description, str):
            fail([*where, "description"], "expected text")
        extra = body.get("additional_properties", False)
        if not isinstance(extra, bool):
            fail([*where, "additional_properties"], "expected true or false")
        props = body.get("properties") or {}
        if not isinstance(props, dict):
            fail([*where, "properties"], "expected a mapping of property name: type")
        specs = []
        for prop, decl in props.items():
            at = [*where, "properties", prop]
            if not isinstance(prop, str) or not PROPERTY_NAME.match(prop):
                fail(at, f"bad property name {prop!r}")
            if name in EVENT_TYPES and prop in columns:
                fail(at, f"{name} is a contract event type: {prop} is its column of "
                         "raw.events, not a property")
            if isinstance(decl, str):
                decl = {"type": decl}
            if not isinstance(decl, dict):
                fail(at, "expected a type or a mapping (type, required, description)")
            for key in decl:
                if key not in PROPERTY_FIELDS:
                    fail([*at, key], f"unknown field (expected one of "
                                     f"{', '.join(PROPERTY_FIELDS)})")
            if "type" not in decl:
                fail(at, "needs a type")
            if decl["type"] not in PROPERTY_TYPES:
                fail([*at, "type"] if not isinstance(props[prop], str) else at,
                     f"unknown property type {decl['type']!r} (expected one of "
                     f"{', '.join(PROPERTY_TYPES)})")
            required = decl.get("required", False)
            if not isinstance(required, bool):
                fail([*at, "required"], "expected true or false")
            text = decl.get("description", "")
            if not isinstance(text, str):
                fail([*at, "description"], "expected text")
            specs.append(PropertySpec(prop, decl["type"], required, text))
        declared[name] = EventSpec(name, description, tuple(specs), extra,
                                   _line_of(node, where))
    return EventCatalog(path, declared)


def events_file() -> Path:
    """The configured events file (setting `events_file`)."""
    from retention.config import settings

    return settings().events_file


def load_catalog(path: Path | None = None) -> EventCatalog:
    """Read and validate the events file (None: the configured one)."""
    path = Path(path) if path is not None else events_file()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EventsFileError(f"{path}: no such events file (RETENTION_EVENTS_FILE; a file "
                              "with `events: {}` declares no custom event types)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EventsFileError(f"{path}: cannot read the events file ({exc})") from exc
    return parse_catalog(text, path)


# --------------------------------------------------------------------------- row checks


def _value_is(type_: str, value: sql.Composable, text: sql.Composable) -> sql.Composable:
    """SQL: the JSON `value` (its text `text`) is of property type `type_`."""
    kind = sql.SQL("jsonb_typeof({})").format(value)
    if type_ == "string":
        return sql.SQL("{} = 'string'").format(kind)
    if type_ == "number":
        return sql.SQL("{} = 'number'").format(kind)
    if type_ == "integer":
        return sql.SQL("({k} = 'number' and ({t})::numeric = trunc(({t})::numeric))").format(
            k=kind, t=text)
    if type_ == "boolean":
        return sql.SQL("{} = 'boolean'").format(kind)
    if type_ == "date":
        return sql.SQL("({} = 'string' and ops.try_date({}) is not null)").format(kind, text)
    if type_ == "timestamp":
        return sql.SQL("({} = 'string' and ops.try_timestamptz({}) is not null)").format(
            kind, text)
    raise ValueError(type_)


def _checks_of(spec: EventSpec, props: sql.Composable) -> list[sql.Composable]:
    """SQL reasons (NULL when fine) of one declared type, over the object `props`."""
    out = []
    for p in spec.properties:
        name = sql.Literal(p.name)
        value = sql.SQL("({} -> {})").format(props, name)
        text = sql.SQL("({} ->> {})").format(props, name)
        present = sql.SQL("coalesce(jsonb_typeof({}), 'null') <> 'null'").format(value)
        if p.required:
            out.append(sql.SQL("case when not ({}) then {} end").format(
                present, sql.Literal(f"missing property {p.name} (required for {spec.name})")))
        out.append(sql.SQL("case when {present} and not {ok} then {msg} || left({v}::text, 60) "
                           "end").format(
            present=present, ok=_value_is(p.type, value, text), v=value,
            msg=sql.Literal(f"wrong type of property {p.name}: {spec.name} declares {p.type}, "
                            "got ")))
    if not spec.additional_properties:
        names = [p.name for p in spec.properties]
        out.append(sql.SQL(
            "(select 'undeclared property of ' || {event} || ': ' "
            "|| string_agg(k, ', ' order by k) "
            "from jsonb_object_keys({props}) k where k <> all({names}::text[]))").format(
            event=sql.Literal(spec.name), props=props, names=sql.Literal(names)))
    return out


def properties_reason(catalog: EventCatalog, event_type: sql.Composable,
                      properties: sql.Composable, text: sql.Composable) -> sql.Composable:
    """SQL of the reason a row's properties break its type's declaration (NULL when they
    do not). `event_type`: the row's type (lower case text); `properties`: its parsed
    properties (jsonb, NULL when the row has none); `text`: the properties as given (NULL
    when empty). Text that is no JSON, or JSON that is no object, is reported by the
    loader's column checks and not checked here. Types without a declaration (the
    contract's, by default) take any object."""
    props = sql.SQL("coalesce({}, '{{}}'::jsonb)").format(properties)
    branches = []
    for spec in catalog.declared.values():
        checks = _checks_of(spec, props)
        if checks:
            branches.append(sql.SQL("when {} then nullif(concat_ws('; ', {}), '')").format(
                sql.Literal(spec.name), sql.SQL(", ").join(checks)))
    if not branches:
        return sql.SQL("null::text")
    return sql.SQL("case when ({x} is null or {p} is not null) "
                   "and coalesce(jsonb_typeof({p}), 'object') = 'object' then "
                   "case {t} {branches} end end").format(
        x=text, p=properties, t=event_type, branches=sql.SQL(" ").join(branches))
