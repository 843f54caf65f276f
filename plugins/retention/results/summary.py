"""One definition of a campaign's results, for every place that shows them.

`step_results` reads `marts.campaign_results` per campaign, step and channel: the treated
arms (every variant but `holdout`) as the results, and the holdout, who were sent nothing,
beside them as the control (its members, how many bought and what they spent in the same
attribution windows). The two are never summed. `retention results`, the quick start and
the weekly report's funnel all read it; `format_step_results` is the table the command line
and the quick start print.
"""

from __future__ import annotations

from collections.abc import Sequence

TREATED = ("audience", "sent", "delivered", "opened", "clicked", "converted", "revenue",
           "offline_revenue")
CONTROL = ("holdout_members", "holdout_converted", "holdout_revenue")


def step_results(conn, run_ids: Sequence[str] | None = None) -> list[dict]:
    """Per (campaign_id, step_index, step, channel), ordered so: the treated arms' sums
    (`TREATED`) and the holdout's (`CONTROL`), over `run_ids` (every run when None)."""
    rows = conn.execute("""
        select campaign_id, min(step_index) as step_index, step, channel,
               sum(audience) filter (where not holdout) as audience,
               sum(sent) filter (where not holdout) as sent,
               sum(delivered) filter (where not holdout) as delivered,
               sum(opened) filter (where not holdout) as opened,
               sum(clicked) filter (where not holdout) as clicked,
               sum(converted) filter (where not holdout) as converted,
               sum(revenue) filter (where not holdout) as revenue,
               sum(offline_revenue) filter (where not holdout) as offline_revenue,
               sum(audience) filter (where holdout) as holdout_members,
               sum(converted) filter (where holdout) as holdout_converted,
               sum(revenue) filter (where holdout) as holdout_revenue
        from (select *, variant = 'holdout' as holdout from marts.campaign_results
              where %(runs)s::text[] is null or run_id = any(%(runs)s::text[])) cr
        group by campaign_id, step, channel
        order by campaign_id, min(step_index), channel""",
                        {"runs": list(run_ids) if run_ids is not None else None})
    names = [d.name for d in rows.description]
    out = []
    for row in rows.fetchall():
        r = dict(zip(names, row))
        for key in (*TREATED, *CONTROL):
            value = r[key] or 0
            r[key] = float(value) if key.endswith("revenue") else int(value)
        out.append(r)
    return out


def format_step_results(rows: Sequence[dict]) -> list[str]:
    """The table: treated sent .. revenue, then the holdout (control) beside them."""
    lines = [f"{'campaign.step':<36}{'channel':<13}{'sent':>7}{'deliv':>7}{'opened':>7}"
             f"{'clicked':>8}{'conv':>6}{'revenue':>12}{'offline':>11}"
             f"  | {'holdout':>7}{'conv':>6}{'revenue':>11}"]
    for r in rows:
        lines.append(
            f"{r['campaign_id'] + '.' + r['step']:<36}{r['channel']:<13}{r['sent']:>7,}"
            f"{r['delivered']:>7,}{r['opened']:>7,}{r['clicked']:>8,}{r['converted']:>6,}"
            f"{r['revenue']:>12,.0f}{r['offline_revenue']:>11,.0f}"
            f"  | {r['holdout_members']:>7,}{r['holdout_converted']:>6,}"
            f"{r['holdout_revenue']:>11,.0f}")
    return lines
