"""`retention-dev`: the development commands beside the product's `retention`.

    retention-dev generate --customers N --seed S --out DIR
    retention-dev demo [--customers N]
    retention-dev providers [--latency-ms MS] -- retention campaign run weekly_promo

`providers` starts the local SendGrid/FCM/Telegram/gateway stand-ins, points the
AIRFLOW_CONN_RETENTION_* connections at them and runs the given command with them; the
product's commands send through those connections unchanged.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path


def _timestamp(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 timestamp: {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def cmd_generate(args: argparse.Namespace) -> int:
    from retention_dev.generate import generate_shop

    kwargs = {"customers": args.customers, "seed": args.seed}
    if args.end:
        kwargs["end"] = args.end
    if args.gzip:
        kwargs["compress"] = True
    counts = generate_shop(Path(args.out), **kwargs)
    print(f"generated a shop of {args.customers:,} customers (seed {args.seed}) in {args.out}")
    for table, n in counts.items():
        print(f"  {table:<24}{n:>14,}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from retention_dev import demo

    return demo.main(args.rest)


def cmd_providers(args: argparse.Namespace) -> int:
    from retention_dev.stack import local_provider_stack

    command = [a for a in args.command if a != "--"] if args.command else []
    if not command:
        raise SystemExit("retention-dev providers: give the command to run, after --")
    with local_provider_stack(latency_ms=args.latency_ms) as (handle, env):
        print(f"local provider servers on {handle.base_url}", file=sys.stderr, flush=True)
        return subprocess.call(command, env={**os.environ, **env})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retention-dev", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command_name", required=True)

    p = sub.add_parser("generate", help="generate a realistic sample shop as contract CSV files")
    p.add_argument("--customers", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="shop")
    p.add_argument("--end", type=_timestamp, help="last moment of the generated history")
    p.add_argument("--gzip", action="store_true", help="write .csv.gz files")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the quick start: the whole pipeline on a sample shop")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("providers", help="run a command with local provider stand-ins")
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="latency of each provider request")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_providers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
