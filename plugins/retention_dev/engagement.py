"""Simulated e-mail readers for the quick start: SendGrid Event Webhook batches for the
e-mails a campaign step sent, signed and posted to the webhook receiver the way SendGrid
posts them.

The local SendGrid stand-in accepts mail, but nobody reads it. This plays the readers so
that the demo's cascade (a later wave skips members who engaged), attribution and report
have deliveries, bounces, opens, clicks and unsubscribes to work with. Purchases are not
simulated: they are the generated shop's own orders and receipts.

Every outcome is a pure function of the message id (a digest), and every event has a
deterministic `sg_event_id`, so a re-run posts the same events and the receiver counts
them once (a batch it has landed before is not landed again). Event times follow the
message's logical send time (`sent_at`), never the wall clock; the signature's timestamp
is the time of the post, as SendGrid's is, since the receiver refuses stale signatures.
Nothing here is used outside demos and tests.

Two ways to play them: `simulate_step` after a step has sent (the in-process demo, between
the waves), or `readers_on_accept`, which the local SendGrid stand-in calls for every send
it accepts, before it answers (`local_provider_stack(on_mail_accepted=...)`): the events
are in before the sending task records its results, so a later wave, trigger or results
load that runs after it sees them, however the steps are scheduled (the quick start
through Airflow). Both post the same events for a message.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib import request as urlrequest

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from retention import db

#: share of sent e-mails that bounce, are opened (of delivered), clicked (of opened),
#: unsubscribed (of opened) and reported as spam (of delivered): a typical promo list
RATES = {"bounce": 0.012, "open": 0.28, "click": 0.18, "unsubscribe": 0.01, "spamreport": 0.0008}
BATCH_SIZE = 1_000


def _uniform(message_id: str, what: str) -> float:
    digest = hashlib.sha256(f"{message_id}|{what}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _event(kind: str, message_id: str, address: str, at: datetime, sg_message_id: str | None,
           **extra) -> dict:
    event = {"email": address, "timestamp": int(at.timestamp()), "event": kind,
             "sg_event_id": hashlib.sha256(f"{message_id}|{kind}".encode()).hexdigest()[:22],
             "sg_message_id": f"{sg_message_id or 'local'}.filter0001.{message_id[:12]}",
             "message_id": message_id}
    event.update(extra)
    return event


def email_events(message_id: str, address: str, sent_at: datetime,
                 provider_message_id: str | None) -> list[dict]:
    """What SendGrid would report for one sent e-mail, given its simulated reader."""
    at = sent_at.astimezone(timezone.utc)
    out = [_event("processed", message_id, address, at, provider_message_id)]
    if _uniform(message_id, "bounce") < RATES["bounce"]:
        out.append(_event("bounce", message_id, address, at + timedelta(seconds=20),
                          provider_message_id, type="bounce",
                          reason="550 5.1.1 The email account that you tried to reach does "
                                 "not exist", status="5.1.1"))
        return out
    out.append(_event("delivered", message_id, address, at + timedelta(seconds=8),
                      provider_message_id, response="250 OK"))
    if _uniform(message_id, "spam") < RATES["spamreport"]:
        out.append(_event("spamreport", message_id, address, at + timedelta(hours=2),
                          provider_message_id))
        return out
    if _uniform(message_id, "open") >= RATES["open"]:
        return out
    opened = at + timedelta(minutes=5 + 600 * _uniform(message_id, "open_delay"))
    out.append(_event("open", message_id, address, opened, provider_message_id))
    if _uniform(message_id, "click") < RATES["click"]:
        out.append(_event("click", message_id, address, opened + timedelta(seconds=40),
                          provider_message_id, url="https://shop.example/promo"))
    if _uniform(message_id, "unsubscribe") < RATES["unsubscribe"]:
        out.append(_event("unsubscribe", message_id, address, opened + timedelta(minutes=1),
                          provider_message_id))
    return out


@dataclass
class Receiver:
    url: str
    private_key: ec.EllipticCurvePrivateKey
    public_key_pem: str


@contextmanager
def webhook_receiver(root: Path | None = None, url: str | None = None) -> Iterator[Receiver]:
    """The project's webhook receiver (`retention.results.receiver.make_app`, served by
    uvicorn) on a free local port, verifying signatures with a key pair made for this run:
    the simulated readers sign with its private half, as SendGrid signs with its own."""
    from retention.results.receiver import make_app, serve_in_thread

    private_key = ec.generate_private_key(ec.SECP256R1())
    public = private_key.public_key()
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    handle = serve_in_thread(make_app(key=public, root=root, url=url))
    try:
        yield Receiver(handle.events_url, private_key, pem)
    finally:
        handle.stop()


def post_batches(receiver: Receiver, events: Sequence[dict],
                 signed_at: datetime | None = None) -> dict:
    """POST events in batches as SendGrid does (signed: timestamp + body, ECDSA P-256).

    The signature's timestamp is when the batch is posted (`signed_at`, default now): the
    receiver refuses one far from its clock. A batch the receiver has landed before is
    answered as a duplicate; its events count as duplicates.
    """
    from retention.results.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign_batch

    totals = {"batches": 0, "events": 0, "inserted": 0, "duplicates": 0, "consent_changes": 0}
    for i in range(0, len(events), BATCH_SIZE):
        body = json.dumps(list(events[i:i + BATCH_SIZE])).encode()
        stamp = str(int((signed_at or datetime.now(timezone.utc)).timestamp()))
        req = urlrequest.Request(receiver.url, data=body, method="POST", headers={
            "Content-Type": "application/json", TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: sign_batch(receiver.private_key, body, stamp)})
        with urlrequest.urlopen(req, timeout=60) as resp:  # a non-2xx raises HTTPError
            answer = json.loads(resp.read())
        totals["batches"] += 1
        totals["events"] += answer["events"]
        if answer.get("duplicate"):
            totals["duplicates"] += answer["events"]
            continue
        ingested = answer.get("ingested") or {}
        for key in ("inserted", "duplicates", "consent_changes"):
            totals[key] += int(ingested.get(key, 0))
    return totals


def readers_on_accept(receiver: Receiver, url: str | None = None,
                      log: Callable[[str], None] | None = None) -> Callable[[dict, str | None], None]:
    """`on_mail_accepted` for the SendGrid stand-in: the readers of the e-mails of one
    accepted Mail Send request post their events at once. A message is identified by its
    personalization's `message_id` custom argument; messages not in ops.messages (e.g. the
    weekly report to marketers) have no simulated readers. The event times follow the
    message's logical send time as the ledger will record it (its step's time, or the end
    of its quiet hours). A failed post is logged, not raised: the send stays accepted."""

    def accepted(body: dict, x_message_id: str | None) -> None:
        ids = [str((p.get("custom_args") or {}).get("message_id"))
               for p in body.get("personalizations") or []
               if (p.get("custom_args") or {}).get("message_id")]
        if not ids:
            return
        try:
            with db.connect(url) as conn:
                rows = conn.execute(
                    "select message_id, address, greatest(coalesce(not_before, planned_at), "
                    "planned_at) from ops.messages where message_id = any(%s) "
                    "and channel = 'email' order by message_id", (ids,)).fetchall()
            events = [e for m, address, sent_at in rows
                      for e in email_events(m, address, sent_at, x_message_id)]
            if events:
                post_batches(receiver, events)
        except Exception as exc:  # noqa: BLE001 - the stand-in answers the send regardless
            (log or print)(f"simulated readers: {len(ids)} e-mails, events not posted: "
                           f"{type(exc).__name__}: {exc}")

    return accepted


def simulate_step(receiver: Receiver, run_id: str | None = None, step: str | None = None,
                  url: str | None = None) -> dict:
    """Post the readers' events for the e-mails `step` of `run_id` sent (None: every sent
    e-mail; events already posted count as duplicates); counts by event type."""
    with db.connect(url) as conn:
        rows = conn.execute(
            "select message_id, address, sent_at, provider_message_id from ops.messages "
            "where (%(run)s::text is null or run_id = %(run)s) "
            "and (%(step)s::text is null or step = %(step)s) "
            "and channel = 'email' and status = 'sent' order by message_id",
            {"run": run_id, "step": step}).fetchall()
    events = [e for row in rows for e in email_events(*row)]
    if not events:
        return {"emails": 0}
    totals = post_batches(receiver, events)
    by_type: dict[str, int] = {}
    for e in events:
        by_type[e["event"]] = by_type.get(e["event"], 0) + 1
    return {"emails": len(rows), **by_type, **totals}
