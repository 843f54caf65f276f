"""SendGrid Event Webhook batches and send results into `ops.message_events`.

The path of a batch (the receiver is `retention.results.receiver`):

1. **Verify**, before anything is written. The receiver needs a verification key,
   `RETENTION_SENDGRID_WEBHOOK_KEY` (the base64 DER public key SendGrid shows under Mail
   Settings > Signed Event Webhook), unless it is started with its explicit insecure switch
   for local use. SendGrid signs `timestamp + raw body` with ECDSA P-256 / SHA-256 and
   sends the base64 DER signature in `X-Twilio-Email-Event-Webhook-Signature`, the
   timestamp in `X-Twilio-Email-Event-Webhook-Timestamp`. The raw bytes are verified, never
   re-encoded JSON. A missing or wrong signature, or a timestamp further than
   `RETENTION_SENDGRID_WEBHOOK_TOLERANCE_SECONDS` from the receiver's clock (either way),
   is refused (403). The body is parsed strictly (`parse_batch`): NaN, Infinity, numbers
   out of range, U+0000 or unpaired surrogates in any string, deep nesting, and anything but
   a JSON array of objects are refused (400): PostgreSQL could not store them.
2. **Land** the raw batch durably, once: one JSON envelope file per batch under
   `<webhook dir>/incoming/` (mode 0600, folders 0700), written to a temporary name,
   fsynced, renamed, and the folder fsynced; then the batch's digest (sha256 of the raw
   body, the batch id) is recorded under `digests/`. A batch whose digest is recorded
   already is a replay: it is not landed again (`land_new_batch`). Only then does the
   receiver answer 2xx, so an acknowledged batch survives a crash or a database outage. A
   crash between the landing and the digest record can land a batch twice; ingestion counts
   its events once all the same.
3. **Ingest** (at once by the receiver, and again by `load_landed_batches` for whatever
   is still in `incoming/`): one transaction normalises the events into
   `ops.message_events`, keyed (provider, sg_event_id) so a batch delivered twice counts
   once, writes consent changes, records the batch in `ops.webhook_batches`, and then the
   file moves to `loaded/`. A batch that cannot be ingested (not a batch, or refused by the
   database) moves to `rejected/` with a `<name>.reason` file beside it and the next batches
   go on; a lost or unavailable database, or a schema not deployed yet, leaves it in
   `incoming/` for the next pass. Log
   lines name files, digests and exception classes only: never a payload, an address or a
   database error text (which can quote row values); the `.reason` file (mode 0600) keeps
   the error text.

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
import math
import os
import re
import stat
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from psycopg.types.json import Jsonb

from retention import db
from retention.config import paths, settings

log = logging.getLogger(__name__)

PROVIDER = "sendgrid"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
KEY_ENV = "RETENTION_SENDGRID_WEBHOOK_KEY"
#: deepest nesting of arrays and objects a batch may have (SendGrid's events are flat but
#: for `custom_args` and `category`)
MAX_NESTING = 32

#: the event types SendGrid posts; others are stored as they come
EVENT_TYPES = ("processed", "delivered", "deferred", "bounce", "blocked", "dropped", "open",
               "click", "unsubscribe", "group_unsubscribe", "group_resubscribe", "spamreport")
#: SendGrid `dropped` reasons that mean the address must not be mailed again
SUPPRESSING_DROP_REASONS = ("Bounced Address", "Unsubscribed Address", "Spam Reporting Address")
#: ledger channel -> the provider name its send results are recorded under
SEND_RESULT_PROVIDERS = {"mobile_push": "fcm", "web_push": "fcm", "telegram": "telegram",
                         "sms": "sms_gateway", "viber": "viber_gateway", "email": PROVIDER}

class WebhookError(ValueError):
    """A request the receiver refuses; `status` is the HTTP status to answer.

    The message is fixed text: it never quotes the body, so it can be logged and answered.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BatchRejected(Exception):
    """A landed batch could not be ingested and moved to `rejected/` (`name` is its file)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name} moved to rejected/ ({reason})")
        self.name = name
        self.reason = reason


class DatabaseUnavailable(RuntimeError):
    """No connection to the database: landed batches wait in `incoming/`."""


#: errors that say nothing about the batch (a lost database, a schema not deployed yet, the
#: file system): it stays in `incoming/` for the next pass
DEFERRING_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.ProgrammingError,
                    OSError)


def ensure_results_tables(conn: psycopg.Connection) -> None:
    """ops.webhook_batches and ops.report_deliveries exist: the database is at the head of
    the migrations (retention.db.schema)."""
    from retention.db.schema import ensure_schemas

    ensure_schemas(conn)


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
    text = (settings().sendgrid_webhook_key or "").strip()
    return load_verification_key(text) if text else None


def signature_tolerance() -> float:
    """Seconds a signature's timestamp may be from the receiver's clock, either way."""
    return settings().sendgrid_webhook_tolerance_seconds


_TIMESTAMP = re.compile(r"[0-9]{1,12}")


def check_timestamp(timestamp: str | None, now: datetime, tolerance: float) -> None:
    """403 unless `timestamp` (Unix seconds, as signed) is within `tolerance` of `now`."""
    if timestamp is None or not _TIMESTAMP.fullmatch(timestamp.strip()):
        raise WebhookError(403, "missing or malformed signature timestamp")
    age = now.timestamp() - int(timestamp.strip())
    if age > tolerance:
        raise WebhookError(403, "stale signature: its timestamp is older than the tolerance")
    if age < -tolerance:
        raise WebhookError(403, "signature timestamp is in the future beyond the tolerance")


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


def _refuse_constant(name: str):
    raise WebhookError(400, f"the body holds {name}, which JSON does not allow")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise WebhookError(400, "the body holds a number out of range")
    return value


def _check_values(events: list) -> None:
    """Every string (keys too) storable by PostgreSQL; nesting bounded."""
    stack: list[tuple[object, int]] = [(events, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise WebhookError(400, "a string in the body holds U+0000")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise WebhookError(400, "a string in the body holds an unpaired surrogate") \
                    from None
        elif isinstance(value, (list, dict)):
            if depth >= MAX_NESTING:
                raise WebhookError(400, "the body is nested too deeply")
            if isinstance(value, dict):
                stack.extend((k, depth + 1) for k in value)
                stack.extend((v, depth + 1) for v in value.values())
            else:
                stack.extend((v, depth + 1) for v in value)


def parse_batch(body: bytes) -> list[dict]:
    """A SendGrid batch is a JSON array of event objects; anything else is a 400.

    Strict: NaN, Infinity and -Infinity, numbers a float cannot hold, U+0000 or unpaired
    surrogates in strings and deep nesting are refused, so what is accepted can be stored.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookError(400, "the body is not UTF-8") from None
    try:
        events = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except WebhookError:
        raise
    except json.JSONDecodeError as exc:
        raise WebhookError(400, f"the body is not JSON ({exc.msg} at offset {exc.pos})") \
            from None
    except (ValueError, RecursionError):
        raise WebhookError(400, "the body is not JSON this receiver can store") from None
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise WebhookError(400, "the body must be a JSON array of event objects")
    _check_values(events)
    return events


def check_request(body: bytes, headers: Mapping[str, str],
                  key: ec.EllipticCurvePublicKey | None, *, now: datetime | None = None,
                  tolerance: float | None = None) -> list[dict]:
    """Verify (when a key is given) and parse a webhook request; WebhookError if refused.

    With `now`, the signed timestamp must also be within `tolerance` seconds of it.
    """
    if key is not None:
        timestamp = _header(headers, TIMESTAMP_HEADER)
        if now is not None:
            check_timestamp(timestamp, now,
                            signature_tolerance() if tolerance is None else tolerance)
        if not verify_signature(key, body, _header(headers, SIGNATURE_HEADER), timestamp):
            raise WebhookError(403, "missing or invalid SendGrid event webhook signature")
    return parse_batch(body)


# --- durable landing -------------------------------------------------------------------

def webhook_dir() -> Path:
    """Where batches land: RETENTION_WEBHOOK_DIR, else RETENTION_HOME/webhooks."""
    explicit = settings().webhook_dir
    return Path(explicit) if explicit else paths().home / "webhooks"


def batch_id_for(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(folder: Path, *, tighten: bool = True) -> Path:
    """`folder` created if need be with mode 0700 (what it holds carries addresses).

    `tighten`: an existing folder open to others is set to 0700 too (the webhook folder's
    own subfolders; never the folder a setting names, which may be shared).
    """
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if tighten:
        try:
            if stat.S_IMODE(folder.stat().st_mode) & 0o077:
                os.chmod(folder, 0o700)
        except OSError:  # not ours to change: the files in it are 0600 all the same
            pass
    return folder


def _private_file(path: Path) -> None:
    try:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        pass


def write_private(path: Path, data: bytes) -> None:
    """`data` to `path` durably, mode 0600: a temporary name, fsync, rename, folder fsync."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _digest_marker(root: Path, batch_id: str) -> Path:
    return root / "digests" / batch_id[:2] / batch_id


def landed_before(batch_id: str, root: Path | None = None) -> bool:
    """Whether a batch with this digest has landed (the record survives restarts)."""
    return _digest_marker(root or webhook_dir(), batch_id).exists()


def _record_digest(root: Path, batch_id: str, name: str) -> bool:
    """Record that `batch_id` landed as `name`; False when it was recorded already."""
    marker = _digest_marker(root, batch_id)
    private_dir(private_dir(root, tighten=False) / "digests")
    private_dir(marker.parent)
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.write(fd, f"{name}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(marker.parent)
    return True


def _write_batch(body: bytes, received_at: datetime, verified: bool, root: Path,
                 provider: str) -> tuple[str, Path]:
    incoming = private_dir(private_dir(root, tighten=False) / "incoming")
    received_at = received_at.astimezone(timezone.utc)
    batch_id = batch_id_for(body)
    name = f"{received_at:%Y%m%dT%H%M%S%f}Z_{provider}_{batch_id[:16]}.json"
    envelope = {"provider": provider, "batch_id": batch_id,
                "received_at": received_at.isoformat(), "signature_verified": verified,
                "body": body.decode("utf-8")}
    final = incoming / name
    write_private(final, json.dumps(envelope).encode("utf-8"))
    return batch_id, final


def land_batch(body: bytes, received_at: datetime, *, verified: bool,
               root: Path | None = None, provider: str = PROVIDER) -> Path:
    """Write the raw batch durably to `incoming/` and return the file (fsynced, renamed).

    Lands it even when its digest was recorded before (the receiver uses `land_new_batch`).
    """
    root = root or webhook_dir()
    batch_id, final = _write_batch(body, received_at, verified, root, provider)
    _record_digest(root, batch_id, final.name)
    return final


@dataclass(frozen=True)
class Landing:
    batch_id: str
    path: Path | None  # None: a replay, not landed again

    @property
    def duplicate(self) -> bool:
        return self.path is None


#: landings of the same digest in this process wait for each other (striped by digest)
_LANDING_LOCKS = tuple(threading.Lock() for _ in range(64))


def land_new_batch(body: bytes, received_at: datetime, *, verified: bool,
                   root: Path | None = None, provider: str = PROVIDER) -> Landing:
    """Land the batch unless its digest is recorded already (a replay: path None).

    The batch file is durable before its digest is recorded, so an acknowledged batch is
    never lost; when another process records the same digest first, this copy is removed.
    """
    root = root or webhook_dir()
    batch_id = batch_id_for(body)
    with _LANDING_LOCKS[int(batch_id[:2], 16) % len(_LANDING_LOCKS)]:
        if landed_before(batch_id, root):
            return Landing(batch_id, None)
        _, final = _write_batch(body, received_at, verified, root, provider)
        if not _record_digest(root, batch_id, final.name):
            final.unlink(missing_ok=True)
            _fsync_dir(final.parent)
            return Landing(batch_id, None)
    return Landing(batch_id, final)


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


def _reason(exc: BaseException) -> str:
    sqlstate = getattr(exc, "sqlstate", None)
    code = f" (SQLSTATE {sqlstate})" if sqlstate else ""
    return f"{type(exc).__name__}{code}: {exc}\n"


def reject_landed_file(path: Path, root: Path, exc: BaseException) -> Path:
    """Move a landed batch to `rejected/` with `<name>.reason` (the error text) beside it.

    Both are mode 0600; the log line names the file and the exception class only.
    """
    rejected = private_dir(root / "rejected")
    write_private(rejected / f"{path.name}.reason", _reason(exc).encode("utf-8", "replace"))
    target = rejected / path.name
    os.replace(path, target)
    _private_file(target)
    _fsync_dir(rejected)
    _fsync_dir(path.parent)
    log.error("webhook batch %s moved to rejected/ (%s); the next batches go on",
              path.name, type(exc).__name__)
    return target


def ingest_landed_file(path: Path, url: str | None = None, *,
                       root: Path | None = None) -> BatchResult | None:
    """Ingest one landed batch in one transaction, then move it to `loaded/`.

    A session lock on the file's name, held until the file has moved, keeps the receiver
    and the loader from ingesting the same file twice; None when another process has it.
    A batch that cannot be ingested moves to `rejected/` (`root`, default the folder above
    `incoming/`) under the same lock and `BatchRejected` is raised; an error that is not the
    batch's (`DEFERRING_ERRORS`) leaves it where it is, and `DatabaseUnavailable` says no
    connection could be made at all.
    """
    root = root or path.parent.parent
    with ExitStack() as stack:
        try:
            conn = stack.enter_context(db.connect(url))
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"no database connection ({type(exc).__name__})") \
                from None
        lock = conn.execute("select pg_try_advisory_lock(hashtext('retention.webhook:' || %s))",
                            (path.name,)).fetchone()[0]
        conn.commit()
        if not lock:
            return None
        try:
            if not path.exists():  # moved by the process that held the lock before us
                return None
            try:
                batch_id, body, received_at, verified = read_landed(path)
                events = parse_batch(body)
                result = ingest_sendgrid_events(conn, events, received_at=received_at,
                                                batch_id=batch_id, verified=verified,
                                                source_file=path.name)
                conn.commit()
            except DEFERRING_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever it is, the batch is the cause
                conn.rollback()
                reject_landed_file(path, root, exc)
                raise BatchRejected(path.name, type(exc).__name__) from None
            loaded = private_dir(root / "loaded")
            os.replace(path, loaded / path.name)
            _private_file(loaded / path.name)
            return result
        finally:
            conn.rollback()
            conn.execute("select pg_advisory_unlock(hashtext('retention.webhook:' || %s))",
                         (path.name,))
            conn.commit()


def _landed_files(incoming: Path) -> Iterator[Path]:
    return iter(sorted(p for p in incoming.iterdir()
                       if p.suffix == ".json" and not p.name.startswith(".")))


def load_landed_batches(root: Path | None = None, url: str | None = None) -> dict:
    """Ingest every batch still in `incoming/` (name order = arrival order); totals.

    A batch that cannot be ingested (not a batch, or refused by the database) moves to
    `rejected/` with a `.reason` file beside it and the loader goes on with the next one,
    so one bad file never blocks the folder. A batch stopped by an error that is not its own
    (`DEFERRING_ERRORS`) stays in `incoming/` (`deferred_files`) for the next pass; when no
    connection can be made at all, `DatabaseUnavailable` is raised and every batch waits.
    Everything else is idempotent.
    """
    root = root or webhook_dir()
    incoming = root / "incoming"
    totals = {"files": 0, "events": 0, "inserted": 0, "duplicates": 0, "invalid": 0,
              "unmatched": 0, "consent_changes": 0, "rejected_files": 0, "deferred_files": 0}
    if not incoming.is_dir():
        return totals
    for path in _landed_files(incoming):
        try:
            result = ingest_landed_file(path, url, root=root)
        except FileNotFoundError:
            continue  # ingested and moved by the receiver meanwhile
        except BatchRejected:
            totals["rejected_files"] += 1
            continue
        except DEFERRING_ERRORS as exc:
            log.warning("webhook batch %s not loaded (%s); it stays in incoming/",
                        path.name, type(exc).__name__)
            totals["deferred_files"] += 1
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
