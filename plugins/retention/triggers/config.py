"""Trigger settings: windows, lateness, thresholds. Defaults here, overrides in
`include/campaigns/_triggers.yaml` (durations as in campaign files: 30m, 24h, 3d).

The file also names the order in which chains are planned in a run: when two chains of
one customer are due at once, the earlier one takes the frequency cap first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path

import yaml

from retention.campaigns.spec import CAMPAIGNS_DIR, CampaignError

SETTINGS_FILE = CAMPAIGNS_DIR / "_triggers.yaml"

#: Every trigger the 15-minute DAG runs, in planning priority order (transactional first).
TRIGGERS = (
    "order_cancelled_oos",
    "abandoned_cart",
    "back_in_stock",
    "price_drop",
    "wishlist_reminder",
    "browse_abandonment",
    "search_abandonment",
    "category_replenished",
    "welcome_series",
    "second_purchase_nudge",
    "review_request",
)
REENGAGEMENT = "reengagement"


@dataclass(frozen=True)
class TriggerSettings:
    # scanning
    lateness: timedelta = timedelta(hours=2)
    """Events loaded up to this long after their interval ended are still handled."""
    max_catchup: timedelta = timedelta(days=3)
    """After a gap in runs, scan back at most this far (plus lateness)."""
    # abandonment
    abandoned_cart_window: timedelta = timedelta(minutes=60)
    """A cart with no later cart and no checkout within this time is abandoned."""
    cart_lookback: timedelta = timedelta(hours=24)
    """Products carted this long before the abandoned cart are still in the cart."""
    browse_window: timedelta = timedelta(minutes=60)
    browse_min_views: int = 2
    """Views of one product or category in a session that make browsing 'repeated'."""
    search_window: timedelta = timedelta(minutes=30)
    wishlist_wait: timedelta = timedelta(days=3)
    # catalogue changes
    interest_lookback: timedelta = timedelta(days=30)
    """Price drop / back in stock reach customers who viewed, carted or wishlisted the
    product this long before the change."""
    min_price_drop: float = 0.05
    replenished_lookback: timedelta = timedelta(hours=24)
    # lifecycle
    review_delay: timedelta = timedelta(days=7)
    """After the order (the contract has no delivery time) for delivered orders."""
    second_purchase_factor: float = 0.8
    """The nudge goes at this share of the cohort's median days to a second purchase."""
    second_purchase_default_days: float = 30.0
    second_purchase_min_days: float = 3.0
    second_purchase_max_days: float = 60.0
    cohort_min_repeaters: int = 20
    """A cohort with fewer second purchases borrows the norm of the last 12 cohorts."""
    # re-engagement
    reengage_multiple: float = 2.0
    """Silence longer than this multiple of the customer's own average gap (or the
    cohort norm for one-time buyers) enters the sequence."""
    reengage_min_silence_days: float = 30.0
    reengage_max_silence_days: float = 365.0
    # health
    health_days: float = 7.0
    health_min_history: int = 8
    health_min_expected: float = 5.0
    health_max_ratio: float = 0.25
    health_p_value: float = 0.001
    priority: tuple[str, ...] = TRIGGERS


_DURATIONS = {f.name for f in fields(TriggerSettings) if f.type in ("timedelta",)}


def parse_window(text: str) -> timedelta:
    """A duration such as 30m, 24h, 3d (not scaled by RETENTION_WAIT_SCALE: a window is a
    fact about customers, not a demo's waiting time)."""
    m = re.match(r"^(\d+(?:\.\d+)?)\s*([smhdw])$", text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 30m, 24h, 3d)")
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return timedelta(seconds=float(m.group(1)) * unit)


def load_settings(path: Path | None = None, **overrides) -> TriggerSettings:
    """Defaults, then the YAML file (if present), then keyword overrides."""
    path = path or SETTINGS_FILE
    values: dict = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise CampaignError(f"{path}: not valid YAML: {exc}") from exc
        known = {f.name for f in fields(TriggerSettings)}
        for key, value in data.items():
            if key not in known:
                raise CampaignError(f"{path}: unknown trigger setting {key!r}")
            if key in _DURATIONS:
                try:
                    value = parse_window(str(value))
                except ValueError as exc:
                    raise CampaignError(f"{path}: {key}: {exc}") from exc
            elif key == "priority":
                unknown = [t for t in value if t not in TRIGGERS]
                if unknown or sorted(value) != sorted(TRIGGERS):
                    raise CampaignError(f"{path}: priority must list each of {', '.join(TRIGGERS)}")
                value = tuple(value)
            values[key] = value
    return replace(TriggerSettings(), **values, **overrides)
