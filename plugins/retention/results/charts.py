"""Inline SVG charts for the report: no script, no external asset, readable in any browser.

Every chart is one `<svg id="chart-...">` with a `<title>` (screen readers, tooltips) and a
`data-points` attribute counting what it drew, so a test can tell an empty chart from a
drawn one. An empty chart still renders, with a line saying why it is empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#2f6db5", "#e07b39", "#3a9e6f", "#b04a8f", "#8a8f98", "#c9a227", "#5bb5c9",
           "#7a5195")
INK, MUTED, GRID = "#1f2933", "#66717d", "#e3e7eb"
FONT = "font-family='system-ui, -apple-system, Segoe UI, Roboto, sans-serif'"

Formatter = Callable[[float], str]


def fmt_number(value: float) -> str:
    if value is None:
        return ""
    if abs(value) >= 1e6:
        return f"{value / 1e6:.1f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.0f}k"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def fmt_percent(value: float) -> str:
    return "" if value is None else f"{value * 100:.1f}%"


def fmt_pp(value: float) -> str:
    return "" if value is None else f"{value * 100:+.1f} pp"


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]
    color: str | None = None
    dashed: Sequence[bool] | None = None  # per point: drawn dashed (e.g. incomplete cohort)


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        candidate = step * 10 ** exponent
        if candidate >= value:
            return candidate
    return 10 ** (exponent + 1)


def _nice_range(low: float, high: float) -> tuple[float, float]:
    span = _nice_max(max(abs(low), abs(high)))
    return (-span if low < 0 else 0.0), (span if high > 0 else 0.0) or span


def _open(chart_id: str, title: str, width: int, height: int, points: int) -> list[str]:
    return [f"<svg id='{escape(chart_id)}' class='chart' xmlns='http://www.w3.org/2000/svg' "
            f"viewBox='0 0 {width} {height}' width='100%' role='img' "
            f"aria-labelledby='{escape(chart_id)}-title' data-points='{points}' {FONT}>",
            f"<title id='{escape(chart_id)}-title'>{escape(title)}</title>",
            f"<rect x='0' y='0' width='{width}' height='{height}' fill='#ffffff'/>"]


def _text(x: float, y: float, text: str, *, size: int = 11, anchor: str = "middle",
          color: str = MUTED, weight: str = "normal", rotate: float | None = None) -> str:
    transform = f" transform='rotate({rotate} {x:.1f} {y:.1f})'" if rotate else ""
    return (f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' "
            f"fill='{color}' font-weight='{weight}'{transform}>{escape(text)}</text>")


def _legend(series: Sequence[Series], x: float, y: float) -> list[str]:
    out, cursor = [], x
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        out.append(f"<rect x='{cursor:.1f}' y='{y - 9:.1f}' width='10' height='10' rx='2' "
                   f"fill='{color}'/>")
        out.append(_text(cursor + 14, y, s.name, anchor="start", color=INK))
        cursor += 24 + 6.5 * len(s.name)
    return out


def empty_chart(chart_id: str, title: str, message: str, width: int = 720,
                height: int = 120) -> str:
    parts = _open(chart_id, title, width, height, 0)
    parts.append(f"<rect x='1' y='1' width='{width - 2}' height='{height - 2}' fill='#fafbfc' "
                 f"stroke='{GRID}' stroke-dasharray='4 4' rx='6'/>")
    parts.append(_text(width / 2, height / 2 + 4, message, size=13))
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(chart_id: str, title: str, categories: Sequence[str], series: Sequence[Series],
              *, stacked: bool = False, fmt: Formatter = fmt_number, width: int = 720,
              height: int = 300, empty_message: str = "No data for this period") -> str:
    """Vertical bars per category: grouped (side by side) or stacked."""
    values = [v for s in series for v in s.values if v is not None]
    if not categories or not values:
        return empty_chart(chart_id, title, empty_message, width)
    left, right, top, bottom = 56, 16, 30, 58
    plot_w, plot_h = width - left - right, height - top - bottom
    if stacked:
        totals = [sum((s.values[i] or 0) for s in series) for i in range(len(categories))]
        top_value = _nice_max(max(totals))
    else:
        top_value = _nice_max(max(values))
    parts = _open(chart_id, title, width, height, len(values))
    for k in range(5):
        y = top + plot_h * (1 - k / 4)
        parts.append(f"<line x1='{left}' x2='{width - right}' y1='{y:.1f}' y2='{y:.1f}' "
                     f"stroke='{GRID}'/>")
        parts.append(_text(left - 6, y + 4, fmt(top_value * k / 4), anchor="end", size=10))
    band = plot_w / len(categories)
    n = 1 if stacked else len(series)
    bar_w = max(2.0, min(48.0, band * 0.75 / n))
    for i, category in enumerate(categories):
        x0 = left + band * i + (band - bar_w * n) / 2
        base = 0.0
        for j, s in enumerate(series):
            v = s.values[i]
            if v is None:
                continue
            color = s.color or PALETTE[j % len(PALETTE)]
            h = plot_h * v / top_value
            x = x0 if stacked else x0 + j * bar_w
            y = top + plot_h - h - (plot_h * base / top_value if stacked else 0)
            parts.append(f"<rect x='{x:.1f}' y='{y:.1f}' width='{bar_w - 1:.1f}' "
                         f"height='{max(h, 0):.1f}' fill='{color}'><title>{escape(category)}, "
                         f"{escape(s.name)}: {escape(fmt(v))}</title></rect>")
            if not stacked and len(categories) * n <= 24:
                parts.append(_text(x + bar_w / 2, y - 3, fmt(v), size=9))
            if stacked:
                base += v
        if stacked and len(categories) <= 24:
            parts.append(_text(x0 + bar_w / 2, top + plot_h - plot_h * base / top_value - 3,
                               fmt(base), size=9))
        label = category if len(category) <= 18 else category[:17] + "…"
        if len(categories) > 8:
            parts.append(_text(x0 + bar_w * n / 2, top + plot_h + 12, label, size=10,
                               anchor="end", rotate=-35))
        else:
            parts.append(_text(x0 + bar_w * n / 2, top + plot_h + 16, label, size=10))
    parts.extend(_legend(series, left, 16))
    parts.append("</svg>")
    return "".join(parts)


def hbar_chart(chart_id: str, title: str, categories: Sequence[str], series: Sequence[Series],
               *, fmt: Formatter = fmt_number, width: int = 720,
               empty_message: str = "No data for this period") -> str:
    """Horizontal stacked bars, one row per category (long names fit)."""
    values = [v for s in series for v in s.values if v is not None]
    if not categories or not values:
        return empty_chart(chart_id, title, empty_message, width)
    row_h, left, right, top = 26, 190, 70, 34
    height = top + row_h * len(categories) + 28
    totals = [sum((s.values[i] or 0) for s in series) for i in range(len(categories))]
    top_value = _nice_max(max(totals))
    plot_w = width - left - right
    parts = _open(chart_id, title, width, height, len(values))
    for k in range(5):
        x = left + plot_w * k / 4
        parts.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{top - 6}' "
                     f"y2='{top + row_h * len(categories)}' stroke='{GRID}'/>")
        parts.append(_text(x, height - 8, fmt(top_value * k / 4), size=10))
    for i, category in enumerate(categories):
        y = top + row_h * i
        label = category if len(category) <= 28 else category[:27] + "…"
        parts.append(_text(left - 8, y + row_h / 2 + 4, label, anchor="end", color=INK))
        base = 0.0
        for j, s in enumerate(series):
            v = s.values[i] or 0
            color = s.color or PALETTE[j % len(PALETTE)]
            w = plot_w * v / top_value
            parts.append(f"<rect x='{left + plot_w * base / top_value:.1f}' y='{y + 4:.1f}' "
                         f"width='{max(w, 0):.1f}' height='{row_h - 8}' fill='{color}'>"
                         f"<title>{escape(category)}, {escape(s.name)}: {escape(fmt(v))}</title>"
                         f"</rect>")
            base += v
        parts.append(_text(left + plot_w * base / top_value + 6, y + row_h / 2 + 4, fmt(base),
                           anchor="start", color=INK, size=10))
    parts.extend(_legend(series, left, 18))
    parts.append("</svg>")
    return "".join(parts)


def line_chart(chart_id: str, title: str, x_labels: Sequence[str], series: Sequence[Series],
               *, fmt: Formatter = fmt_percent, width: int = 720, height: int = 300,
               empty_message: str = "No data for this period") -> str:
    """Lines over x labels; points of a series may be dashed (not final yet) or missing."""
    values = [v for s in series for v in s.values if v is not None]
    if not x_labels or not values:
        return empty_chart(chart_id, title, empty_message, width)
    left, right, top, bottom = 56, 130, 30, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    top_value = _nice_max(max(values))
    parts = _open(chart_id, title, width, height, len(values))
    for k in range(5):
        y = top + plot_h * (1 - k / 4)
        parts.append(f"<line x1='{left}' x2='{left + plot_w}' y1='{y:.1f}' y2='{y:.1f}' "
                     f"stroke='{GRID}'/>")
        parts.append(_text(left - 6, y + 4, fmt(top_value * k / 4), anchor="end", size=10))
    step = plot_w / max(1, len(x_labels) - 1)
    for i, label in enumerate(x_labels):
        parts.append(_text(left + step * i, top + plot_h + 16, label, size=10))

    def point(i: int, v: float) -> tuple[float, float]:
        return left + step * i, top + plot_h * (1 - v / top_value)

    for j, s in enumerate(series):
        color = s.color or PALETTE[j % len(PALETTE)]
        pts = [(i, v) for i, v in enumerate(s.values) if v is not None]
        for (i0, v0), (i1, v1) in zip(pts, pts[1:]):
            dashed = bool(s.dashed and (s.dashed[i0] or s.dashed[i1]))
            dash = " stroke-dasharray='5 4'" if dashed else ""
            (x0, y0), (x1, y1) = point(i0, v0), point(i1, v1)
            parts.append(f"<line x1='{x0:.1f}' y1='{y0:.1f}' x2='{x1:.1f}' y2='{y1:.1f}' "
                         f"stroke='{color}' stroke-width='2'{dash}/>")
        for i, v in pts:
            x, y = point(i, v)
            hollow = bool(s.dashed and s.dashed[i])
            parts.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3.5' "
                         f"fill='{'#ffffff' if hollow else color}' stroke='{color}' "
                         f"stroke-width='1.5'><title>{escape(s.name)}, {escape(x_labels[i])}: "
                         f"{escape(fmt(v))}{' (not final)' if hollow else ''}</title></circle>")
        if pts:
            x, y = point(*pts[-1])
            parts.append(_text(left + plot_w + 8, y + 4, s.name, anchor="start", color=color,
                               size=10))
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True)
class Interval:
    label: str
    estimate: float
    low: float
    high: float
    significant: bool


def interval_chart(chart_id: str, title: str, rows: Sequence[Interval], *,
                   fmt: Formatter = fmt_pp, width: int = 720,
                   empty_message: str = "No experiment this period") -> str:
    """A forest plot: each estimate with its interval around a zero line."""
    if not rows:
        return empty_chart(chart_id, title, empty_message, width)
    row_h, left, right, top = 30, 250, 40, 20
    height = top + row_h * len(rows) + 34
    low, high = _nice_range(min(r.low for r in rows), max(r.high for r in rows))
    plot_w = width - left - right

    def x_of(v: float) -> float:
        return left + plot_w * (v - low) / (high - low)

    parts = _open(chart_id, title, width, height, len(rows))
    for k in range(5):
        v = low + (high - low) * k / 4
        parts.append(f"<line x1='{x_of(v):.1f}' x2='{x_of(v):.1f}' y1='{top}' "
                     f"y2='{top + row_h * len(rows)}' stroke='{GRID}'/>")
        parts.append(_text(x_of(v), height - 12, fmt(v), size=10))
    parts.append(f"<line x1='{x_of(0):.1f}' x2='{x_of(0):.1f}' y1='{top - 4}' "
                 f"y2='{top + row_h * len(rows)}' stroke='{INK}' stroke-width='1.2'/>")
    for i, r in enumerate(rows):
        y = top + row_h * i + row_h / 2
        color = PALETTE[2] if r.significant and r.estimate > 0 else (
            PALETTE[1] if r.significant else PALETTE[4])
        label = r.label if len(r.label) <= 40 else r.label[:39] + "…"
        parts.append(_text(left - 8, y + 4, label, anchor="end", color=INK))
        parts.append(f"<line x1='{x_of(r.low):.1f}' x2='{x_of(r.high):.1f}' y1='{y:.1f}' "
                     f"y2='{y:.1f}' stroke='{color}' stroke-width='3' stroke-linecap='round'/>")
        parts.append(f"<circle cx='{x_of(r.estimate):.1f}' cy='{y:.1f}' r='5' fill='{color}'>"
                     f"<title>{escape(r.label)}: {escape(fmt(r.estimate))} "
                     f"({escape(fmt(r.low))} to {escape(fmt(r.high))})</title></circle>")
    parts.append("</svg>")
    return "".join(parts)
