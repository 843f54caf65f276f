"""Campaigns as code: YAML files validated against a JSON Schema.

A campaign is a set of steps (waves of a promo cascade, or steps of a trigger chain), each
with a channel rule, a template and a wait. Errors name the file, the line and the field:

    include/campaigns/weekly_promo.yaml:14: steps[1].channel: 'pidgeon' is not one of [...]
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from retention.config import PROJECT_ROOT, settings
from retention.ingest.contract import CHANNELS

CAMPAIGNS_DIR = PROJECT_ROOT / "include" / "campaigns"
KINDS = ("promo", "trigger", "lifecycle", "reengagement", "transactional")
CAP_CLASSES = ("promo", "trigger", "transactional")
EXIT_EVENTS = ("purchase", "unsubscribe", "cart", "view", "wishlist", "search", "remove_from_cart",
               "app_open", "review")

_DURATION = r"^\d+(\.\d+)?\s*(s|m|h|d|w)$"

_NUMBER_RANGE = {
    "type": "object",
    "properties": {"min": {"type": ["number", "null"]}, "max": {"type": ["number", "null"]}},
    "additionalProperties": False,
}
_CATEGORY_WINDOW = {
    "type": "object",
    "required": ["category"],
    "properties": {
        "category": {"type": "string", "minLength": 1},
        "within_days": {"type": "number", "exclusiveMinimum": 0},
        "without_purchase": {"type": "boolean"},
        "max_rank": {"type": "integer", "minimum": 1},
    },
    "additionalProperties": False,
}
RULE_SCHEMAS: dict[str, dict] = {
    "bought_category": _CATEGORY_WINDOW,
    "viewed_category": _CATEGORY_WINDOW,
    "affinity": _CATEGORY_WINDOW,
    "visited": {"type": "object", "required": ["within_days"],
                "properties": {"within_days": {"type": "number", "exclusiveMinimum": 0}},
                "additionalProperties": False},
    "ordered": {"type": "object",
                "properties": {"within_hours": {"type": "number", "exclusiveMinimum": 0},
                               "within_days": {"type": "number", "exclusiveMinimum": 0}},
                "minProperties": 1, "additionalProperties": False},
    "purchased": {"type": "object",
                  "properties": {"within_days": {"type": "number", "exclusiveMinimum": 0}},
                  "additionalProperties": False},
    "lifecycle_stage": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    "rfm_segment": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    "ltv": _NUMBER_RANGE,
    "purchases": _NUMBER_RANGE,
    "days_since_last_purchase": _NUMBER_RANGE,
    "churn_risk": {"type": "array", "minItems": 1, "uniqueItems": True,
                   "items": {"enum": ["high", "medium", "low"]}},
    "predicted_value_top": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "probability_alive": _NUMBER_RANGE,
    "churn_probability": _NUMBER_RANGE,
    "expected_purchases_30d": _NUMBER_RANGE,
    "expected_purchases_90d": _NUMBER_RANGE,
    "predicted_value_12m": _NUMBER_RANGE,
    "has_channel": {"type": "string", "enum": list(CHANNELS)},
    "customer_ids": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    "all_customers": {"type": "boolean", "const": True},
}
RULE_SCHEMA = {
    "type": "object",
    "minProperties": 1,
    "maxProperties": 1,
    "properties": RULE_SCHEMAS,
    "additionalProperties": False,
}
#: a step's channel rule: a channel, or channels in the order to try them; `best` (alone,
#: or first in the list) tries the customer's best channel first
#: (marts.customer_channel_engagement), then the rest (alone: every channel) in order
BEST_CHANNEL = "best"
CHANNEL_RULE = {
    "oneOf": [
        {"type": "string", "enum": [*CHANNELS, BEST_CHANNEL]},
        {"type": "array", "items": {"type": "string", "enum": [*CHANNELS, BEST_CHANNEL]},
         "minItems": 1, "uniqueItems": True},
    ]
}
#: share of a step's members kept at the step's own time or channel order when the step
#: says `send_time: optimal` or `best`, unless the step says `control:`
DEFAULT_STEP_CONTROL = 0.2
#: how long after the step's time an optimal send time may fall, unless `send_window:`
DEFAULT_SEND_WINDOW = "24h"
#: the blocks of a trigger definition (docs/triggers.md); what the schema cannot say (one
#: entry kind, a subject the entry can give, settings named with $) is checked by
#: retention.triggers.definitions with the same file:line: field messages
_SETTING = r"\$[a-z][a-z0-9_]*"
_WINDOW = {"type": "string", "pattern": rf"^(\d+(\.\d+)?\s*[smhdw]|{_SETTING})$"}
_AMOUNT = {"type": "number"}
_NUMBER_OR_SETTING = {"anyOf": [{"type": "number"}, {"type": "string", "pattern": f"^{_SETTING}$"}]}
_NAMES = {"anyOf": [{"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}]}
_EVENT_TYPES = {"anyOf": [{"type": "string", "pattern": r"^[a-z][a-z0-9_]*$"},
                          {"type": "array", "minItems": 1, "uniqueItems": True,
                           "items": {"type": "string", "pattern": r"^[a-z][a-z0-9_]*$"}}]}
_RANGE = {"type": "object", "minProperties": 1, "additionalProperties": False,
          "properties": {"min": _AMOUNT, "max": _AMOUNT}}
_SCALAR = {"type": ["string", "number", "boolean"]}
_PROPERTY_TEST = {"anyOf": [
    _SCALAR,
    {"type": "object", "minProperties": 1, "additionalProperties": False,
     "properties": {"eq": _SCALAR, "ne": _SCALAR, "gt": {"type": "number"},
                    "gte": {"type": "number"}, "lt": {"type": "number"},
                    "lte": {"type": "number"},
                    "in": {"type": "array", "items": _SCALAR, "minItems": 1},
                    "exists": {"type": "boolean"}}}]}
_EVENT_FILTERS = {"type": "object", "additionalProperties": False, "properties": {
    "product": _NAMES, "category": {"type": "string", "minLength": 1}, "price": _RANGE,
    "brand": _NAMES,
    "properties": {"type": "object", "minProperties": 1,
                   "propertyNames": {"pattern": r"^[A-Za-z_][A-Za-z0-9_.-]*$"},
                   "additionalProperties": _PROPERTY_TEST}}}
_ORDER_FILTERS = {"type": "object", "additionalProperties": False, "properties": {
    "status": {"anyOf": [{"enum": ["placed", "paid", "delivered", "cancelled", "returned"]},
                         {"type": "array", "minItems": 1, "uniqueItems": True,
                          "items": {"enum": ["placed", "paid", "delivered", "cancelled",
                                             "returned"]}}]},
    "payment_method": _NAMES, "amount": _RANGE, "category": {"type": "string", "minLength": 1},
    "cancel_reason": {"type": "string", "minLength": 1}}}
_RECEIPT_FILTERS = {"type": "object", "additionalProperties": False, "properties": {
    "amount": _RANGE, "category": {"type": "string", "minLength": 1}, "store": _NAMES}}
_KEY = {"type": "string", "pattern": r"^[a-z][a-z0-9_]*$"}
#: values of a `stage` entry's measure; which ones the measure can take is checked by
#: triggers.definitions (STAGE_VALUES), with the line of the value
_STAGE_VALUES = {"anyOf": [{"type": "string", "minLength": 1},
                           {"type": "array", "minItems": 1, "uniqueItems": True,
                            "items": {"type": "string", "minLength": 1}}]}
TRIGGER_SCHEMAS: dict[str, Any] = {
    "entry": {"type": "object", "additionalProperties": False, "properties": {
        "event": _EVENT_TYPES,
        "where": _EVENT_FILTERS,
        "session": {"type": "object", "required": ["min_views"], "additionalProperties": False,
                    "properties": {"min_views": _NUMBER_OR_SETTING, "span": _WINDOW}},
        "cart_contents": {"type": "object", "additionalProperties": False,
                          "properties": {"lookback": _WINDOW}},
        "order": _ORDER_FILTERS,
        "receipt": _RECEIPT_FILTERS,
        "subscription": {"type": "object", "additionalProperties": False, "properties": {
            "first": {"type": "boolean"},
            "channel": {"anyOf": [{"enum": list(CHANNELS)},
                                  {"type": "array", "minItems": 1,
                                   "items": {"enum": list(CHANNELS)}}]}}},
        "product_change": {"enum": ["price_drop", "back_in_stock", "new_in_category"]},
        "min_drop": _NUMBER_OR_SETTING,
        "interest": {"type": "object", "additionalProperties": False, "properties": {
            "events": _EVENT_TYPES, "within": _WINDOW}},
        "date": {"enum": ["birthday", "first_purchase_anniversary"]},
        "predicted": {"type": "object", "required": ["measure"], "additionalProperties": False,
                      "minProperties": 2, "maxProperties": 2, "properties": {
                          "measure": {"enum": ["predicted_value_12m", "probability_alive",
                                               "expected_purchases_90d",
                                               "expected_purchases_365d",
                                               "expected_avg_order_value",
                                               "expected_purchases_30d",
                                               "churn_probability"]},
                          "above": _NUMBER_OR_SETTING, "below": _NUMBER_OR_SETTING}},
        "stage": {"type": "object", "required": ["measure", "to"], "additionalProperties": False,
                  "properties": {
                      "measure": {"enum": ["rfm_segment", "lifecycle_stage"]},
                      "from": _STAGE_VALUES, "to": _STAGE_VALUES}},
        "next_order": {"enum": ["due"]},
        "at": {"type": "string", "pattern": r"^([01]\d|2[0-3]):[0-5]\d$"},
        "key": _KEY,
        "per": _KEY,
    }},
    "unless": {"type": "array", "minItems": 1, "items": {
        "type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
            "event": _EVENT_TYPES, "where": _EVENT_FILTERS,
            "purchase": {"type": "object", "additionalProperties": False,
                         "properties": {"same": {"enum": ["product"]}}},
            "order": _ORDER_FILTERS,
            "same": {"enum": ["product", "category"]},
            "since": {"enum": ["entry", "session_start"]}}}},
    "wait": _WINDOW,
    "reentry": {"anyOf": [{"enum": ["always", "once"]},
                          {"type": "object", "required": ["every"], "additionalProperties": False,
                           "properties": {"every": _WINDOW}}]},
}

CAMPAIGN_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["id", "kind", "audience", "steps"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": r"^[a-z][a-z0-9_]*$"},
        "name": {"type": "string"},
        "description": {"type": "string"},
        "kind": {"enum": list(KINDS)},
        "schedule": {"type": ["string", "null"]},
        "cap_class": {"enum": list(CAP_CLASSES)},
        "audience": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "include_any": {"type": "array", "items": RULE_SCHEMA},
                "include_all": {"type": "array", "items": RULE_SCHEMA},
                "exclude_any": {"type": "array", "items": RULE_SCHEMA},
            },
            "anyOf": [{"required": ["include_any"]}, {"required": ["include_all"]}],
        },
        "steps": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "channel", "template"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": r"^[a-z][a-z0-9_]*$"},
                    "channel": CHANNEL_RULE,
                    "template": {"type": "string", "pattern": r"^[a-z][a-z0-9_]*$"},
                    "wait": {"type": "string", "pattern": _DURATION},
                    "only_unengaged": {"type": "boolean"},
                    "send_time": {"enum": ["default", "optimal"]},
                    "send_window": {"type": "string", "pattern": _DURATION},
                    "control": {"type": "number", "exclusiveMinimum": 0, "maximum": 0.5},
                },
            },
        },
        "variants": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": r"^[A-Za-z0-9_]+$", "not": {"const": "holdout"}},
                    "weight": {"type": "number", "exclusiveMinimum": 0},
                    "subject": {"type": "string"},
                    "template": {"type": "string", "pattern": r"^[a-z][a-z0-9_]*$"},
                },
            },
        },
        "holdout": {"type": "number", "minimum": 0, "maximum": 0.5},
        "exit_on": {"type": "array", "items": {"enum": list(EXIT_EVENTS)}, "uniqueItems": True},
        "promo": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "discount_percent": {"type": "number", "exclusiveMinimum": 0, "maximum": 90},
                "valid_days": {"type": "integer", "minimum": 1},
            },
        },
        "subject": {"type": "string"},
        **TRIGGER_SCHEMAS,
    },
}


class CampaignError(ValueError):
    """A campaign file is invalid; the message names the file, line and field."""


@dataclass(frozen=True)
class Step:
    index: int
    name: str
    channels: tuple[str, ...]
    template: str
    wait: timedelta
    only_unengaged: bool
    #: `channel:` says `best`: the member's best channel first (`channels` is the rest)
    best_channel: bool = False
    #: `default` (the step's time) or `optimal` (each member's preferred hour within
    #: `send_window` of the step's time)
    send_time: str = "default"
    send_window: timedelta = timedelta(hours=24)
    #: share of the members in the step's control arm (step's time, channel order)
    control: float = DEFAULT_STEP_CONTROL

    @property
    def has_control_arm(self) -> bool:
        return self.best_channel or self.send_time == "optimal"


@dataclass(frozen=True)
class Variant:
    name: str
    weight: float
    subject: str | None
    template: str | None


@dataclass(frozen=True)
class Campaign:
    id: str
    name: str
    kind: str
    schedule: str | None
    cap_class: str
    audience: dict
    steps: tuple[Step, ...]
    variants: tuple[Variant, ...]
    holdout: float
    exit_on: tuple[str, ...]
    promo: dict
    subject: str | None
    source: str
    spec_hash: str
    raw: dict = field(repr=False, compare=False, default_factory=dict)
    #: the trigger definition (`entry:` and the blocks with it), None for a campaign
    #: without one (retention.triggers.definitions.Definition)
    definition: Any = field(repr=False, compare=False, default=None)

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"campaign {self.id} has no step {name!r}")

    def step_offset(self, step: Step) -> timedelta:
        """Time from the run's start to this step: the sum of the waits up to it."""
        return sum((s.wait for s in self.steps[: step.index + 1]), timedelta())


def parse_duration(text: str) -> timedelta:
    m = re.match(r"^(\d+(?:\.\d+)?)\s*([smhdw])$", text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 30m, 24h, 3d)")
    value, unit = float(m.group(1)), m.group(2)
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    scale = settings().wait_scale
    return timedelta(seconds=value * seconds * scale)


def parse_window(text: str) -> timedelta:
    """A send window: a duration on the clock of the customer's day, never scaled by
    RETENTION_WAIT_SCALE (a preferred hour stays an hour)."""
    m = re.match(r"^(\d+(?:\.\d+)?)\s*([smhdw])$", text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 30m, 24h, 3d)")
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return timedelta(seconds=float(m.group(1)) * seconds)


def _line_of(node: yaml.Node, path: list) -> int:
    """The 1-based line of the YAML node at a JSON-schema error path (deepest found)."""
    line = node.start_mark.line + 1
    for key in path:
        child = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == key:
                    child = v
                    line = k.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            child = node.value[key]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def _field(path: list) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties are not allowed", "unknown field")
    if error.validator in ("oneOf", "anyOf") and error.context:
        best = min(error.context, key=lambda e: len(e.message))
        return best.message
    return error.message


def _non_finite(data: Any, path: list | None = None):
    """The path of the first NaN or infinite number in the parsed YAML, or None.

    YAML's .nan and .inf are floats, and JSON Schema's number type accepts them; a NaN
    also passes every minimum/maximum comparison, so a NaN holdout or weight would get
    past the schema and put everyone in the holdout.
    """
    path = path or []
    if isinstance(data, float) and not math.isfinite(data):
        return path
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return None
    for key, value in items:
        found = _non_finite(value, [*path, key])
        if found is not None:
            return found
    return None


def parse_yaml(text: str, source: str, error: type[Exception]) -> tuple[Any, Any]:
    """The node tree of a YAML text (for `_line_of`) and its data; text that is not YAML
    raises `error` naming `source` and the line."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise error(f"{source}{line}: not valid YAML: "
                    f"{getattr(exc, 'problem', None) or exc}") from exc


def parse_campaign(text: str, source: str = "<string>") -> Campaign:
    """Parse and validate one campaign; CampaignError names source, line and field."""
    node, data = parse_yaml(text, source, CampaignError)
    if not isinstance(data, dict) or node is None:
        raise CampaignError(f"{source}:1: a campaign file must be a mapping of fields")
    bad = _non_finite(data)
    if bad is not None:
        value = data
        for key in bad:
            value = value[key]
        raise CampaignError(f"{source}:{_line_of(node, bad)}: {_field(bad)}: "
                            f"{value} is not a finite number")
    validator = jsonschema.Draft202012Validator(CAMPAIGN_SCHEMA)
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), e.message))
    if errors:
        err = max(errors, key=lambda e: len(e.absolute_path))
        path = list(err.absolute_path)
        raise CampaignError(f"{source}:{_line_of(node, path)}: {_field(path)}: {_message(err)}")
    steps = []
    names: set[str] = set()
    for i, s in enumerate(data["steps"]):
        if s["name"] in names:
            raise CampaignError(f"{source}:{_line_of(node, ['steps', i, 'name'])}: "
                                f"steps[{i}].name: duplicate step name {s['name']!r}")
        names.add(s["name"])
        channels = (s["channel"],) if isinstance(s["channel"], str) else tuple(s["channel"])
        best = BEST_CHANNEL in channels
        if best and channels[0] != BEST_CHANNEL:
            raise CampaignError(f"{source}:{_line_of(node, ['steps', i, 'channel'])}: "
                                f"steps[{i}].channel: {BEST_CHANNEL!r} must come first "
                                "(the best channel is tried before the others)")
        if best:
            channels = channels[1:] or tuple(CHANNELS)
        send_time = s.get("send_time", "default")
        for key in ("send_window",):
            if key in s and send_time != "optimal":
                raise CampaignError(f"{source}:{_line_of(node, ['steps', i, key])}: "
                                    f"steps[{i}].{key}: only with send_time: optimal")
        if "control" in s and not (best or send_time == "optimal"):
            raise CampaignError(f"{source}:{_line_of(node, ['steps', i, 'control'])}: "
                                f"steps[{i}].control: only with send_time: optimal or "
                                f"channel: {BEST_CHANNEL}")
        window = parse_window(s.get("send_window", DEFAULT_SEND_WINDOW))
        if window <= timedelta(0):
            raise CampaignError(f"{source}:{_line_of(node, ['steps', i, 'send_window'])}: "
                                f"steps[{i}].send_window: must be longer than 0")
        steps.append(Step(i, s["name"], channels, s["template"],
                          parse_duration(s.get("wait", "0s")), s.get("only_unengaged", i > 0),
                          best_channel=best, send_time=send_time, send_window=window,
                          control=float(s.get("control", DEFAULT_STEP_CONTROL))))
    variants = tuple(Variant(v["name"], float(v.get("weight", 1)), v.get("subject"),
                             v.get("template")) for v in data.get("variants", [{"name": "A"}]))
    if len({v.name for v in variants}) != len(variants):
        raise CampaignError(f"{source}:{_line_of(node, ['variants'])}: variants: duplicate names")
    definition = None
    if any(key in data for key in TRIGGER_SCHEMAS):
        from retention.triggers.definitions import parse_definition

        definition = parse_definition(data, source, lambda path: _line_of(node, path))
    canonical = json.dumps(data, sort_keys=True, default=str)
    return Campaign(
        id=data["id"], name=data.get("name", data["id"]), kind=data["kind"],
        schedule=data.get("schedule"),
        cap_class=data.get("cap_class", "transactional" if data["kind"] == "transactional"
                           else ("promo" if data["kind"] == "promo" else "trigger")),
        audience=data["audience"], steps=tuple(steps), variants=variants,
        holdout=float(data.get("holdout", 0.0)), exit_on=tuple(data.get("exit_on", ["purchase", "unsubscribe"])),
        promo=data.get("promo", {}), subject=data.get("subject"), source=source,
        spec_hash=hashlib.sha256(canonical.encode()).hexdigest()[:16], raw=data,
        definition=definition,
    )


def load_campaign(name_or_path: str | Path, directory: Path | None = None) -> Campaign:
    path = Path(name_or_path)
    if not path.suffix:
        path = (directory or CAMPAIGNS_DIR) / f"{name_or_path}.yaml"
    if not path.exists():
        raise CampaignError(f"{path}: no such campaign file")
    campaign = parse_campaign(path.read_text(), source=str(path))
    if campaign.id != path.stem:
        raise CampaignError(f"{path}:1: id: {campaign.id!r} must equal the file name {path.stem!r}")
    return campaign


def load_all(directory: Path | None = None) -> dict[str, Campaign]:
    directory = directory or CAMPAIGNS_DIR
    return {p.stem: load_campaign(p) for p in sorted(directory.glob("*.yaml"))
            if not p.name.startswith("_")}
