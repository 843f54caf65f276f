"""The generated shop with a planted ground truth (`generate_shop(plant_preferences=True)`,
`_truth.csv`): each customer's favourite hour of the week and channel, and the order after
which they stopped buying. The send-time and best-channel marts, built on the loaded shop
and its simulated engagement history (retention_dev.planted_truth), recover the planted
favourites; a `send_time: optimal`, `channel: best` step plans its control arm as the
plain step does; and the fitted P(alive) ranks the planted drop-outs as the likelier lost.

The hand-made checks of the same features stay in tests/test_send_time_and_channel.py
(preference_sim's customers) and tests/test_predict.py (samples.simulate).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from retention import db
from retention_dev.generate import DEFAULT_END, TRUTH_COLUMNS, TRUTH_FILE, generate_shop

pytestmark = pytest.mark.xdist_group("test_planted_truth")  # one worker builds the shop

CUSTOMERS = 3_000
SEED = 42
STEP_AT = DEFAULT_END + timedelta(hours=10)
#: the two marts and what they are built from (customer_lifetime's RFM segments among it)
MARTS = "+customer_send_time +customer_channel_engagement"


def _read(folder: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(folder / name, dtype=str, keep_default_na=False)


def _session_starts(folder: Path, truth: pd.DataFrame) -> pd.DataFrame:
    """Each customer session's first event, with its hour of the week in the customer's
    zone and their planted favourite hour."""
    events = _read(folder, "events.csv")
    events = events[(events.customer_id != "") & (events.session_id != "")]
    starts = (events.assign(t=pd.to_datetime(events.occurred_at, utc=True, format="ISO8601"))
              .groupby(["customer_id", "session_id"]).t.min().reset_index()
              .merge(truth, on="customer_id"))
    local = [t.tz_convert(z) for t, z in zip(starts.t, starts.timezone)]
    starts["hour_of_week"] = [x.weekday() * 24 + x.hour for x in local]
    return starts


# --- the generator --------------------------------------------------------------------


@pytest.mark.unit
def test_the_knob_plants_a_truth_and_leaves_the_rest_of_the_shop_as_it_was(tmp_path):
    from retention.ingest.load import discover

    generate_shop(tmp_path / "plain", 800, seed=SEED)
    generate_shop(tmp_path / "planted", 800, seed=SEED, plant_preferences=True)
    plain, planted = tmp_path / "plain", tmp_path / "planted"
    assert not (plain / TRUTH_FILE).exists()
    # drawn from generators of their own: only the session times change
    differ = sorted(p.name for p in planted.iterdir()
                    if not (plain / p.name).exists()
                    or (plain / p.name).read_bytes() != p.read_bytes())
    assert differ == [TRUTH_FILE, "events.csv"]
    # the loader skips the truth file: not a table, not even an ignored file
    files, ignored = discover(planted)
    assert TRUTH_FILE not in {p.name for p in files.values()} and ignored == []

    truth = _read(planted, TRUTH_FILE)
    customers = _read(planted, "customers.csv")
    assert tuple(truth.columns) == TRUTH_COLUMNS
    assert truth.customer_id.tolist() == customers.customer_id.tolist()
    assert truth.timezone.tolist() == customers.timezone.tolist()
    assert truth.favourite_hour_of_week.astype(int).between(0, 167).all()

    # the favourite channel is one the customer is subscribed to at the end; none without
    subs = _read(planted, "channel_subscriptions.csv")
    live = subs[subs.unsubscribed_at == ""].groupby("customer_id").channel.agg(set)
    for cid, channel in zip(truth.customer_id, truth.favourite_channel):
        assert (channel in live[cid]) if cid in live.index else channel == "", cid
    assert truth.favourite_channel.nunique() >= 5

    # churned_at: the customer's last order, after which they stopped; orders: their count
    orders = _read(planted, "orders.csv")
    count = orders.groupby("customer_id").size()
    assert (truth.orders.astype(int) == truth.customer_id.map(count).fillna(0)).all()
    last = orders.assign(t=pd.to_datetime(orders.ordered_at, utc=True)) \
        .groupby("customer_id").t.max()
    churned = truth[truth.churned_at != ""]
    assert len(churned) > 100 and (churned.orders.astype(int) > 0).all()
    assert (pd.to_datetime(churned.churned_at, utc=True)
            == churned.customer_id.map(last)).all()
    assert (truth[truth.orders == "0"].churned_at == "").all()

    # sessions start in the favourite hour far more often than by chance (1 in 168);
    # the order sessions stay at the order's time
    starts = _session_starts(planted, truth)
    at_favourite = (starts.hour_of_week == starts.favourite_hour_of_week.astype(int)).mean()
    before = _session_starts(plain, truth)
    by_chance = (before.hour_of_week == before.favourite_hour_of_week.astype(int)).mean()
    print(f"session starts in the favourite hour: planted {at_favourite:.3f}, "
          f"plain {by_chance:.3f}")
    assert at_favourite > 0.3 and by_chance < 0.03


@pytest.mark.unit
def test_hour_loyalty_is_a_share():
    from retention_dev.generate import ShopKnobs

    with pytest.raises(ValueError, match="hour_loyalty must be between 0 and 1"):
        ShopKnobs(plant_preferences=True, hour_loyalty=1.5)


# --- the chain: load, history, marts, plan, predict -------------------------------------


@pytest.fixture(scope="module")
def planted_shop(make_database, migrated_template, tmp_path_factory):
    """The loaded shop with its simulated message history and the two marts built as of
    the shop's end (their data tests are tests/test_send_time_and_channel.py's and the dbt
    project's); (url, truth, folder)."""
    from retention.ingest.load import load_folder
    from retention.warehouse.build import build
    from retention_dev import planted_truth

    folder = tmp_path_factory.mktemp("planted")
    generate_shop(folder, CUSTOMERS, seed=SEED, plant_preferences=True)
    url = make_database("rt_planted", template=migrated_template)
    report = load_folder(folder, url, loaded_at=DEFAULT_END, currency="UAH")
    assert report.quarantined == 0 and report.ignored_files == []
    truth = planted_truth.read_truth(folder)
    assert len(truth) == CUSTOMERS
    written = planted_truth.write_history(url, truth, DEFAULT_END)
    assert written["messages"] > 10 * CUSTOMERS and written["events"] > 0
    result = build(as_of=DEFAULT_END, url=url, select=MARTS, indirect_selection="empty")
    assert result["dbt"]["success"] and result["dbt"]["failures"] == 0
    return url, truth, folder


@pytest.mark.slow
def test_the_marts_recover_the_planted_hour_and_channel(planted_shop):
    from retention_dev import preference_sim

    url, truth, _ = planted_shop
    rates = {k: preference_sim.recovery(url, truth, min_signals=k)["hour_of_week"]
             for k in (1, 4, 8)}
    with db.connect(url) as conn:
        best = conn.execute(
            "select b.customer_id, b.channel, (select count(*) from "
            "marts.customer_channel_engagement e where e.customer_id = b.customer_id "
            "and e.is_eligible) from marts.customer_channel_engagement b "
            "where b.is_best").fetchall()
    choice = [(c, ch) for c, ch, eligible in best if eligible >= 2]
    channel_rate = sum(truth[c].channel == ch for c, ch in choice) / len(choice)
    print({f"hour, >= {k} signals": (r.customers, round(r.rate, 3)) for k, r in rates.items()},
          f"best channel among >= 2 eligible: {len(choice)}, {channel_rate:.3f}")
    assert rates[8].customers >= 0.15 * CUSTOMERS and rates[8].rate >= 0.95
    assert rates[4].customers >= 0.4 * CUSTOMERS and rates[4].rate >= 0.9
    assert len(choice) >= 0.2 * CUSTOMERS and channel_rate >= 0.8


@pytest.mark.slow
def test_the_optimal_step_uses_the_learned_preferences_and_leaves_its_control_arm(
        planted_shop):
    from retention.campaigns.engine import plan_step, start_run
    from retention.campaigns.spec import parse_campaign
    from test_send_time_and_channel import (POLICY, _campaign, _in_control, _reference_release,
                                            _rows)

    url, truth, _ = planted_shop
    share = 0.5
    channels = "email, mobile_push, web_push, telegram, sms, viber"
    smart = parse_campaign(_campaign(f"{{name: s, channel: [best, {channels}], template: t, "
                                     f"send_time: optimal, control: {share}}}"), "smart.yaml")
    plain = parse_campaign(_campaign(f"{{name: s, channel: [{channels}], template: t}}",
                                     "plain"), "plain.yaml")
    for campaign in (smart, plain):
        plan_step(campaign, start_run(campaign, STEP_AT, url=url, policy=POLICY), "s",
                  url=url, policy=POLICY)
    rows, baseline = _rows(url, "smart"), _rows(url, "plain")
    assert set(rows) == set(baseline) and len(rows) >= 0.5 * CUSTOMERS
    with db.connect(url) as conn:
        prefs = {(c, ch): (how, hod, tz) for c, ch, how, hod, tz in conn.execute(
            "select customer_id, channel, preferred_hour_of_week, preferred_hour_of_day, "
            "timezone from marts.customer_send_time").fetchall()}
        best = dict(conn.execute("select customer_id, channel from "
                                 "marts.customer_channel_engagement where is_best").fetchall())
        live = {}
        for c, ch in conn.execute(
                "select customer_id, channel from raw.channel_subscriptions "
                "where subscribed_at <= %(t)s and (unsubscribed_at is null "
                "or unsubscribed_at > %(t)s)", {"t": STEP_AT}).fetchall():
            live.setdefault(c, set()).add(ch)
    on_favourite = {"default": [], "optimal": []}
    for c, (status, channel, not_before, time_arm, channel_arm) in rows.items():
        control = _in_control("smart", "s", c, share)
        assert (time_arm, channel_arm) == (("default", "default") if control
                                           else ("optimal", "best")), c
        if control:  # untouched: what the plain step plans
            assert (status, channel, not_before) == baseline[c][:3], c
        elif status == "planned":
            if best.get(c) in live.get(c, ()):
                assert channel == best[c], c
            how, hod, tz = prefs.get((c, channel)) or prefs[(c, "any")]
            assert not_before == _reference_release(STEP_AT, how, hod, tz,
                                                    timedelta(hours=24)), c
        if status == "planned" and len(live.get(c, ())) >= 2:
            on_favourite[time_arm].append(channel == truth[c].channel)
    share_on = {arm: (len(v), round(float(np.mean(v)), 3)) for arm, v in on_favourite.items()}
    print(f"planned on the planted favourite channel (customers with >= 2 live channels): "
          f"{share_on}")
    assert min(n for n, _ in share_on.values()) >= 200
    assert share_on["optimal"][1] >= share_on["default"][1] + 0.2


@pytest.mark.slow
def test_probability_alive_ranks_the_planted_drop_outs(planted_shop):
    """The shop's purchases (paid and delivered orders, as loaded) fitted with BG/NBD: among
    the repeat buyers the planted drop-outs get the lower P(alive). (A customer may also
    drop out after a first order, which BG/NBD does not model: P(alive) is 1 for every
    one-time buyer, so they are left out.)"""
    from retention.warehouse import predict as P

    url, truth, _ = planted_shop
    with db.connect(url) as conn:
        purchases = pd.DataFrame(conn.execute(
            "select customer_id, ordered_at, total_amount::float8 from raw.orders "
            "where status in ('paid', 'delivered')").fetchall(),
            columns=["customer_id", "purchased_at", "revenue"])
    prediction = P.predict_customer_value(purchases, DEFAULT_END)
    scores = prediction.summary.join(prediction.scores)
    repeat = scores[scores["frequency"] > 0]
    dropped = np.array([truth[c].churned_at is not None for c in repeat.index])
    alive = repeat["probability_alive"].to_numpy()
    auc, lift = P.ranking_quality(1 - alive, dropped, ~dropped)
    print(f"repeat buyers {len(repeat)}, planted drop-outs {dropped.sum()}, AUC {auc:.3f}, "
          f"sum P(alive) {alive.sum():.0f} against {(~dropped).sum()} alive")
    assert len(repeat) >= 500 and 0.2 < dropped.mean() < 0.6
    assert auc > 0.75 and lift == pytest.approx(2 * auc - 1)
    spread = np.sqrt((alive * (1 - alive)).sum())
    assert abs(alive.sum() - (~dropped).sum()) < 4 * spread
