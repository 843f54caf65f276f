"""The quick start: the whole pipeline end to end on a generated sample shop.

Runs the same functions the DAGs run, in order, and prints what each step did. Safe to
run again: the shop is generated deterministically, loads upsert, builds replace.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from retention import db
from retention.config import paths, settings

DEFAULT_END = datetime(2026, 10, 31, tzinfo=timezone.utc)
#: the weekly cascade's Monday run inside the sample's history, so its results come back
CASCADE_AS_OF = datetime(2026, 10, 26, 7, tzinfo=timezone.utc)
#: the end of the trigger run's interval (one day) and the re-engagement run's as_of
TRIGGERS_UNTIL = datetime(2026, 10, 30, 12, tzinfo=timezone.utc)


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(started: float) -> None:
    print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)


def run(customers: int, seed: int, verbose: bool = False) -> int:
    from retention_dev.generate import generate_shop
    from retention.ingest.load import load_folder

    home = paths().home
    home.mkdir(parents=True, exist_ok=True)
    if not verbose:
        # dbt's per-node lines go to its log file (dbt_project/target/logs/dbt.log); the
        # demo prints the build's counts. urllib3's retries of Google's regional-access
        # lookup (no route from here; real deployments reach it) are not the demo's news.
        os.environ.setdefault("DBT_QUIET", "true")
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

    t = _step("database")
    url = db.database_url()
    print(f"   {db.redacted_url(url)}")
    _done(t)

    t = _step(f"generate a sample shop: {customers:,} customers, seed {seed}")
    shop = home / f"sample-shop-{customers}-{seed}"
    marker = shop / ".complete"
    if not marker.exists():
        counts = generate_shop(shop, customers=customers, seed=seed, end=DEFAULT_END)
        marker.write_text("ok\n")
    else:
        counts = {p.name.split(".")[0]: sum(1 for _ in open(p)) - 1 for p in sorted(shop.glob("*.csv"))}
        print("   (already generated; same seed gives the same files)")
    for table, n in counts.items():
        print(f"   {table:<24}{n:>12,}")
    _done(t)

    t = _step("load through the contract (bad rows to ops.quarantine)")
    loaded_at = DEFAULT_END + timedelta(hours=1)
    report = load_folder(shop, url, loaded_at=loaded_at)
    print("   " + report.format().replace("\n", "\n   "))
    _done(t)

    try:
        from retention.ingest.quality import run_checkpoint
    except ImportError:  # pragma: no cover - while the module is being built
        run_checkpoint = None
    if run_checkpoint is not None:
        t = _step("data quality checkpoint (Great Expectations)")
        quality = run_checkpoint(url, as_of=loaded_at, load_id=report.load_id)
        print("   " + (quality.format() if hasattr(quality, "format") else str(quality)).replace(
            "\n", "\n   "))
        quality.raise_for_failures()
        _done(t)

    from retention.warehouse.build import build

    t = _step(f"dbt build as of Monday {CASCADE_AS_OF:%Y-%m-%d %H:%M} UTC: customer lifetime tables")
    _print_summary(build(as_of=CASCADE_AS_OF, url=url))
    _done(t)

    t = _step("predicted customer value (BG/NBD + Gamma-Gamma)")
    from retention.warehouse.predict import write_predictions

    pred = write_predictions(url, CASCADE_AS_OF)
    fit = pred.get("bgnbd") or {}
    gg = pred.get("gamma_gamma") or {}
    print(f"   customers scored {pred['customers']:,} ({pred['customers_with_purchases']:,} "
          f"with purchases)")
    if fit:
        print("   BG/NBD r={r:.3f} alpha={alpha:.3f} a={a:.3f} b={b:.3f}".format(**fit))
    if gg:
        print("   Gamma-Gamma p={p:.3f} q={q:.3f} gamma={gamma:.3f}".format(**gg))
    _done(t)

    _ensure_promo_secret(home)
    from retention.campaigns.runner import format_waves, run_campaign
    from retention.campaigns.spec import load_campaign
    from retention.connections import channels_from_env
    from retention_dev import engagement
    from retention_dev.stack import local_provider_stack
    from retention.triggers import run_reengagement, run_triggers
    from retention.triggers.runner import LazyChannels, format_report

    with local_provider_stack() as (handle, env), engagement.webhook_receiver(url=url) as hook:
        os.environ.update(env)
        channels = LazyChannels(lambda name: channels_from_env([name])[name])

        t = _step(f"weekly promo cascade as of {CASCADE_AS_OF:%Y-%m-%d %H:%M} UTC "
                  "(local SendGrid/FCM/Telegram stand-ins)")
        print(f"   providers on {handle.base_url}; SendGrid Event Webhook receiver on {hook.url}")
        campaign = load_campaign("weekly_promo")
        readers: dict[str, dict] = {}

        def after_step(run_id: str, step: str) -> None:
            # the readers' opens, clicks, bounces and unsubscribes arrive during the wait
            readers[step] = engagement.simulate_step(hook, run_id, step, url)

        result = run_campaign(campaign, CASCADE_AS_OF, channels, url, after_step=after_step)
        print("   " + format_waves(result).replace("\n", "\n   "))
        for step, r in readers.items():
            if r.get("emails"):
                print(f"   {step} readers (simulated, via the signed webhook): "
                      + ", ".join(f"{k} {r.get(k, 0):,}" for k in
                                  ("delivered", "bounce", "open", "click", "unsubscribe"))
                      + f"; {r['duplicates']:,} duplicate events ignored")
        _print_agreement(handle, result["run_id"], url)
        _done(t)

        t = _step(f"trigger chains over the day to {TRIGGERS_UNTIL:%Y-%m-%d %H:%M} UTC")
        triggered = run_triggers(TRIGGERS_UNTIL - timedelta(days=1), TRIGGERS_UNTIL, url,
                                 channels)
        print("   " + format_report(triggered).replace("\n", "\n   "))
        _done(t)

        t = _step(f"re-engagement sequence, daily run as of {TRIGGERS_UNTIL:%Y-%m-%d %H:%M} UTC")
        reengaged = run_reengagement(TRIGGERS_UNTIL, url, channels)
        print("   " + format_report(reengaged).replace("\n", "\n   "))
        _done(t)

        from retention.warehouse.build import default_as_of
        from retention.results.pipeline import load_results

        end = default_as_of(url)
        t = _step(f"results back, and dbt build as of the end of the data, "
                  f"{end:%Y-%m-%d %H:%M} UTC (lifetime and attribution marts)")
        r = engagement.simulate_step(hook, url=url)
        print(f"   readers of the trigger e-mails (simulated, via the signed webhook): "
              f"{r.get('inserted', 0):,} new events, {r.get('duplicates', 0):,} already counted")
    loaded = load_results(end, url)
    webhook = loaded["webhook"]
    print(f"   landed webhook batches loaded: {webhook.get('files', 0)} (the receiver ingests "
          f"each batch as it lands)")
    print(f"   push, Telegram, SMS and Viber send results recorded: "
          f"{sum(loaded['send_results'].values()):,}")
    _print_summary(build(as_of=end, url=url))
    _print_campaign_results(url)
    _done(t)

    t = _step("weekly marketer report")
    from retention.results.report import write_report

    path = write_report(CASCADE_AS_OF.date(), url)
    _done(t)
    print(f"\nquick start finished. The weekly report: {path}")
    print("The warehouse stays up for exploring: `retention db` prints its URL.")
    return 0


def _print_summary(summary: dict) -> None:
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        if not isinstance(value, (dict, list)):
            print(f"   {key:<42}{value}")
    dbt = summary.get("dbt")
    if isinstance(dbt, dict):
        print("   dbt: " + ", ".join(f"{k} {v}" for k, v in dbt.items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)))


def _ensure_promo_secret(home: Path) -> None:
    """Promo codes and unsubscribe links are keyed by RETENTION_PROMO_SECRET. The demo
    makes one for this machine (kept in RETENTION_HOME, never in the repository)."""
    if settings().promo_secret:
        return
    keep = home / "demo_promo_secret"
    try:
        # created owner-only: no moment in which another user could read it
        fd = os.open(keep, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if keep.stat().st_mode & 0o077:
            keep.chmod(0o600)
    else:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secrets.token_urlsafe(32))
    os.environ["RETENTION_PROMO_SECRET"] = keep.read_text().strip()


def _print_agreement(handle, run_id: str, url: str) -> None:
    """The ledger against what the provider stand-ins accepted on the wire during this run
    (on a re-run of the demo the ledger already has every message, so nothing goes out)."""
    wire = {"email": 0, "push": 0, "telegram": 0}
    for r in handle.providers["sendgrid"].accepted:
        if r.path.endswith("/mail/send"):
            wire["email"] += len(r.body["personalizations"])
    wire["push"] = sum(1 for r in handle.providers["fcm"].accepted if r.path.endswith(":send"))
    wire["telegram"] = sum(1 for r in handle.providers["telegram"].accepted
                           if r.path.endswith("/sendMessage"))
    with db.connect(url) as conn:
        rows = conn.execute("select channel, count(*) from ops.messages where run_id = %s "
                            "and status = 'sent' group by 1 order by 1", (run_id,)).fetchall()
    print("   ledger, sent by channel: " + ", ".join(f"{c} {n:,}" for c, n in rows))
    print("   accepted on the wire in this run: " + ", ".join(f"{k} {v:,}" for k, v in wire.items()))


def _print_campaign_results(url: str) -> None:
    """marts.campaign_results per campaign step and channel (all runs and variants)."""
    with db.connect(url) as conn:
        rows = conn.execute("""
            select campaign_id, step, channel, sum(sent), sum(delivered), sum(opened),
                   sum(clicked), sum(converted), sum(revenue), sum(offline_revenue)
            from marts.campaign_results group by 1, 2, 3 order by 1, min(step_index), 3
        """).fetchall()
    print(f"   {'campaign.step':<36}{'channel':<13}{'sent':>7}{'deliv':>7}{'opened':>7}"
          f"{'clicked':>8}{'conv':>6}{'revenue':>12}{'offline':>11}")
    for c, step, ch, *n in rows:
        print(f"   {c + '.' + step:<36}{ch:<13}{int(n[0] or 0):>7,}{int(n[1] or 0):>7,}"
              f"{int(n[2] or 0):>7,}{int(n[3] or 0):>8,}{int(n[4] or 0):>6,}"
              f"{float(n[5] or 0):>12,.0f}{float(n[6] or 0):>11,.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/demo", description=__doc__)
    parser.add_argument("--customers", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show dbt's per-model lines and library warnings")
    args = parser.parse_args(argv)
    return run(args.customers, args.seed, args.verbose)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
