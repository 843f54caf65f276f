"""The weekly marketer report: one self-contained HTML file per week, charts as inline SVG.

    write_report(week=None, url=None, out_dir=None) -> Path
    send_report(path, recipients, channel) -> dict

Sections (each an element id, each chart an `<svg id="chart-...">`, see SECTIONS, CHARTS):

* summary: what the week's messages sent and earned, online and offline;
* cascade funnel by wave and channel (multi-step campaign runs of the week): audience,
  sent, delivered, opened, clicked, converted;
* each campaign's revenue, online and offline (runs whose first message is in the week);
* experiments: holdout uplift (conversion rate, revenue per member) and A/B differences
  with 95% intervals and a verdict ("not significant yet" where it is not), from
  `uplift.measure_runs` (intention to treat over each run's frozen audience), each with
  its always-valid interval beside it and revenue per member also CUPED-adjusted; each
  run's sample ratio tests (a mismatch is also a note at the top); the week's global
  control group against an equal-sized sample of treated members;
* trigger chains: their revenue and their share of retention revenue (promo campaigns
  plus trigger chains; transactional messages are service, not retention);
* cohorts: second-purchase curves (30/60/90 days) and new-customer 30-day RPR by
  first-purchase month, unfinished windows marked;
* ROPO: per week, offline revenue split into ROPO purchases, other matched receipts and
  unmatched receipts, and the ROPO share of offline revenue;
* model quality: the out-of-time backtest of churn risk and next-order timing of the
  latest prediction runs (ops.predicted_value_backtests, written by `retention predict`):
  AUC and lift quality per run.

A week is an ISO week (Monday 00:00 UTC to the next Monday). The report reads the marts
built by `retention build` (message_attribution, campaign_results, cohort_retention,
ropo_purchases) as of the build's as_of, and the ledger; it never reads the clock. It is
kept per week as `RETENTION_HOME/reports/weekly_report_<YYYY>-W<WW>.html`, with its e-mail
version beside it (`.eml`, see `report_email`: inline styles, charts as inline PNG), which
`send_report` sends.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

import jinja2
from markupsafe import Markup

from retention import db
from retention.results.summary import step_results
from retention.config import paths, settings
from retention.results import charts
from retention.results.charts import Interval, Series
from retention.results.report_template import TEMPLATE
from retention.results.step_arms import measure_step_arms
from retention.results.uplift import (
    NOT_SIGNIFICANT, SRM_ALPHA, GlobalControl, RunUplift, attribution_windows,
    format_difference, measure_global_control, measure_runs,
)

SECTIONS = ("summary", "cascade-funnel", "campaign-revenue", "experiments", "trigger-chains",
            "cohorts", "ropo", "model-quality")
CHARTS = ("chart-cascade-funnel", "chart-campaign-revenue", "chart-experiments-conversion",
          "chart-experiments-revenue", "chart-trigger-revenue", "chart-trigger-share",
          "chart-cohort-curves", "chart-rpr-30d", "chart-ropo-share")
ROPO_WEEKS = 12
COHORT_MONTHS = 12
#: prediction runs shown in the model-quality table, latest first
MODEL_RUNS = 8


# --- weeks ----------------------------------------------------------------------------

def week_start_of(day: date) -> date:
    return day - timedelta(days=day.weekday())


def parse_week(text: str) -> date:
    """`2026-W45` or any date in the week (`2026-11-04`) -> the week's Monday."""
    text = text.strip()
    m = re.fullmatch(r"(\d{4})-?W(\d{1,2})", text, re.IGNORECASE)
    if m:
        return date.fromisocalendar(int(m.group(1)), int(m.group(2)), 1)
    try:
        return week_start_of(date.fromisoformat(text[:10]))
    except ValueError as exc:
        raise ValueError(f"not a week: {text!r} (e.g. 2026-W45 or 2026-11-04)") from exc


def week_label(week_start: date) -> str:
    year, week, _ = week_start.isocalendar()
    return f"{year}-W{week:02d}"


def previous_week(as_of: datetime) -> date:
    """The Monday of the last ISO week that ended at or before `as_of`."""
    return week_start_of(as_of.astimezone(timezone.utc).date()) - timedelta(days=7)


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=timezone.utc)


def report_path(week_start: date, out_dir: Path | None = None) -> Path:
    return (out_dir or paths().reports) / f"weekly_report_{week_label(week_start)}.html"


# --- data -----------------------------------------------------------------------------

@dataclass
class ReportData:
    week_start: date
    as_of: datetime
    currency: str
    funnel: list[dict] = field(default_factory=list)
    campaigns: list[dict] = field(default_factory=list)
    experiments: list[RunUplift] = field(default_factory=list)
    #: the global holdout of the week's marketing runs against as many treated members
    global_control: GlobalControl | None = None
    #: steps with a learned send time or best channel against their control arm
    step_arms: list = field(default_factory=list)
    cohorts: list[dict] = field(default_factory=list)
    ropo_weeks: list[dict] = field(default_factory=list)
    #: backtest rows of the latest prediction runs up to as_of, latest first
    model_quality: list[dict] = field(default_factory=list)
    sent_in_week: int = 0
    #: messages whose request went out with no answer from the provider (never resent)
    unknown_in_week: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def week_end(self) -> date:
        return self.week_start + timedelta(days=7)

    @property
    def retention(self) -> list[dict]:
        return [c for c in self.campaigns if c["cap_class"] in ("promo", "trigger")]

    @property
    def chains(self) -> list[dict]:
        return [c for c in self.campaigns if c["cap_class"] == "trigger"]

    @property
    def retention_revenue(self) -> float:
        return sum(c["revenue"] for c in self.retention)

    @property
    def chain_revenue(self) -> float:
        return sum(c["revenue"] for c in self.chains)

    @property
    def chain_share(self) -> float | None:
        return self.chain_revenue / self.retention_revenue if self.retention_revenue else None


def _exists(conn, relation: str) -> bool:
    return conn.execute("select to_regclass(%s) is not null", (relation,)).fetchone()[0]


def _dicts(cursor) -> list[dict]:
    names = [d.name for d in cursor.description]
    return [dict(zip(names, (float(v) if hasattr(v, "as_tuple") else v for v in row)))
            for row in cursor.fetchall()]


def default_week(url: str | None = None) -> date:
    """The week of the latest campaign run or message, else of the latest order."""
    with db.connect(url) as conn:
        latest = None
        if _exists(conn, "ops.messages"):
            latest = conn.execute("select max(planned_at) from ops.messages").fetchone()[0]
        if latest is None:
            latest = conn.execute("select max(ordered_at) from raw.orders").fetchone()[0]
    if latest is None:
        raise ValueError("nothing to report: no message and no order in the warehouse yet")
    return week_start_of(latest.astimezone(timezone.utc).date())


def collect(week_start: date, url: str | None = None, as_of: datetime | None = None) -> ReportData:
    """Everything the report shows, read from the warehouse."""
    ws, we = _midnight(week_start), _midnight(week_start + timedelta(days=7))
    with db.connect(url) as conn:
        has_results = _exists(conn, "marts.campaign_results")
        if as_of is None:
            built = conn.execute("select max(as_of) from marts.campaign_results").fetchone()[0] \
                if has_results else None
            as_of = built or we
        as_of = as_of.astimezone(timezone.utc)
        currency = "" if not _exists(conn, "ops.shop_settings") else (conn.execute(
            "select value from ops.shop_settings where key = 'currency'").fetchone() or [""])[0]
        data = ReportData(week_start, as_of, currency or "")
        params = {"ws": ws, "we": we, "as_of": as_of}
        if _exists(conn, "ops.messages"):
            data.sent_in_week = conn.execute(
                "select count(*) from ops.messages where status = 'sent' and sent_at >= %(ws)s "
                "and sent_at < %(we)s and cap_class <> 'transactional'", params).fetchone()[0]
            data.unknown_in_week = conn.execute(
                "select count(*) from ops.messages where status = 'unknown' "
                "and coalesce(not_before, planned_at) >= %(ws)s "
                "and coalesce(not_before, planned_at) < %(we)s", params).fetchone()[0]
            if data.unknown_in_week:
                data.notes.append(
                    f"{data.unknown_in_week:,} messages went out without an answer from the "
                    "provider (status unknown): they may have been delivered and were not "
                    "resent; they count against the frequency caps. The provider's own log "
                    "tells which arrived.")
        if not has_results:
            data.notes.append("marts.campaign_results is not built yet: run `retention build`.")
        else:
            runs = [r[0] for r in conn.execute(
                "select run_id from ops.campaign_runs where as_of >= %(ws)s and as_of < %(we)s "
                "and jsonb_array_length(spec -> 'steps') > 1", params).fetchall()]
            # the treated arms as results, the holdout beside them (retention.results.summary)
            data.funnel = [r for r in step_results(conn, runs) if r["audience"]] if runs else []
            data.campaigns = _dicts(conn.execute("""
                with runs as (
                  select run_id, min(first_planned_at) as started_at
                  from marts.campaign_results group by run_id
                )
                select cr.campaign_id, min(cr.cap_class) as cap_class,
                       count(distinct cr.run_id) as runs, sum(cr.sent) as sent,
                       sum(cr.converted) as converted, sum(cr.conversions) as conversions,
                       sum(cr.revenue) as revenue, sum(cr.offline_revenue) as offline_revenue
                from marts.campaign_results cr
                join runs on runs.run_id = cr.run_id
                where runs.started_at >= %(ws)s and runs.started_at < %(we)s
                  and cr.variant <> 'holdout'
                group by cr.campaign_id
                order by sum(cr.revenue) desc, cr.campaign_id""", params))
        if _exists(conn, "marts.cohort_retention"):
            data.cohorts = _dicts(conn.execute("""
                select * from (
                  select * from marts.cohort_retention
                  where cohort_month < %(we)s order by cohort_month desc limit %(n)s
                ) recent order by cohort_month""", dict(params, n=COHORT_MONTHS)))
        else:
            data.notes.append("marts.cohort_retention is not built yet.")
        if _exists(conn, "marts.ropo_purchases"):
            data.ropo_weeks = _dicts(conn.execute("""
                with weeks as (
                  select generate_series(%(ws)s::timestamptz - make_interval(weeks => %(back)s),
                                         %(ws)s::timestamptz, interval '7 days') as week_start
                ),
                receipts as (
                  select date_trunc('week', purchased_at at time zone 'UTC') as week_start,
                         sum(total_amount) as offline_revenue
                  from raw.offline_receipts where purchased_at <= %(as_of)s group by 1
                ),
                matched as (
                  select date_trunc('week', purchased_at at time zone 'UTC') as week_start,
                         sum(total_amount) as matched_revenue,
                         coalesce(sum(total_amount) filter (where is_ropo), 0) as ropo_revenue
                  from marts.ropo_purchases where purchased_at <= %(as_of)s group by 1
                )
                select (w.week_start at time zone 'UTC')::date as week_start,
                       coalesce(r.offline_revenue, 0) as offline_revenue,
                       coalesce(m.matched_revenue, 0) as matched_revenue,
                       coalesce(m.ropo_revenue, 0) as ropo_revenue
                from weeks w
                left join receipts r on r.week_start = (w.week_start at time zone 'UTC')
                left join matched m on m.week_start = (w.week_start at time zone 'UTC')
                order by 1""", dict(params, back=ROPO_WEEKS - 1)))
        else:
            data.notes.append("marts.ropo_purchases is not built yet.")
        if _exists(conn, "ops.predicted_value_backtests"):
            data.model_quality = _dicts(conn.execute("""
                select b.as_of, b.measure, b.cutoff,
                       extract(epoch from b.outcome_window) / 86400 as outcome_days,
                       b.customers, b.positives, b.auc, b.lift_quality
                from ops.predicted_value_backtests b
                where b.as_of in (select distinct as_of from ops.predicted_value_backtests
                                  where as_of <= %(as_of)s order by as_of desc limit %(n)s)
                order by b.as_of desc, b.measure""", dict(params, n=MODEL_RUNS)))
    data.experiments = [r for r in measure_runs(as_of, started_from=ws, started_before=we, url=url)
                        if r.holdout or r.ab]
    data.global_control = measure_global_control(as_of, ws, we, url=url)
    data.step_arms = measure_step_arms(as_of, started_from=ws, started_before=we, url=url)
    for run in data.experiments:  # a sample ratio mismatch goes to the top of the report
        data.notes.extend(f"{run.campaign_id}, run of {run.run_as_of:%Y-%m-%d %H:%M}: {w}"
                          for w in run.srm_warnings)
    if data.global_control and data.global_control.srm and data.global_control.srm.mismatch:
        data.notes.append(f"The week's global control group: {data.global_control.srm.warning}")
    return data


def _metric_label(metric: str) -> str:
    return ("revenue per member, CUPED-adjusted" if metric == "revenue_per_member_cuped"
            else metric.replace("_", " "))


def _comparison_rows(differences) -> list[tuple]:
    """(difference, its text) per comparison, a revenue difference followed by its
    CUPED-adjusted counterpart."""
    rows = []
    for d in differences:
        rows.append((d, format_difference(d)))
        if d.cuped is not None:
            rows.append((d.cuped, format_difference(d.cuped)))
    return rows


# --- rendering ------------------------------------------------------------------------

def _money(value: float | None, currency: str) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f} {currency}".strip().replace(",", "\u202f")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _funnel_chart(data: ReportData) -> str:
    several = len({r["campaign_id"] for r in data.funnel}) > 1
    labels = [f"{r['campaign_id'] + ' · ' if several else ''}{r['step_index'] + 1}. {r['step']}"
              f"{'' if r['step'] == r['channel'] else ' (%s)' % r['channel']}" for r in data.funnel]
    metrics = ("sent", "delivered", "opened", "clicked", "converted")
    return charts.bar_chart(
        "chart-cascade-funnel", "Cascade funnel by wave and channel", labels,
        [Series(m, [float(r[m]) for r in data.funnel]) for m in metrics],
        empty_message="No cascade ran this week")


def _revenue_chart(chart_id: str, title: str, rows: list[dict], currency: str,
                   empty: str) -> str:
    fmt = charts.fmt_number
    return charts.hbar_chart(
        chart_id, title + (f" ({currency})" if currency else ""), [r["campaign_id"] for r in rows],
        [Series("online", [r["revenue"] - r["offline_revenue"] for r in rows]),
         Series("offline", [r["offline_revenue"] for r in rows])], fmt=fmt,
        empty_message=empty)


def _share_chart(data: ReportData) -> str:
    segments = [Series(c["campaign_id"], [c["revenue"]]) for c in data.chains]
    other = data.retention_revenue - data.chain_revenue
    segments.append(Series("promo campaigns", [other], color=charts.PALETTE[4]))
    if not data.retention_revenue:
        return charts.empty_chart("chart-trigger-share", "Trigger chains' share of retention "
                                  "revenue", "No retention revenue this week")
    return charts.hbar_chart("chart-trigger-share",
                             "Trigger chains' share of retention revenue",
                             [f"retention revenue ({_pct(data.chain_share)} from chains)"],
                             segments)


def _experiment_rows(data: ReportData, metric: str) -> list[Interval]:
    rows = []
    for run in data.experiments:
        for d in run.holdout + run.ab:
            if d.metric == metric:
                label = f"{run.campaign_id} {run.run_as_of:%m-%d}: {d.treatment} vs {d.control}"
                rows.append(Interval(label, d.difference, d.ci_low, d.ci_high, d.significant))
    return rows


def _cohort_charts(data: ReportData) -> tuple[str, str]:
    windows = [w for w in (30, 60, 90) if any(f"second_purchase_{w}d_rate" in c for c in data.cohorts)]
    curves = []
    for i, c in enumerate(data.cohorts[-6:]):
        values = [0.0] + [c.get(f"second_purchase_{w}d_rate") for w in windows]
        dashed = [False] + [not c.get(f"is_complete_{w}d", True) for w in windows]
        curves.append(Series(f"{c['cohort_month']:%Y-%m}", values, dashed=dashed))
    curve_chart = charts.line_chart(
        "chart-cohort-curves", "Share of each cohort with a second purchase, by days since "
        "the first (hollow: window not over yet)", ["day 0"] + [f"day {w}" for w in windows],
        curves, empty_message="No cohort yet")
    months = [f"{c['cohort_month']:%Y-%m}" for c in data.cohorts]
    final = [c.get("second_purchase_30d_rate") if c.get("is_complete_30d") else None
             for c in data.cohorts]
    partial = [None if c.get("is_complete_30d") else c.get("second_purchase_30d_rate")
               for c in data.cohorts]
    rpr_chart = charts.bar_chart(
        "chart-rpr-30d", "New-customer 30-day RPR by first-purchase month", months,
        [Series("final", final, color=charts.PALETTE[0]),
         Series("not final yet", partial, color="#b8c4d0")],
        stacked=True, fmt=charts.fmt_percent, empty_message="No cohort yet")
    return curve_chart, rpr_chart


def _ropo_chart(data: ReportData) -> str:
    weeks = data.ropo_weeks
    labels = [f"{w['week_start']:%m-%d}" for w in weeks]
    return charts.bar_chart(
        "chart-ropo-share", "Offline revenue by week: ROPO purchases, other matched receipts, "
        "unmatched" + (f" ({data.currency})" if data.currency else ""), labels,
        [Series("ROPO", [w["ropo_revenue"] for w in weeks], color=charts.PALETTE[2]),
         Series("matched, not ROPO", [w["matched_revenue"] - w["ropo_revenue"] for w in weeks],
                color=charts.PALETTE[0]),
         Series("unmatched", [w["offline_revenue"] - w["matched_revenue"] for w in weeks],
                color="#b8c4d0")],
        stacked=True, empty_message="No offline receipt yet")


def _figure(svg: str) -> Markup:
    """The chart with its title as a visible caption (the SVG's own title, escaped there)."""
    title = re.search(r"<title id='[^']*'>(.*?)</title>", svg, re.S)
    caption = f"<figcaption>{title.group(1)}</figcaption>" if title else ""
    return Markup(caption + svg)


_TEMPLATE = jinja2.Environment(autoescape=True, trim_blocks=True,
                               lstrip_blocks=True).from_string(TEMPLATE)


def context(data: ReportData) -> dict:
    """What the report shows of collected data: figures, formatters and `chart_markup`
    (each chart's SVG by name), shared by the HTML file and its e-mail version."""
    cur = data.currency
    totals = {k: sum(c[k] for c in data.retention) for k in ("sent", "converted", "revenue",
                                                             "offline_revenue", "conversions")}
    this_week = next((w for w in data.ropo_weeks if w["week_start"] == data.week_start), None)
    ropo_share = _ratio(this_week["ropo_revenue"], this_week["offline_revenue"]) if this_week else None
    ropo_share_matched = _ratio(this_week["ropo_revenue"], this_week["matched_revenue"]) \
        if this_week else None
    curve_chart, rpr_chart = _cohort_charts(data)
    experiments = []
    for run in data.experiments:
        experiments.append({
            "run": run, "complete": run.complete,
            "arms": [(name, arm) for name, arm in sorted(run.arms.items())],
            "rows": _comparison_rows(run.holdout + run.ab), "srm": run.srm})
    gc = data.global_control
    global_control = gc and {"gc": gc, "arms": [("global holdout", gc.holdout),
                                                 ("treated sample", gc.sample)],
                             "rows": _comparison_rows(gc.differences)}
    chart_markup = {
        "funnel": _funnel_chart(data),
        "campaign_revenue": _revenue_chart(
            "chart-campaign-revenue", "Revenue per campaign, online and offline",
            data.campaigns, cur, "No campaign message this week"),
        "experiments_conversion": charts.interval_chart(
            "chart-experiments-conversion", "Conversion rate difference with 95% interval "
            "(green: significant uplift)", _experiment_rows(data, "conversion_rate")),
        "experiments_revenue": charts.interval_chart(
            "chart-experiments-revenue", "Revenue per member difference with 95% interval"
            + (f" ({cur})" if cur else ""), _experiment_rows(data, "revenue_per_member"),
            fmt=lambda v: f"{v:+.1f}"),
        "trigger_revenue": _revenue_chart(
            "chart-trigger-revenue", "Trigger chain revenue, online and offline", data.chains,
            cur, "No trigger chain message this week"),
        "trigger_share": _share_chart(data),
        "cohort_curves": curve_chart,
        "rpr": rpr_chart,
        "ropo": _ropo_chart(data),
    }
    return dict(
        d=data, label=week_label(data.week_start), cur=cur, totals=totals,
        money=lambda v: _money(v, cur), pct=_pct, ratio=_ratio, ropo_share=ropo_share,
        ropo_share_matched=ropo_share_matched, this_week=this_week,
        experiments=experiments, not_significant=NOT_SIGNIFICANT,
        global_control=global_control, srm_alpha=SRM_ALPHA, metric_label=_metric_label,
        step_arms=[(s, _comparison_rows(s.differences)) for s in data.step_arms],
        windows=attribution_windows(), chart_markup=chart_markup,
        week_end_display=data.week_end - timedelta(days=1))


def render(data: ReportData, ctx: dict | None = None) -> str:
    """The report's HTML for collected data (self-contained: inline CSS and SVG)."""
    ctx = ctx or context(data)
    return _TEMPLATE.render(**ctx, charts={k: _figure(v) for k, v in ctx["chart_markup"].items()})


def write_report(week: date | str | None = None, url: str | None = None,
                 out_dir: Path | str | None = None, as_of: datetime | None = None) -> Path:
    """Write the report of the ISO week containing `week` (default: the latest week with
    messages) and return its path, RETENTION_HOME/reports/weekly_report_<week>.html."""
    if isinstance(week, str):
        week_start = parse_week(week)
    elif week is not None:
        week_start = week_start_of(week)
    else:
        week_start = default_week(url)
    from retention.results.report_email import write_email

    data = collect(week_start, url, as_of)
    ctx = context(data)
    html = render(data, ctx)
    path = report_path(week_start, Path(out_dir) if out_dir else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    write_email(ctx, path)
    return path


# --- delivery -------------------------------------------------------------------------

def configured_recipients() -> list[str]:
    """RETENTION_REPORT_RECIPIENTS: comma- or space-separated e-mail addresses."""
    raw = settings().report_recipients or ""
    return [r for r in re.split(r"[,\s;]+", raw) if r]


def send_report(path: Path | str, recipients: list[str], channel=None,
                url: str | None = None) -> dict:
    """E-mail the report's e-mail version to each recipient once per week.

    The message is the `weekly_report_<week>.eml` kept beside the HTML report
    (`report_email`): HTML with inline styles, the charts as inline PNG attachments, a
    plain-text alternative and a link to the full report. `channel` is the e-mail channel
    (a `retention.channels.SendGridChannel`; default: the `retention_sendgrid` connection
    from the environment, `retention.connections`). Deliveries are recorded in
    `ops.report_deliveries`, so a retried task does not send a recipient the same week twice.
    """
    from retention.channels.base import Attachment, OutboundMessage
    from retention.results.report_email import email_path, read_email
    from retention.results.webhook import ensure_results_tables

    if channel is None:
        from retention.connections import channels_from_env

        channel = channels_from_env(["email"])["email"]

    path = Path(path)
    mail = read_email(email_path(path))
    if not getattr(channel, "supports_attachments", False):
        raise TypeError(f"the report e-mail carries its charts as inline images; "
                        f"{type(channel).__name__} cannot send attachments")
    images = tuple(Attachment(i.filename, i.png, "image/png", i.content_id)
                   for i in mail.images)
    m = re.search(r"weekly_report_(\d{4}-W\d{2})\.html$", path.name)
    label = m.group(1) if m else path.stem
    week_start = parse_week(label) if m else None
    subject, html, body_text = mail.subject, mail.html, mail.text
    with db.connect(url) as conn:
        ensure_results_tables(conn)
        conn.commit()
        done = {r[0] for r in conn.execute(
            "select recipient from ops.report_deliveries where week_start = %s",
            (week_start,)).fetchall()} if week_start else set()
    pending = [r for r in dict.fromkeys(recipients) if r not in done]
    messages = [OutboundMessage(
        message_id="report_" + hashlib.sha256(f"{label}|{r}".encode()).hexdigest()[:24],
        customer_id=f"marketer:{r}", channel="email", address=r, subject=subject,
        body_text=body_text, body_html=html,
        data={"message_id": "report_" + hashlib.sha256(f"{label}|{r}".encode()).hexdigest()[:24],
              "kind": "weekly_report", "week": label},
        unsubscribe_url=None, attachments=images) for r in pending]
    results = channel.send_batch(messages) if messages else []
    sent = [(msg, res) for msg, res in zip(messages, results) if res.status == "sent"]
    if sent and week_start:
        with db.connect(url) as conn:
            with conn.cursor() as cur:
                cur.executemany(
                    "insert into ops.report_deliveries (week_start, recipient, report_file, "
                    "provider_message_id, sent_at) values (%s, %s, %s, %s, %s) "
                    "on conflict do nothing",
                    [(week_start, msg.address, str(path), res.provider_message_id,
                      datetime.now(timezone.utc)) for msg, res in sent])  # a recorded fact
            conn.commit()
    failed = {msg.address: res.reason for msg, res in zip(messages, results) if res.status != "sent"}
    return {"week": label, "sent": len(sent), "already_sent": len(recipients) - len(pending),
            "failed": failed}


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - the CLI wraps it
    import argparse

    parser = argparse.ArgumentParser(prog="python -m retention.results.report")
    parser.add_argument("--week", help="2026-W45 or a date in the week (default: the latest)")
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    print(write_report(args.week, out_dir=args.out_dir))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["CHARTS", "SECTIONS", "collect", "configured_recipients", "context", "default_week",
           "parse_week", "previous_week", "render", "report_path", "send_report", "week_label",
           "write_report"]
