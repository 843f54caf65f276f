"""Moves between lifecycle stages and RFM segments: marts.customer_stage_history and the
`stage` entry of the trigger language (docs/triggers.md).

A small generated shop is built by dbt at two as_ofs. The history holds one snapshot per
as_of, equal to what customer_lifetime said as of it; building an as_of again (plainly or
with --full-refresh) changes nothing. The `stage` definition of the shipped
include/campaigns/loyal_at_risk.yaml finds exactly the customers whose segment went from a
loyal cell to an at-risk one, computed here from the two customer_lifetime states; the
campaign sends each of them once through the provider stand-ins, and a second run sends
nothing.
"""

from __future__ import annotations

import json
import textwrap
from datetime import datetime, time, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from retention import db
from retention.campaigns.policy import Policy
from retention.campaigns.spec import CampaignError, load_campaign, parse_campaign
from retention.ingest.load import load_folder
from retention.triggers.config import TriggerSettings
from retention.triggers.definitions import STAGE_VALUES, compile_definition
from retention.triggers.state import ensure_trigger_tables
from retention.warehouse.build import build
from test_trigger_language import HEAD, STEPS

pytestmark = pytest.mark.xdist_group("test_trigger_stage_moves")

UTC = timezone.utc
ROOT = Path(__file__).resolve().parents[1]
FIRST = datetime(2026, 9, 1, tzinfo=UTC)
SECOND = datetime(2026, 10, 31, tzinfo=UTC)
#: customer_lifetime and the history, with their ancestors and the tests of those only
SELECT = "+customer_stage_history"
SETTINGS = TriggerSettings()
POLICY = Policy(global_cap=3, global_cap_days=7, channel_cap=2, channel_cap_days=7,
                quiet_start=time(21), quiet_end=time(9), default_timezone="UTC",
                global_holdout=0.0)
LOYAL, AT_RISK = {"champions", "loyal"}, {"at_risk", "cant_lose"}
ALL_RELATIONS = {"marts.customer_lifetime", "marts.customer_stage_history"}
HISTORY = ("select customer_id, as_of, lifecycle_stage, rfm_segment, r_score, f_score, m_score "
           "from marts.customer_stage_history order by as_of, customer_id")
LIFETIME = ("select customer_id, as_of, lifecycle_stage, rfm_segment, r_score, f_score, m_score "
            "from marts.customer_lifetime order by customer_id")


def _build(url: str, as_of: datetime, **kw) -> dict:
    result = build(as_of=as_of, url=url, select=SELECT, indirect_selection="buildable", **kw)
    assert result["dbt"]["success"] and result["dbt"]["failures"] == 0, result["dbt"]
    return result


def _rows(url: str, sql: str, params: dict | None = None) -> list[tuple]:
    with db.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture(scope="module")
def stage_shop(make_database, migrated_template, tmp_path_factory) -> dict:
    """A generated shop of 300 customers built as of FIRST, then as of SECOND, with the
    customer_lifetime rows after each build."""
    from retention_dev.generate import DEFAULT_END, generate_shop

    folder = tmp_path_factory.mktemp("stage_shop")
    generate_shop(folder, 300, seed=5)
    url = make_database("stage", template=migrated_template)
    assert load_folder(folder, url=url, loaded_at=DEFAULT_END + timedelta(days=1)).quarantined == 0
    with db.connect(url) as conn:
        ensure_trigger_tables(conn)
        conn.commit()
    states = {}
    for as_of in (FIRST, SECOND):
        _build(url, as_of)
        states[as_of] = _rows(url, LIFETIME)
    return {"url": url, "states": states}


def _segments(rows: list[tuple]) -> dict[str, str]:
    return {r[0]: r[3] for r in rows}


def _moved(shop: dict, frm: set[str] | None, to: set[str], column: int = 3) -> set[str]:
    """The customers in a `to` value as of SECOND whose value as of FIRST was in `frm`
    (None: any value not in `to`), from the two customer_lifetime states; a customer
    without a row as of FIRST did not move."""
    before = {r[0]: r[column] for r in shop["states"][FIRST]}
    after = {r[0]: r[column] for r in shop["states"][SECOND]}
    return {c for c, v in after.items() if v in to and c in before
            and (before[c] in frm if frm is not None else before[c] not in to)}


def _moments(url: str, definition, lo: datetime, hi: datetime,
             relations=ALL_RELATIONS) -> list[tuple]:
    compiled = compile_definition(definition, "loyal_at_risk", SETTINGS, False,
                                  relations=relations)
    return _rows(url, f"select customer_id, event_key, hit_at, anchor_at, context "
                      f"from ({compiled.sql}) d order by customer_id",
                 dict(compiled.params, lo=lo, hi=hi))


# --------------------------------------------------------------------------- the history


def test_the_history_keeps_one_snapshot_per_build_and_a_rerun_changes_nothing(stage_shop):
    url, states = stage_shop["url"], stage_shop["states"]
    history = _rows(url, HISTORY)
    # one snapshot per build, each exactly customer_lifetime as of its as_of
    assert sorted({r[1] for r in history}) == [FIRST, SECOND]
    for as_of in (FIRST, SECOND):
        assert sorted(r for r in history if r[1] == as_of) == sorted(states[as_of])
    assert len(states[FIRST]) < len(states[SECOND])  # customers who signed up in between
    assert {r[3] for r in states[SECOND]} >= LOYAL | AT_RISK
    indexes = {r[0] for r in _rows(url, "select indexdef from pg_indexes where schemaname = "
                                        "'marts' and tablename = 'customer_stage_history'")}
    assert any("UNIQUE" in i and "(customer_id, as_of)" in i for i in indexes), indexes

    # an earlier as_of again, with --full-refresh: the history is kept, not rebuilt
    _build(url, FIRST, full_refresh=True)
    assert _rows(url, LIFETIME) == states[FIRST]
    assert _rows(url, HISTORY) == history
    # the latest as_of again: its snapshot is replaced by the same rows
    _build(url, SECOND)
    assert _rows(url, HISTORY) == history
    assert _rows(url, LIFETIME) == states[SECOND]


@pytest.mark.unit
def test_the_language_knows_the_values_the_model_can_produce():
    """STAGE_VALUES (what a `stage` entry may name) are the accepted_values of both models."""
    for name in ("customer_lifetime", "customer_stage_history"):
        spec = yaml.safe_load((ROOT / "dbt_project" / "models" / "marts" / f"{name}.yml")
                              .read_text())["models"][0]
        for column in spec["columns"]:
            if column["name"] in STAGE_VALUES:
                accepted = next(t["accepted_values"]["arguments"]["values"]
                                for t in column["data_tests"]
                                if isinstance(t, dict) and "accepted_values" in t)
                assert tuple(accepted) == STAGE_VALUES[column["name"]], (name, column["name"])
    sql = (ROOT / "dbt_project" / "models" / "marts" / "customer_lifetime.sql").read_text()
    for values in STAGE_VALUES.values():
        for value in values:
            assert f"'{value}'" in sql, value


# --------------------------------------------------------------------------- the entry


def test_the_stage_entry_finds_exactly_the_moves_from_a_loyal_cell_to_an_at_risk_one(stage_shop):
    url = stage_shop["url"]
    definition = load_campaign("loyal_at_risk").definition
    assert definition.kind == "stage" and definition.reentry == {"every": "90d"}
    expected = _moved(stage_shop, LOYAL, AT_RISK)
    assert len(expected) >= 5, expected  # the shop has moves to find
    # the same set read from the history table alone (the previous snapshot of each)
    from_history = {r[0] for r in _rows(url, """
        select customer_id from (
          select customer_id, as_of, rfm_segment,
                 lag(rfm_segment) over (partition by customer_id order by as_of) as before
          from marts.customer_stage_history) h
        where as_of = %(second)s and before = any(%(loyal)s) and rfm_segment = any(%(risk)s)""",
        {"second": SECOND, "loyal": sorted(LOYAL), "risk": sorted(AT_RISK)})}
    assert from_history == expected

    found = _moments(url, definition, SECOND - timedelta(minutes=15), SECOND)
    assert [r[0] for r in found] == sorted(expected)  # each once
    before = _segments(stage_shop["states"][FIRST])
    after = _segments(stage_shop["states"][SECOND])
    for customer, key, hit_at, anchor_at, context in found:
        assert (hit_at, anchor_at) == (SECOND, SECOND)
        assert key == f"stage:{SECOND.timestamp():.6f}"  # one per customer and snapshot
        assert context == {"measure": "rfm_segment", "value": after[customer],
                           "previous": before[customer], "previous_as_of": FIRST.isoformat()}

    # exact as of the interval: the moment is SECOND itself; a first snapshot moves nothing
    assert _moments(url, definition, SECOND - timedelta(days=1),
                    SECOND - timedelta(microseconds=1)) == []
    assert _moments(url, definition, FIRST - timedelta(days=1), FIRST) == []
    assert [r[0] for r in _moments(url, definition, FIRST, SECOND)] == sorted(expected)
    # no history table: no moment, and nothing to count
    assert _moments(url, definition, FIRST, SECOND,
                    relations={"marts.customer_lifetime"}) == []
    compiled = compile_definition(definition, "loyal_at_risk", SETTINGS, False,
                                  relations={"marts.customer_lifetime"})
    assert _rows(url, compiled.source_sql, {"start": FIRST, "end": SECOND}) == [(0,)]
    # with it, the source rows are the snapshots written in the interval
    compiled = compile_definition(definition, "loyal_at_risk", SETTINGS, False,
                                  relations=ALL_RELATIONS)
    assert _rows(url, compiled.source_sql, {"start": FIRST, "end": SECOND}) == [
        (len(stage_shop["states"][SECOND]),)]


def _stage_campaign(block: str):
    return parse_campaign(HEAD + textwrap.dedent(block) + STEPS, "demo.yaml")


def test_without_from_any_other_value_moves_and_lifecycle_stages_move_too(stage_shop):
    url = stage_shop["url"]
    window = (SECOND - timedelta(minutes=15), SECOND)
    # without `from`: from any value not in `to`; a move inside `to` (hibernating to
    # lost) is no move into it
    sinking = {"hibernating", "lost"}
    anywhere = _stage_campaign("entry:\n  stage: {measure: rfm_segment, to: [hibernating, lost]}\n")
    expected = _moved(stage_shop, None, sinking)
    before = _segments(stage_shop["states"][FIRST])
    after = _segments(stage_shop["states"][SECOND])
    assert len({before[c] for c in expected}) >= 2, expected
    inside = {c for c in after if after[c] in sinking and before.get(c, after[c]) in sinking
              and before[c] != after[c]}
    assert inside and not inside & expected
    assert {r[0] for r in _moments(url, anywhere.definition, *window)} == expected
    lapsing = _stage_campaign(
        "entry:\n  stage: {measure: lifecycle_stage, from: [loyal, repeat],"
        " to: [at_risk, lapsed]}\n")
    expected = _moved(stage_shop, {"loyal", "repeat"}, {"at_risk", "lapsed"}, column=2)
    assert expected
    assert {r[0] for r in _moments(url, lapsing.definition, *window)} == expected
    # a wait moves the moment and its scan with it
    later = _stage_campaign(
        "entry:\n  stage: {measure: rfm_segment, to: [at_risk, cant_lose]}\nwait: 2d\n")
    found = _moments(url, later.definition, SECOND, SECOND + timedelta(days=2))
    assert {r[0] for r in found} == _moved(stage_shop, LOYAL, AT_RISK)
    assert {(r[2], r[3]) for r in found} == {(SECOND + timedelta(days=2), SECOND)}


@pytest.mark.unit
@pytest.mark.parametrize("block,expected", [
    ("entry:\n  stage: {measure: rfm_score, to: at_risk}\n",
     "demo.yaml:5: entry.stage.measure"),
    ("entry:\n  stage:\n    measure: rfm_segment\n    from: [champions, loyal]\n"
     "    to: [at_risk, at_rsk]\n",
     "demo.yaml:8: entry.stage.to[1]: unknown rfm_segment 'at_rsk' (one of champions, loyal, "
     "potential_loyalist, new, promising, cant_lose, at_risk, hibernating, lost, no_purchase)"),
    ("entry:\n  stage:\n    measure: lifecycle_stage\n    from: champions\n    to: lapsed\n",
     "demo.yaml:7: entry.stage.from: unknown lifecycle_stage 'champions' (one of "
     "subscriber_no_purchase, prospect, new, one_time, repeat, loyal, at_risk, lapsed)"),
    ("entry:\n  stage:\n    measure: rfm_segment\n    from: [loyal, at_risk]\n"
     "    to: [at_risk]\n",
     "demo.yaml:8: entry.stage.to[0]: 'at_risk' is in both from and to"),
    ("entry:\n  stage: {measure: rfm_segment, from: [loyal]}\n",
     "demo.yaml:5: entry.stage"),
    ("entry:\n  stage: {measure: rfm_segment, to: [at_risk]}\n  per: order\n",
     "demo.yaml:6: entry.per: a stage entry can be per a label only"),
])
def test_a_bad_stage_block_names_file_line_and_field(block, expected):
    with pytest.raises(CampaignError) as err:
        _stage_campaign(block)
    assert str(err.value).startswith(expected), str(err.value)


# --------------------------------------------------------------------------- the campaign


def test_the_shipped_campaign_sends_each_mover_once_through_the_stand_ins(stage_shop,
                                                                         monkeypatch):
    """include/campaigns/loyal_at_risk.yaml alone: a run of the trigger over the interval
    that ends at the second build's as_of sends each customer who moved from a loyal cell
    to an at-risk one one message, counted at the provider stand-ins; a second run of the
    same interval sends nothing."""
    from retention.connections import channels_from_env
    from retention.triggers import run_triggers
    from retention.triggers.runner import definition_triggers
    from retention_dev.stack import local_provider_stack

    url = stage_shop["url"]
    assert "loyal_at_risk" in definition_triggers()
    monkeypatch.setenv("RETENTION_DATABASE_URL", url)
    monkeypatch.setenv("RETENTION_PROMO_SECRET", "test-secret")
    expected = _moved(stage_shop, LOYAL, AT_RISK)
    start, end = SECOND - timedelta(minutes=15), SECOND + timedelta(hours=12)
    with local_provider_stack() as (handle, env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        channels = channels_from_env(["email", "mobile_push", "telegram"])
        first = run_triggers(start, end, url, channels, policy=POLICY, settings=SETTINGS,
                             triggers=["loyal_at_risk"])
        accepted_first = {n: dict(p.accepted_recipients()) for n, p in handle.providers.items()}
        run_triggers(start, end, url, channels, policy=POLICY, settings=SETTINGS,
                     triggers=["loyal_at_risk"])
        accepted = {n: dict(p.accepted_recipients()) for n, p in handle.providers.items()}
        bodies = json.dumps([r.body for r in handle.accepted])
    assert first["triggers"]["loyal_at_risk"]["started"] == len(expected), first["triggers"]
    # the first step of each mover's chain: sent to every mover with an active
    # subscription on a channel of the campaign, once; the others are not reachable there
    channels_of = {"email", "mobile_push", "telegram"}
    reachable = {c for c, ch, gone in _rows(
        url, "select customer_id, channel, unsubscribed_at from raw.channel_subscriptions")
        if c in expected and ch in channels_of and gone is None}
    messages = _rows(url, "select customer_id, step, channel, status from ops.messages "
                          "where campaign_id = 'loyal_at_risk' order by customer_id")
    assert {m[1] for m in messages} == {"reminder"}
    assert len({m[0] for m in messages}) == len(messages) and {m[0] for m in messages} <= expected
    sent = [m for m in messages if m[3] == "sent"]
    assert sorted(m[0] for m in sent) == sorted(reachable)
    assert len(sent) >= 3 and reachable < expected, (messages, expected)
    # each sent message accepted once at its stand-in, at the customer's address; the
    # second run added nothing
    addresses = {(c, ch): a for c, ch, a in _rows(
        url, "select customer_id, channel, address from raw.channel_subscriptions")}
    by_provider = {"email": "sendgrid", "mobile_push": "fcm", "telegram": "telegram"}
    wanted: dict[str, dict[str, int]] = {}
    for customer, _step, channel, _status in sent:
        address = addresses[(customer, channel)]
        wanted.setdefault(by_provider[channel], {})[
            address.lower() if channel == "email" else address] = 1
    got = {n: r for n, r in accepted.items() if r}
    assert got == wanted
    assert accepted == accepted_first
    assert "We have not seen you for a while" in bodies
