"""SendGrid Event Webhook: signature, the receiver process, dedup, consent flowback, files.

The receiver runs as its own process (`python -m retention.results.receiver`) against a
real PostgreSQL database; requests are real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import time as time_module
import urllib.error
import urllib.request
from datetime import datetime, time, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from retention import db
from retention.results import webhook
from retention.results.webhook import (
    SIGNATURE_HEADER, TIMESTAMP_HEADER, land_batch, load_landed_batches, record_send_results,
    sign_batch, verify_signature,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 2, 7, 0, tzinfo=timezone.utc)


def _keypair() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh P-256 key pair; the public half as SendGrid shows it (base64 DER)."""
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, base64.b64encode(der).decode()


def _event(kind: str, event_id: str, message_id: str | None, email: str, at: datetime,
           **extra) -> dict:
    out = {"email": email, "timestamp": int(at.timestamp()), "event": kind,
           "sg_event_id": event_id, "sg_message_id": f"xmsg1.filter0001.{event_id}",
           "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>", "category": ["weekly_promo"]}
    if message_id:
        out["message_id"] = message_id
    out.update(extra)
    return out


def _messages(url: str, rows: list[tuple]) -> None:
    """Ledger rows as dispatch leaves them: (message_id, customer_id, channel, address, status)."""
    with db.connect(url) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "insert into ops.messages (message_id, campaign_id, run_id, step, channel, "
                "customer_id, variant, status, reason, provider_message_id, planned_at, sent_at, "
                "address) values (%s, 'weekly_promo', 'weekly_promo@x', 'email', %s, %s, 'A', "
                "%s, %s, %s, %s, %s, %s)",
                [(mid, ch, cid, st, None if st == "sent" else "provider: 400", "xmsg1"
                  if st == "sent" else None, T0, T0 if st == "sent" else None, addr)
                 for mid, cid, ch, addr, st in rows])
        conn.commit()


def _count(url: str, sql: str, params: tuple = ()) -> int:
    with db.connect(url) as conn:
        return conn.execute(sql, params).fetchone()[0]


@pytest.fixture()
def keypair():
    return _keypair()


@pytest.fixture()
def receiver(database_url, tmp_path, keypair):
    """The receiver as its own process, with a verification key; yields (base url, folder)."""
    _, public_b64 = keypair
    folder = tmp_path / "webhooks"
    env = dict(os.environ, RETENTION_DATABASE_URL=database_url,
               RETENTION_SENDGRID_WEBHOOK_KEY=public_b64,
               PYTHONPATH=os.pathsep.join([str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "retention.results.receiver", "--port", "0",
                             "--landing", str(folder)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once the socket is bound
        assert "listening on http://127.0.0.1:" in line, (line, proc.stderr.read())
        base = line.split("listening on ")[1].split("/sendgrid")[0]
        yield base, folder
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _post(base: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(f"{base}/sendgrid/events", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _signed(private: ec.EllipticCurvePrivateKey, body: bytes, ts: str | None = None) -> dict:
    """SendGrid's headers for `body`, signed now (the receiver refuses stale signatures)."""
    ts = ts or str(int(time_module.time()))
    return {SIGNATURE_HEADER: sign_batch(private, body, ts), TIMESTAMP_HEADER: ts}


@pytest.mark.unit
def test_signature_is_ecdsa_over_timestamp_and_raw_body(keypair):
    private, public_b64 = keypair
    key = webhook.load_verification_key(public_b64)
    body = b'[{"event":"open","sg_event_id":"e1","timestamp":1762066800}]'
    signature = sign_batch(private, body, "1762066800")
    assert verify_signature(key, body, signature, "1762066800")
    assert not verify_signature(key, body, signature, "1762066801"), "timestamp is signed"
    assert not verify_signature(key, body + b" ", signature, "1762066800"), "raw bytes are signed"
    assert not verify_signature(key, body, None, "1762066800")
    assert not verify_signature(key, body, "not base64!", "1762066800")
    other = webhook.load_verification_key(_keypair()[1])
    assert not verify_signature(other, body, signature, "1762066800")
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    assert verify_signature(webhook.load_verification_key(pem.decode()), body, signature,
                            "1762066800")
    with pytest.raises(ValueError, match="base64 DER"):
        webhook.load_verification_key("definitely not a key")


def test_batch_delivered_twice_lands_and_counts_once(receiver, keypair, database_url):
    base, folder = receiver
    private, _ = keypair
    _messages(database_url, [("m1", "c1", "email", "c1@example.com", "sent"),
                             ("m2", "c2", "email", "c2@example.com", "sent")])
    batch = [_event("processed", "ev1", "m1", "c1@example.com", T0),
             _event("delivered", "ev2", "m1", "c1@example.com", T0 + timedelta(seconds=5)),
             _event("delivered", "ev3", "m2", "c2@example.com", T0 + timedelta(seconds=6)),
             _event("open", "ev4", "m1", "c1@example.com", T0 + timedelta(hours=1))]
    body = json.dumps(batch).encode()
    first = _post(base, body, _signed(private, body))
    second = _post(base, body, _signed(private, body))  # SendGrid retries on a lost 2xx
    assert first[0] == 200 and first[1]["ingested"]["inserted"] == 4
    # the replay is acknowledged (SendGrid must stop retrying) but lands nothing new
    assert second[0] == 200 and second[1]["duplicate"] is True
    assert second[1]["landed"] is None and second[1]["ingested"] is None
    assert second[1]["batch_id"] == first[1]["batch_id"]
    with db.connect(database_url) as conn:
        rows = conn.execute("select provider, provider_event_id, message_id, event_type, "
                            "occurred_at, address from ops.message_events "
                            "order by provider_event_id").fetchall()
        deliveries, inserted = conn.execute(
            "select deliveries, inserted from ops.webhook_batches").fetchone()
    assert rows == [
        ("sendgrid", "ev1", "m1", "processed", T0, "c1@example.com"),
        ("sendgrid", "ev2", "m1", "delivered", T0 + timedelta(seconds=5), "c1@example.com"),
        ("sendgrid", "ev3", "m2", "delivered", T0 + timedelta(seconds=6), "c2@example.com"),
        ("sendgrid", "ev4", "m1", "open", T0 + timedelta(hours=1), "c1@example.com"),
    ]
    assert (deliveries, inserted) == (1, 4)
    # landed durably once and moved to loaded/ after ingestion
    assert [p.name for p in (folder / "loaded").iterdir()] == [first[1]["landed"]]
    assert not list((folder / "incoming").glob("*.json"))


def test_forged_signature_is_refused_and_nothing_written(receiver, keypair, database_url):
    base, folder = receiver
    _messages(database_url, [("m1", "c1", "email", "c1@example.com", "sent")])
    body = json.dumps([_event("unsubscribe", "ev9", "m1", "c1@example.com", T0)]).encode()
    forger, _ = _keypair()  # signs with a key SendGrid never issued
    forged = _post(base, body, _signed(forger, body))
    unsigned = _post(base, body, {})
    private, _ = keypair
    tampered_body = body.replace(b"unsubscribe", b"open\x20\x20\x20\x20\x20\x20\x20")
    tampered = _post(base, tampered_body, _signed(private, body))
    assert forged[0] == unsigned[0] == tampered[0] == 403
    assert _count(database_url, "select count(*) from ops.message_events") == 0
    assert _count(database_url, "select count(*) from ops.consent_changes") == 0
    assert _count(database_url, "select to_regclass('ops.webhook_batches') is null") \
        or _count(database_url, "select count(*) from ops.webhook_batches") == 0
    assert not folder.exists() or not any(folder.rglob("*.json")), "nothing landed on disk"
    # the genuine signature over the same body is accepted
    status, answer = _post(base, body, _signed(private, body))
    assert status == 200 and answer["ingested"]["consent_changes"] == 1


def test_malformed_batch_is_a_400(receiver, keypair, database_url):
    base, folder = receiver
    private, _ = keypair
    for body in (b'{"event": "open"}', b"not json", b"[1, 2]"):
        status, _ = _post(base, body, _signed(private, body))
        assert status == 400
    assert not folder.exists() or not any(folder.rglob("*.json"))


CASCADE = textwrap.dedent("""\
    id: twice
    kind: promo
    audience:
      include_any:
        - customer_ids: [c1, c2]
    steps:
      - {name: first, channel: email, template: weekly_promo}
      - {name: reminder, channel: email, template: weekly_promo, wait: 24h}
    """)


def test_unsubscribe_event_stops_the_next_wave(receiver, keypair, database_url):
    from retention.campaigns.engine import plan_step, start_run
    from retention.campaigns.policy import Policy
    from retention.campaigns.spec import parse_campaign

    base, _ = receiver
    private, _ = keypair
    policy = Policy(global_cap=10, global_cap_days=7, channel_cap=10, channel_cap_days=7,
                    quiet_start=time(23), quiet_end=time(6), default_timezone="UTC",
                    global_holdout=0.0)
    with db.connect(database_url) as conn:
        conn.execute("insert into raw.customers (customer_id, email, created_at, timezone) values "
                     "('c1', 'Ann@Example.com', '2025-01-01Z', 'UTC'), "
                     "('c2', 'bob@example.com', '2025-01-01Z', 'UTC')")
        conn.execute("insert into raw.channel_subscriptions (customer_id, channel, address, "
                     "subscribed_at) values ('c1', 'email', 'Ann@Example.com', '2025-01-01Z'), "
                     "('c2', 'email', 'bob@example.com', '2025-01-01Z')")
        conn.commit()
    campaign = parse_campaign(CASCADE, "twice.yaml")
    run = start_run(campaign, T0, policy=policy)
    assert plan_step(campaign, run, "first", policy=policy)["planned"] == 2
    with db.connect(database_url) as conn:  # the first wave went out (what dispatch records)
        conn.execute("update ops.messages set status = 'sent', sent_at = planned_at, "
                     "provider_message_id = 'xmsg1' where step = 'first'")
        m1 = conn.execute("select message_id from ops.messages where customer_id = 'c1'").fetchone()[0]
        conn.commit()
    # Ann clicks "unsubscribe" two hours later; SendGrid lowercases nothing, we match anyway
    body = json.dumps([_event("unsubscribe", "ev-unsub", m1, "ann@example.com",
                              T0 + timedelta(hours=2))]).encode()
    status, answer = _post(base, body, _signed(private, body))
    assert status == 200 and answer["ingested"]["consent_changes"] >= 1
    counts = plan_step(campaign, run, "reminder", policy=policy)
    with db.connect(database_url) as conn:
        reminder = dict((c, (s, r)) for c, s, r in conn.execute(
            "select customer_id, status, reason from ops.messages where step = 'reminder'"))
    assert reminder == {"c1": ("suppressed", "no consent"), "c2": ("planned", None)}
    assert counts["planned"] == 1


def test_consent_flowback_hard_bounce_spam_and_drops_but_not_soft_bounces(database_url, tmp_path):
    _messages(database_url, [("m1", "c1", "email", "hard@example.com", "sent"),
                             ("m2", "c2", "email", "soft@example.com", "sent"),
                             ("m3", "c3", "email", "spam@example.com", "sent"),
                             ("m4", "c4", "email", "dropped@example.com", "sent"),
                             ("m5", "c5", "email", "group@example.com", "sent")])
    batch = [_event("bounce", "b1", "m1", "hard@example.com", T0, type="bounce",
                    reason="550 5.1.1 user unknown"),
             _event("bounce", "b2", "m2", "soft@example.com", T0, type="blocked",
                    reason="450 mailbox full"),
             _event("spamreport", "s1", "m3", "spam@example.com", T0 + timedelta(hours=1)),
             _event("dropped", "d1", "m4", "dropped@example.com", T0, reason="Bounced Address"),
             _event("group_unsubscribe", "g1", "m5", "group@example.com", T0, asm_group_id=7),
             # an earlier unsubscribe of the spam reporter arrives later: the earliest wins
             _event("unsubscribe", "u0", "m3", "spam@example.com", T0 - timedelta(hours=5)),
             {"event": "open", "sg_event_id": "no-time"}]  # not storable: counted invalid
    land_batch(json.dumps(batch).encode(), T0 + timedelta(hours=3), verified=True,
               root=tmp_path)
    totals = load_landed_batches(tmp_path, database_url)
    assert totals["files"] == 1 and totals["inserted"] == 6 and totals["invalid"] == 1
    with db.connect(database_url) as conn:
        consent = {a: (at, src, reason) for a, at, src, reason in conn.execute(
            "select address, unsubscribed_at, source, reason from ops.consent_changes")}
        blocked = conn.execute("select event_type from ops.message_events "
                               "where provider_event_id = 'b2'").fetchone()[0]
    assert set(consent) == {"hard@example.com", "spam@example.com", "dropped@example.com",
                            "group@example.com"}
    assert consent["hard@example.com"][2] == "hard bounce"
    assert consent["spam@example.com"] == (T0 - timedelta(hours=5),
                                           "sendgrid webhook: unsubscribe", "unsubscribe")
    assert consent["dropped@example.com"][2] == "dropped: Bounced Address"
    assert consent["group@example.com"][2] == "group unsubscribe (group 7)"
    assert blocked == "blocked"


def test_landed_files_load_once_and_match_without_custom_args(database_url, tmp_path):
    _messages(database_url, [("m1", "c1", "email", "c1@example.com", "sent"),
                             ("m2", "c2", "email", "c2@example.com", "sent")])
    # no message_id custom arg: found by the X-Message-Id prefix plus the address
    batch = [_event("delivered", "ev1", None, "C2@example.com", T0),
             _event("open", "ev2", None, "nobody@example.com", T0)]
    body = json.dumps(batch).encode()
    land_batch(body, T0, verified=False, root=tmp_path)
    land_batch(body, T0 + timedelta(minutes=1), verified=False, root=tmp_path)  # redelivered
    (tmp_path / "incoming" / "broken.json").write_text("{not json")
    totals = load_landed_batches(tmp_path, database_url)
    assert totals == {"files": 2, "events": 4, "inserted": 2, "duplicates": 2, "invalid": 0,
                      "unmatched": 2, "consent_changes": 0, "rejected_files": 1,
                      "deferred_files": 0}
    assert (tmp_path / "rejected" / "broken.json.reason").exists()
    assert load_landed_batches(tmp_path, database_url)["files"] == 0  # nothing left
    with db.connect(database_url) as conn:
        matched = dict(conn.execute("select provider_event_id, message_id from ops.message_events"))
    assert matched == {"ev1": "m2", "ev2": None}


def test_send_results_become_delivered_and_failed_events(database_url):
    _messages(database_url, [("p1", "c1", "mobile_push", "tok1", "sent"),
                             ("p2", "c2", "mobile_push", "tok2", "failed"),
                             ("t1", "c3", "telegram", "42", "sent"),
                             ("e1", "c4", "email", "e@example.com", "sent"),
                             ("e2", "c5", "email", "f@example.com", "failed")])
    assert record_send_results(database_url) == {"delivered": 2, "failed": 2}
    assert record_send_results(database_url) == {"delivered": 0, "failed": 0}  # idempotent
    with db.connect(database_url) as conn:
        rows = conn.execute("select provider, message_id, event_type from ops.message_events "
                            "order by message_id").fetchall()
    assert rows == [("sendgrid", "e2", "failed"), ("fcm", "p1", "delivered"),
                    ("fcm", "p2", "failed"), ("telegram", "t1", "delivered")]
