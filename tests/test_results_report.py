"""The weekly marketer report on a generated shop with real campaign runs, opened in headless
Chromium; its delivery through the e-mail channel; the report DAG run for real.

The screenshot is kept next to the report: RETENTION_HOME/reports/weekly_report_2026-W43.png
(RETENTION_HOME defaults to .retention/ in the checkout); the test prints both paths.
"""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import psycopg
import pytest

from airflow_ui_browser import chromium
from retention import db
from retention.config import paths
from retention.results.report import (
    CHARTS, SECTIONS, collect, parse_week, previous_week, render, send_report, week_label,
    write_report,
)
from retention.results.uplift import format_difference as render_text

# one pytest-xdist worker runs the module: its built shop is made once
pytestmark = pytest.mark.xdist_group("test_results_report")

END = datetime(2026, 10, 31, tzinfo=timezone.utc)
WEEK = date(2026, 10, 19)  # ISO week 2026-W43
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars"]


def _sent(url: str, run_id: str, step: str) -> list[tuple]:
    """What dispatch records once a step went out (the channels are tested elsewhere)."""
    with db.connect(url) as conn:
        conn.execute("update ops.messages set status = 'sent', sent_at = greatest(not_before, planned_at), "
                     "provider_message_id = 'x' || left(md5(run_id || step), 12) "
                     "where run_id = %s and step = %s and status = 'planned'", (run_id, step))
        # in a fixed order: the readers' events are drawn from a seeded generator row by row
        rows = conn.execute("select message_id, address, sent_at, channel from ops.messages "
                            "where run_id = %s and step = %s and status = 'sent' "
                            "order by message_id", (run_id, step)).fetchall()
        conn.commit()
    return rows


def _sendgrid_events(url: str, rows: list[tuple], rng: random.Random) -> None:
    from retention.results.webhook import ingest_sendgrid_events

    events = []
    for mid, address, at, channel in rows:
        if channel != "email":
            continue
        ts = int(at.timestamp())
        base = {"message_id": mid, "email": address}
        events.append({**base, "event": "processed", "sg_event_id": f"p-{mid}", "timestamp": ts})
        if rng.random() < 0.04:
            events.append({**base, "event": "bounce", "type": "bounce", "sg_event_id": f"b-{mid}",
                           "timestamp": ts + 5})
            continue
        events.append({**base, "event": "delivered", "sg_event_id": f"d-{mid}", "timestamp": ts + 5})
        if rng.random() < 0.25:
            events.append({**base, "event": "open", "sg_event_id": f"o-{mid}",
                           "timestamp": ts + rng.randint(60, 20000)})
            if rng.random() < 0.3:
                events.append({**base, "event": "click", "sg_event_id": f"c-{mid}",
                               "timestamp": ts + rng.randint(20000, 30000)})
    with db.connect(url) as conn:
        ingest_sendgrid_events(conn, events, received_at=END, batch_id=f"test-{rows[0][0]}",
                               verified=True)
        conn.commit()


def _make_shop(url: str, folder: Path) -> None:
    """A generated shop; the weekly cascade and a cross-sell run in week 43; trigger chains."""
    from retention.warehouse.build import build
    from retention.campaigns.engine import plan_step, start_run
    from retention.campaigns.spec import load_campaign
    from retention_dev.generate import generate_shop
    from retention.ingest.load import load_folder
    from retention.results.pipeline import build_attribution
    from retention.results.webhook import record_send_results

    generate_shop(folder, customers=1500, seed=13, end=END)
    load_folder(folder, url, loaded_at=END)
    build(as_of=END, url=url)
    rng = random.Random(43)
    for campaign_id, start in (("weekly_promo", datetime(2026, 10, 19, 7, tzinfo=timezone.utc)),
                               ("smartphone_accessories", datetime(2026, 10, 22, 8, tzinfo=timezone.utc))):
        campaign = load_campaign(campaign_id)
        run = start_run(campaign, start, url=url)
        for step in campaign.steps:
            plan_step(campaign, run, step.name, url=url)
            rows = _sent(url, run.run_id, step.name)
            if rows:
                _sendgrid_events(url, rows, rng)
    with db.connect(url) as conn:  # trigger chains: one message an hour after a cart
        carts = conn.execute("""
            select distinct on (customer_id) customer_id, occurred_at from raw.events
            where event_type = 'cart' and customer_id is not null
              and occurred_at >= '2026-10-19Z' and occurred_at < '2026-10-26Z'
            order by customer_id, occurred_at""").fetchall()
        rows = []
        for customer, at in carts:
            chain, step, channel = (("abandoned_cart", "reminder", "mobile_push")
                                    if rng.random() < 0.5 else ("browse_abandonment", "nudge", "email"))
            rows.append((f"t_{chain}_{customer}", chain, f"{chain}:{customer}", step, channel,
                         customer, at + timedelta(hours=1)))
        with conn.cursor() as cur:
            cur.executemany(
                "insert into ops.messages (message_id, campaign_id, run_id, step, channel, "
                "customer_id, variant, status, planned_at, sent_at, cap_class) values "
                "(%s, %s, %s, %s, %s, %s, 'A', 'sent', %s, %s, 'trigger')",
                [r + (r[-1],) for r in rows])
        conn.commit()
    record_send_results(url)
    build_attribution(END, url=url, with_parents=False)  # the purchases are built already


@contextmanager
def made_shop(make_database, name: str, **env: str) -> Iterator[str]:
    """A new database `name` holding the shop of `_make_shop`, made with
    RETENTION_CURRENCY=UAH and the `env` settings, which stay set until the block ends;
    yields its URL."""
    from retention.db.schema import ensure_schemas

    url = make_database(name)
    with db.connect(url) as conn:
        ensure_schemas(conn)
        conn.commit()
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as folder:
        for key, value in {"RETENTION_DATABASE_URL": url, "RETENTION_CURRENCY": "UAH",
                           **env}.items():
            mp.setenv(key, value)
        _make_shop(url, Path(folder))
        yield url


@pytest.fixture(scope="module")
def shop_url(make_database):
    with made_shop(make_database, "rt_report") as url:
        yield url


class _Dom(HTMLParser):
    """Ids, chart point counts, anything that would load from outside the file, the
    headings' text, the KPI tiles (value, label) and the number of <svg> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.points: dict[str, int] = {}
        self.external: list[str] = []
        self.headings: list[str] = []
        self.kpis: list[tuple[str, ...]] = []
        self.svgs = 0
        self._kpi: list[str] | None = None
        self._capture: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "svg":
            self.svgs += 1
            if a.get("id"):
                self.points[a["id"]] = int(a.get("data-points", "0"))
        if tag in ("script", "link", "img", "iframe", "object"):
            self.external.append(tag)
        for name in ("src", "href"):
            if a.get(name) and not a[name].startswith("#"):
                self.external.append(a[name])
        if tag == "div" and a.get("class") == "kpi":
            self._kpi = []
        if tag in ("h1", "h2") or (self._kpi is not None and tag in ("b", "span")):
            self._capture, self._text = tag, []

    def handle_endtag(self, tag):
        if tag != self._capture:
            return
        text = " ".join("".join(self._text).split())
        self._capture = None
        if tag in ("h1", "h2"):
            self.headings.append(text)
        else:
            self._kpi.append(text)
            if len(self._kpi) == 2:
                self.kpis.append(tuple(self._kpi))
                self._kpi = None

    def handle_data(self, data):
        if self._capture:
            self._text.append(data)


def _parse(html: str) -> _Dom:
    dom = _Dom()
    dom.feed(html)
    return dom


def _png_pixels(data: bytes) -> np.ndarray:
    """A non-interlaced 8-bit RGB or RGBA PNG (what Chromium writes) as an array of
    (height, width, 3) RGB values: its chunks walked, IDAT inflated, each row unfiltered."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    pos, idat, header = 8, [], None
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data[pos + 8:pos + 8 + size])
        elif kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + size])
        pos += 12 + size
    width, height, depth, color_type, _, _, interlace = header
    assert depth == 8 and color_type in (2, 6) and interlace == 0, header
    bpp = 3 if color_type == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    assert len(raw) == height * (stride + 1), (len(raw), header)
    prev = bytearray(stride)
    rows = []
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:  # Sub
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind == 2:  # Up
            line = bytearray((x + u) & 255 for x, u in zip(line, prev))
        elif kind == 3:  # Average
            for i in range(stride):
                line[i] = (line[i] + (((line[i - bpp] if i >= bpp else 0) + prev[i]) >> 1)) & 255
        elif kind == 4:  # Paeth
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        else:
            assert kind == 0, f"row {y}: filter {kind}"
        rows.append(bytes(line))
        prev = line
    return np.frombuffer(b"".join(rows), np.uint8).reshape(height, width, bpp)[:, :, :3]


def _rows_with(pixels: np.ndarray, color: str) -> np.ndarray:
    """The indexes of the rows holding at least one pixel of `color` ("#rrggbb")."""
    rgb = np.frombuffer(bytes.fromhex(color[1:]), np.uint8)
    return np.flatnonzero((pixels == rgb).all(axis=2).any(axis=1))


@pytest.mark.unit
def test_weeks():
    assert parse_week("2026-W43") == WEEK == parse_week("2026-10-22") == parse_week("2026w43")
    assert week_label(WEEK) == "2026-W43"
    assert previous_week(datetime(2026, 10, 26, 8, tzinfo=timezone.utc)) == WEEK
    with pytest.raises(ValueError, match="not a week"):
        parse_week("last week")


def test_report_in_headless_chromium_has_every_section_and_chart(shop_url, tmp_path):
    path = write_report("2026-W43", url=shop_url)
    assert path == paths().reports / "weekly_report_2026-W43.html"
    dom = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-dom'}",
         "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    rendered = _parse(dom)
    assert set(SECTIONS) <= rendered.ids, set(SECTIONS) - rendered.ids
    assert set(CHARTS) <= rendered.ids, set(CHARTS) - rendered.ids
    assert rendered.svgs == len(CHARTS), rendered.svgs  # each chart one <svg>, nothing else
    empty = [c for c in CHARTS if rendered.points.get(c, 0) == 0]
    assert not empty, f"charts drawn without data: {empty}"
    assert rendered.external == [], "the report must be self-contained"
    assert rendered.headings == [
        "Weekly retention report, 2026-W43", "Summary", "Cascade funnel by wave and channel",
        "Revenue per campaign, online and offline", "A/B tests and holdouts", "Trigger chains",
        "Cohort retention and new-customer RPR", "ROPO: research online, purchase offline",
        "Model quality",
    ], rendered.headings
    # the summary tiles of the seeded shop's week 43 (test_report_figures_match_the_marts
    # checks the figures against the marts)
    # (text with its spaces collapsed: the thousands separator is a narrow no-break space)
    assert rendered.kpis == [
        ("823", "messages sent"), ("205 512", "attributed revenue"), ("175 677", "of it online"),
        ("29 835", "of it offline (stores)"), ("14.6%", "trigger chains' share"),
        ("10.1%", "ROPO share of offline revenue"),
    ], rendered.kpis
    screenshot = path.with_suffix(".png")
    subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-shot'}",
                    "--window-size=1100,6400", f"--screenshot={screenshot}", path.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = _png_pixels(screenshot.read_bytes())
    assert pixels.shape == (6400, 1100, 3), pixels.shape  # the window, the page drawn into it
    # the styled page: the grey background beside the cards on every row, white section
    # cards from under the header to the last sections, the title's ink in the header
    assert _rows_with(pixels, "#f4f6f8").size == 6400
    cards = _rows_with(pixels, "#ffffff")
    assert cards[0] < 200 and cards[-1] > 5000, (cards[0], cards[-1])
    assert _rows_with(pixels, "#1f2933")[0] < 100
    # the charts' first series colours, drawn from the funnel at the top down to the ROPO
    # chart at the bottom (its bars in the first and third colours)
    for color, lowest in (("#2f6db5", 5000), ("#e07b39", 3500), ("#3a9e6f", 5000)):
        rows = _rows_with(pixels, color)
        assert rows.size > 200 and rows[0] < 1000 and rows[-1] > lowest, (color, rows.size,
                                                                          rows[0], rows[-1])
    print(f"\nweekly report: {path}\nscreenshot:    {screenshot}")


def test_report_figures_match_the_marts(shop_url):
    data = collect(WEEK, shop_url)
    with db.connect(shop_url) as conn:
        revenue, offline, converted = conn.execute("""
            select sum(revenue), sum(offline_revenue), sum(converted) from marts.campaign_results
            where variant <> 'holdout' and cap_class in ('promo', 'trigger')""").fetchone()
        waves = conn.execute("""
            select step, sum(sent) from marts.campaign_results
            where campaign_id = 'weekly_promo' and variant <> 'holdout' group by step""").fetchall()
        chains = conn.execute("select sum(revenue) from marts.campaign_results "
                              "where cap_class = 'trigger'").fetchone()[0]
    assert data.retention_revenue == pytest.approx(float(revenue))
    assert sum(c["offline_revenue"] for c in data.retention) == pytest.approx(float(offline))
    assert offline > 0, "the generated shop's store receipts reach the campaigns"
    assert {r["step"]: r["sent"] for r in data.funnel if r["campaign_id"] == "weekly_promo"} \
        == {s: float(n) for s, n in waves}
    assert data.chain_share == pytest.approx(float(chains) / float(revenue))
    (weekly,) = [r for r in data.experiments if r.campaign_id == "weekly_promo"]
    assert set(weekly.arms) == {"A", "B", "holdout"} and len(weekly.holdout) == 2
    assert len(weekly.ab) == 2
    html = render(data)
    for diff in weekly.holdout + weekly.ab:
        assert diff.verdict in html
    # an unsent campaign is no experiment: both arms equal, so never "significant"
    assert all(d.verdict == "not significant yet" for r in data.experiments for d in r.ab
               if d.difference == 0)
    assert data.ropo_weeks[-1]["week_start"] == WEEK and data.ropo_weeks[-1]["ropo_revenue"] > 0
    assert 0 < converted
    # each revenue difference has its CUPED-adjusted one beside it, and every difference
    # its always-valid interval, wider than the fixed one
    for diff in weekly.holdout + weekly.ab:
        assert diff.cs_low <= diff.ci_low and diff.ci_high <= diff.cs_high
        assert "always valid" in render_text(diff)
    revenue = weekly.holdout[1]
    assert revenue.cuped.metric == "revenue_per_member_cuped" and revenue.cuped.cs_low is not None
    assert render_text(revenue.cuped) in html and "CUPED-adjusted" in html
    assert {t.split for t in weekly.srm} == {"holdout split", "A/B split"}
    assert "Sample ratio, holdout split: global holdout" in html
    # the global control group: the week's global holdout members, as many others by hash
    gc = data.global_control
    with db.connect(shop_url) as conn:
        members, held = conn.execute("""
            select count(distinct am.customer_id),
                   count(distinct am.customer_id) filter (where am.holdout_kind = 'global')
            from ops.audience_members am join ops.campaign_runs r on r.run_id = am.run_id
            where r.as_of >= %s and r.as_of < %s""",
            (datetime.combine(WEEK, datetime.min.time(), timezone.utc),
             datetime.combine(WEEK + timedelta(days=7), datetime.min.time(), timezone.utc))
        ).fetchone()
    assert held > 20 and gc.holdout.members == gc.sample.members == held
    assert gc.population == members and gc.srm.cells[0][:2] == ("global holdout", held)
    assert [d.metric for d in gc.differences] == ["conversion_rate", "revenue_per_member"]
    assert gc.differences[1].cuped is not None and 'id="global-control"' in html


def test_a_sample_ratio_mismatch_is_a_warning_at_the_top_of_the_report(shop_url):
    """The week's cascade loses its campaign holdout from the ledger: its holdout split no
    longer fits the assigned shares, and the report says so above everything else."""
    with db.connect(shop_url) as conn:
        lost = conn.execute(
            "select am.run_id, am.customer_id, am.variant, am.holdout_kind "
            "from ops.audience_members am join ops.campaign_runs r on r.run_id = am.run_id "
            "where r.campaign_id = 'weekly_promo' and am.holdout_kind = 'campaign'").fetchall()
        assert len(lost) > 30
        conn.execute("delete from ops.audience_members where holdout_kind = 'campaign' and "
                     "run_id in (select run_id from ops.campaign_runs "
                     "where campaign_id = 'weekly_promo')")
        conn.commit()
    try:
        data = collect(WEEK, shop_url)
    finally:
        with db.connect(shop_url) as conn, conn.cursor() as cur:
            cur.executemany("insert into ops.audience_members (run_id, customer_id, variant, "
                            "holdout_kind) values (%s, %s, %s, %s)", lost)
            conn.commit()
    (weekly,) = [r for r in data.experiments if r.campaign_id == "weekly_promo"]
    (split,) = [t for t in weekly.srm if t.mismatch]
    assert split.split == "holdout split" and split.p_value < 1e-6
    assert dict((c, o) for c, o, _ in split.cells)["campaign holdout"] == 0
    note = next(n for n in data.notes if "Sample ratio mismatch" in n)
    assert note.startswith("weekly_promo, run of 2026-10-19 07:00: Sample ratio mismatch")
    dom = _parse(render(data))
    assert "Sample ratio mismatch" in render(data).split('<section id="summary">')[0]
    assert set(SECTIONS) <= dom.ids


def test_one_definition_of_results_in_the_cli_the_mart_and_the_report(shop_url):
    """The treated arms are the results and the holdout (sent nothing) the control beside
    them, never summed: `retention results` prints what the report's funnel shows, and
    both equal the mart's rows split by variant."""
    from retention.results.summary import format_step_results, step_results

    data = collect(WEEK, shop_url)
    with db.connect(shop_url) as conn:
        runs = [r[0] for r in conn.execute(
            "select run_id from ops.campaign_runs where as_of >= %s and as_of < %s "
            "and jsonb_array_length(spec -> 'steps') > 1",
            (datetime.combine(WEEK, datetime.min.time(), timezone.utc),
             datetime.combine(WEEK + timedelta(days=7), datetime.min.time(), timezone.utc))
        ).fetchall()]
        mart = conn.execute("""
            select step, channel, variant = 'holdout', sum(sent), sum(converted), sum(revenue),
                   sum(audience)
            from marts.campaign_results where run_id = any(%s) and campaign_id = 'weekly_promo'
            group by 1, 2, 3""", (runs,)).fetchall()
        every_run = step_results(conn)
    treated = {(st, ch): (int(s), int(c), float(r)) for st, ch, h, s, c, r, _ in mart if not h}
    control = {(st, ch): (int(a), int(c), float(r)) for st, ch, h, _, c, r, a in mart if h}
    funnel = {(r["step"], r["channel"]): r for r in data.funnel
              if r["campaign_id"] == "weekly_promo"}
    assert set(funnel) == set(treated) and any(c[1] for c in control.values()), (
        "the week's cascade has holdout members who bought: the case that must not be summed")
    for key, r in funnel.items():
        assert (r["sent"], r["converted"]) == treated[key][:2]
        assert r["revenue"] == pytest.approx(treated[key][2])
        members, converted, revenue = control.get(key, (0, 0, 0.0))
        assert (r["holdout_members"], r["holdout_converted"]) == (members, converted)
        assert r["holdout_revenue"] == pytest.approx(revenue)
    # the command line prints the same rows (every run of the shop: here the one cascade
    # run and the trigger chains)
    run = subprocess.run(
        [sys.executable, "-m", "retention.cli", "results", "--no-build",
         "--as-of", "2026-11-02T08:00:00Z"],
        env={**os.environ, "RETENTION_DATABASE_URL": shop_url}, capture_output=True,
        text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = run.stdout.splitlines()
    assert all(line in printed for line in format_step_results(every_run)), run.stdout[-3000:]
    for r in every_run:
        if r["campaign_id"] == "weekly_promo":
            assert r == funnel[(r["step"], r["channel"])]


def test_empty_warehouse_still_renders_every_section(database_url, tmp_path):
    path = write_report(WEEK, url=database_url, out_dir=tmp_path)
    dom = _parse(path.read_text())
    assert set(SECTIONS) <= dom.ids and set(CHARTS) <= dom.ids
    assert all(dom.points[c] == 0 for c in CHARTS)
    assert "not built yet" in path.read_text()


def test_send_report_emails_each_marketer_once(shop_url, tmp_path, monkeypatch):
    from retention.channels import SendGridChannel
    from retention_dev.servers import start

    monkeypatch.setenv("RETENTION_REPORT_BASE_URL", "https://airflow.shop.example/reports/")
    link = "https://airflow.shop.example/reports/weekly_report_2026-W43.html"
    path = write_report(WEEK, url=shop_url, out_dir=tmp_path)
    base, server = start("sendgrid", api_keys={"SG.test"})
    try:
        channel = SendGridChannel("SG.test", "reports@shop.example", base_url=base)
        first = send_report(path, ["anna@shop.example", "max@shop.example"], channel, url=shop_url)
        again = send_report(path, ["anna@shop.example", "max@shop.example", "new@shop.example"],
                            channel, url=shop_url)
        requests = server.accepted
    finally:
        server.stop()
    assert first == {"week": "2026-W43", "sent": 2, "already_sent": 0, "failed": {}}
    assert again == {"week": "2026-W43", "sent": 1, "already_sent": 2, "failed": {}}
    recipients = [p["to"][0]["email"] for r in requests for p in r.body["personalizations"]]
    assert recipients == ["anna@shop.example", "max@shop.example", "new@shop.example"]
    # each chart's size in the kept report (SVG user units): its PNG is twice as large
    sizes = {chart: (float(w), float(h)) for chart, w, h in re.findall(
        r"<svg id='([^']+)'[^>]*viewBox='0 0 ([\d.]+) ([\d.]+)'", path.read_text())}
    assert set(sizes) == set(CHARTS)
    for request in requests:
        _assert_mail_client_safe(request.body, link, sizes)
    with db.connect(shop_url) as conn:
        assert conn.execute("select count(*) from ops.report_deliveries").fetchone()[0] == 3
        conn.execute("delete from ops.report_deliveries")
        conn.commit()


def _assert_mail_client_safe(body: dict, link: str, sizes: dict) -> None:
    """What SendGrid accepted reads in Gmail and Outlook: no SVG, style block or script in
    any part; each chart an inline PNG attachment its `cid:` resolves to; a text
    alternative; the link to the full report."""
    import base64

    assert "Weekly retention report 2026-W43" in str(body.get("subject")) + str(
        body["personalizations"][0].get("subject"))
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    text, html = (c["value"] for c in body["content"])
    for part in (text, html, *(a["content"] for a in body["attachments"])):
        assert "<svg" not in part.lower()
    assert not re.search(r"<(style|script|link)\b", html, re.I)
    # the text alternative: the summary's figures and the link
    assert "\n- messages sent: 823\n- attributed revenue: 205\u202f512" in text, text
    assert f"Full report with charts and every table: {link}" in text
    assert f'<a href="{link}"' in html
    cids = re.findall(r'<img src="cid:([^"]+)"', html)
    assert len(cids) == len(CHARTS) == len(set(cids)), cids
    assert re.findall(r'src="([^"]+)"', html) == [f"cid:{c}" for c in cids]  # nothing remote
    attachments = {a["content_id"]: a for a in body["attachments"]}
    assert set(attachments) == set(cids), (set(attachments) ^ set(cids))
    assert {f"{chart}.2026-W43" for chart in CHARTS} == set(cids)
    for cid, a in attachments.items():
        assert a["disposition"] == "inline" and a["type"] == "image/png", a | {"content": "..."}
        png = base64.b64decode(a["content"], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR", cid
        width, height = struct.unpack(">II", png[16:24])
        svg_width, svg_height = sizes[cid.split(".")[0]]
        assert (width, height) == (round(2 * svg_width), round(2 * svg_height)), (cid, width, height)
        assert width == 1440 and height >= 150, (cid, width, height)
        assert 5_000 < len(png) < 500_000, (cid, len(png))
        pixels = _png_pixels(png)
        assert pixels.shape == (height, width, 3)
        drawn = (pixels != 255).any(axis=2).mean()  # not a blank white image
        assert drawn > 0.01, (cid, drawn)
    # the funnel's first series colour is drawn in its image
    funnel = _png_pixels(base64.b64decode(attachments["chart-cascade-funnel.2026-W43"]["content"]))
    assert _rows_with(funnel, "#2f6db5").size > 100


def test_weekly_report_dag_writes_the_past_week(shop_url, airflow_db, tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("RETENTION_DATABASE_URL", shop_url)
    monkeypatch.setenv("RETENTION_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RETENTION_REPORT_RECIPIENTS", raising=False)
    root = Path(__file__).resolve().parents[1]
    dag = DagBag(dag_folder=str(root / "dags" / "retention_weekly_report.py")).dags[
        "retention_weekly_report"]
    run = dag.test(logical_date=datetime(2026, 10, 26, 8, tzinfo=timezone.utc))
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states == {"load_results": "success", "build_attribution": "success",
                      "write_report": "success", "send_report": "skipped"}, states
    report = tmp_path / "home" / "reports" / "weekly_report_2026-W43.html"
    assert report.exists() and "Results as of 2026-10-26 08:00 UTC" in report.read_text()


def test_model_quality_shows_the_backtests_of_the_prediction_runs(shop_url):
    """Two prediction runs on the generated shop: the report's model-quality table holds
    both runs' backtests as kept in ops.predicted_value_backtests; the outcome counts are
    the shop's own purchases after each cutoff."""
    from retention.warehouse.predict import write_predictions

    earlier = END - timedelta(days=7)
    runs = {as_of: write_predictions(shop_url, as_of, run_id=f"predict@{as_of:%m-%d}")
            for as_of in (earlier, END)}
    data = collect(WEEK, shop_url, as_of=END)
    assert [(m["as_of"], m["measure"]) for m in data.model_quality] == [
        (END, "churn_risk"), (END, "next_order"), (earlier, "churn_risk"),
        (earlier, "next_order")]
    with db.connect(shop_url) as conn:
        for m in data.model_quality:
            cutoff = m["as_of"] - timedelta(days=90)
            assert m["cutoff"] == cutoff
            buyers, quiet, soon = conn.execute("""
                with before as (select distinct customer_id from intermediate.int_purchases_unified
                                where customer_id is not null and purchased_at <= %(cutoff)s),
                     after as (select customer_id, min(purchased_at) as first_at
                               from intermediate.int_purchases_unified
                               where purchased_at > %(cutoff)s and purchased_at <= %(as_of)s
                               group by customer_id)
                select count(*), count(*) filter (where a.customer_id is null),
                       count(*) filter (where a.first_at <= %(cutoff)s + interval '30 days')
                from before b left join after a using (customer_id)""",
                {"cutoff": cutoff, "as_of": m["as_of"]}).fetchone()
            assert m["customers"] == buyers > 100
            assert m["positives"] == (quiet if m["measure"] == "churn_risk" else soon)
            assert 0 < m["positives"] < buyers
            summary = runs[m["as_of"]]["backtest"][m["measure"]]
            assert m["auc"] == pytest.approx(summary["auc"])
            # the models rank the generated customers' next purchases better than chance
            assert m["auc"] > 0.6 and m["lift_quality"] == pytest.approx(2 * m["auc"] - 1)
            print(f"\n{m['as_of']:%Y-%m-%d} {m['measure']}: {buyers} customers, "
                  f"{m['positives']} with the outcome, AUC {m['auc']:.3f}, "
                  f"lift quality {m['lift_quality']:.3f}")
    html = render(data)
    section = html[html.index('<section id="model-quality">'):html.index("<footer>")]
    for m in data.model_quality:
        assert f"{m['auc'] * 100:.1f}%" in section and f"{m['lift_quality'] * 100:.1f}%" in section
    # the e-mail version: the latest run's two backtests, and the global control group
    from retention.results.report import context
    from retention.results.report_email import render_email

    mail = render_email(context(data), Path("weekly_report_2026-W43.html"))
    latest = [m for m in data.model_quality if m["as_of"] == END]
    quality = mail.text.split("Model quality (the latest prediction run's backtest):\n", 1)[1]
    assert quality.split("\n\n", 1)[0].splitlines() == [
        f"- {name}: AUC {m['auc'] * 100:.1f}%, lift quality {m['lift_quality'] * 100:.1f}% "
        f"(fitted as of {m['cutoff']:%Y-%m-%d}, {m['customers']:,} customers)"
        for name, m in zip(("churn risk (no purchase)", "next order (purchase)"), latest)]
    assert data.global_control and len(data.global_control.differences) >= 2
    assert "Global control group (sent no marketing)" in mail.text
    assert ">Model quality</h2>" in mail.html and ">Global control group</h2>" in mail.html
    # a report as of a moment before the runs shows none of them
    assert collect(WEEK, shop_url, as_of=earlier - timedelta(seconds=1)).model_quality == []


def test_replenishment_due_reaches_who_the_snapshots_expected_back(shop_url):
    """include/campaigns/replenishment_due.yaml on the generated shop's predictions: the
    moments over 60 days after the data's end are exactly those computed from the
    snapshots, the purchases and the campaign's rules (wait 3 days, nothing bought since
    the snapshot, churn risk low or medium as of the moment, once in 30 days)."""
    from retention.campaigns.spec import load_campaign
    from retention.triggers.config import TriggerSettings
    from retention.triggers.definitions import compile_definition
    from retention.warehouse.predict import write_predictions

    write_predictions(shop_url, END, run_id="replenishment")
    campaign = load_campaign("replenishment_due")
    compiled = compile_definition(campaign.definition, "replenishment_due", TriggerSettings(),
                                  has_ropo=True)
    lo, hi = END, END + timedelta(days=60)
    with db.connect(shop_url) as conn:
        found = conn.execute(f"select customer_id, hit_at, anchor_at, context from "
                             f"({compiled.sql}) d", dict(compiled.params, lo=lo, hi=hi)
                             ).fetchall()
        snapshots = conn.execute(
            "select customer_id, as_of, expected_next_order_at, churn_risk "
            "from marts.customer_predicted_value where churn_risk is not null").fetchall()
        bought: dict[str, list[datetime]] = {}
        for customer, at in conn.execute(
                "select customer_id, ordered_at from raw.orders where status <> 'cancelled' "
                "union all select customer_id, occurred_at from raw.events "
                "where event_type = 'purchase' and customer_id is not null "
                "union all select customer_id, purchased_at from marts.ropo_purchases"):
            bought.setdefault(customer, []).append(at)
    wait = timedelta(days=3)
    risk = {}
    for customer, as_of, _, band in snapshots:
        risk.setdefault(customer, []).append((as_of, band))
    moments = []
    for customer, as_of, due, _ in snapshots:
        hit = due + wait
        if not lo < hit <= hi or any(as_of < t <= hit for t in bought.get(customer, [])):
            continue
        band = max((s for s in risk[customer] if s[0] <= hit), default=(None, None))[1]
        if band in ("low", "medium"):
            moments.append((customer, hit))
    expected, last = set(), {}
    for customer, hit in sorted(moments):
        if customer not in last or hit >= last[customer] + timedelta(days=30):
            expected.add((customer, hit))
            last[customer] = hit
    assert {(c, hit) for c, hit, _, _ in found} == expected and len(expected) > 20
    assert all(hit == due + wait and ctx["expected_next_order_at"] for _, hit, due, ctx in found)
