"""A batch's link keys (the promo secret and unsubscribe base read once) give each message
the same context as reading the settings per message."""

from __future__ import annotations

from datetime import date

import pytest

from retention.campaigns.render import LinkKeys, context_for, link_keys, verify_unsubscribe_token

pytestmark = pytest.mark.unit

ARGS = dict(campaign_id="weekly", campaign_name="Weekly", run_id="r1", message_id="m1",
            customer_id="c1", variant="a", preferred_category="home.kitchen", products=[],
            discount_percent=10, expires_on=date(2026, 11, 9))


def test_context_with_the_batch_keys_is_the_per_message_context(monkeypatch):
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret-keys")
    monkeypatch.setenv("RETENTION_UNSUBSCRIBE_URL", "https://shop.test/u")
    keys = link_keys()
    assert keys == LinkKeys(b"test-secret-keys", "https://shop.test/u")
    assert context_for(**ARGS, keys=keys) == context_for(**ARGS)
    url = context_for(**ARGS, keys=keys)["unsubscribe_url"]
    assert url.startswith("https://shop.test/u?m=m1&t=")
    assert verify_unsubscribe_token("m1", url.rsplit("t=", 1)[1])


def test_the_batch_keys_are_what_signs(monkeypatch):
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret-keys")
    other = LinkKeys(b"another-secret", "https://other.test/u")
    ctx = context_for(**ARGS, keys=other)
    assert ctx["promo"]["code"] != context_for(**ARGS)["promo"]["code"]
    assert ctx["unsubscribe_url"].startswith("https://other.test/u?m=m1&t=")
    assert not verify_unsubscribe_token("m1", ctx["unsubscribe_url"].rsplit("t=", 1)[1])
