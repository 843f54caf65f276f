"""The effect of the intelligence layer's steps: learned send time or best channel against
the step's control arm (docs/campaigns.md).

A step with `send_time: optimal` or `channel: best` records each member's arm in the
ledger (ops.messages.send_time_arm: `optimal` or `default`; channel_arm: `best` or
`default`; hashed on campaign, step and customer). Intention to treat: every ledger row
of the arm counts as a member, whatever became of the message (planned, sent, suppressed,
failed). Two outcomes per member:

* engaged: an open (not a machine open, SendGrid's sg_machine_open) or a click of the
  message by as_of;
* converted: a purchase (online paid or delivered, or a matched offline receipt) after the
  step's time and by the step's time plus the longest delay of its messages (release
  after the step's time, quiet hours included) plus the channel's attribution window, the
  same span for both arms, cut at as_of.

Each is compared treated minus control with uplift.proportion_difference (Wald interval,
pooled z-test, always-valid interval), so the report shows the effect with its interval
and both arms' figures, never the treated group alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from retention import db
from retention.results.uplift import (ArmStats, Difference, _purchases_sql, _windows_sql,
                                      attribution_windows, proportion_difference)

#: (ledger column, treated arm, control arm) per kind of step arm
KINDS = {"send_time": ("send_time_arm", "optimal", "default"),
         "channel": ("channel_arm", "best", "default")}


@dataclass
class StepArms:
    run_id: str
    campaign_id: str
    step: str
    kind: str  # send_time | channel
    #: the arms' members with, as `converters`, the engaged members
    engaged: dict[str, ArmStats] = field(default_factory=dict)
    #: the arms' members with the converted members
    converted: dict[str, ArmStats] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "campaign_id": self.campaign_id, "step": self.step,
                "kind": self.kind,
                "engaged": {k: a.as_dict() for k, a in self.engaged.items()},
                "converted": {k: a.as_dict() for k, a in self.converted.items()},
                "differences": [d.as_dict() for d in self.differences]}


def measure_step_arms(as_of: datetime, *, run_ids: list[str] | None = None,
                      started_from: datetime | None = None,
                      started_before: datetime | None = None, url: str | None = None,
                      confidence: float = 0.95,
                      windows: dict[str, float] | None = None) -> list[StepArms]:
    """Treated against control per run, step and kind of arm, as of `as_of`: the steps'
    rows planned by as_of, of the runs named or of the steps planned in
    [started_from, started_before)."""
    windows = windows or attribution_windows()
    values, params = _windows_sql(windows)
    params.update(as_of=as_of, run_ids=run_ids, started_from=started_from,
                  started_before=started_before, default_hours=max(windows.values()))
    with db.connect(url) as conn:
        if not conn.execute("select exists (select 1 from information_schema.columns where "
                            "table_schema = 'ops' and table_name = 'messages' "
                            "and column_name = 'channel_arm')").fetchone()[0]:
            return []  # a ledger before migration 0004_step_arms
        rows = conn.execute(f"""
            with windows (channel, hours) as ({values}),
            arms as (
              select m.run_id, m.campaign_id, m.step, m.customer_id, m.message_id, m.channel,
                     m.planned_at, coalesce(m.not_before, m.planned_at) as due_at,
                     a.kind, a.arm
              from ops.messages m
              cross join lateral (values ('send_time', m.send_time_arm),
                                         ('channel', m.channel_arm)) as a (kind, arm)
              where a.arm is not null and m.planned_at <= %(as_of)s
                and (%(run_ids)s::text[] is null or m.run_id = any(%(run_ids)s::text[]))
                and (%(started_from)s::timestamptz is null or m.planned_at >= %(started_from)s)
                and (%(started_before)s::timestamptz is null
                     or m.planned_at < %(started_before)s)
            ),
            spans as (
              select a.run_id, a.step, max(a.due_at - a.planned_at)
                       + make_interval(secs => max(coalesce(w.hours, %(default_hours)s)) * 3600)
                       as span
              from arms a left join windows w on w.channel = a.channel
              group by a.run_id, a.step
            ),
            purchases (customer_id, purchased_at, revenue) as ({_purchases_sql(conn)}
            )
            select a.run_id, a.campaign_id, a.step, a.kind, a.arm, count(*),
                   count(*) filter (where exists (
                     select 1 from ops.message_events e
                     where e.message_id = a.message_id and e.event_type in ('open', 'click')
                       and e.occurred_at <= %(as_of)s
                       and coalesce(e.payload ->> 'sg_machine_open' in ('true', '1'), false)
                           is false)),
                   count(*) filter (where exists (
                     select 1 from purchases p
                     where p.customer_id = a.customer_id and p.purchased_at > a.planned_at
                       and p.purchased_at <= least(a.planned_at + s.span, %(as_of)s)))
            from arms a
            join spans s on s.run_id = a.run_id and s.step = a.step
            group by 1, 2, 3, 4, 5
            order by 1, 3, 4, 5""", params).fetchall()
    found: dict[tuple, StepArms] = {}
    for run_id, campaign_id, step, kind, arm, members, engaged, converted in rows:
        out = found.setdefault((run_id, step, kind), StepArms(run_id, campaign_id, step, kind))
        out.engaged[arm] = ArmStats(arm, members, engaged, 0.0)
        out.converted[arm] = ArmStats(arm, members, converted, 0.0)
    for out in found.values():
        _, treated, control = KINDS[out.kind]
        if treated not in out.engaged or control not in out.engaged:
            continue
        for metric, arms in (("engagement_rate", out.engaged), ("conversion_rate", out.converted)):
            d = proportion_difference(arms[treated], arms[control], confidence)
            if d is not None:
                out.differences.append(replace(d, metric=metric))
    return list(found.values())
