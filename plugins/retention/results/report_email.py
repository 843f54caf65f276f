"""The weekly report as an e-mail that common mail clients show as written.

Gmail and Outlook drop inline SVG and most `<style>` blocks, so the e-mail is its own
rendering of the same figures (`report.context`):

* HTML with inline `style` attributes only, table layout, no script and no SVG;
* every chart as a PNG (the report's own SVG rasterised by cairosvg at twice its size,
  so it stays sharp on high-density screens), attached inline and shown with
  `<img src="cid:...">`;
* a plain-text alternative (summary, headline figures, verdicts);
* a link to the full report, `RETENTION_REPORT_BASE_URL/weekly_report_<week>.html`
  (unset: the kept file's path is named instead).

`write_email(ctx, html_path)` keeps it beside the HTML report as a standard MIME file,
`weekly_report_<week>.eml` (multipart/alternative of text and multipart/related HTML plus
images), which any mail client opens; `read_email(path)` gives its parts back for sending.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from html import unescape
from pathlib import Path

import cairosvg
import jinja2

from retention.config import settings

#: pixels of a PNG per SVG user unit (the charts are 720 units wide)
PNG_SCALE = 2
#: the width a chart is shown at in the e-mail, in CSS pixels
SHOWN_WIDTH = 680

INK, MUTED, LINE, GOOD = "#1f2933", "#66717d", "#e3e7eb", "#3a9e6f"
FONT = "font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif"

# Sections of the e-mail: heading and the charts (keys of context()["chart_markup"]).
EMAIL_SECTIONS = (
    ("Cascade funnel by wave and channel", ("funnel",)),
    ("Revenue per campaign, online and offline", ("campaign_revenue",)),
    ("A/B tests and holdouts", ("experiments_conversion", "experiments_revenue")),
    ("Trigger chains", ("trigger_revenue", "trigger_share")),
    ("Cohort retention and new-customer RPR", ("cohort_curves", "rpr")),
    ("ROPO: research online, purchase offline", ("ropo",)),
)


@dataclass(frozen=True)
class InlineImage:
    content_id: str  # referenced from the HTML as cid:<content_id>
    filename: str
    png: bytes
    alt: str


@dataclass(frozen=True)
class ReportEmail:
    subject: str
    html: str
    text: str
    images: list[InlineImage]


def chart_png(svg: str) -> bytes:
    """A chart's SVG as PNG, PNG_SCALE pixels per unit of its viewBox width."""
    m = re.search(r"viewBox='0 0 ([\d.]+) ([\d.]+)'", svg)
    width = float(m.group(1)) if m else 720.0
    return cairosvg.svg2png(bytestring=svg.encode("utf-8"), output_width=int(width * PNG_SCALE))


def report_link(html_path: Path) -> str | None:
    """The full report's URL under RETENTION_REPORT_BASE_URL (None when unset)."""
    base = settings().report_base_url
    return f"{base.rstrip('/')}/{html_path.name}" if base else None


_ENV = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)

_HTML = _ENV.from_string(r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ subject }}</title>
</head>
<body style="margin:0;padding:0;background:#f4f6f8;">
<table role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0" style="background:#f4f6f8;">
<tr><td align="center" style="padding:16px 8px;">
<table role="presentation" width="720" cellpadding="0" cellspacing="0" border="0" style="width:100%;max-width:720px;background:#ffffff;border:1px solid {{ c.line }};border-radius:8px;{{ c.font }};color:{{ c.ink }};font-size:14px;line-height:1.45;">
<tr><td style="padding:20px 20px 4px 20px;">
  <h1 style="margin:0 0 4px 0;font-size:22px;color:{{ c.ink }};{{ c.font }};">Weekly retention report, {{ label }}</h1>
  <p style="margin:0;color:{{ c.muted }};font-size:13px;">Week of {{ d.week_start.isoformat() }} to {{ week_end_display.isoformat() }} (UTC).
  Results as of {{ d.as_of.strftime('%Y-%m-%d %H:%M') }} UTC{% if cur %}, amounts in {{ cur }}{% endif %}.
  {% if d.as_of.date() < d.week_end %}<b style="color:#8a5a00;">Week not over yet.</b>{% endif %}</p>
  {% for n in d.notes %}<p style="margin:6px 0 0 0;color:{{ c.muted }};font-size:13px;">{{ n }}</p>{% endfor %}
  {% if link %}<p style="margin:12px 0 0 0;"><a href="{{ link }}" style="color:#2f6db5;font-weight:bold;">Open the full report</a> <span style="color:{{ c.muted }};font-size:13px;">(every table, interactive charts)</span></p>
  {% else %}<p style="margin:12px 0 0 0;color:{{ c.muted }};font-size:13px;">The full report with every table is kept as {{ path }}.</p>{% endif %}
</td></tr>
<tr><td style="padding:16px 20px 0 20px;">
  <h2 style="margin:0 0 6px 0;font-size:17px;color:{{ c.ink }};{{ c.font }};">Summary</h2>
  <p style="margin:0 0 10px 0;">{{ summary }}</p>
  <table role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0">
  {% for row in kpis | batch(3) %}
    <tr>{% for value, name in row %}
      <td width="33%" valign="top" style="padding:8px 10px;border:1px solid {{ c.line }};">
        <div style="font-size:19px;font-weight:bold;color:{{ c.ink }};">{{ value }}</div>
        <div style="font-size:12px;color:{{ c.muted }};">{{ name }}</div></td>
    {% endfor %}</tr>
  {% endfor %}
  </table>
</td></tr>
{% for heading, figures in sections %}
<tr><td style="padding:22px 20px 0 20px;">
  <h2 style="margin:0 0 8px 0;font-size:17px;color:{{ c.ink }};{{ c.font }};">{{ heading }}</h2>
  {% for image in figures %}
  <p style="margin:10px 0 4px 0;font-size:13px;font-weight:bold;color:{{ c.muted }};">{{ image.alt }}</p>
  <img src="cid:{{ image.content_id }}" width="{{ shown_width }}" alt="{{ image.alt }}" style="display:block;width:100%;max-width:{{ shown_width }}px;height:auto;border:0;outline:none;">
  {% endfor %}
  {% if heading.startswith('A/B') %}
    {% for e in experiments %}{% for diff, text in e.rows %}
    <p style="margin:4px 0;font-size:13px;">{{ e.run.campaign_id }}: {{ diff.treatment }} vs {{ diff.control }}, {{ diff.metric.replace('_', ' ') }}:
      <b style="color:{{ c.good if diff.significant else c.muted }};">{{ text }}</b></p>
    {% endfor %}{% endfor %}
  {% endif %}
</td></tr>
{% endfor %}
{% if global_control or quality %}
<tr><td style="padding:22px 20px 0 20px;">
  {% if global_control %}
  <h2 style="margin:0 0 8px 0;font-size:17px;color:{{ c.ink }};{{ c.font }};">Global control group</h2>
  {% for diff, text in global_control.rows %}
  <p style="margin:4px 0;font-size:13px;">{{ diff.metric.replace('_', ' ') }}:
    <b style="color:{{ c.good if diff.significant else c.muted }};">{{ text }}</b></p>
  {% endfor %}
  {% endif %}
  {% if quality %}
  <h2 style="margin:14px 0 8px 0;font-size:17px;color:{{ c.ink }};{{ c.font }};">Model quality</h2>
  {% for line in quality %}<p style="margin:4px 0;font-size:13px;">{{ line[2:] }}</p>{% endfor %}
  {% endif %}
</td></tr>
{% endif %}
<tr><td style="padding:22px 20px 20px 20px;color:{{ c.muted }};font-size:12px;">
  {% if link %}<a href="{{ link }}" style="color:#2f6db5;">The full report</a> has every table behind these charts.{% endif %}
  Last touch: a purchase goes to the last message before it within the channel's attribution window.
</td></tr>
</table>
</td></tr>
</table>
</body>
</html>
""")


def _svg_id(svg: str) -> str:
    return re.search(r"<svg id='([^']+)'", svg).group(1)


def _svg_title(svg: str) -> str:
    m = re.search(r"<title id='[^']*'>(.*?)</title>", svg, re.S)
    return unescape(m.group(1)) if m else _svg_id(svg)


def render_email(ctx: dict, html_path: Path) -> ReportEmail:
    """The e-mail version of a report whose context is `ctx` (`report.context(data)`),
    kept as `html_path`."""
    label, d = ctx["label"], ctx["d"]
    money, pct = ctx["money"], ctx["pct"]
    totals = ctx["totals"]
    images: dict[str, InlineImage] = {}
    for key, svg in ctx["chart_markup"].items():
        chart_id = _svg_id(svg)
        images[key] = InlineImage(f"{chart_id}.{label}", f"{chart_id}.png", chart_png(svg),
                                  _svg_title(svg))
    kpis = [(f"{d.sent_in_week:,}", "messages sent"),
            (money(totals["revenue"]), "attributed revenue"),
            (money(totals["revenue"] - totals["offline_revenue"]), "of it online"),
            (money(totals["offline_revenue"]), "of it offline (stores)"),
            (pct(d.chain_share), "trigger chains' share"),
            (pct(ctx["ropo_share"]), "ROPO share of offline revenue")]
    summary = (f"This week's campaigns and trigger chains sent {d.sent_in_week:,} messages and "
               f"earned {money(totals['revenue'])} from {int(totals['conversions']):,} purchases, "
               f"{money(totals['offline_revenue'])} of it in stores.")
    if d.chain_share is not None:
        summary += f" Trigger chains brought {pct(d.chain_share)} of retention revenue."
    if ctx["ropo_share"] is not None:
        summary += f" ROPO purchases were {pct(ctx['ropo_share'])} of offline revenue."
    link = report_link(html_path)
    subject = f"Weekly retention report {label}"
    quality = model_quality_lines(d.model_quality, pct)
    html = _HTML.render(
        **ctx, subject=subject, summary=summary, kpis=kpis, link=link, path=str(html_path),
        quality=quality,
        sections=[(heading, [images[k] for k in keys]) for heading, keys in EMAIL_SECTIONS],
        shown_width=SHOWN_WIDTH,
        c=dict(ink=INK, muted=MUTED, line=LINE, good=GOOD, font=FONT))
    lines = [f"Weekly retention report, {label}",
             f"Week of {d.week_start.isoformat()} to {ctx['week_end_display'].isoformat()} (UTC), "
             f"results as of {d.as_of:%Y-%m-%d %H:%M} UTC.", "", summary, ""]
    lines += [f"- {name}: {value}" for value, name in kpis]
    verdicts = [f"- {e['run'].campaign_id}: {diff.treatment} vs {diff.control}, "
                f"{diff.metric.replace('_', ' ')}: {text}"
                for e in ctx["experiments"] for diff, text in e["rows"]]
    if verdicts:
        lines += ["", "A/B tests and holdouts:", *verdicts]
    gc = ctx["global_control"]
    if gc:
        lines += ["", "Global control group (sent no marketing) against an equal treated sample:",
                  *(f"- {diff.metric.replace('_', ' ')}: {text}" for diff, text in gc["rows"])]
    if quality:
        lines += ["", "Model quality (the latest prediction run's backtest):", *quality]
    if d.notes:
        lines += ["", *d.notes]
    lines += ["", f"Full report with charts and every table: {link}" if link else
              f"The full report with charts and every table is kept as {html_path}."]
    return ReportEmail(subject, html, "\n".join(lines) + "\n", list(images.values()))


def model_quality_lines(rows: list[dict], pct) -> list[str]:
    """One line per prediction of the latest run in `rows` (ReportData.model_quality,
    newest run first): AUC and lift quality of its backtest."""
    if not rows:
        return []
    latest = rows[0]["as_of"]
    names = {"churn_risk": "churn risk (no purchase)", "next_order": "next order (purchase)"}
    return [f"- {names.get(m['measure'], m['measure'])}: AUC {pct(m['auc'])}, lift quality "
            f"{pct(m['lift_quality'])} (fitted as of {m['cutoff']:%Y-%m-%d}, "
            f"{int(m['customers']):,} customers)"
            for m in rows if m["as_of"] == latest]


def email_path(html_path: Path) -> Path:
    return html_path.with_suffix(".eml")


def write_email(ctx: dict, html_path: Path) -> Path:
    """Keep the e-mail version beside the report (`weekly_report_<week>.eml`)."""
    mail = render_email(ctx, html_path)
    msg = EmailMessage()
    msg["Subject"] = mail.subject
    msg.set_content(mail.text)
    msg.add_alternative(mail.html, subtype="html")
    html_part = msg.get_payload()[1]
    for image in mail.images:
        html_part.add_related(image.png, "image", "png", cid=f"<{image.content_id}>",
                              filename=image.filename, disposition="inline")
        html_part.get_payload()[-1]["Content-Description"] = image.alt
    path = email_path(html_path)
    tmp = path.with_suffix(".eml.tmp")
    tmp.write_bytes(msg.as_bytes(policy=policy.SMTP))
    os.replace(tmp, path)
    return path


def read_email(path: Path) -> ReportEmail:
    """The parts of a kept `.eml` report: subject, HTML, text and inline images."""
    if not path.exists():
        raise FileNotFoundError(f"no e-mail version of the report at {path}: write the report "
                                "again (retention report --week ...) to make it")
    msg = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
    html = text = None
    images = []
    for part in msg.walk():
        kind = part.get_content_type()
        if kind == "text/html" and html is None:
            html = part.get_content()
        elif kind == "text/plain" and text is None:
            text = part.get_content()
        elif kind == "image/png":
            images.append(InlineImage(str(part["Content-ID"]).strip("<>"), part.get_filename(),
                                      part.get_content(), str(part["Content-Description"] or "")))
    if html is None or text is None:
        raise ValueError(f"{path} is not a report e-mail: it lacks its "
                         f"{'HTML' if html is None else 'text'} part")
    # the file keeps SMTP line ends (CRLF); the parts are sent with the newlines they had
    return ReportEmail(str(msg["Subject"]), html.replace("\r\n", "\n"),
                       text.replace("\r\n", "\n"), images)
