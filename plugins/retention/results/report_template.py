"""The weekly report's HTML template (Jinja2, autoescaped). Kept in Python so an installed
package carries it; charts arrive as ready SVG markup."""

TEMPLATE = r"""{#- the tables and note of an experiment: its arms, its comparisons, its sample ratio -#}
{% macro arms_table(arms, head) -%}
  <table>
    <tr><th class="text">{{ head }}</th><th>members</th><th>converted</th><th>conversion rate</th><th>revenue</th><th>revenue per member</th></tr>
    {% for name, arm in arms %}
    <tr><td>{{ name }}</td><td>{{ "{:,}".format(arm.members) }}</td><td>{{ "{:,}".format(arm.converters) }}</td>
        <td>{{ pct(arm.conversion_rate) }}</td><td>{{ money(arm.revenue) }}</td>
        <td>{{ "%.2f"|format(arm.revenue_per_member or 0) }}</td></tr>
    {% endfor %}
  </table>
{%- endmacro -%}
{% macro comparisons_table(rows) -%}
  <table>
    <tr><th class="text">comparison</th><th class="text">metric</th><th class="text">difference (95% CI), p; always-valid 95% CI</th></tr>
    {% for diff, text in rows %}
    <tr><td>{{ diff.treatment }} vs {{ diff.control }}</td><td class="text">{{ metric_label(diff.metric) }}</td>
        <td class="text"><span class="verdict {{ 'sig' if diff.significant else 'ns' }}">{{ text }}</span></td></tr>
    {% endfor %}
  </table>
{%- endmacro -%}
{% macro srm_note(t) -%}
  <p class="{{ 'srm-warning' if t.mismatch else 'note' }}">{% if t.mismatch %}<b>Sample ratio mismatch.</b> {% endif %}Sample ratio, {{ t.describe() }}.</p>
{%- endmacro -%}
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Weekly retention report {{ label }}</title>
<style>
  :root { --ink: #1f2933; --muted: #66717d; --line: #e3e7eb; --good: #3a9e6f; --bad: #e07b39; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
         color: var(--ink); background: #f4f6f8; }
  header, section, footer { max-width: 980px; margin: 0 auto; padding: 20px 28px; }
  header { padding-top: 28px; }
  h1 { font-size: 24px; margin: 0 0 4px; }
  h2 { font-size: 18px; margin: 0 0 6px; }
  h3 { font-size: 15px; margin: 18px 0 6px; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 10px; margin-top: 16px; }
  .meta, .note, figcaption { color: var(--muted); }
  .lead { margin: 0 0 12px; }
  .kpis { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px; }
  .kpi { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
  .kpi b { display: block; font-size: 20px; }
  .kpi span { color: var(--muted); font-size: 12px; }
  figure { margin: 14px 0 16px; }
  figcaption { font-weight: 600; font-size: 13px; margin-bottom: 4px; }
  table { border-collapse: collapse; width: 100%; font-size: 13px; margin: 6px 0 10px; }
  th, td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: right; }
  th:first-child, td:first-child, td.text, th.text { text-align: left; }
  th { color: var(--muted); font-weight: 600; }
  .verdict { font-weight: 600; }
  .verdict.sig { color: var(--good); }
  .verdict.ns { color: var(--muted); }
  .badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
           background: #fff4e5; color: #8a5a00; margin-left: 6px; }
  ul.notes { color: var(--muted); }
  .srm-warning { color: #b42318; }
  footer { color: var(--muted); font-size: 12px; }
</style>
</head>
<body>
<header>
  <h1>Weekly retention report, {{ label }}</h1>
  <div class="meta">Week of {{ d.week_start.isoformat() }} to {{ week_end_display.isoformat() }} (UTC).
    Results as of {{ d.as_of.strftime('%Y-%m-%d %H:%M') }} UTC{% if cur %}, amounts in {{ cur }}{% endif %}.
    {% if d.as_of.date() < d.week_end %}<span class="badge">week not over yet</span>{% endif %}</div>
  {% if d.notes %}<ul class="notes">{% for n in d.notes %}<li>{{ n }}</li>{% endfor %}</ul>{% endif %}
</header>

<section id="summary">
  <h2>Summary</h2>
  <!--summary-->
  <p class="lead">This week's campaigns and trigger chains sent {{ "{:,}".format(d.sent_in_week) }} messages and earned
  {{ money(totals.revenue) }} from {{ "{:,}".format(totals.conversions | int) }} purchases,
  {{ money(totals.offline_revenue) }} of it in stores.
  {% if d.chain_share is not none %}Trigger chains brought {{ pct(d.chain_share) }} of retention revenue.{% endif %}
  {% if ropo_share is not none %}ROPO purchases were {{ pct(ropo_share) }} of offline revenue.{% endif %}</p>
  <!--/summary-->
  <div class="kpis">
    <div class="kpi"><b>{{ "{:,}".format(d.sent_in_week) }}</b><span>messages sent</span></div>
    <div class="kpi"><b>{{ money(totals.revenue) }}</b><span>attributed revenue</span></div>
    <div class="kpi"><b>{{ money(totals.revenue - totals.offline_revenue) }}</b><span>of it online</span></div>
    <div class="kpi"><b>{{ money(totals.offline_revenue) }}</b><span>of it offline (stores)</span></div>
    <div class="kpi"><b>{{ pct(d.chain_share) }}</b><span>trigger chains' share</span></div>
    <div class="kpi"><b>{{ pct(ropo_share) }}</b><span>ROPO share of offline revenue</span></div>
  </div>
</section>

<section id="cascade-funnel">
  <h2>Cascade funnel by wave and channel</h2>
  <p class="lead">Each wave of the week's multi-step campaigns: the members who were sent it, and beside
  them the holdout, who were sent nothing (the control: how many of them bought in the same windows).
  A later wave goes only to members whom no earlier wave reached or who did not engage, so waves add
  up. Push and Telegram report delivery (accepted by the provider) only; opens and clicks come from
  e-mail.</p>
  <figure>{{ charts.funnel }}</figure>
  {% if d.funnel %}
  <table>
    <tr><th class="text">wave</th><th>audience</th><th>sent</th><th>delivered</th><th>opened</th>
        <th>clicked</th><th>converted</th><th>conversion / sent</th><th>revenue</th><th>offline</th>
        <th>holdout</th><th>holdout converted</th><th>holdout revenue</th></tr>
    {% for r in d.funnel %}
    <tr><td>{{ r.campaign_id }} · {{ r.step_index + 1 }}. {{ r.step }}{% if r.step != r.channel %} ({{ r.channel }}){% endif %}</td>
        <td>{{ "{:,}".format(r.audience | int) }}</td><td>{{ "{:,}".format(r.sent | int) }}</td>
        <td>{{ pct(ratio(r.delivered, r.sent)) }}</td><td>{{ pct(ratio(r.opened, r.delivered or r.sent)) }}</td>
        <td>{{ pct(ratio(r.clicked, r.delivered or r.sent)) }}</td><td>{{ "{:,}".format(r.converted | int) }}</td>
        <td>{{ pct(ratio(r.converted, r.sent)) }}</td><td>{{ money(r.revenue) }}</td><td>{{ money(r.offline_revenue) }}</td>
        <td>{{ "{:,}".format(r.holdout_members | int) }}</td><td>{{ "{:,}".format(r.holdout_converted | int) }}</td>
        <td>{{ money(r.holdout_revenue) }}</td></tr>
    {% endfor %}
  </table>
  {% endif %}
</section>

<section id="campaign-revenue">
  <h2>Revenue per campaign, online and offline</h2>
  <p class="lead">Purchases within each channel's attribution window after a message, credited to the
  last message before them; offline receipts count when matched to the customer by loyalty card or phone.</p>
  <figure>{{ charts.campaign_revenue }}</figure>
  {% if d.campaigns %}
  <table>
    <tr><th class="text">campaign</th><th class="text">kind</th><th>runs</th><th>sent</th><th>converted</th>
        <th>revenue</th><th>online</th><th>offline</th></tr>
    {% for c in d.campaigns %}
    <tr><td>{{ c.campaign_id }}</td><td class="text">{{ c.cap_class }}</td><td>{{ c.runs }}</td>
        <td>{{ "{:,}".format(c.sent | int) }}</td><td>{{ "{:,}".format(c.converted | int) }}</td>
        <td>{{ money(c.revenue) }}</td><td>{{ money(c.revenue - c.offline_revenue) }}</td>
        <td>{{ money(c.offline_revenue) }}</td></tr>
    {% endfor %}
  </table>
  {% endif %}
</section>

<section id="experiments">
  <h2>A/B tests and holdouts</h2>
  <p class="lead">Every member of a run's frozen audience counts in the arm they were assigned to,
  reached or not; purchases online and offline within the run's window. 95% intervals; a difference
  whose test is not below p = 0.05 reads "{{ not_significant }}". The always-valid interval beside
  each may be read every week: however often it is looked at, the chance that it ever misses the
  true difference stays within 5% (the fixed interval holds for one look only). Revenue per member
  is also shown CUPED-adjusted: each member's revenue in the equally long period before the run
  explains part of the spread, which narrows the interval without moving its centre on average.
  Each run's arm sizes are tested against the shares its assignment gives them (sample ratio,
  chi-square); p &lt; {{ srm_alpha }} is a warning that members were lost or moved unevenly.</p>
  <figure>{{ charts.experiments_conversion }}</figure>
  <figure>{{ charts.experiments_revenue }}</figure>
  {% for e in experiments %}
  <h3 id="experiment-{{ loop.index }}">{{ e.run.campaign_id }}, run of {{ e.run.run_as_of.strftime('%Y-%m-%d %H:%M') }}
    {% if not e.complete %}<span class="badge">window open until {{ e.run.window_end.strftime('%Y-%m-%d %H:%M') }}</span>{% endif %}</h3>
  {{ arms_table(e.arms, "arm") }}
  {{ comparisons_table(e.rows) }}
  {% for t in e.srm %}
  {{ srm_note(t) }}
  {% endfor %}
  {% else %}
  <p class="note">No campaign run this week had a holdout or more than one variant.</p>
  {% endfor %}
  {% if global_control %}
  {% set g = global_control.gc %}
  <h3 id="global-control">Global control group</h3>
  <p class="note">The {{ "{:,}".format(g.holdout.members) }} members of the week's marketing runs in the global
  holdout (no marketing message reaches them) against {{ "{:,}".format(g.sample.members) }} of the other
  {{ "{:,}".format(g.population - g.holdout.members) }}, drawn by hash; purchases from
  {{ g.measured_from.strftime('%Y-%m-%d %H:%M') }} to {{ g.measured_until.strftime('%Y-%m-%d %H:%M') }} UTC.</p>
  {{ arms_table(global_control.arms, "group") }}
  {{ comparisons_table(global_control.rows) }}
  {% if g.srm %}{{ srm_note(g.srm) }}{% endif %}
  {% endif %}
  {% for s, rows in step_arms %}
  <h3 id="step-arms-{{ loop.index }}">{{ s.campaign_id }}, step {{ s.step }}: {{ 'learned send time' if s.kind == 'send_time' else 'best channel' }} against its control arm</h3>
  <p class="note">Run {{ s.run_id }}. Every ledger row of the step counts in its member's arm; engaged: an open
  (not a machine's) or a click; converted: a purchase within the step's span (docs/campaigns.md).</p>
  <table>
    <tr><th class="text">arm</th><th>members</th><th>engaged</th><th>engagement rate</th><th>converted</th><th>conversion rate</th></tr>
    {% for name, arm in s.engaged.items() %}
    <tr><td>{{ name }}</td><td>{{ "{:,}".format(arm.members) }}</td><td>{{ "{:,}".format(arm.converters) }}</td>
        <td>{{ pct(arm.conversion_rate) }}</td><td>{{ "{:,}".format(s.converted[name].converters) }}</td>
        <td>{{ pct(s.converted[name].conversion_rate) }}</td></tr>
    {% endfor %}
  </table>
  {{ comparisons_table(rows) }}
  {% endfor %}
</section>

<section id="trigger-chains">
  <h2>Trigger chains</h2>
  <p class="lead">{% if d.chain_share is not none %}Trigger chains earned {{ money(d.chain_revenue) }},
  {{ pct(d.chain_share) }} of the week's retention revenue ({{ money(d.retention_revenue) }}, promo campaigns plus
  trigger chains).{% else %}No retention revenue this week.{% endif %}</p>
  <figure>{{ charts.trigger_revenue }}</figure>
  <figure>{{ charts.trigger_share }}</figure>
</section>

<section id="cohorts">
  <h2>Cohort retention and new-customer RPR</h2>
  <p class="lead">Customers grouped by the month of their first purchase; the share who made a second
  purchase within 30, 60 and 90 days. A window that has not ended yet is not final.</p>
  <figure>{{ charts.cohort_curves }}</figure>
  <figure>{{ charts.rpr }}</figure>
  {% if d.cohorts %}
  <table>
    <tr><th class="text">cohort</th><th>customers</th><th>30 days</th><th>60 days</th><th>90 days</th></tr>
    {% for c in d.cohorts %}
    <tr><td>{{ c.cohort_month.strftime('%Y-%m') }}</td><td>{{ "{:,}".format(c.customers | int) }}</td>
      {% for w in (30, 60, 90) %}
        <td>{{ pct(c['second_purchase_%dd_rate' % w]) }}{% if not c['is_complete_%dd' % w] %} *{% endif %}</td>
      {% endfor %}</tr>
    {% endfor %}
  </table>
  <p class="note">* window not over yet</p>
  {% endif %}
</section>

<section id="ropo">
  <h2>ROPO: research online, purchase offline</h2>
  <p class="lead">{% if this_week %}This week {{ money(this_week.offline_revenue) }} was spent in stores;
  {{ money(this_week.matched_revenue) }} of it on receipts matched to a customer, and
  {{ money(this_week.ropo_revenue) }} on ROPO purchases (an item the customer viewed online in the 30 days before):
  {{ pct(ropo_share) }} of offline revenue, {{ pct(ropo_share_matched) }} of matched offline revenue.
  {% else %}No offline data yet.{% endif %}</p>
  <figure>{{ charts.ropo }}</figure>
</section>

<section id="model-quality">
  <h2>Model quality</h2>
  <p class="lead">How well the predictions of the latest runs held up: each run also fits the models as
  of an earlier cutoff and scores the customers of that day against what they did afterwards. Churn
  risk: did the customers it rated riskiest buy nothing in the window? Next order: did the customers
  it expected to order soonest order within the window? AUC is the chance that a customer with the
  outcome is rated above one without (50% random, 100% perfect); lift quality is how much of the way
  from a random to a perfect ordering the ranking gets (0% random, 100% perfect).</p>
  {% if d.model_quality %}
  <table>
    <tr><th class="text">run (as of)</th><th class="text">prediction</th><th class="text">fitted as of</th>
        <th>window (days)</th><th>customers</th><th>with the outcome</th><th>AUC</th><th>lift quality</th></tr>
    {% for m in d.model_quality %}
    <tr><td>{{ m.as_of.strftime('%Y-%m-%d %H:%M') }}</td>
        <td class="text">{{ {'churn_risk': 'churn risk (no purchase)', 'next_order': 'next order (purchase)'}.get(m.measure, m.measure) }}</td>
        <td class="text">{{ m.cutoff.strftime('%Y-%m-%d') }}</td><td>{{ m.outcome_days | round | int }}</td>
        <td>{{ "{:,}".format(m.customers | int) }}</td><td>{{ "{:,}".format(m.positives | int) }}</td>
        <td>{{ pct(m.auc) }}</td><td>{{ pct(m.lift_quality) }}</td></tr>
    {% endfor %}
  </table>
  {% else %}
  <p class="note">No backtest yet: each prediction run (`retention predict`, the build DAG's predicted value task) writes one.</p>
  {% endif %}
</section>

<footer>
  Attribution windows (hours after a message): {% for ch, h in windows | dictsort %}{{ ch }} {{ h | int }}{% if not loop.last %}, {% endif %}{% endfor %}.
  Last touch: a purchase goes to the last message before it. Built from marts.campaign_results,
  marts.message_attribution, marts.cohort_retention, marts.ropo_purchases, ops.campaign_runs and
  ops.predicted_value_backtests.
</footer>
</body>
</html>
"""
