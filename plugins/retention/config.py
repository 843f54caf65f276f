"""Settings, read from `RETENTION_*` environment variables.

Every setting has one place here so the README, the CLI and the DAGs agree on names.
Secrets never have defaults in code: they come from the environment or Airflow connections.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

#: name -> (default, description); the README table is generated from this.
SETTINGS: dict[str, tuple[str | None, str]] = {
    "RETENTION_DATABASE_URL": (
        None,
        "SQLAlchemy URL of the warehouse (postgresql://user:pass@host:5432/db). "
        "Unset: an embedded PostgreSQL 16 (pgserver) under RETENTION_HOME/pgdata.",
    ),
    "RETENTION_CURRENCY": (
        None,
        "The shop's reporting currency (ISO-4217). Unset: taken from the first load "
        "(the most frequent currency of its orders) and then fixed in ops.shop_settings.",
    ),
    "RETENTION_HOME": (
        str(PROJECT_ROOT / ".retention"),
        "Working folder: embedded database, landing folder, data-quality results, reports.",
    ),
    "RETENTION_LANDING_DIR": (
        None,
        "Folder the ingest DAG loads from. Unset: RETENTION_HOME/landing.",
    ),
    "RETENTION_DBT_PROJECT_DIR": (
        str(PROJECT_ROOT / "dbt_project"),
        "The dbt project the build runs.",
    ),
    "RETENTION_DBT_THREADS": ("2", "dbt threads."),
    "RETENTION_DISPATCH_THREADS": (
        "2",
        "Sending threads per channel in a campaign step (each claims, renders, sends and "
        "records its own batches): one batch is rendered while another is on the wire.",
    ),
    "RETENTION_CLAIM_LEASE_SECONDS": (
        "60",
        "Lease of a dispatcher's claim on ledger rows, renewed while it runs. Another "
        "dispatcher settles a claim only once its lease expired and its owner's database "
        "session is gone. Longer than any one provider request.",
    ),
    "RETENTION_DISPATCH_SETTLE_WAIT_SECONDS": (
        "120",
        "How long a dispatcher that has sent everything it could waits for claims it cannot "
        "settle yet (another live dispatcher's batch, an unknown e-mail outcome before the "
        "provider's activity log can tell) before it returns and leaves them to the next "
        "pass.",
    ),
    "RETENTION_LOAD_LOCK_TIMEOUT": (
        "900",
        "Seconds a load waits for another load of the same database to finish before it "
        "fails with 'another load is running' (0: no limit).",
    ),
    "RETENTION_WAIT_SCALE": (
        "1",
        "Multiplier for every wait between campaign steps (tests and demos shorten them, "
        "e.g. 0.0001).",
    ),
    "RETENTION_PROMO_SECRET": (
        None,
        "Secret that keys personal promo codes and unsubscribe links (HMAC). Required to send.",
    ),
    "RETENTION_UNSUBSCRIBE_URL": (
        "https://shop.example/unsubscribe",
        "Base of the one-click unsubscribe link put in every message.",
    ),
    "RETENTION_SHOP_URL": (
        "https://shop.example",
        "Base of product links in messages (recommendations, carts).",
    ),
    "RETENTION_INGEST_SCHEDULE": ("@hourly", "Schedule of the ingest DAG (landing folder)."),
    "RETENTION_TRIGGERS_SCHEDULE": ("*/15 * * * *", "Schedule of the trigger-chain DAG."),
    "RETENTION_TRIGGERS_SEND": (
        "true",
        "false: the trigger and re-engagement DAGs plan ledger rows but do not send.",
    ),
    "RETENTION_USE_POOLS": (
        "true",
        "false (or 0, no): campaign DAG steps run without the per-provider Airflow pools.",
    ),
    "RETENTION_ASSET_HOST": (
        "warehouse",
        "Host name in the Airflow Asset URIs of the warehouse tables (a logical name, "
        "never connected to).",
    ),
    "RETENTION_ASSET_DATABASE": (
        "retention",
        "Database name in the Airflow Asset URIs of the warehouse tables (a logical name).",
    ),
    "RETENTION_SENDGRID_WEBHOOK_KEY": (
        None,
        "SendGrid Event Webhook verification key (PEM or base64 DER). Required: the receiver "
        "does not start without it (except with --insecure-no-signature, local use only); "
        "unsigned, forged or stale batches get 403 and nothing is written.",
    ),
    "RETENTION_SENDGRID_WEBHOOK_TOLERANCE_SECONDS": (
        "600",
        "How far (seconds, either way) a SendGrid webhook signature's timestamp may be from "
        "the receiver's clock; a stale or future-dated signature gets 403.",
    ),
    "RETENTION_WEBHOOK_DIR": (
        None,
        "Where webhook batches land before they are loaded. Unset: RETENTION_HOME/webhooks.",
    ),
    "RETENTION_ATTRIBUTION_WINDOWS": (
        None,
        "Per-channel attribution windows in hours, JSON, e.g. `{\"email\": 48}`. Unset: "
        "email 72, mobile and web push 24, telegram 48, sms and viber 24.",
    ),
    "RETENTION_RESULTS_SCHEDULE": ("@hourly", "Schedule of the results (attribution) DAG."),
    "RETENTION_REPORT_SCHEDULE": ("0 8 * * 1", "Schedule of the weekly marketer report DAG."),
    "RETENTION_REPORT_RECIPIENTS": (
        None,
        "Marketers who get the weekly report (comma-separated e-mail addresses). Unset: "
        "the report is written and kept, not sent.",
    ),
}


def setting(name: str) -> str | None:
    default, _ = SETTINGS[name]
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class Paths:
    home: Path

    @property
    def pgdata(self) -> Path:
        return self.home / "pgdata"

    @property
    def landing(self) -> Path:
        explicit = setting("RETENTION_LANDING_DIR")
        return Path(explicit) if explicit else self.home / "landing"

    @property
    def data_quality(self) -> Path:
        return self.home / "data_quality"

    @property
    def reports(self) -> Path:
        return self.home / "reports"


def paths() -> Paths:
    home = Path(setting("RETENTION_HOME") or PROJECT_ROOT / ".retention")
    return Paths(home=home)
