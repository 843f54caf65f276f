"""The contact policy shared by all campaigns: caps, quiet hours, global holdout."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time
from pathlib import Path

import yaml

from retention.campaigns.spec import CAMPAIGNS_DIR, CampaignError


@dataclass(frozen=True)
class Policy:
    global_cap: int
    global_cap_days: float
    channel_cap: int
    channel_cap_days: float
    quiet_start: time
    quiet_end: time
    default_timezone: str
    global_holdout: float


def load_policy(path: Path | None = None) -> Policy:
    path = path or CAMPAIGNS_DIR / "_policy.yaml"
    try:
        data = yaml.safe_load(path.read_text())
        caps = data["frequency_caps"]
        quiet = data["quiet_hours"]
        return Policy(
            global_cap=int(caps["global"]["max"]), global_cap_days=float(caps["global"]["per_days"]),
            channel_cap=int(caps["per_channel"]["max"]),
            channel_cap_days=float(caps["per_channel"]["per_days"]),
            quiet_start=time.fromisoformat(quiet["start"]), quiet_end=time.fromisoformat(quiet["end"]),
            default_timezone=str(data.get("default_timezone", "UTC")),
            global_holdout=float(data.get("global_holdout", 0.0)),
        )
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise CampaignError(f"{path}: invalid contact policy: {exc!r}") from exc
