"""`retention-dev`: the development commands beside the product's `retention`.

    retention-dev generate --customers N --seed S --out DIR
    retention-dev demo [--customers N]
    retention-dev providers [--latency-ms MS] -- retention campaign run weekly_promo
    retention-dev airflow up [--port PORT] [--readers] [--manual-only] | down

`providers` starts the local SendGrid/FCM/Telegram/gateway stand-ins, points the
AIRFLOW_CONN_RETENTION_* connections at them and runs the given command with them; the
product's commands send through those connections unchanged.

`airflow up` starts the same stand-ins in a background process (PID file
`RETENTION_HOME/airflow/dev-providers.pid`, its addresses in `dev-providers.json`, log
`RETENTION_HOME/airflow/logs/providers.log`) and then the product's local Airflow
(`retention airflow up`) with the connections pointing at them; `airflow down` stops
Airflow, then the stand-ins. `--readers` adds simulated e-mail readers (a webhook receiver
in the stand-ins' process, fed for every send the SendGrid stand-in accepts);
`--manual-only` turns the scheduler's own runs off (only triggered runs), as the quick
start does.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from retention.cli import timestamp


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


def _providers_pid_file() -> Path:
    from retention_airflow.local import home

    return home() / "dev-providers.pid"


def providers_info_file() -> Path:
    """Where `airflow up` keeps the running stand-ins' addresses (no secrets): the
    providers' base URL, the wire counts URL, whether readers are simulated."""
    from retention_airflow.local import home

    return home() / "dev-providers.json"


def providers_info() -> dict | None:
    """The running stand-ins of `airflow up` (`providers_info_file()` plus `pid`), or None
    when they are not running."""
    import json

    import psutil

    try:
        pid = int(_providers_pid_file().read_text().split()[0])
        proc = psutil.Process(pid)
        if "serve-providers" not in " ".join(proc.cmdline()) or \
                proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return {**json.loads(providers_info_file().read_text()), "pid": pid}
    except (OSError, ValueError, psutil.Error):
        return None


def cmd_serve_providers(args: argparse.Namespace) -> int:
    """The background half of `airflow up`: hold the stand-ins open until SIGTERM; their
    connections go to the parent once, as one JSON line on stdout (never to a file or log),
    with the addresses of the wire counts and, with --readers, of the webhook receiver."""
    import json
    import signal
    import threading
    from contextlib import ExitStack

    from retention_dev.stack import local_provider_stack, serve_wire_counts

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with ExitStack() as stack:
        on_accept, receiver_url = None, None
        if args.readers:
            from retention import db
            from retention_dev import engagement

            url = db.database_url()
            receiver = stack.enter_context(engagement.webhook_receiver(url=url))
            receiver_url = receiver.url
            on_accept = engagement.readers_on_accept(
                receiver, url, log=lambda text: print(text, file=sys.stderr, flush=True))
        handle, env = stack.enter_context(local_provider_stack(
            latency_ms=args.latency_ms, on_mail_accepted=on_accept))
        counts_url = stack.enter_context(serve_wire_counts(handle))
        print(f"local provider servers on {handle.base_url}"
              + (f"; simulated readers post to {receiver_url}" if receiver_url else ""),
              file=sys.stderr, flush=True)
        sys.stdout.write(json.dumps({"connections": env, "info": {
            "providers_url": handle.base_url, "wire_counts_url": counts_url,
            "receiver_url": receiver_url, "readers": bool(args.readers)}}) + "\n")
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        stop.wait()
    return 0


def stop_providers(grace: float = 10.0) -> bool:
    """Stop the stand-ins of `airflow up`; False if they were not running."""
    import psutil

    pid_file = _providers_pid_file()
    providers_info_file().unlink(missing_ok=True)
    try:
        proc = psutil.Process(int(pid_file.read_text().split()[0]))
        if "serve-providers" not in " ".join(proc.cmdline()):
            raise psutil.NoSuchProcess(proc.pid)  # the PID belongs to another program now
    except (OSError, ValueError, psutil.Error):
        pid_file.unlink(missing_ok=True)
        return False
    proc.terminate()
    try:
        proc.wait(grace)
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    pid_file.unlink(missing_ok=True)
    return True


class ProvidersError(RuntimeError):
    """The stand-ins' background process did not start."""


def start_providers(logs_dir: Path, *, latency_ms: float = 0.0, readers: bool = False,
                    out=print) -> dict[str, str]:
    """Start the stand-ins' background process (stopping one still running) and return
    the AIRFLOW_CONN_RETENTION_* values pointing at them."""
    import json
    import select

    stop_providers()
    logs_dir.mkdir(parents=True, exist_ok=True)
    with (logs_dir / "providers.log").open("ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "retention_dev.cli", "airflow", "serve-providers",
             "--latency-ms", str(latency_ms), *(["--readers"] if readers else [])],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    _providers_pid_file().write_text(str(child.pid))
    ready, _, _ = select.select([child.stdout], [], [], 120)
    line = child.stdout.readline() if ready else b""
    child.stdout.close()
    if not line:
        stop_providers()
        raise ProvidersError(f"the local provider servers did not start "
                             f"(see {logs_dir / 'providers.log'})")
    started = json.loads(line)
    env = started["connections"]
    fd = os.open(providers_info_file(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as fh:
        json.dump(started["info"], fh)
    out(f"local provider servers started (PID {child.pid}"
        + ("; simulated e-mail readers" if readers else "") + "); Airflow's "
        f"{', '.join(sorted(k.removeprefix('AIRFLOW_CONN_').lower() for k in env))} "
        f"point at them")
    return env


#: the scheduler setting that `--manual-only` turns off: no runs from the timetables
#: or Assets, only the runs triggered by hand or through the REST API
MANUAL_ONLY = {"AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"}


def airflow_up(local, *, port: int, timeout: float = 300.0, metadata_database: str = "airflow_meta",
               latency_ms: float = 0.0, readers: bool = False, manual_only: bool = False,
               out=print) -> bool:
    """The stand-ins, then `local` (a `LocalAirflow`) with its connections pointing at
    them; False if Airflow was running already (it is left as it is). Raises
    LocalAirflowError or ProvidersError, having stopped what it started."""
    from retention_airflow.local import COMPONENTS

    if all(local.status().values()):
        local.up(port=port)  # says it is running, and how to log in
        return False
    env = start_providers(local.logs_dir, latency_ms=latency_ms, readers=readers, out=out)
    try:
        local.up(port=port, env={**env, **(MANUAL_ONLY if manual_only else {})},
                 timeout=timeout, metadata_database=metadata_database)
    except BaseException:
        if not any(local.status().get(c) for c in COMPONENTS):
            stop_providers()
        raise
    return True


def cmd_airflow(args: argparse.Namespace) -> int:
    from retention_airflow.local import DEFAULT_PORT, LocalAirflow, LocalAirflowError

    local = LocalAirflow()
    if args.action == "down":
        local.down()
        print("local provider servers stopped" if stop_providers()
              else "local provider servers were not running")
        return 0
    try:
        started = airflow_up(local, port=args.port or DEFAULT_PORT, timeout=args.timeout,
                             metadata_database=args.metadata_database,
                             latency_ms=args.latency_ms, readers=args.readers,
                             manual_only=args.manual_only)
    except (LocalAirflowError, ProvidersError) as exc:
        print(f"retention-dev airflow up: {exc}", file=sys.stderr)
        return 1
    if started:
        print("  stop both with `retention-dev airflow down`")
    return 0


def add_airflow_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a command that brings up the local Airflow: its UI's port and its
    metadata database."""
    parser.add_argument("--port", type=int, default=None,
                        help="the Airflow UI's port on 127.0.0.1 (default 8080)")
    parser.add_argument("--metadata-database", default="airflow_meta",
                        help="the Airflow metadata database on the pipeline's PostgreSQL server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retention-dev", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command_name", required=True)

    p = sub.add_parser("generate", help="generate a realistic sample shop as contract CSV files")
    p.add_argument("--customers", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="shop")
    p.add_argument("--end", type=timestamp, help="last moment of the generated history")
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

    p = sub.add_parser("airflow", help="the local Airflow (`retention airflow up`) with the "
                                       "provider stand-ins behind its retention_* connections")
    p.add_argument("action", choices=["up", "down", "serve-providers"],
                   help="serve-providers is the background process `up` starts")
    add_airflow_arguments(p)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="latency of each provider request")
    p.add_argument("--readers", action="store_true",
                   help="simulated readers: the SendGrid stand-in posts the readers' signed "
                        "Event Webhook batches to a webhook receiver for every send it accepts")
    p.add_argument("--manual-only", action="store_true",
                   help="no runs from the DAGs' schedules or Assets, only runs triggered by "
                        "hand or through the REST API (the demo's data lies in the past)")
    p.set_defaults(func=lambda a: cmd_serve_providers(a) if a.action == "serve-providers"
                   else cmd_airflow(a))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
