"""SendGrid Event Webhook batches and send results into `ops.message_events`.

The path of a batch:

1. **Verify** (when a verification key is configured, `RETENTION_SENDGRID_WEBHOOK_KEY`: the
   base64 DER public key SendGrid shows under Mail Settings > Signed Event Webhook).
   SendGrid signs `timestamp + raw body` with ECDSA P-256 / SHA-256 and sends the base64
   DER signature in `X-Twilio-Email-Event-Webhook-Signature`, the timestamp in
   `X-Twilio-Email-Event-Webhook-Timestamp`. The raw bytes are verified, never re-encoded
   JSON. A missing or wrong signature is refused (403) and nothing is written.
2. **Land** the raw batch durably: one JSON envelope file per request under
   `<webhook dir>/incoming/`, written to a temporary name, fsynced, renamed, and the
   folder fsynced. Only then does the receiver answer 2xx, so an acknowledged batch
   survives a crash or a database outage.
3. **Ingest** (at once by the receiver, and again by `load_landed_batches` for whatever
   is still in `incoming/`): one transaction normalises the events into
   `ops.message_events`, keyed (provider, sg_event_id) so a batch delivered twice counts
   once, writes consent changes, records the batch in `ops.webhook_batches`, and then the
   file moves to `loaded/`.

Consent flows back in the same transaction, so the next wave respects it: `unsubscribe`,
`group_unsubscribe`, `spamreport`, a hard `bounce` (SendGrid's `type: bounce`, not
`blocked`), and a `dropped` event whose reason says the address is bounced, unsubscribed or
a spam reporter, each become an `ops.consent_changes` row for channel `email` at the
event's time (the earliest one is kept).

Every e-mail carries `custom_args.message_id`, which SendGrid returns as a top-level key of
each event. An event without it is matched by the `sg_message_id` prefix (SendGrid's
X-Message-Id, the ledger's provider_message_id) and the address; an event that matches no
ledger row is still stored (message_id NULL or as given) and counted as unmatched.

`record_send_results` turns the outcomes of push, Telegram, SMS and Viber sends (already in
`ops.messages`) into `delivered` / `failed` events, so every channel reports delivery the
same way. For FCM, `delivered` means accepted by FCM (the v1 API reports no device
receipt); for Telegram the Bot API's `ok` means delivered to the chat.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from psycopg.types.json import Jsonb

from retention import db
from retention.config import paths

log = logging.getLogger(__name__)

PROVIDER = "sendgrid"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
KEY_ENV = "RETENTION_SENDGRID_WEBHOOK_KEY"
DIR_ENV = "RETENTION_WEBHOOK_DIR"

#: the event types SendGrid posts; others are stored as they come
EVENT_TYPES = ("processed", "delivered", "deferred", "bounce", "blocked", "dropped", "open",
               "click", "unsubscribe", "group_unsubscribe", "group_resubscribe", "spamreport")
#: SendGrid `dropped` reasons that mean the address must not be mailed again
SUPPRESSING_DROP_REASONS = ("Bounced Address", "Unsubscribed Address", "Spam Reporting Address")
#: ledger channel -> the provider name its send results are recorded under
SEND_RESULT_PROVIDERS = {"mobile_push": "fcm", "web_push": "fcm", "telegram": "telegram",
                         "sms": "sms_gateway", "viber": "viber_gateway", "email": PROVIDER}

RESULTS_DDL = """
create schema if not exists ops;

create table if not exists ops.webhook_batches (
  batch_id text primary key,
  provider text not null,
  received_at timestamptz not null,
  signature_verified boolean not null,
  events integer not null,
  inserted integer not null,
  duplicates integer not null,
  invalid integer not null,
  unmatched integer not null,
  consent_changes integer not null,
  deliveries integer not null default 1,
  source_file text
);

create table if not exists ops.report_deliveries (
  week_start date not null,
  recipient text not null,
  report_file text not null,
  provider_message_id text,
  sent_at timestamptz not null,
  primary key (week_start, recipient)
);
"""


class WebhookError(ValueError):
    """A request the receiver refuses; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def ensure_results_tables(conn: psycopg.Connection) -> None:
    conn.execute("select pg_advisory_xact_lock(hashtext('retention.results.ddl'))")
    conn.execute(RESULTS_DDL)


# --- signature -------------------------------------------------------------------------

def load_verification_key(text: str) -> ec.EllipticCurvePublicKey:
    """The public key as SendGrid shows it (base64 DER SubjectPublicKeyInfo); PEM works too."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"{KEY_ENV} is not a base64 DER (or PEM) public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{KEY_ENV} is not an elliptic-curve (ECDSA) public key")
    return key


def configured_key() -> ec.EllipticCurvePublicKey | None:
    """The verification key from the environment, or None when verification is off."""
    text = os.environ.get(KEY_ENV, "").strip()
    return load_verification_key(text) if text else None


def verify_signature(key: ec.EllipticCurvePublicKey, body: bytes, signature: str | None,
                     timestamp: str | None) -> bool:
    """True when `signature` (base64 DER ECDSA) signs `timestamp` + the raw `body`."""
    if not signature or not timestamp:
        return False
    try:
        raw_signature = base64.b64decode(signature.strip(), validate=True)
        key.verify(raw_signature, timestamp.strip().encode() + body, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, binascii.Error, ValueError):
        return False


def sign_batch(private_key: ec.EllipticCurvePrivateKey, body: bytes, timestamp: str) -> str:
    """What SendGrid does: the base64 DER signature of timestamp + body (for tests, demos)."""
    return base64.b64encode(private_key.sign(timestamp.encode() + body,
                                             ec.ECDSA(hashes.SHA256()))).decode()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def parse_batch(body: bytes) -> list[dict]:
    """A SendGrid batch is a JSON array of event objects; anything else is a 400."""
    try:
        events = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WebhookError(400, f"the body is not UTF-8 JSON: {exc}") from exc
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise WebhookError(400, "the body must be a JSON array of event objects")
    return events


def check_request(body: bytes, headers: Mapping[str, str],
                  key: ec.EllipticCurvePublicKey | None) -> list[dict]:
    """Verify (when a key is given) and parse a webhook request; WebhookError if refused."""
    if key is not None and not verify_signature(key, body, _header(headers, SIGNATURE_HEADER),
                                                _header(headers, TIMESTAMP_HEADER)):
        raise WebhookError(403, "missing or invalid SendGrid event webhook signature")
    return parse_batch(body)


# --- durable landing -------------------------------------------------------------------

def webhook_dir() -> Path:
    """Where batches land: RETENTION_WEBHOOK_DIR, else RETENTION_HOME/webhooks."""
    explicit = os.environ.get(DIR_ENV, "").strip()
    return Path(explicit) if explicit else paths().home / "webhooks"


def batch_id_for(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def land_batch(body: bytes, received_at: datetime, *, verified: bool,
               root: Path | None = None, provider: str = PROVIDER) -> Path:
    """Write the raw batch durably to `incoming/` and return the file (fsynced, renamed)."""
    incoming = (root or webhook_dir()) / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    received_at = received_at.astimezone(timezone.utc)
    batch_id = batch_id_for(body)
    name = f"{received_at:%Y%m%dT%H%M%S%f}Z_{provider}_{batch_id[:16]}.json"
    envelope = {"provider": provider, "batch_id": batch_id,
                "received_at": received_at.isoformat(), "signature_verified": verified,
                "body": body.decode("utf-8")}
    final = incoming / name
    tmp = incoming / f".{name}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(envelope, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(incoming)
    return final


def read_landed(path: Path) -> tuple[str, bytes, datetime, bool]:
    """(batch_id, raw body, received_at, signature_verified) of a landed file.

    A file may also be a bare SendGrid JSON array (an export, or batches copied by hand);
    its received_at is then the file's modification time and it counts as unverified.
    """
    raw = path.read_bytes()
    data = json.loads(raw.decode("utf-8"))
    if isinstance(data, dict) and "body" in data:
        body = data["body"].encode("utf-8")
        received = datetime.fromisoformat(data["received_at"])
        return data.get("batch_id") or batch_id_for(body), body, received, \
            bool(data.get("signature_verified"))
    received = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
    return batch_id_for(raw), raw, received, False


# --- normalisation and ingestion -------------------------------------------------------

@dataclass
class BatchResult:
    batch_id: str
    events: int
    inserted: int
    duplicates: int
    invalid: int
    unmatched: int
    consent_changes: int

    def as_dict(self) -> dict:
        return asdict(self)


def normalise_event(event: dict) -> dict | None:
    """One SendGrid event as an `ops.message_events` row (None when it has no type or time).

    `provider_event_id` is `sg_event_id`; an event without one gets a digest of its
    canonical JSON, so a re-delivered copy still deduplicates. A `bounce` whose `type` is
    `blocked` (a soft, temporary refusal) is stored as `blocked`.
    """
    event_type = event.get("event")
    timestamp = event.get("timestamp")
    if not isinstance(event_type, str) or not event_type:
        return None
    try:
        occurred_at = datetime.fromtimestamp(int(timestamp), tz=timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    if event_type == "bounce" and str(event.get("type", "")).lower() == "blocked":
        event_type = "blocked"
    event_id = event.get("sg_event_id")
    if not isinstance(event_id, str) or not event_id:
        canonical = json.dumps(event, sort_keys=True, separators=(",", ":"))
        event_id = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    message_id = event.get("message_id")
    if not isinstance(message_id, str) or not message_id:
        custom = event.get("custom_args")
        message_id = custom.get("message_id") if isinstance(custom, dict) else None
    sg_message_id = event.get("sg_message_id")
    prefix = sg_message_id.split(".", 1)[0] if isinstance(sg_message_id, str) else None
    email = event.get("email")
    return {"provider_event_id": event_id, "message_id": message_id or None,
            "event_type": event_type, "occurred_at": occurred_at,
            "address": email if isinstance(email, str) else None,
            "sg_message_prefix": prefix or None, "payload": event}


def consent_reason(row: dict) -> str | None:
    """Why an event withdraws consent for its address, or None."""
    kind = row["event_type"]
    if kind == "unsubscribe":
        return "unsubscribe"
    if kind == "group_unsubscribe":
        group = row["payload"].get("asm_group_id")
        return f"group unsubscribe (group {group})" if group is not None else "group unsubscribe"
    if kind == "spamreport":
        return "spam report"
    if kind == "bounce":
        return "hard bounce"
    if kind == "dropped" and row["payload"].get("reason") in SUPPRESSING_DROP_REASONS:
        return f"dropped: {row['payload']['reason']}"
    return None


def ingest_sendgrid_events(conn: psycopg.Connection, events: list[dict], *,
                           received_at: datetime, batch_id: str, verified: bool,
                           source_file: str | None = None) -> BatchResult:
    """Normalise a batch into ops.message_events and ops.consent_changes (caller commits)."""
    ensure_results_tables(conn)
    rows = [r for r in (normalise_event(e) for e in events) if r is not None]
    invalid = len(events) - len(rows)
    conn.execute("""create temp table if not exists incoming_events (
                      provider_event_id text, message_id text, event_type text,
                      occurred_at timestamptz, address text, sg_message_prefix text,
                      payload jsonb, consent_reason text) on commit drop""")
    conn.execute("truncate incoming_events")
    with conn.cursor() as cur:
        with cur.copy("copy incoming_events (provider_event_id, message_id, event_type, "
                      "occurred_at, address, sg_message_prefix, payload, consent_reason) "
                      "from stdin") as copy:
            for r in rows:
                copy.write_row((r["provider_event_id"], r["message_id"], r["event_type"],
                                r["occurred_at"], r["address"], r["sg_message_prefix"],
                                Jsonb(r["payload"]), consent_reason(r)))
    # events without the custom arg: the X-Message-Id prefix and the address find the row
    conn.execute("""
        update incoming_events e set message_id = m.message_id
        from ops.messages m
        where e.message_id is null and e.sg_message_prefix is not null
          and m.provider_message_id = e.sg_message_prefix and m.channel = 'email'
          and lower(m.address) = lower(e.address)""")
    unmatched = conn.execute("""
        select count(*) from incoming_events e
        where not exists (select 1 from ops.messages m where m.message_id = e.message_id)
    """).fetchone()[0]
    inserted = conn.execute("""
        insert into ops.message_events (provider, provider_event_id, message_id, event_type,
                                        occurred_at, address, payload, received_at)
        select distinct on (provider_event_id) %s, provider_event_id, message_id, event_type,
               occurred_at, address, payload, %s
        from incoming_events
        order by provider_event_id, occurred_at
        on conflict (provider, provider_event_id) do nothing""",
                            (PROVIDER, received_at)).rowcount
    # consent: the event's address as SendGrid spells it, the ledger's address of the
    # message, and any subscription address equal to it ignoring case (planning compares
    # addresses exactly)
    consent = conn.execute("""
        with withdrawn as (
          select e.address, e.occurred_at, e.consent_reason, e.event_type
          from incoming_events e where e.consent_reason is not null and e.address is not null
          union all
          select m.address, e.occurred_at, e.consent_reason, e.event_type
          from incoming_events e join ops.messages m on m.message_id = e.message_id
          where e.consent_reason is not null and m.address is not null
          union all
          select s.address, e.occurred_at, e.consent_reason, e.event_type
          from incoming_events e
          join raw.channel_subscriptions s
            on s.channel = 'email' and lower(s.address) = lower(e.address)
          where e.consent_reason is not null
        )
        insert into ops.consent_changes (channel, address, unsubscribed_at, source, reason)
        select distinct on (address) 'email', address, occurred_at,
               'sendgrid webhook: ' || event_type, consent_reason
        from withdrawn
        order by address, occurred_at
        on conflict (channel, address) do update
          set unsubscribed_at = excluded.unsubscribed_at, source = excluded.source,
              reason = excluded.reason
          where excluded.unsubscribed_at < ops.consent_changes.unsubscribed_at""").rowcount
    result = BatchResult(batch_id=batch_id, events=len(events), inserted=inserted,
                         duplicates=len(rows) - inserted,
                         invalid=invalid, unmatched=unmatched, consent_changes=consent)
    conn.execute("""
        insert into ops.webhook_batches (batch_id, provider, received_at, signature_verified,
            events, inserted, duplicates, invalid, unmatched, consent_changes, source_file)
        values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        on conflict (batch_id) do update
          set deliveries = ops.webhook_batches.deliveries + 1,
              inserted = ops.webhook_batches.inserted + excluded.inserted,
              consent_changes = ops.webhook_batches.consent_changes + excluded.consent_changes""",
                 (batch_id, PROVIDER, received_at, verified, result.events, result.inserted,
                  result.duplicates, result.invalid, result.unmatched, result.consent_changes,
                  source_file))
    if invalid:
        log.warning("batch %s: %d events without an event type or timestamp were not stored "
                    "(the raw batch is kept in the landing folder)", batch_id[:16], invalid)
    return result


def ingest_landed_file(path: Path, url: str | None = None) -> BatchResult | None:
    """Ingest one landed batch in one transaction, then move it to `loaded/`.

    A session lock on the file's name, held until the file has moved, keeps the receiver
    and the loader from ingesting the same file twice; None when another process has it.
    """
    with db.connect(url) as conn:
        lock = conn.execute("select pg_try_advisory_lock(hashtext('retention.webhook:' || %s))",
                            (path.name,)).fetchone()[0]
        conn.commit()
        if not lock:
            return None
        try:
            if not path.exists():  # moved by the process that held the lock before us
                return None
            batch_id, body, received_at, verified = read_landed(path)
            events = parse_batch(body)
            result = ingest_sendgrid_events(conn, events, received_at=received_at,
                                            batch_id=batch_id, verified=verified,
                                            source_file=path.name)
            conn.commit()
            loaded = path.parent.parent / "loaded"
            loaded.mkdir(parents=True, exist_ok=True)
            os.replace(path, loaded / path.name)
            return result
        finally:
            conn.rollback()
            conn.execute("select pg_advisory_unlock(hashtext('retention.webhook:' || %s))",
                         (path.name,))
            conn.commit()


def load_landed_batches(root: Path | None = None, url: str | None = None) -> dict:
    """Ingest every batch still in `incoming/` (name order = arrival order); totals.

    A file that is not a valid batch moves to `rejected/` with a `.reason` file beside it,
    so one bad file never blocks the folder; everything else is idempotent.
    """
    root = root or webhook_dir()
    incoming = root / "incoming"
    totals = {"files": 0, "events": 0, "inserted": 0, "duplicates": 0, "invalid": 0,
              "unmatched": 0, "consent_changes": 0, "rejected_files": 0}
    if not incoming.is_dir():
        return totals
    for path in sorted(p for p in incoming.iterdir()
                       if p.suffix == ".json" and not p.name.startswith(".")):
        try:
            result = ingest_landed_file(path, url)
        except FileNotFoundError:
            continue  # ingested and moved by the receiver meanwhile
        except (WebhookError, ValueError, KeyError, UnicodeDecodeError) as exc:
            rejected = root / "rejected"
            rejected.mkdir(parents=True, exist_ok=True)
            os.replace(path, rejected / path.name)
            (rejected / f"{path.name}.reason").write_text(f"{exc}\n")
            log.error("webhook batch %s rejected: %s", path.name, exc)
            totals["rejected_files"] += 1
            continue
        if result is None:
            continue
        totals["files"] += 1
        for key, value in result.as_dict().items():
            if key in totals:
                totals[key] += value
    return totals


def record_send_results(url: str | None = None, since: datetime | None = None) -> dict[str, int]:
    """Delivered / failed events from the ledger's send outcomes (idempotent); counts.

    E-mail gets only `failed` here (SendGrid refused the request, so no webhook event will
    come); its delivery comes from the Event Webhook. Other channels get `delivered` for a
    `sent` row (the provider accepted it) and `failed` for a `failed` row, at the logical
    send time, keyed `<message_id>:delivered|failed`.
    """
    cases = " ".join(f"when '{c}' then '{p}'" for c, p in SEND_RESULT_PROVIDERS.items())
    with db.connect(url) as conn:
        rows = conn.execute(f"""
            with outcomes as (
              select m.message_id, m.channel, m.address, m.provider_message_id, m.reason,
                     case when m.status = 'sent' then 'delivered' else 'failed' end as kind,
                     coalesce(m.sent_at, m.not_before, m.planned_at) as at
              from ops.messages m
              where (m.status = 'failed' or (m.status = 'sent' and m.channel <> 'email'))
                and (%(since)s::timestamptz is null or m.planned_at >= %(since)s)
            ), written as (
              insert into ops.message_events (provider, provider_event_id, message_id,
                  event_type, occurred_at, address, payload, received_at)
              select case o.channel {cases} else o.channel end,
                     o.message_id || ':' || o.kind, o.message_id, o.kind, o.at, o.address,
                     jsonb_strip_nulls(jsonb_build_object(
                       'source', 'send result', 'provider_message_id', o.provider_message_id,
                       'reason', o.reason)),
                     o.at
              from outcomes o
              on conflict (provider, provider_event_id) do nothing
              returning event_type
            )
            select event_type, count(*) from written group by 1""", {"since": since}).fetchall()
        conn.commit()
    counts = {"delivered": 0, "failed": 0}
    counts.update({kind: n for kind, n in rows})
    return counts
