"""The quick start: the whole pipeline end to end on a generated sample shop.

Runs the same functions the DAGs run, in order, and prints what each step did. Safe to
run again: the shop is generated deterministically, loads upsert, builds replace.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from retention import db
from retention.config import paths

DEFAULT_END = datetime(2026, 10, 31, tzinfo=timezone.utc)


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(started: float) -> None:
    print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)


def run(customers: int, seed: int) -> int:
    from retention.generate import generate_shop
    from retention.load import load_folder

    home = paths().home
    home.mkdir(parents=True, exist_ok=True)

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
        from retention.quality import run_checkpoint
    except ImportError:  # pragma: no cover - while the module is being built
        run_checkpoint = None
    if run_checkpoint is not None:
        t = _step("data quality checkpoint (Great Expectations)")
        quality = run_checkpoint(url, as_of=loaded_at, load_id=report.load_id)
        print("   " + (quality.format() if hasattr(quality, "format") else str(quality)).replace(
            "\n", "\n   "))
        quality.raise_for_failures()
        _done(t)

    try:
        from retention.build import build
    except ImportError:  # pragma: no cover
        build = None
    if build is not None:
        t = _step("dbt build: customer lifetime tables")
        summary = build(as_of=None, url=url)
        for key, value in summary.items():
            if not isinstance(value, (dict, list)):
                print(f"   {key:<36}{value}")
        _done(t)

    print("\nquick start finished: the warehouse is ready (`retention db` prints its URL).")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/demo", description=__doc__)
    parser.add_argument("--customers", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    return run(args.customers, args.seed)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
