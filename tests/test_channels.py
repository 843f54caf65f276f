"""Channel clients against the local provider servers, over real HTTP with the real SDKs.

Waits go through an injected sleep that only records them, so the tests count retries
and backoffs instead of sleeping; the servers' switches decide, deterministically, which
request gets a 429, a 5xx or a timeout.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import requests

from retention.channels import (FirebaseChannel, HttpGatewayChannel, OutboundMessage,
                                RetryPolicy, SendGridChannel, TelegramChannel, TokenBucket)
from retention.channels.retry import (OutcomeUnknown, PermanentError, RetriesExhausted,
                                      RetryAfterTooLong, TransientError)
from retention.channels.sendgrid import HTML_TAG, TEXT_TAG
from retention_dev.servers import (expand_mail_send, fake_service_account, start,
                                   validate_mail_send)

ROOT = Path(__file__).resolve().parents[1]


class Waits:
    """An injected sleep (and clock): records each wait and advances fake time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.calls: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.fixture
def waits() -> Waits:
    return Waits()


def policy(waits: Waits, attempts: int = 5) -> RetryPolicy:
    return RetryPolicy(max_attempts=attempts, base_delay=0.5, max_delay=30, jitter=0.5, seed=7,
                       sleep=waits.sleep)


def email(i: int, **kw) -> OutboundMessage:
    link = f"https://shop.example/unsubscribe?m=m{i}&t=tok{i}"
    values = dict(
        message_id=f"m{i}", customer_id=f"c{i}", channel="email", address=f"user{i}@example.com",
        subject="10% off for you",
        body_text=f"Hello customer {i}\nYour code PROMO{i:04d}\nUnsubscribe: {link}",
        body_html=(f"<!doctype html><html><body><h1>Hello customer {i}</h1>"
                   f"<p>Your code <b>PROMO{i:04d}</b></p><p><a href=\"{link}\">Unsubscribe</a></p>"
                   "</body></html>"),
        data={"campaign_id": "weekly", "step": "email"}, unsubscribe_url=link)
    values.update(kw)
    return OutboundMessage(**values)


def push(i: int, token: str | None = None, channel: str = "mobile_push") -> OutboundMessage:
    return OutboundMessage(f"p{i}", f"c{i}", channel, token or f"token-{i}", "10% off",
                           f"Code PROMO{i:04d}", None, {"campaign_id": "weekly"}, None)


def _failing(*errors: BaseException):
    """An attempt that raises `errors` one per call, then returns "ok"; counts its calls."""
    pending = list(errors)

    def attempt():
        attempt.calls += 1
        if pending:
            raise pending.pop(0)
        return "ok"

    attempt.calls = 0
    return attempt


def test_retry_policy_waits_backoff_or_retry_after_and_gives_up_clearly(waits):
    retried = []
    attempt = _failing(TransientError("503"), TransientError("429", 2.0), TransientError("502"))
    assert policy(waits, attempts=4).call(attempt, on_retry=retried.append) == "ok"
    assert attempt.calls == 4 and [e.label for e in retried] == ["503", "429", "502"]
    # retry 2 waits exactly Retry-After; retries 1 and 3 the seeded jittered backoff, the
    # same waits a twin policy computes, within (0.5 * 2**(n-1)) * [0.5, 1]
    twin = policy(waits)
    assert waits.calls == [twin.delay(1), 2.0, twin.delay(3)]
    assert 0.25 <= waits.calls[0] < 0.5 and 1.0 <= waits.calls[2] < 2.0  # jitter drawn
    assert 15.0 <= twin.delay(12) <= 30.0  # capped at max_delay

    waits.calls.clear()
    attempt = _failing(*[TransientError("503")] * 9)
    with pytest.raises(RetriesExhausted) as exhausted:
        policy(waits, attempts=3).call(attempt)
    assert (exhausted.value.reason, exhausted.value.attempts, attempt.calls) == \
        ("retries exhausted: 503", 3, 3)
    assert isinstance(exhausted.value.__cause__, TransientError) and len(waits.calls) == 2

    waits.calls.clear()
    attempt = _failing(TransientError("429", 121.0))  # over max_retry_after (120)
    with pytest.raises(RetryAfterTooLong) as too_long:
        policy(waits).call(attempt)
    assert too_long.value.reason == "429: Retry-After 121 s" and too_long.value.attempts == 1
    assert attempt.calls == 1 and waits.calls == []

    for error in (PermanentError("400: bad request", 400), OutcomeUnknown("timeout"),
                  KeyError("bug")):  # passed through at once, never retried
        attempt = _failing(error)
        with pytest.raises(type(error)) as raised:
            policy(waits).call(attempt)
        assert raised.value is error and attempt.calls == 1 and waits.calls == []


# --------------------------------------------------------------------------- SendGrid

@pytest.fixture
def api_key() -> str:
    return "SG." + secrets.token_urlsafe(16)  # generated per test, never stored


@pytest.fixture
def sendgrid(api_key):
    url, handle = start("sendgrid", api_keys={api_key})
    yield url, handle
    handle.stop()


def test_email_batch_exact_payload(sendgrid, api_key, waits):
    url, server = sendgrid
    channel = SendGridChannel(api_key, "shop@example.com", from_name="Shop", base_url=url,
                              sandbox=True, retry=policy(waits))
    messages = [email(1), email(2), email(3, subject="New in phones: 10% off")]

    results = channel.send_batch(messages)

    [request] = server.received
    assert request.path == "/v3/mail/send" and request.status == 200  # sandbox: 200, no id
    assert request.headers["authorization"] == f"Bearer {api_key}"
    body = request.body
    assert body["from"] == {"email": "shop@example.com", "name": "Shop"}
    assert body["mail_settings"] == {"sandbox_mode": {"enable": True}}
    assert "subject" not in body  # subjects differ: each personalization carries its own
    assert body["content"] == [
        {"type": "text/plain", "value": f"Hello customer {TEXT_TAG}"},
        {"type": "text/html", "value": f"<!doctype html><html><body><h1>Hello customer {HTML_TAG}"
                                       "\">Unsubscribe</a></p></body></html>"}]
    link = "https://shop.example/unsubscribe?m=m{0}&t=tok{0}".format
    assert body["personalizations"] == [{
        "to": [{"email": f"user{i}@example.com"}],
        "subject": m.subject,
        "substitutions": {
            TEXT_TAG: f"{i}\nYour code PROMO{i:04d}\nUnsubscribe: {link(i)}",
            HTML_TAG: f"{i}</h1><p>Your code <b>PROMO{i:04d}</b></p><p><a href=\"{link(i)}"},
        "headers": {"List-Unsubscribe": f"<{link(i)}>",
                    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
        "custom_args": {"campaign_id": "weekly", "step": "email", "message_id": f"m{i}"},
    } for i, m in zip((1, 2, 3), messages)]
    # what each recipient gets after SendGrid's substitutions is exactly what was rendered
    assert [(mail["to"], mail["subject"], mail["text"], mail["html"]) for mail in
            expand_mail_send(body)] == [([m.address], m.subject, m.body_text, m.body_html)
                                        for m in messages]
    assert [(r.message_id, r.status, r.provider_message_id) for r in results] == \
        [("m1", "sent", None), ("m2", "sent", None), ("m3", "sent", None)]
    assert waits.calls == []


def test_live_send_takes_the_request_message_id(sendgrid, api_key, waits):
    url, server = sendgrid
    channel = SendGridChannel(api_key, "shop@example.com", base_url=url, retry=policy(waits))
    results = channel.send_batch([email(1), email(2)])
    [request] = server.received
    assert request.status == 202 and request.body["mail_settings"]["sandbox_mode"]["enable"] is False
    assert request.body["subject"] == "10% off for you"  # one subject: sent once
    message_id = request.response_headers["X-Message-Id"]
    assert [r.provider_message_id for r in results] == [message_id, message_id]


def test_2500_emails_go_in_three_requests_of_at_most_1000(sendgrid, api_key, waits):
    url, server = sendgrid
    channel = SendGridChannel(api_key, "shop@example.com", base_url=url, retry=policy(waits))
    messages = [email(i) for i in range(2500)]

    results = channel.send_batch(messages)

    accepted = server.accepted
    assert [len(r.body["personalizations"]) for r in accepted] == [1000, 1000, 500]
    sent_ids = [p["custom_args"]["message_id"] for r in accepted for p in r.body["personalizations"]]
    assert sorted(sent_ids) == sorted(m.message_id for m in messages)  # each exactly once
    ids_by_request = {p["custom_args"]["message_id"]: r.response_headers["X-Message-Id"]
                      for r in accepted for p in r.body["personalizations"]}
    assert all(r.status == "sent" and r.provider_message_id == ids_by_request[r.message_id]
               for r in results)
    assert len({r.provider_message_id for r in results}) == 3


def test_same_address_twice_goes_in_separate_requests(sendgrid, api_key, waits):
    url, server = sendgrid
    channel = SendGridChannel(api_key, "shop@example.com", base_url=url, retry=policy(waits))
    results = channel.send_batch([email(1), email(2, address="USER1@example.com"), email(3)])
    assert [[p["to"][0]["email"] for p in r.body["personalizations"]] for r in server.received] \
        == [["user1@example.com", "user3@example.com"], ["USER1@example.com"]]
    assert [r.status for r in results] == ["sent"] * 3


def test_a_refused_address_fails_alone_and_the_rest_is_sent(api_key, waits):
    url, server = start("sendgrid", api_keys={api_key}, invalid_addresses={"user2@example.com"})
    try:
        channel = SendGridChannel(api_key, "shop@example.com", base_url=url, retry=policy(waits))
        results = channel.send_batch([email(1), email(2), email(3), email(4, address="no-at-sign")])
        first, second = server.received
        assert first.status == 400 and first.response == {"errors": [{
            "message": "Does not contain a valid address.",
            "field": "personalizations.1.to.0.email",
            "help": "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
                    "#message.personalizations"}]}
        assert second.status == 202 and [p["custom_args"]["message_id"]
                                         for p in second.body["personalizations"]] == ["m1", "m3"]
        assert [(r.status, r.reason) for r in results] == [
            ("sent", None),
            ("failed", "400: Does not contain a valid address. (personalizations.1.to.0.email)"),
            ("sent", None), ("failed", "invalid address")]
        assert waits.calls == []  # a 400 is not retried
    finally:
        server.stop()


def test_oversize_personal_part_is_sent_alone_in_full(sendgrid, api_key, waits):
    url, server = sendgrid
    channel = SendGridChannel(api_key, "shop@example.com", base_url=url, retry=policy(waits))
    big = email(2, body_html="<p>" + "x" * 12_000 + "</p>")
    results = channel.send_batch([email(1), big, email(3)])
    first, second = server.received
    assert [p["custom_args"]["message_id"] for p in first.body["personalizations"]] == ["m1", "m3"]
    assert [p["custom_args"]["message_id"] for p in second.body["personalizations"]] == ["m2"]
    assert "substitutions" not in second.body["personalizations"][0]
    assert second.body["content"][1]["value"] == big.body_html
    assert [r.status for r in results] == ["sent"] * 3


def test_shared_body_and_substitutions_rebuild_every_message(sendgrid, api_key, waits):
    import random
    rng = random.Random(3)
    words = ["<p>", "</p>", "sale", "code", "PROMO", "ab", "\n", "é", " "]
    head, tail = "<html><body>" * 3, "</body></html>"
    messages = [email(i, body_text="".join(rng.choices(words, k=rng.randint(0, 6))),
                      body_html=head + "".join(rng.choices(words, k=rng.randint(0, 8))) + tail)
                for i in range(40)]
    url, server = sendgrid
    SendGridChannel(api_key, "shop@example.com", base_url=url, retry=policy(waits)) \
        .send_batch(messages)
    [request] = server.accepted
    assert request.body["content"][1]["value"].startswith(head)
    assert [(m["text"], m["html"]) for m in expand_mail_send(request.body)] == \
        [(m.body_text, m.body_html) for m in messages]


def test_sendgrid_5xx_storm_then_success_sends_each_message_once(api_key, waits):
    url, server = start("sendgrid", api_keys={api_key}, sequence=[500, 503, 502, "ok"])
    try:
        channel = SendGridChannel(api_key, "shop@example.com", base_url=url, retry=policy(waits))
        messages = [email(i) for i in range(5)]
        results = channel.send_batch(messages)
        assert [r.status for r in server.received] == [500, 503, 502, 202]
        [accepted] = server.accepted
        assert Counter(p["custom_args"]["message_id"] for p in accepted.body["personalizations"]) \
            == Counter(m.message_id for m in messages)
        assert all(r.status == "sent" for r in results)
        # exponential backoff with jitter: retry n waits within (0.5 * 2**(n-1)) * [0.5, 1]
        assert len(waits.calls) == 3 and channel.stats.retries == 3
        for n, wait in enumerate(waits.calls, start=1):
            assert 0.25 * 2 ** (n - 1) <= wait <= 0.5 * 2 ** (n - 1)
    finally:
        server.stop()


def test_sendgrid_429_waits_exactly_retry_after(api_key, waits):
    url, server = start("sendgrid", api_keys={api_key}, sequence=[429], retry_after=3)
    try:
        channel = SendGridChannel(api_key, "shop@example.com", base_url=url, retry=policy(waits))
        results = channel.send_batch([email(1)])
        assert [r.status for r in server.received] == [429, 202]
        assert waits.calls == [3.0] and results[0].status == "sent"
    finally:
        server.stop()


def test_sendgrid_retries_exhausted(api_key, waits):
    url, server = start("sendgrid", api_keys={api_key}, server_error_fraction=1.0,
                        server_error_status=503)
    try:
        channel = SendGridChannel(api_key, "shop@example.com", base_url=url,
                                  retry=policy(waits, attempts=4))
        results = channel.send_batch([email(1), email(2)])
        assert len(server.received) == 4 and server.accepted == []
        assert len(waits.calls) == 3
        assert [(r.status, r.reason) for r in results] == \
            [("failed", "retries exhausted: 503")] * 2
    finally:
        server.stop()


def test_sendgrid_timeout_after_the_request_is_unknown_and_not_resent(api_key, waits):
    url, server = start("sendgrid", api_keys={api_key}, sequence=["timeout"], hang_seconds=30)
    try:
        channel = SendGridChannel(api_key, "shop@example.com", base_url=url, timeout=0.3,
                                  retry=policy(waits))
        results = channel.send_batch([email(1), email(2)])
        assert [r.outcome for r in server.received] == ["timeout"]  # one request, no retry
        assert waits.calls == []
        assert [r.status for r in results] == ["unknown", "unknown"]
        assert results[0].reason == "outcome unknown: timeout"
    finally:
        server.stop()  # releases the held request


@pytest.mark.unit
def test_sendgrid_connection_refused_is_retried(api_key, waits):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    channel = SendGridChannel(api_key, "shop@example.com", base_url=closed,
                              retry=policy(waits, attempts=3))
    [result] = channel.send_batch([email(1)])
    assert (result.status, result.reason) == ("failed", "retries exhausted: connection error")
    assert len(waits.calls) == 2


def test_retry_after_over_the_limit_defers_instead_of_parking(api_key, waits):
    url, server = start("sendgrid", api_keys={api_key}, sequence=[429], retry_after=7200)
    try:
        channel = SendGridChannel(api_key, "shop@example.com", base_url=url,
                                  retry=policy(waits))
        [result] = channel.send_batch([email(1)])
        assert result.status == "deferred" and "Retry-After 7200" in result.reason
        assert waits.calls == [] and len(server.received) == 1
    finally:
        server.stop()


def test_sendgrid_401_fails_without_retry(sendgrid, waits):
    url, server = sendgrid
    channel = SendGridChannel("SG.wrong", "shop@example.com", base_url=url, retry=policy(waits))
    results = channel.send_batch([email(1), email(2)])
    assert [r.status for r in server.received] == [401]
    assert waits.calls == [] and channel.stats.retries == 0
    assert [(r.status, r.reason) for r in results] == [
        ("failed", "401: The provided authorization grant is invalid, expired, or revoked")] * 2


@pytest.mark.parametrize("change, field", [
    (lambda b: b.update(personalizations=[{"to": [{"email": f"u{i}@example.com"}]}
                                          for i in range(1001)]), "personalizations"),
    (lambda b: b["personalizations"][0].update(custom_args={"n": 1}),
     "personalizations.0.custom_args.n"),
    (lambda b: b["personalizations"][0].update(headers={"From": "x@example.com"}),
     "personalizations.0.headers.From"),
    (lambda b: b.pop("subject"), "subject"),
    (lambda b: b.update(content=[{"type": "text/html", "value": "<p>x</p>"},
                                 {"type": "text/plain", "value": "x"}]), "content.0.type"),
    (lambda b: b.update(mail_settings={"sandbox_mode": {"enable": "true"}}),
     "mail_settings.sandbox_mode.enable"),
    (lambda b: b["personalizations"][0].update(substitutions={"-x-": "y" * 10_001}),
     "personalizations.0.substitutions"),
])
def test_sendgrid_server_is_strict(sendgrid, api_key, change, field):
    url, _ = sendgrid
    body = {"personalizations": [{"to": [{"email": "a@example.com"}]}],
            "from": {"email": "shop@example.com"}, "subject": "s",
            "content": [{"type": "text/plain", "value": "x"}]}
    assert validate_mail_send(body) == []
    change(body)
    response = requests.post(f"{url}/v3/mail/send", json=body,
                             headers={"Authorization": f"Bearer {api_key}"}, timeout=5)
    assert response.status_code == 400
    assert field in [e["field"] for e in response.json()["errors"]]


# --------------------------------------------------------------------------- FCM

@pytest.fixture(scope="module")
def fcm_server():
    url, handle = start("fcm", project_id="shop-push")
    info, public_pem = fake_service_account(f"{url}/token", project_id="shop-push")
    handle.configure(public_keys=[public_pem])  # the server checks the SDK's signed JWT
    yield url, handle, info
    handle.stop()


@pytest.fixture
def fcm(fcm_server, waits):
    url, server, info = fcm_server
    server.configure(sequence=[], unregistered_tokens=set(), invalid_tokens=set(), retry_after=1)
    server.clear()
    channels = []

    def make(**kw) -> FirebaseChannel:
        kw.setdefault("retry", policy(waits))
        kw.setdefault("timeout", 5)
        channel = FirebaseChannel(info, base_url=url, **kw)
        channels.append(channel)
        return channel
    yield make, server
    for channel in channels:
        channel.close()


def _fcm_sends(server) -> list:
    return [r for r in server.received if r.path.endswith("/messages:send")]


def test_fcm_501_pushes_in_batches_of_500_with_unregistered_mapped(fcm):
    make, server = fcm
    server.configure(unregistered_tokens={"token-7", "token-500"}, invalid_tokens={"token-9"})
    channel = make()
    messages = [push(i) for i in range(501)]  # send_each refuses more than 500 at once

    results = channel.send_batch(messages)

    sends = _fcm_sends(server)
    assert len(sends) == 501
    assert [r.path for r in server.received if r.path == "/token"] == ["/token"]  # one token
    assert all(r.headers["authorization"].startswith("Bearer ya29.local.") for r in sends)
    by_token = {r.body["message"]["token"]: r for r in sends}
    assert by_token["token-3"].body == {"message": {
        "token": "token-3", "data": {"campaign_id": "weekly", "message_id": "p3"},
        "notification": {"title": "10% off", "body": "Code PROMO0003"},
        "android": {"priority": "normal"}}}
    failed = {r.message_id: (r.reason, r.deactivate_address) for r in results if r.status == "failed"}
    assert failed == {
        "p7": ("404 UNREGISTERED: Requested entity was not found.", True),
        "p500": ("404 UNREGISTERED: Requested entity was not found.", True),
        "p9": ("400 INVALID_ARGUMENT: The registration token is not a valid FCM registration token",
               True)}
    sent = [r for r in results if r.status == "sent"]
    assert len(sent) == 498
    assert {r.provider_message_id for r in sent} == \
        {a.response["name"] for a in server.accepted if a.path.endswith("messages:send")}
    assert [r.message_id for r in results] == [m.message_id for m in messages]


def test_web_push_payload(fcm):
    make, server = fcm
    channel = make(kind="web_push", ttl_seconds=3600)
    [result] = channel.send_batch([push(1, channel="web_push")])
    [request] = _fcm_sends(server)
    assert request.body == {"message": {
        "token": "token-1", "data": {"campaign_id": "weekly", "message_id": "p1"},
        "webpush": {"headers": {"Urgency": "normal", "TTL": "3600"},
                    "notification": {"title": "10% off", "body": "Code PROMO0001"}}}}
    assert result.status == "sent" and result.provider_message_id.startswith(
        "projects/shop-push/messages/")


def test_fcm_android_ttl_and_a_message_without_token(fcm, waits):
    make, server = fcm
    channel = make(ttl_seconds=3600)
    blank = dataclasses.replace(push(2), address=None)
    results = channel.send_batch([push(1), blank])
    [request] = _fcm_sends(server)  # nothing goes out for the message without a token
    assert request.body["message"]["android"] == {"priority": "normal", "ttl": "3600s"}
    assert [(r.status, r.reason, r.deactivate_address) for r in results] == [
        ("sent", None, False), ("failed", "no FCM registration token", False)]


def test_fcm_retry_after_beyond_the_policy_defers_without_waiting(fcm, waits):
    make, server = fcm
    server.configure(rate_limit_fraction=1.0, retry_after=600)
    channel = make()
    results = channel.send_batch([push(1), push(2)])
    assert len(_fcm_sends(server)) == 2
    assert [(r.status, r.reason) for r in results] == [("deferred", "429: Retry-After 600 s")] * 2
    assert waits.calls == [] and channel.stats.retries == 0
    server.configure(rate_limit_fraction=0.0)


def test_fcm_5xx_storm_then_success_delivers_each_once(fcm, waits):
    make, server = fcm
    messages = [push(i) for i in range(10)]
    server.configure(sequence=[503] * 10 + [500] * 4)  # round 1: all fail; round 2: four fail
    channel = make()

    results = channel.send_batch(messages)

    assert len(_fcm_sends(server)) == 10 + 10 + 4
    delivered = Counter(r.body["message"]["data"]["message_id"] for r in server.accepted
                        if r.path.endswith("messages:send"))
    assert delivered == Counter(m.message_id for m in messages)
    assert all(r.status == "sent" for r in results)
    assert len(waits.calls) == 2 and channel.stats.retries == 14


def test_fcm_429_waits_retry_after_then_exhausts(fcm, waits):
    make, server = fcm
    server.configure(rate_limit_fraction=1.0, retry_after=4)
    channel = make(retry=policy(waits, attempts=3))
    results = channel.send_batch([push(1), push(2)])
    assert len(_fcm_sends(server)) == 6
    assert waits.calls == [4.0, 4.0]
    assert [(r.status, r.reason) for r in results] == [("failed", "retries exhausted: 429")] * 2
    server.configure(rate_limit_fraction=0.0)


def test_fcm_timeout_is_unknown_and_never_resent(fcm, waits):
    make, server = fcm
    server.configure(sequence=["timeout", "ok"], hang_seconds=10)
    channel = make(timeout=0.5)
    [result] = channel.send_batch([push(1)])
    assert (result.status, result.reason) == ("unknown", "outcome unknown: timeout")
    assert [r.outcome for r in _fcm_sends(server)] == ["timeout"]
    assert channel.stats.retries == 0 and waits.calls == []


def test_fcm_revoked_access_token_is_refreshed_once(fcm):
    make, server = fcm
    channel = make()
    assert channel.send_batch([push(1)])[0].status == "sent"
    server.provider.revoke_tokens()
    results = channel.send_batch([push(2), push(3)])
    assert [r.status for r in results] == ["sent", "sent"]
    statuses = [r.status for r in _fcm_sends(server)]
    assert statuses.count(200) == 3 and set(statuses) <= {200, 401}
    tokens = [r for r in server.received if r.path == "/token"]
    assert len(tokens) == 2  # the first token and one refresh however many requests saw 401


def test_fcm_connection_refused_is_retried_then_failed(fcm_server, waits):
    url, _, info = fcm_server
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with FirebaseChannel(info, base_url=closed, retry=policy(waits, attempts=2)) as channel:
        [result] = channel.send_batch([push(1)])
    assert (result.status, result.reason) == ("failed", "retries exhausted: connection error")


def test_fcm_proxy_is_resolved_from_the_environment_when_built(fcm_server, monkeypatch):
    url, _, info = fcm_server
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
                 "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with FirebaseChannel(info, base_url=url) as channel:
        assert channel.proxy is None
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with FirebaseChannel(info, base_url=url) as channel:
        assert channel.proxy == "http://127.0.0.1:9"
    with FirebaseChannel(info, base_url=url, proxies_from_env=False) as channel:
        assert channel.proxy is None
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with FirebaseChannel(info, base_url=url) as channel:
        assert channel.proxy is None


def test_fcm_chunked_answers_are_read(fcm):
    make, server = fcm
    server.configure(sequence=["chunked"] * 3)
    channel = make()
    results = channel.send_batch([push(i) for i in range(3)])
    assert [r.status for r in results] == ["sent"] * 3
    assert sorted(r.provider_message_id for r in results) == \
        sorted(a.response["name"] for a in _fcm_sends(server))
    assert [r.outcome for r in _fcm_sends(server)] == ["chunked"] * 3


def test_fcm_connection_close_answer_opens_a_new_connection(fcm, waits):
    make, server = fcm
    channel = make()
    assert channel.send_batch([push(1)])[0].status == "sent"
    before = server.connections_accepted
    assert channel.send_batch([push(2)])[0].status == "sent"
    assert server.connections_accepted == before  # kept alive, reused
    server.configure(sequence=["close"])
    assert channel.send_batch([push(3)])[0].status == "sent"  # answered, then closed
    assert server.connections_accepted == before
    assert channel.send_batch([push(4)])[0].status == "sent"
    assert server.connections_accepted == before + 1
    assert [r.outcome for r in _fcm_sends(server)] == ["ok", "ok", "close", "ok"]
    assert channel.stats.retries == 0 and waits.calls == []


def test_fcm_connection_closed_without_an_answer_is_unknown(fcm, waits):
    make, server = fcm
    server.configure(sequence=["drop", "ok"])
    channel = make()
    [result] = channel.send_batch([push(1)])
    assert (result.status, result.reason) == (
        "unknown", "outcome unknown: connection lost before the answer")
    assert channel.stats.retries == 0 and waits.calls == []
    [result] = channel.send_batch([push(2)])  # the next request goes out on a new connection
    assert result.status == "sent"
    assert [r.outcome for r in _fcm_sends(server)] == ["drop", "ok"]


def test_fcm_kept_alive_connection_closed_after_the_request_is_unknown_not_resent(fcm, waits):
    """libcurl sends a request again by itself when a reused connection dies before any
    byte of the answer; FCM took the first copy, so the push is unknown and sent once."""
    make, server = fcm
    channel = make()
    assert channel.send_batch([push(1)])[0].status == "sent"
    before = server.connections_accepted
    server.configure(sequence=["accept_drop"])
    [result] = channel.send_batch([push(2)])  # on the kept-alive connection
    assert (result.status, result.reason) == (
        "unknown", "outcome unknown: connection lost before the answer")
    assert server.connections_accepted == before
    assert [r.outcome for r in _fcm_sends(server)] == ["ok", "accept_drop"]
    assert channel.stats.retries == 0 and waits.calls == []


def test_fcm_pool_is_bounded(fcm):
    make, server = fcm
    channel = make(pool_size=3)
    assert channel.send_batch([push(0)])[0].status == "sent"  # the token, a first connection
    before = server.connections_accepted
    results = channel.send_batch([push(i) for i in range(1, 41)])
    assert [r.status for r in results] == ["sent"] * 40
    assert server.connections_accepted - before == 2  # 40 requests on at most 3 connections


def test_fcm_unknown_access_token_is_401(fcm_server):
    url, _, _ = fcm_server
    response = requests.post(f"{url}/v1/projects/shop-push/messages:send",
                             json={"message": {"token": "t"}},
                             headers={"Authorization": "Bearer made-up"}, timeout=5)
    assert response.status_code == 401
    assert response.json()["error"]["status"] == "UNAUTHENTICATED"


# --------------------------------------------------------------------------- Telegram

BOT = "123456:" + "A" * 35  # a well-formed, made-up bot token


def tg(i: int, chat: str | None = None) -> OutboundMessage:
    html = f"<b>10% off</b>\nYour code <code>PROMO{i:04d}</code>"
    return OutboundMessage(f"t{i}", f"c{i}", "telegram", chat or str(1000 + i), None, html, html,
                           {}, f"https://shop.example/u/t{i}")


def test_telegram_payload_429_retry_after_and_blocked_user(waits):
    url, server = start("telegram", bot_tokens={BOT}, blocked_chat_ids={"666"}, sequence=["ok", 429],
                        retry_after=5)
    try:
        channel = TelegramChannel(BOT, base_url=url, workers=1, clock=waits.clock,
                                  retry=policy(waits))
        results = channel.send_batch([tg(1), tg(2), tg(3, chat="666")])

        assert [(r.path, r.status) for r in server.received] == \
            [(f"/bot{BOT}/sendMessage", 200), (f"/bot{BOT}/sendMessage", 429),
             (f"/bot{BOT}/sendMessage", 200), (f"/bot{BOT}/sendMessage", 403)]
        assert server.received[0].body == {
            "chat_id": "1001", "text": "<b>10% off</b>\nYour code <code>PROMO0001</code>",
            "parse_mode": "HTML", "link_preview_options": {"is_disabled": True},
            "reply_markup": {"inline_keyboard": [[{"text": "Unsubscribe",
                                                   "url": "https://shop.example/u/t1"}]]}}
        assert [(r.status, r.provider_message_id, r.reason, r.deactivate_address) for r in results] == [
            ("sent", "1001:1", None, False), ("sent", "1002:1", None, False),
            ("failed", None, "403: Forbidden: bot was blocked by the user", True)]
        # 1/30 s spacing before messages 2 and 3, and exactly retry_after before the retry
        assert waits.calls == [pytest.approx(1 / 30), 5.0, pytest.approx(1 / 30)]
    finally:
        server.stop()


def test_telegram_sends_at_most_30_a_second(waits):
    url, server = start("telegram")
    try:
        channel = TelegramChannel(BOT, base_url=url, workers=1, clock=waits.clock,
                                  retry=policy(waits))
        start_at = waits.now
        results = channel.send_batch([tg(i) for i in range(61)])
        assert len(server.accepted) == 61 and all(r.status == "sent" for r in results)
        assert waits.now - start_at == pytest.approx(2.0)  # 60 intervals of 1/30 s
    finally:
        server.stop()


@pytest.mark.unit
def test_token_bucket_windows_and_burst(waits):
    bucket = TokenBucket(30, clock=waits.clock, sleep=waits.sleep)
    grants = [bucket.acquire() for _ in range(91)]
    for t in grants:  # no one-second window holds more than 30 sends
        assert sum(1 for g in grants if t <= g < t + 1 - 1e-9) <= 30
    assert grants[-1] - grants[0] == pytest.approx(3.0)

    bursty = TokenBucket(30, burst=30, clock=waits.clock, sleep=waits.sleep)
    waits.calls.clear()
    for _ in range(30):
        bursty.acquire()
    assert waits.calls == []  # a full bucket lets 30 go at once
    bursty.hold(2.0)
    at = bursty.acquire()
    assert waits.calls == [pytest.approx(2.0)] and at == waits.now


# --------------------------------------------------------------------------- HTTP gateway

def test_http_gateway_payload_template_and_response_mapping(waits):
    secret = secrets.token_hex(8)
    url, server = start("gateway", expected_headers={"X-Api-Key": secret},
                        rejected_addresses={"+380000000000"})
    try:
        channel = HttpGatewayChannel({
            "channel": "sms", "url": f"{url}/gateway/v2/send", "headers": {"X-Api-Key": secret},
            "payload_template": {"to": "{address}", "text": "{text}", "ref": "{message_id}",
                                 "meta": {"campaign": "{data.campaign_id}",
                                          "note": "{{literal}} for {customer_id}",
                                          "missing": "{data.nope}"},
                                 "sender": "SHOP"},
            "message_id_path": "$.message.id", "success_path": "status",
            "success_values": ["accepted"], "error_path": "error", "workers": 1},
            retry=policy(waits))
        text = 'Code "PROMO1"\nStop: https://shop.example/u/s1'
        messages = [OutboundMessage("s1", "c1", "sms", "+380501234567", None, text, None,
                                    {"campaign_id": "weekly"}, None),
                    OutboundMessage("s2", "c2", "sms", "+380000000000", None, "x", None,
                                    {"campaign_id": "weekly"}, None)]
        results = channel.send_batch(messages)
        first, second = server.received
        assert first.path == "/gateway/v2/send" and first.headers["x-api-key"] == secret
        assert first.body == {"to": "+380501234567", "text": text, "ref": "s1",
                              "meta": {"campaign": "weekly", "note": "{literal} for c1",
                                       "missing": None},
                              "sender": "SHOP"}
        assert [(r.status, r.provider_message_id, r.reason) for r in results] == [
            ("sent", "gw-1", None), ("failed", None, "rejected: unknown subscriber")]

        wrong = HttpGatewayChannel({"channel": "viber", "url": f"{url}/gateway/v2/send",
                                    "payload_template": {"to": "{address}"}}, retry=policy(waits))
        [refused] = wrong.send_batch(messages[:1])
        assert refused.reason == '401: {"status": "error", "error": "unauthorized"}'
        assert waits.calls == []

        with pytest.raises(ValueError, match="unknown placeholder"):
            HttpGatewayChannel({"channel": "sms", "url": url, "payload_template": {"x": "{phone}"}})
    finally:
        server.stop()


@pytest.mark.parametrize("outcome", ["timeout", "drop"])
def test_http_gateway_and_telegram_no_answer_is_unknown(waits, outcome):
    url, server = start("gateway", sequence=[outcome], hang_seconds=10)
    try:
        channel = HttpGatewayChannel({
            "channel": "sms", "url": f"{url}/gateway/send", "timeout": 0.5,
            "payload_template": {"phone": "{address}", "msg": "{text}"}}, retry=policy(waits))
        [result] = channel.send_batch([OutboundMessage("s1", "c1", "sms", "+1555", None, "hi",
                                                       None, {}, None)])
        assert result.status == "unknown" and result.reason.startswith("outcome unknown")
        assert len(server.received) == 1 and waits.calls == []
    finally:
        server.stop()
    url, server = start("telegram", sequence=[outcome], hang_seconds=10)
    try:
        channel = TelegramChannel("123:abc", base_url=url, timeout=0.5, retry=policy(waits))
        [result] = channel.send_batch([OutboundMessage("t1", "c1", "telegram", "42", None, "hi",
                                                       None, {}, None)])
        assert result.status == "unknown"
        assert len(server.received) == 1 and waits.calls == []
    finally:
        server.stop()


def test_http_gateway_form_body_and_retries(waits):
    url, server = start("gateway", sequence=[502, 429], retry_after=2)
    try:
        channel = HttpGatewayChannel({
            "channel": "sms", "url": f"{url}/gateway/send", "body_format": "form",
            "payload_template": {"phone": "{address}", "msg": "{text}"},
            "message_id_path": "message.id"}, retry=policy(waits))
        [result] = channel.send_batch([OutboundMessage("s1", "c1", "sms", "+1555", None, "hi & bye",
                                                       None, {}, None)])
        assert [r.status for r in server.received] == [502, 429, 200]
        assert server.received[-1].body == {"phone": "+1555", "msg": "hi & bye"}
        assert result.status == "sent" and result.provider_message_id == "gw-1"
        assert len(waits.calls) == 2 and waits.calls[1] == 2.0
    finally:
        server.stop()


def test_servers_record_everything_they_were_sent():
    url, server = start("telegram", bot_tokens={BOT})
    try:
        bad = requests.post(f"{url}/bot123:nope/sendMessage", json={"chat_id": 1, "text": "x"},
                            timeout=5)
        unparsable = requests.post(f"{url}/bot{BOT}/sendMessage",
                                   json={"chat_id": 1, "text": "<div>x</div>", "parse_mode": "HTML"},
                                   timeout=5)
        assert bad.status_code == 401 and bad.json() == {"ok": False, "error_code": 401,
                                                         "description": "Unauthorized"}
        assert unparsable.status_code == 400 and "Unsupported start tag" in \
            unparsable.json()["description"]
        assert [r.status for r in server.received] == [401, 400] and server.accepted == []
        assert json.dumps(server.received[1].body) == \
            '{"chat_id": 1, "text": "<div>x</div>", "parse_mode": "HTML"}'
    finally:
        server.stop()


def test_an_fcm_channel_never_closed_is_closed_at_exit_without_complaint(tmp_path):
    """A task that exits without closing its push channel exits cleanly: the client's
    thread is stopped and its libcurl handles closed at exit, nothing said on stderr
    about it."""
    script = tmp_path / "never_closed.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'plugins')!r})\n"
        "from retention_dev.stack import local_provider_stack\n"
        "from retention.connections import channels_from_env\n"
        "from retention.channels.base import OutboundMessage\n"
        "with local_provider_stack() as (handle, env):\n"
        "    os.environ.update(env)\n"
        "    ch = channels_from_env(['mobile_push'])['mobile_push']\n"
        "    m = OutboundMessage('m1', 'c1', 'mobile_push', 'tok-1', 't', 'b', None, {}, None)\n"
        "    print(ch.send_batch([m])[0].status)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "sent"
    assert "Unclosed" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.unit
def test_sendgrid_requests_carry_their_messages_attachments_and_keep_other_ones_apart():
    from retention.channels.base import Attachment

    chart = Attachment("funnel.png", b"\x89PNG\r\n\x1a\n-funnel", "image/png", "funnel.2026-W43")
    sheet = Attachment("terms.pdf", b"%PDF-1.7", "application/pdf")
    channel = SendGridChannel("SG.test", "shop@example.com", base_url="http://127.0.0.1:9")

    def mail(i, attachments):
        return OutboundMessage(f"m{i}", f"c{i}", "email", f"a{i}@example.com", "Week 43",
                               "text", "<p>html</p>", {}, None, attachments)

    messages = [mail(1, (chart,)), mail(2, ()), mail(3, (chart,)), mail(4, (chart, sheet))]
    groups = channel.plan_requests(messages)
    assert sorted(sorted(m.message_id for m in g) for g in groups) == [
        ["m1", "m3"], ["m2"], ["m4"]]
    bodies = {tuple(m.message_id for m in g): channel.build_request(g) for g in groups}
    assert "attachments" not in bodies[("m2",)]
    assert bodies[("m1", "m3")]["attachments"] == [
        {"content": "iVBORw0KGgotZnVubmVs", "type": "image/png", "filename": "funnel.png",
         "disposition": "inline", "content_id": "funnel.2026-W43"}]
    assert [a["disposition"] for a in bodies[("m4",)]["attachments"]] == ["inline", "attachment"]
