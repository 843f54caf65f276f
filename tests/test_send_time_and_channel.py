"""Send-time optimisation and the best channel (docs/campaigns.md): the step fields, the
plan of a `send_time: optimal` / `channel: best` step with its control arm on hand-made
rows, and on a simulated history with a planted favourite hour and channel per customer
(retention_dev.preference_sim): the marts recover the planted preferences, the control
arm is planned exactly as without the feature, and the step's effect is measured against
it with its interval.
"""

from __future__ import annotations

import hashlib
import textwrap
from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from retention import db
from retention.campaigns.engine import plan_step, start_run
from retention.campaigns.policy import Policy
from retention.campaigns.spec import (CampaignError, load_all, parse_campaign)
from retention.ingest.contract import CHANNELS

AS_OF = datetime(2026, 11, 2, 7, 0, tzinfo=timezone.utc)  # Monday 09:00 in Kyiv
POLICY = Policy(global_cap=100, global_cap_days=7, channel_cap=100, channel_cap_days=7,
                quiet_start=time(21), quiet_end=time(9), default_timezone="Europe/Kyiv",
                global_holdout=0.0)


def _campaign(step: str, cid: str = "smart") -> str:
    return textwrap.dedent(f"""\
        id: {cid}
        kind: promo
        audience:
          include_any:
            - all_customers: true
        steps:
          - {step}
        """)


def _in_control(campaign: str, step: str, customer: str, share: float) -> bool:
    """The engine's arm hash (engine.step_control_sql), in Python."""
    digest = hashlib.md5(f"{campaign}:{step}:control:{customer}".encode()).hexdigest()
    return int(digest[:8], 16) / 4294967296.0 < share


# --- the step fields ------------------------------------------------------------------

@pytest.mark.unit
def test_step_fields_and_their_defaults():
    c = parse_campaign(_campaign("{name: s, channel: [best, email, mobile_push], template: t, "
                                 "send_time: optimal, send_window: 12h, control: 0.3}"), "x.yaml")
    s = c.steps[0]
    assert (s.best_channel, s.channels, s.send_time, s.send_window, s.control) == (
        True, ("email", "mobile_push"), "optimal", timedelta(hours=12), 0.3)
    alone = parse_campaign(_campaign("{name: s, channel: best, template: t}"), "x.yaml").steps[0]
    assert alone.best_channel and alone.channels == tuple(CHANNELS) and alone.control == 0.2
    assert alone.send_time == "default" and alone.has_control_arm
    plain = parse_campaign(_campaign("{name: s, channel: email, template: t}"), "x.yaml").steps[0]
    assert (plain.best_channel, plain.send_time, plain.has_control_arm) == (False, "default", False)
    # the shipped campaigns keep the step's own time and channel order
    for campaign in load_all().values():
        for step in campaign.steps:
            assert not step.has_control_arm, (campaign.id, step.name)


@pytest.mark.unit
@pytest.mark.parametrize("step, message", [
    ("{name: s, channel: [email, best], template: t}",
     "x.yaml:7: steps[0].channel: 'best' must come first"),
    ("{name: s, channel: email, template: t, send_window: 12h}",
     "x.yaml:7: steps[0].send_window: only with send_time: optimal"),
    ("{name: s, channel: email, template: t, control: 0.1}",
     "x.yaml:7: steps[0].control: only with send_time: optimal or channel: best"),
    ("{name: s, channel: email, template: t, send_time: soon}",
     "x.yaml:7: steps[0].send_time: 'soon' is not one of"),
    ("{name: s, channel: email, template: t, send_time: optimal, control: 0.9}",
     "x.yaml:7: steps[0].control: 0.9 is greater than the maximum"),
    ("{name: s, channel: email, template: t, send_time: optimal, send_window: 0h}",
     "x.yaml:7: steps[0].send_window: must be longer than 0"),
])
def test_bad_step_fields_name_file_line_and_field(step, message):
    with pytest.raises(CampaignError) as err:
        parse_campaign(_campaign(step), "x.yaml")
    assert str(err.value).startswith(message), str(err.value)


# --- planning on hand-made rows -------------------------------------------------------

PREFERENCES_DDL = """
create table marts.customer_send_time (customer_id text, channel text, timezone text,
  segment text, preferred_hour_of_week int, preferred_hour_of_day int, signals int,
  own_weight float8, as_of timestamptz);
create table marts.customer_channel_engagement (customer_id text, channel text, messages int,
  engaged int, engagement_rate float8, is_eligible boolean, channel_rank int,
  is_best boolean, as_of timestamptz);
"""

#: customer: (zone, hour of the week of the `any` row, hour of the day, expected release
#: in the optimal arm). The step: Monday 2026-11-02 07:00 UTC, window 24 h.
HAND = {
    # Monday 18:00 in Kyiv is within 24 h: 16:00 UTC
    "k_week": ("Europe/Kyiv", 18, 18, datetime(2026, 11, 2, 16, tzinfo=timezone.utc)),
    # Thursday 10:00 is not; the hour of the day, 20:00, is: 18:00 UTC
    "k_day": ("Europe/Kyiv", 3 * 24 + 10, 20, datetime(2026, 11, 2, 18, tzinfo=timezone.utc)),
    # Monday 23:00 is quiet: waits for Tuesday 09:00 Kyiv, 07:00 UTC
    "k_quiet": ("Europe/Kyiv", 23, 23, datetime(2026, 11, 3, 7, tzinfo=timezone.utc)),
    # Monday 09:00-09:59 has begun: the step's time
    "k_now": ("Europe/Kyiv", 9, 9, AS_OF),
    # New York: Monday 02:00 EST now, 10:00 EST is 15:00 UTC
    "n_ten": ("America/New_York", 10, 10, datetime(2026, 11, 2, 15, tzinfo=timezone.utc)),
    # no preference: the step's time
    "k_none": ("Europe/Kyiv", None, None, AS_OF),
    # a zone the server does not know: the default zone's hours (Kyiv), 12:00 = 10:00 UTC
    "x_badtz": ("Mars/Olympus", 12, 12, datetime(2026, 11, 2, 10, tzinfo=timezone.utc)),
}


@pytest.fixture()
def hand_shop(database_url):
    with db.connect(database_url) as conn:
        conn.execute(PREFERENCES_DDL)
        for c, (tz, how, hod, _) in HAND.items():
            conn.execute("insert into raw.customers (customer_id, timezone) values (%s, %s)", (c, tz))
            for ch in ("email", "mobile_push"):
                conn.execute("insert into raw.channel_subscriptions (customer_id, channel, address) "
                             "values (%s, %s, %s)", (c, ch, f"{ch}:{c}"))
            if how is not None:
                conn.execute("insert into marts.customer_send_time values (%s, 'any', %s, "
                             "'none', %s, %s, 9, 0.7, %s)",
                             (c, "Europe/Kyiv" if tz == "Mars/Olympus" else tz, how, hod, AS_OF))
        # k_week's push row (its channel here) wins over its `any` row: Monday 12:00 Kyiv
        # = 10:00 UTC; its e-mail row is not its channel
        conn.execute("insert into marts.customer_send_time values ('k_week', 'email', "
                     "'Europe/Kyiv', 'none', 15, 15, 5, 0.5, %s)", (AS_OF,))
        conn.execute("insert into marts.customer_send_time values ('k_week', 'mobile_push', "
                     "'Europe/Kyiv', 'none', 12, 12, 5, 0.5, %s)", (AS_OF,))
        # best channels: e-mail for k_day and k_now, push (the rule's first) otherwise
        conn.execute("insert into marts.customer_channel_engagement values "
                     "('k_day', 'email', 5, 4, 0.8, true, 1, true, %(t)s), "
                     "('k_day', 'mobile_push', 5, 1, 0.2, true, 2, false, %(t)s), "
                     "('k_now', 'email', 5, 4, 0.8, true, 1, true, %(t)s), "
                     "('n_ten', 'telegram', 5, 5, 1.0, true, 1, true, %(t)s)", {"t": AS_OF})
        conn.commit()
    return database_url


def _rows(url: str, campaign: str) -> dict[str, tuple]:
    with db.connect(url) as conn:
        return {r[0]: r[1:] for r in conn.execute(
            "select customer_id, status, channel, not_before, send_time_arm, channel_arm "
            "from ops.messages where campaign_id = %s", (campaign,)).fetchall()}


def test_optimal_time_and_best_channel_with_a_control_arm(hand_shop):
    share = 0.4
    smart = parse_campaign(_campaign("{name: s, channel: [best, mobile_push, email], "
                                     f"template: t, send_time: optimal, control: {share}}}"),
                           "smart.yaml")
    plain = parse_campaign(_campaign("{name: s, channel: [mobile_push, email], template: t}",
                                     "plain"), "plain.yaml")
    for campaign in (smart, plain):
        plan_step(campaign, start_run(campaign, AS_OF, policy=POLICY), "s", policy=POLICY)
    rows, baseline = _rows(hand_shop, "smart"), _rows(hand_shop, "plain")
    assert set(rows) == set(HAND) == set(baseline)
    control = {c for c in HAND if _in_control("smart", "s", c, share)}
    assert control and control != set(HAND), "pick customers that fill both arms"
    for c, (_, _, _, release) in HAND.items():
        status, channel, not_before, time_arm, channel_arm = rows[c]
        if c in control:
            # untouched: what the plain step plans, and the arm recorded
            assert (status, channel, not_before) == baseline[c][:3], c
            assert (time_arm, channel_arm) == ("default", "default"), c
            continue
        assert (time_arm, channel_arm) == ("optimal", "best"), c
        expected_channel = "email" if c in ("k_day", "k_now") else "mobile_push"
        if c == "k_week":
            release = datetime(2026, 11, 2, 10, tzinfo=timezone.utc)
        assert (status, channel, not_before) == ("planned", expected_channel, release), c
    # the plain step records no arm
    assert {r[3:] for r in baseline.values()} == {(None, None)}


# --- a simulated history with planted preferences --------------------------------------

SIM_AS_OF = datetime(2026, 11, 2, 0, tzinfo=timezone.utc)
SIM_STEP_AT = SIM_AS_OF + timedelta(hours=10)
MARTS = ("stg_customers stg_events stg_ops_messages stg_ops_message_events "
         "int_send_time_customers_changed int_send_time_sessions int_send_time_signals "
         "customer_send_time customer_channel_engagement")


def _reference_release(step_at: datetime, how: int, hod: int, tz: str,
                       window: timedelta) -> datetime:
    """The engine's rule in Python: the next preferred hour of the week within the window,
    else of the day, else the step's time (a begun hour counts from the step's time); then
    the quiet hours 21:00-09:00 local."""
    local = step_at.astimezone(ZoneInfo(tz))
    start = local.replace(minute=0, second=0, microsecond=0)

    def next_at(hours: int) -> datetime:
        wall = start.replace(tzinfo=None) + timedelta(hours=hours)
        return max(step_at, wall.replace(tzinfo=ZoneInfo(tz)).astimezone(timezone.utc))

    release = step_at
    for at in (next_at((how - (start.weekday() * 24 + start.hour)) % 168),
               next_at((hod - start.hour) % 24)):
        if at < step_at + window:
            release = at
            break
    loc = release.astimezone(ZoneInfo(tz))
    if loc.hour >= 21 or loc.hour < 9:
        day = loc.date() + timedelta(days=1 if loc.hour >= 21 else 0)
        release = datetime(day.year, day.month, day.day, 9,
                           tzinfo=ZoneInfo(tz)).astimezone(timezone.utc)
    return release


def test_planted_preferences_are_recovered_and_the_effect_measured(database_url):
    from retention.results.step_arms import measure_step_arms
    from retention.warehouse.build import build
    from retention_dev import preference_sim as sim

    truth = sim.plant(database_url, SIM_AS_OF, customers=400, seed=7)
    result = build(as_of=SIM_AS_OF, url=database_url, select=MARTS, indirect_selection="cautious",
                   unit_tests=True)  # the marts' hand-worked unit tests run here too
    assert result["dbt"]["success"] and result["dbt"]["failures"] == 0
    assert result["dbt"]["by_type"]["unit_test"] == {"pass": 5}, result["dbt"]

    found = sim.recovery(database_url, truth, min_signals=8)
    print({k: (r.customers, r.recovered, round(r.rate, 3)) for k, r in found.items()})
    assert found["hour_of_week"].customers >= 150 and found["hour_of_week"].rate >= 0.9
    assert found["channel"].customers >= 300 and found["channel"].rate >= 0.75

    share = 0.5
    smart = parse_campaign(_campaign("{name: s, channel: [best, email, mobile_push, telegram], "
                                     f"template: t, send_time: optimal, control: {share}}}"),
                           "smart.yaml")
    plain = parse_campaign(_campaign("{name: s, channel: [email, mobile_push, telegram], "
                                     "template: t}", "plain"), "plain.yaml")
    runs = {}
    for campaign in (smart, plain):
        runs[campaign.id] = start_run(campaign, SIM_STEP_AT, policy=POLICY)
        plan_step(campaign, runs[campaign.id], "s", policy=POLICY)
    rows, baseline = _rows(database_url, "smart"), _rows(database_url, "plain")
    assert set(rows) == set(truth) == set(baseline)
    with db.connect(database_url) as conn:
        prefs = {(c, ch): (how, hod, tz) for c, ch, how, hod, tz in conn.execute(
            "select customer_id, channel, preferred_hour_of_week, preferred_hour_of_day, "
            "timezone from marts.customer_send_time").fetchall()}
        best = dict(conn.execute("select customer_id, channel from "
                                 "marts.customer_channel_engagement where is_best").fetchall())
    arms = {"default": 0, "optimal": 0}
    for c, (status, channel, not_before, time_arm, channel_arm) in rows.items():
        assert time_arm == ("default" if _in_control("smart", "s", c, share) else "optimal")
        assert channel_arm == {"default": "default", "optimal": "best"}[time_arm]
        arms[time_arm] += 1
        if time_arm == "default":
            assert (status, channel, not_before) == baseline[c][:3], c
            continue
        assert status == "planned" and channel == best.get(c, "email"), c
        how, hod, tz = prefs.get((c, channel)) or prefs[(c, "any")]
        assert not_before == _reference_release(SIM_STEP_AT, how, hod, tz,
                                                timedelta(hours=24)), c
    assert min(arms.values()) >= 150, arms

    sim.respond(database_url, runs["smart"].run_id, "s", truth)
    measured = {m.kind: m for m in measure_step_arms(
        SIM_AS_OF + timedelta(days=3), run_ids=[runs["smart"].run_id], url=database_url)}
    assert set(measured) == {"send_time", "channel"}
    with db.connect(database_url) as conn:
        engaged = dict(conn.execute(
            "select m.send_time_arm, count(distinct m.message_id) from ops.messages m "
            "join ops.message_events e on e.message_id = m.message_id "
            "where m.campaign_id = 'smart' group by 1").fetchall())
    time_arms = measured["send_time"]
    assert {a: s.members for a, s in time_arms.engaged.items()} == arms
    assert {a: s.converters for a, s in time_arms.engaged.items()} == engaged
    assert {a: s.converters for a, s in measured["channel"].engaged.items()} == {
        "best": engaged["optimal"], "default": engaged["default"]}
    [rate] = [d for d in time_arms.differences if d.metric == "engagement_rate"]
    print(f"engagement optimal {rate.treatment_value:.3f} default {rate.control_value:.3f} "
          f"difference {rate.difference:+.3f} [{rate.ci_low:+.3f}, {rate.ci_high:+.3f}]")
    # the simulated customers open more at their hour and on their channel
    assert rate.ci_low > 0 and rate.significant
    assert [d.metric for d in time_arms.differences] == ["engagement_rate", "conversion_rate"]

    # the weekly report shows both arms and the differences of the step
    from retention.results.report import collect, render, week_start_of
    data = collect(week_start_of(SIM_STEP_AT.date()), url=database_url,
                   as_of=SIM_AS_OF + timedelta(days=3))
    assert [(s.step, s.kind) for s in data.step_arms] == [("s", "channel"), ("s", "send_time")]
    html = render(data)
    assert "smart, step s: learned send time against its control arm" in html
    assert "smart, step s: best channel against its control arm" in html
    assert f"<td>optimal</td><td>{arms['optimal']:,}</td><td>{engaged['optimal']:,}</td>" in html
    assert f"<td>default</td><td>{arms['default']:,}</td><td>{engaged['default']:,}</td>" in html
