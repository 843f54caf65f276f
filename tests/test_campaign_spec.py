"""Campaign files: the shipped ones validate; a wrong one names file, line and field."""

from __future__ import annotations

import textwrap

import pytest

from retention.campaigns.render import template_files
from retention.campaigns.spec import CampaignError, load_all, load_campaign, parse_campaign

pytestmark = pytest.mark.unit

VALID = textwrap.dedent("""\
    id: demo
    kind: promo
    audience:
      include_any:
        - visited: {within_days: 30}
    steps:
      - name: email
        channel: email
        template: weekly_promo
      - name: push
        channel: [mobile_push, telegram]
        template: weekly_promo
        wait: 24h
    variants:
      - {name: A, weight: 2}
      - {name: B}
    holdout: 0.1
    """)


def test_shipped_campaigns_validate_and_their_templates_exist():
    campaigns = load_all()
    assert {"weekly_promo", "smartphone_accessories"} <= set(campaigns)
    cascade = campaigns["weekly_promo"]
    assert [s.channels for s in cascade.steps] == [("email",), ("mobile_push",), ("web_push",), ("telegram",)]
    for campaign in campaigns.values():
        for step in campaign.steps:
            for channel in step.channels:
                for path in template_files(channel, step.template):
                    assert path.exists(), f"{campaign.id}.{step.name}: missing {path}"


def test_valid_campaign_parses():
    c = parse_campaign(VALID, "demo.yaml")
    assert [s.name for s in c.steps] == ["email", "push"]
    assert c.steps[1].channels == ("mobile_push", "telegram") and c.steps[1].only_unengaged
    assert c.steps[1].wait.total_seconds() == 86400
    assert [(v.name, v.weight) for v in c.variants] == [("A", 2.0), ("B", 1.0)]
    assert c.cap_class == "promo"


@pytest.mark.parametrize("old,new,expected", [
    ("channel: [mobile_push, telegram]", "channel: [mobile_push, pigeon]",
     "demo.yaml:11: steps[1].channel"),
    ("holdout: 0.1", "holdout: 0.9", "demo.yaml:17: holdout: 0.9 is greater than the maximum of 0.5"),
    ("wait: 24h", "wait: tomorrow", "demo.yaml:13: steps[1].wait: 'tomorrow' does not match"),
    ("- visited: {within_days: 30}", "- visted: {within_days: 30}", "demo.yaml:5: audience.include_any[0]: unknown field"),
    ("kind: promo", "kind: promo\ncolour: red", "demo.yaml:1: (top level): unknown field ('colour' was unexpected)"),
    ("  - {name: B}", "  - {name: holdout}", "demo.yaml:16: variants[1].name"),
])
def test_invalid_campaign_names_line_and_field(old, new, expected):
    assert old in VALID
    with pytest.raises(CampaignError) as err:
        parse_campaign(VALID.replace(old, new), "demo.yaml")
    assert str(err.value).startswith(expected), str(err.value)


def test_broken_yaml_and_wrong_id(tmp_path):
    with pytest.raises(CampaignError, match=r"demo.yaml:3: not valid YAML"):
        parse_campaign("id: demo\nkind: promo\n  steps: [\n", "demo.yaml")
    path = tmp_path / "other.yaml"
    path.write_text(VALID)
    with pytest.raises(CampaignError, match="must equal the file name 'other'"):
        load_campaign(path)


@pytest.mark.parametrize("old,new,expected", [
    ("holdout: 0.1", "holdout: .nan", "demo.yaml:17: holdout: nan is not a finite number"),
    ("holdout: 0.1", "holdout: .NaN", "demo.yaml:17: holdout: nan is not a finite number"),
    ("holdout: 0.1", "holdout: .inf", "demo.yaml:17: holdout: inf is not a finite number"),
    ("holdout: 0.1", "holdout: -.inf", "demo.yaml:17: holdout: -inf is not a finite number"),
    ("holdout: 0.1", "holdout: -0.1", "demo.yaml:17: holdout: -0.1 is less than the minimum of 0"),
    ("holdout: 0.1", "holdout: 1.5", "demo.yaml:17: holdout: 1.5 is greater than the maximum of 0.5"),
    ("{name: A, weight: 2}", "{name: A, weight: .nan}", "demo.yaml:15: variants[0].weight: nan is not a finite number"),
    ("{name: A, weight: 2}", "{name: A, weight: .inf}", "demo.yaml:15: variants[0].weight: inf is not a finite number"),
    ("{name: A, weight: 2}", "{name: A, weight: -1}", "demo.yaml:15: variants[0].weight: -1 is less than or equal to"),
    ("- visited: {within_days: 30}", "- visited: {within_days: .nan}",
     "demo.yaml:5: audience.include_any[0].visited.within_days: nan is not a finite number"),
])
def test_non_finite_or_out_of_range_numbers_are_refused(old, new, expected):
    """YAML's .nan passes JSON Schema's number type and every bound, so it is refused
    explicitly; a NaN holdout would otherwise put every customer in the holdout."""
    assert old in VALID
    with pytest.raises(CampaignError) as err:
        parse_campaign(VALID.replace(old, new), "demo.yaml")
    assert str(err.value).startswith(expected), str(err.value)


def test_load_campaign_with_nan_holdout_names_the_file(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text(VALID.replace("holdout: 0.1", "holdout: .nan"))
    with pytest.raises(CampaignError) as err:
        load_campaign(path)
    assert str(err.value).startswith(f"{path}:17: holdout:"), str(err.value)
    assert "finite" in str(err.value)
