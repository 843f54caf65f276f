"""Settings, read from `RETENTION_*` environment variables into one typed object.

`Settings` has one field per setting (name, type, default, description), so the README,
`retention settings` and the DAGs agree on names, and a bad value fails at once with
`SettingError` naming the variable. `settings()` returns the values the environment holds
at the moment of the call: it compares every variable of `Settings` with the last read on
each call and reuses that object only when all are unchanged, so a changed variable (a
test's monkeypatch.setenv included) is never answered from an older read.
Secrets never have defaults in code: they come from the environment or Airflow connections.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENV_PREFIX = "RETENTION_"

Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class SettingError(ValueError):
    """A `RETENTION_*` variable holds a value its setting cannot take."""


def _variable(field: str) -> str:
    return ENV_PREFIX + field.upper()


class Settings(BaseSettings):
    """One field per `RETENTION_<FIELD>` variable, matched exactly (upper case); an empty
    variable counts as unset. Fields can also be given by name: `Settings(home=...)`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, alias_generator=_variable,
                                      case_sensitive=True, validate_by_name=True,
                                      validate_by_alias=True, env_ignore_empty=True,
                                      frozen=True, extra="ignore")

    # repr=False: values that may hold a password or a key stay out of reprs and errors
    database_url: str | None = Field(None, repr=False, description=(
        "SQLAlchemy URL of the warehouse (postgresql://user:pass@host:5432/db). "
        "Unset: an embedded PostgreSQL 16 (pgserver) under RETENTION_HOME/pgdata."))
    currency: str | None = Field(None, description=(
        "The shop's reporting currency (ISO-4217). Unset: taken from the first load "
        "(the most frequent currency of its orders) and then fixed in ops.shop_settings."))
    home: Path = Field(PROJECT_ROOT / ".retention", description=(
        "Working folder: embedded database, landing folder, data-quality results, reports."))
    landing_dir: Path | None = Field(None, description=(
        "Folder the ingest DAG loads from. Unset: RETENTION_HOME/landing."))
    dbt_project_dir: Path = Field(PROJECT_ROOT / "dbt_project", description=(
        "The dbt project the build runs."))
    dbt_threads: int = Field(2, ge=1, description="dbt threads.")
    dispatch_threads: int = Field(2, ge=1, description=(
        "Sending threads per channel in a campaign step (each claims, renders, sends and "
        "records its own batches): one batch is rendered while another is on the wire."))
    claim_lease_seconds: Seconds = Field(60.0, description=(
        "Lease of a dispatcher's claim on ledger rows, renewed while it runs. Another "
        "dispatcher settles a claim only once its lease expired and its owner's database "
        "session is gone. Longer than any one provider request."))
    dispatch_settle_wait_seconds: Seconds = Field(120.0, description=(
        "How long a dispatcher that has sent everything it could waits for claims it cannot "
        "settle yet (another live dispatcher's batch, an unknown e-mail outcome before the "
        "provider's activity log can tell) before it returns and leaves them to the next "
        "pass."))
    send_shards: int = Field(2, ge=1, le=64, description=(
        "Send tasks per campaign step in Airflow (a mapped task, one dispatcher each with "
        "its own claims and lease, run by whichever workers are free): at most the "
        "provider pool's slots run at once."))
    plan_sessions: int = Field(2, ge=1, le=64, description=(
        "Database sessions that plan a large campaign step side by side, each for its own "
        "part of the audience (one statement uses one core of the database server); 1 "
        "plans every step in one statement."))
    plan_split_members: int = Field(200_000, ge=1, description=(
        "Audience size from which a step's first plan is split over RETENTION_PLAN_SESSIONS "
        "sessions."))
    send_retry_delay_seconds: Seconds = Field(120.0, description=(
        "Wait before Airflow retries a campaign step's failed send task (a task whose "
        "worker died included: the dead dispatcher's claims are settled by the lease rules "
        "of RETENTION_CLAIM_LEASE_SECONDS)."))
    load_lock_timeout: Seconds = Field(900.0, description=(
        "Seconds a load waits for another load of the same database to finish before it "
        "fails with 'another load is running' (0: no limit)."))
    events_file: Path = Field(PROJECT_ROOT / "include" / "events.yaml", description=(
        "The shop's declared event types and their properties (YAML); the loader "
        "quarantines events of an undeclared type or with wrong properties."))
    wait_scale: Seconds = Field(1.0, description=(
        "Multiplier for every wait between campaign steps (tests and demos shorten them, "
        "e.g. 0.0001)."))
    promo_secret: str | None = Field(None, repr=False, description=(
        "Secret that keys personal promo codes and unsubscribe links (HMAC). Required to send."))
    unsubscribe_url: str = Field("https://shop.example/unsubscribe", description=(
        "Base of the one-click unsubscribe link put in every message."))
    shop_url: str = Field("https://shop.example", description=(
        "Base of product links in messages (recommendations, carts)."))
    ingest_schedule: str = Field("@hourly", description=(
        "Schedule of the ingest DAG (landing folder)."))
    triggers_schedule: str = Field("*/15 * * * *", description=(
        "Schedule of the trigger-chain DAG."))
    triggers_send: bool = Field(True, description=(
        "false: the trigger and re-engagement DAGs plan ledger rows but do not send."))
    use_pools: bool = Field(True, description=(
        "false (or 0, no): campaign DAG steps run without the per-provider Airflow pools."))
    asset_host: str = Field("warehouse", description=(
        "Host name in the Airflow Asset URIs of the warehouse tables (a logical name, "
        "never connected to)."))
    asset_database: str = Field("retention", description=(
        "Database name in the Airflow Asset URIs of the warehouse tables (a logical name)."))
    sendgrid_webhook_key: str | None = Field(None, repr=False, description=(
        "SendGrid Event Webhook verification key (PEM or base64 DER). Required: the receiver "
        "does not start without it (except with --insecure-no-signature, local use only); "
        "unsigned, forged or stale batches get 403 and nothing is written."))
    sendgrid_webhook_tolerance_seconds: float = Field(
        600.0, gt=0, allow_inf_nan=False, description=(
            "How far (seconds, either way) a SendGrid webhook signature's timestamp may be "
            "from the receiver's clock; a stale or future-dated signature gets 403."))
    webhook_dir: Path | None = Field(None, description=(
        "Where webhook batches land before they are loaded. Unset: RETENTION_HOME/webhooks."))
    # NoDecode: the JSON is parsed by the validator below, so a malformed value is a
    # validation error naming the variable like any other
    attribution_windows: Annotated[dict[str, Seconds] | None, NoDecode] = Field(
        None, description=(
            "Per-channel attribution windows in hours, JSON, e.g. `{\"email\": 48}`. Unset: "
            "email 72, mobile and web push 24, telegram 48, sms and viber 24."))
    results_schedule: str = Field("@hourly", description=(
        "Schedule of the results (attribution) DAG."))
    report_schedule: str = Field("0 8 * * 1", description=(
        "Schedule of the weekly marketer report DAG."))
    report_recipients: str | None = Field(None, description=(
        "Marketers who get the weekly report (comma-separated e-mail addresses). Unset: "
        "the report is written and kept, not sent."))
    report_base_url: str | None = Field(None, description=(
        "Base URL where the kept weekly reports (RETENTION_HOME/reports) are published, e.g. "
        "behind the Airflow UI's web server: the e-mailed report links to "
        "<base>/weekly_report_<week>.html for the full version. Unset: the e-mail names the "
        "report's file instead of a link."))

    @field_validator("report_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL, e.g. https://airflow.example/reports")
        return value

    @field_validator("attribution_windows", mode="before")
    @classmethod
    def _json_object(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        import json

        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("expected a JSON object of channel: hours, e.g. {\"email\": 48}")
        return parsed

    @classmethod
    def variable(cls, field: str) -> str:
        """The environment variable of a field (its alias): `claim_lease_seconds` ->
        `RETENTION_CLAIM_LEASE_SECONDS`."""
        return cls.model_fields[field].alias or _variable(field)

    @staticmethod
    def shown(default: object) -> str:
        """A default as `retention settings` prints it."""
        if default is None:
            return "(none)"
        if isinstance(default, bool):
            return str(default).lower()
        if isinstance(default, float):
            return f"{default:g}"
        return str(default)


def _explain(exc: ValidationError) -> SettingError:
    problems = []
    for error in exc.errors():
        name, *inner = [str(part) for part in error["loc"]] or [""]
        info = next((info for info in Settings.model_fields.values() if info.alias == name), None)
        where = f" (at {'.'.join(inner)})" if inner else ""
        shown = "" if info is None or info.repr is False else f"={error.get('input')!r}"
        problems.append(f"{name}{where}{shown}: {error['msg']}")
    return SettingError("invalid setting: " + "; ".join(problems))


_VARIABLES = tuple(Settings.variable(field) for field in Settings.model_fields)
_RAW_VARIABLES = tuple(os.fsencode(name) for name in _VARIABLES)
#: (values of _VARIABLES, the Settings read from them) of the last read
_last: tuple[tuple, Settings] | None = None


def _environment_key() -> tuple:
    """The value of each variable `Settings` reads, as the environment holds it now. On
    POSIX it looks them up in the bytes table `os.environ` writes through (`_data`):
    `os.environ.get` of an unset variable costs an exception each, and renders call
    `settings()` per message (bench/RESULTS.md)."""
    raw = getattr(os.environ, "_data", None)
    if os.name == "posix" and isinstance(raw, dict):
        return tuple(map(raw.get, _RAW_VARIABLES))
    return tuple(map(os.environ.get, _VARIABLES))


def settings() -> Settings:
    """The settings as the environment holds them now (raises `SettingError`)."""
    global _last
    # compared in full on every call: a changed, added or removed variable is a new key
    key = _environment_key()
    last = _last
    if last is not None and last[0] == key:
        return last[1]
    try:
        current = Settings()
    except ValidationError as exc:
        raise _explain(exc) from None
    if _environment_key() == key:  # kept only if nothing changed while it was read
        _last = (key, current)
    return current


@dataclass(frozen=True)
class Paths:
    home: Path

    @property
    def pgdata(self) -> Path:
        return self.home / "pgdata"

    @property
    def landing(self) -> Path:
        return settings().landing_dir or self.home / "landing"

    @property
    def data_quality(self) -> Path:
        return self.home / "data_quality"

    @property
    def reports(self) -> Path:
        return self.home / "reports"


def paths() -> Paths:
    return Paths(home=settings().home)
