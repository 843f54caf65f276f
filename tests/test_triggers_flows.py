"""Re-engagement, trigger health, sending and rendering of chain messages, the DAGs."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from retention import db
from retention.campaigns.render import context_for, promo_code, render
from retention.campaigns.spec import load_campaign
from retention.channels.base import SendResult
from retention.triggers import run_reengagement, run_triggers
from retention.triggers.config import REENGAGEMENT, TRIGGERS, TriggerSettings
from retention.triggers.health import poisson_cdf, record_health
from retention.triggers.runner import definition_triggers
from test_triggers import POLICY, SETTINGS, Shop, at, chains, messages, run
from test_triggers import shop  # noqa: F401  (fixture)

UTC = timezone.utc
ROOT = Path(__file__).resolve().parents[1]
REENGAGE = replace(load_campaign(REENGAGEMENT), holdout=0.0)
MORNING = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)  # a daily run after quiet hours (UTC customers)


class Recorder:
    """A provider that accepts everything and remembers what it was given."""

    max_batch = 50

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list = []

    def send_batch(self, messages):
        self.sent.extend(messages)
        return [SendResult.sent(m.message_id, f"prov-{m.message_id}") for m in messages]


def recorders(*names: str) -> dict[str, Recorder]:
    return {n: Recorder(n) for n in names}


def reengage(shop: Shop, as_of: datetime, channels=None, settings=SETTINGS) -> dict:
    return run_reengagement(as_of, shop.url, channels, policy=POLICY, settings=settings,
                            campaign=REENGAGE)


# ----------------------------------------------------------------------- re-engagement


def test_reengagement_entry_follows_own_gap_or_cohort_norm(shop):
    day = timedelta(days=1)
    for cid, gap, last_days_ago, n in (("regular", 20, 45, 4), ("recent", 20, 35, 4),
                                       ("one_timer", None, 70, 1), ("fresh_one", None, 50, 1),
                                       ("ancient", None, 400, 1), ("came_back", 20, 45, 4)):
        shop.customer(cid, channels=("email",))
        last = MORNING - last_days_ago * day
        for k in range(n):
            shop.order(cid, last - k * (gap or 0) * day)
    shop.order("came_back", MORNING - 2 * day, status="placed")
    result = reengage(shop, MORNING)
    entered = {c["customer_id"]: c for c in chains(shop)}
    # regular: 45 days > 2 x 20; one_timer: 70 > 2 x 30 (no cohort has 20 repeaters: the
    # default norm); recent 35 < 40, fresh_one 50 < 60, ancient beyond 365, came_back ordered
    assert set(entered) == {"regular", "one_timer"}
    assert entered["regular"]["context"]["threshold_days"] == 40.0
    assert entered["one_timer"]["context"]["threshold_days"] == 60.0
    assert result["triggers"][REENGAGEMENT]["started"] == 2
    assert {(m[2], m[3], m[4], m[5]) for m in messages(shop)} == {
        ("reminder", "regular", "email", "planned"), ("reminder", "one_timer", "email", "planned")}
    # the next day nobody enters twice
    reengage(shop, MORNING + day)
    assert len(chains(shop)) == 2 and len(messages(shop)) == 2


def test_reengagement_sequence_channels_offer_and_exit(shop, monkeypatch):
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    day = timedelta(days=1)
    shop.customer("fan", channels=("mobile_push", "email", "telegram"))
    shop.customer("quiet", channels=("email",))
    for cid in ("fan", "quiet"):
        for k in range(3):
            shop.order(cid, MORNING - (45 + 20 * k) * day)
    # fan opened e-mails once and clicked Telegram messages twice: Telegram first
    with db.connect(shop.url) as conn:
        for i, (channel, event) in enumerate((("telegram", "click"), ("telegram", "click"),
                                              ("email", "open"))):
            conn.execute("insert into ops.messages (message_id, campaign_id, run_id, step, channel, "
                         "customer_id, variant, status, planned_at, cap_class) values "
                         "(%s, 'weekly_promo', 'old', 's', %s, 'fan', 'A', 'sent', %s, 'promo')",
                         (f"old{i}", channel, MORNING - 60 * day))
            conn.execute("insert into ops.message_events (provider, provider_event_id, message_id, "
                         "event_type, occurred_at, received_at) values ('x', %s, %s, %s, %s, %s)",
                         (f"ev{i}", f"old{i}", event, MORNING - 59 * day, MORNING - 59 * day))
        conn.commit()
    channels = recorders("mobile_push", "email", "telegram")
    reengage(shop, MORNING, channels)
    assert [m.address for m in channels["telegram"].sent] == ["chat-fan"]
    assert [m.address for m in channels["email"].sent] == ["quiet@example.com"]
    # the bot is blocked for fan: the offer falls back to the next channel fan has, by
    # engagement (e-mail, opened once) before the one never engaged with (push)
    with db.connect(shop.url) as conn:
        conn.execute("insert into ops.deactivated_addresses values ('telegram', 'chat-fan', %s, "
                     "'provider: blocked')", (MORNING + day,))
        conn.commit()
    for k in range(1, 5):
        reengage(shop, MORNING + k * day, channels)
    offers = {m.customer_id: m for ch in channels.values() for m in ch.sent
              if m.data["step"] == "personal_offer"}
    assert offers["fan"].channel == "email"
    chain_of = {c["customer_id"]: c["chain_id"] for c in chains(shop)}
    code = promo_code(REENGAGEMENT, chain_of["quiet"], "quiet")
    expires = (MORNING + 4 * day + timedelta(days=REENGAGE.promo["valid_days"])).date().isoformat()
    assert code in offers["quiet"].body_text and expires in offers["quiet"].body_text
    # quiet buys after the offer: no feedback request; fan gets one
    shop.order("quiet", MORNING + 6 * day)
    for k in range(5, 13):
        reengage(shop, MORNING + k * day, channels)
    steps = sorted((m[3], m[2]) for m in messages(shop, REENGAGEMENT))
    assert steps == [("fan", "feedback"), ("fan", "personal_offer"), ("fan", "reminder"),
                     ("quiet", "personal_offer"), ("quiet", "reminder")]
    state = {c["customer_id"]: (c["status"], c["exit_reason"]) for c in chains(shop)}
    assert state == {"fan": ("completed", None), "quiet": ("exited", "purchase")}
    feedback = [m for ch in channels.values() for m in ch.sent if m.data["step"] == "feedback"]
    assert len(feedback) == 1 and "feedback?m=" in feedback[0].body_text


# --------------------------------------------------------------------------- health


def test_silent_tracker_is_flagged_against_the_recent_norm(shop):
    # a week of 15-minute runs at 10:00 and 10:15 that started about 20 cart chains each
    with db.connect(shop.url) as conn:
        for d in range(1, 8):
            for minute in (0, 15):
                end = at(10, minute, day=-d) + timedelta(minutes=15)
                conn.execute("insert into ops.trigger_health (trigger, interval_start, interval_end, "
                             "source_rows, started, extended, history_runs, flagged) values "
                             "('abandoned_cart', %s, %s, 90, %s, 0, 0, false)",
                             (end - timedelta(minutes=15), end, 18 + d % 5))
        conn.commit()
    result = run(shop, at(10), at(10, 15), ["abandoned_cart"])
    health = result["triggers"]["abandoned_cart"]
    assert health["flagged"] and health["expected"] == pytest.approx(20, abs=1.5)
    assert "no source rows at all" in health["note"]
    row = shop.rows("select started, flagged, history_runs from ops.trigger_health "
                    "where interval_end = %s", (at(10, 15),))
    assert row == [(0, True, 14)]
    # a normal count at the same hour is not flagged
    with db.connect(shop.url) as conn:
        for i in range(17):
            conn.execute("insert into ops.trigger_hits values ('abandoned_cart', %s, 'k', 'cart', "
                         "%s, %s, %s, 'started', %s)",
                         (f"c{i}", at(10, 20), at(9, 20), f"ch{i}", at(10, 30)))
        verdict = record_health(conn, "abandoned_cart", at(10, 15), at(10, 30), 80, SETTINGS)
    assert verdict["started"] == 17 and not verdict["flagged"]


@pytest.mark.unit
def test_poisson_cdf():
    assert poisson_cdf(0, 20) == pytest.approx(2.06e-9, rel=1e-2)
    assert poisson_cdf(20, 20) == pytest.approx(0.559, abs=1e-3)
    assert poisson_cdf(3, 0) == 1.0


# ------------------------------------------------------------------ sending, rendering


def test_chain_messages_are_sent_once_with_their_products(shop, monkeypatch):
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    shop.customer("c1", channels=("email",))
    shop.product("p1", "home.kitchen.kettle", name="Bosch Kettle K100", price=49.9)
    shop.product("p2", "home.kitchen.kettle", name="Tefal Kettle T2", price=39.9)
    shop.product("p3", "home.kitchen.descaler", name="Descaler D5", price=5.5)
    shop.event("c1", "cart", at(10), "p1")
    # the recommendations mart (dbt model product_recommendations): kettle buyers then
    # looked at the descaler
    with db.connect(shop.url) as conn:
        conn.execute("create schema if not exists marts")
        conn.execute("create table marts.product_recommendations (product_id text, "
                     "recommended_product_id text, rank integer, score numeric, customers integer)")
        conn.execute("insert into marts.product_recommendations values ('p1', 'p3', 1, 0.5, 4)")
        conn.commit()
    shop.customer("c2", channels=("mobile_push",))
    shop.event("c2", "search", at(10, 20), query="tefal kettle")
    channels = recorders("email", "mobile_push")
    for _ in range(2):  # the second pass is a re-run of the same interval
        run(shop, at(10, 45), at(11), ["abandoned_cart", "search_abandonment"], channels=channels)
    (mail,) = channels["email"].sent
    assert mail.subject == "You left something in your cart"
    assert "Bosch Kettle K100" in mail.body_text and "Bosch Kettle K100" in mail.body_html
    assert "/cart?m=" in mail.body_text and mail.unsubscribe_url
    assert "You may also like:\n- Descaler D5" in mail.body_text
    (push,) = channels["mobile_push"].sent
    assert push.subject == "Results for \u201ctefal kettle\u201d"
    assert push.body_text.startswith("Tefal Kettle T2")
    assert {m[5] for m in messages(shop)} == {"sent"}


def _context(step: str, channel: str) -> dict:
    ctx = context_for(campaign_id="c", campaign_name="C", run_id="ch_x", message_id="m_x",
                      customer_id="cu", variant="A", preferred_category=None, products=[],
                      discount_percent=10, expires_on=datetime(2026, 11, 9).date())
    product = {"id": "p1", "name": "Bosch Kettle <K100>", "price": "49.90",
               "url": "https://shop.example/p/p1"}
    ctx.update(step=step, shop_url="https://shop.example", products=[product, product],
               recommended=[product], review_url="https://r", feedback_url="https://f",
               cart_url="https://c",
               chain={"trigger": "t", "step": step, "subject": "s", "query": "kettle",
                      "category": "home.kitchen.kettle", "category_label": "kettle",
                      "old_price": "59.90", "new_price": "49.90", "order_id": "o1",
                      "silence_days": 60,
                      "properties": {"amount": 150, "reason": "review of <K100>"}})
    return ctx


@pytest.mark.unit
@pytest.mark.parametrize("campaign_id", [*TRIGGERS, REENGAGEMENT, *definition_triggers()])
def test_every_chain_step_renders_on_every_channel_it_may_use(campaign_id, monkeypatch):
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    campaign = load_campaign(campaign_id)
    for step in campaign.steps:
        for channel in step.channels:
            ctx = _context(step.name, channel)
            out = render(channel, step.template, ctx)
            assert out.body_text.strip(), (campaign_id, step.name, channel)
            if channel in ("email", "mobile_push", "web_push"):
                assert out.subject and "{" not in out.subject
            if channel == "email":
                assert ctx["unsubscribe_url"] in out.body_text
                assert "&lt;K100&gt;" in out.body_html  # autoescaped
            if "promo" in step.name or step.name in ("last_call", "first_order_offer",
                                                     "personal_offer"):
                assert ctx["promo"]["code"] in out.body_text + (out.subject or "")


# --------------------------------------------------------------------------- DAGs


def test_triggers_dag_runs_one_interval(airflow_db, shop, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("RETENTION_TRIGGERS_SEND", "false")
    shop.customer("c1")
    shop.product("p1", "home.kitchen.kettle")
    shop.event("c1", "cart", at(10), "p1")
    dag = DagBag(dag_folder=str(ROOT / "dags" / "retention_triggers.py")).dags["retention_triggers"]
    assert dag.timetable.summary == "*/15 * * * *"
    # a manual run at 11:00 covers the last whole interval: (10:45, 11:00]
    run_ = dag.test(logical_date=at(11))
    states = {ti.task_id: ti.state for ti in run_.get_task_instances()}
    assert states == {"run_triggers": "success", "check_health": "success"}, states
    (chain,) = chains(shop)
    assert chain["started_at"] == at(11) and chain["next_step"] == 1
    assert shop.rows("select scanned_until from ops.trigger_watermarks "
                     "where trigger = 'abandoned_cart'") == [(at(11),)]


def test_reengagement_dag_runs_one_day(airflow_db, shop, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("RETENTION_TRIGGERS_SEND", "false")
    shop.customer("lapsed", channels=("email",))
    shop.order("lapsed", MORNING - timedelta(days=100))
    dag = DagBag(dag_folder=str(ROOT / "dags" / "retention_reengagement.py")
                 ).dags["retention_reengagement"]
    run_ = dag.test(logical_date=MORNING)  # the day that ended at 08:00
    assert {ti.task_id: ti.state for ti in run_.get_task_instances()} == {
        "run_reengagement": "success"}
    (chain,) = chains(shop)
    assert chain["customer_id"] == "lapsed" and chain["started_at"] == MORNING.replace(hour=8)


@pytest.mark.unit
def test_every_trigger_has_settings_and_a_campaign():
    settings = TriggerSettings()
    assert sorted(settings.priority) == sorted(TRIGGERS)
    # the triggers that are campaign files alone run after those of the priority
    assert {"bonus_credited", "secure_payment_nudge", "inactive_viewers",
            "loyal_at_risk"} <= set(definition_triggers())
    for name in (*TRIGGERS, REENGAGEMENT, *definition_triggers()):
        campaign = load_campaign(name)
        assert campaign.exit_on and campaign.schedule is None
        assert campaign.kind in ("trigger", "lifecycle", "reengagement", "transactional")



def test_chains_go_out_through_the_real_clients_to_local_providers(shop, monkeypatch):
    """The channel clients (SendGrid, FCM, Telegram SDK calls) built from connections, as
    the DAG builds them, against the local provider servers: the wire payloads carry the
    chain's products, and a re-run sends nothing twice."""
    import json as _json

    from retention.connections import build_channel
    from retention_dev.servers import fake_service_account, start
    from retention.triggers.runner import LazyChannels

    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    sg_url, sendgrid = start("sendgrid", api_keys={"SG.test"})
    fcm_url, fcm = start("fcm", project_id="shop-push")
    tg_url, telegram = start("telegram", bot_tokens={"123:abc"})
    try:
        info, public_pem = fake_service_account(f"{fcm_url}/token", project_id="shop-push")
        fcm.configure(public_keys=[public_pem])
        connections = {
            "email": {"host": sg_url, "password": "SG.test",
                      "extra": {"from_email": "shop@example.com"}},
            "mobile_push": {"host": fcm_url, "extra": {"service_account": info,
                                                       "project_id": "shop-push"}},
            "telegram": {"host": tg_url, "password": "123:abc"},
        }
        built: list[str] = []

        def factory(name: str):
            built.append(name)
            return build_channel(name, connections[name])

        shop.customer("pushy", channels=("mobile_push", "email"))
        shop.customer("mailer", channels=("email",))
        shop.customer("chatty", channels=("telegram",))
        shop.product("p1", "home.kitchen.kettle", name="Bosch Kettle K100")
        for cid in ("pushy", "mailer", "chatty"):
            shop.event(cid, "cart", at(10), "p1")
        for _ in range(2):
            run(shop, at(10, 45), at(11), ["abandoned_cart"], channels=LazyChannels(factory))
        assert sorted(set(built)) == ["email", "mobile_push", "telegram"]
        (push,) = [r.body for r in fcm.accepted if "messages:send" in r.path]
        assert push["message"]["token"] == "token-pushy"
        assert push["message"]["notification"]["title"] == "You left something in your cart"
        assert "Bosch Kettle K100" in push["message"]["notification"]["body"]
        (mail,) = sendgrid.accepted
        assert "mailer@example.com" in _json.dumps(mail.body)
        assert "Bosch Kettle K100" in _json.dumps(mail.body)
        (chat,) = [r.body for r in telegram.accepted if r.path.endswith("/sendMessage")]
        assert str(chat["chat_id"]) == "chat-chatty" and "Bosch Kettle K100" in chat["text"]
        assert sorted(m[5] for m in messages(shop)) == ["sent", "sent", "sent"]
    finally:
        for handle in (sendgrid, fcm, telegram):
            handle.stop()
