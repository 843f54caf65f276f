"""A campaign wave end to end: start_run + plan_step + dispatch, ledger included.

    .venv/bin/python bench/bench_dispatch.py                       # 1,000,000 recipients
    .venv/bin/python bench/bench_dispatch.py --recipients 100000 --processes 2

A fresh database on the configured server (RETENTION_TEST_DATABASE_URL, else
RETENTION_DATABASE_URL, else the embedded one) gets N customers, each with an e-mail
address and a push token (inserted set-wise with generate_series). The local provider
servers (`retention_dev.servers`: SendGrid and FCM, 20 ms latency per request)
run in a separate process, keeping no request log (as with --no-record-bodies) but a
count of the messages they accepted, which each wave is checked against.

Waves, each a campaign run of its own:

* e-mail: SendGridChannel, 1,000 personalizations per request;
* push: FirebaseChannel (HTTP v1 over libcurl, pycurl), 500 per call, one HTTP request each;
* e-mail one request per message, as the Airflow SendGrid provider sends
  (`airflow.providers.sendgrid.utils.emailer.send_email`: a Mail with one personalization
  and a new SendGridAPIClient per call, run one after the other by a task): measured on
  --per-message-sample recipients and extrapolated to N (the output says so).

After each wave every ledger row of the run must be `sent` and the servers must have
accepted exactly its number of messages. `--compare-recording` times recording 1,000
outcomes with executemany and with one UPDATE from arrays (what dispatch does).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, time as dtime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

AS_OF = datetime(2026, 11, 2, 10, 0, tzinfo=timezone.utc)  # noon in Kyiv: no quiet hours
WAVE = 1_000_000
BUDGET_S = 600


# --------------------------------------------------------------------------- servers

def serve_main(argv: Sequence[str]) -> int:
    """The provider servers' process: SendGrid and FCM of retention_dev.servers, counting
    what they accept instead of logging requests; GET /bench/counts answers the counts."""
    from retention_dev.servers import (FcmProvider, Provider, Reply, Route, SendGridProvider,
                                       serve, serve_until_signalled, write_service_account)

    parser = argparse.ArgumentParser()
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--write-service-account", required=True)
    args = parser.parse_args(argv)

    class Counting:
        def _record(self, inc, route, outcome, reply) -> None:  # replaces the request log
            status = None if reply is None else reply.status
            with self._lock:
                self.requests[f"{route.handler} {status}"] += 1
                if status is not None and 200 <= status < 300 and route.handler in (
                        "mail_send", "send"):
                    self.messages += getattr(inc, "messages", 1)

    class CountingSendGrid(Counting, SendGridProvider):
        def mail_send(self, inc):
            try:
                body = inc.json()
                inc.json = lambda: body  # parse once
                inc.messages = len(body.get("personalizations") or [])
            except (ValueError, AttributeError):
                pass
            return super().mail_send(inc)

    class CountingFcm(Counting, FcmProvider):
        pass

    class Counts(Provider):
        name = "bench"
        routes = (Route(("GET",), "/bench/counts", "counts", False),)

        def __init__(self, providers, **options) -> None:
            self.others = providers
            super().__init__(**options)

        def counts(self, inc) -> Reply:
            out = {}
            for p in self.others:
                with p._lock:
                    out[p.name] = {"messages": p.messages, "requests": dict(p.requests)}
            return Reply(200, out)

        def _record(self, *args) -> None:
            pass

    common = dict(latency_ms=args.latency_ms, record_bodies=False)
    providers = [CountingSendGrid(api_keys={args.api_key}, **common),
                 CountingFcm(project_id="bench-project", **common)]
    for p in providers:
        p.messages, p.requests = 0, Counter()
    base_url, handle = serve([*providers, Counts(providers)])
    write_service_account(handle, args.write_service_account, "bench-project")
    print(f"local providers (sendgrid, fcm) on {base_url}", flush=True)
    serve_until_signalled(handle)
    return 0


class Servers:
    def __init__(self, latency_ms: float, workdir: str) -> None:
        self.api_key = "SG." + secrets.token_urlsafe(16)
        account = os.path.join(workdir, "service-account.json")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--latency-ms", str(latency_ms),
             "--api-key", self.api_key, "--write-service-account", account],
            stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if " on http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"local servers did not start: {line!r}")
        self.url = line.rsplit(" on ", 1)[1].strip()
        with open(account) as f:
            self.service_account = json.load(f)

    def connections(self) -> dict[str, dict]:
        return {"email": {"conn_type": "http", "host": self.url, "password": self.api_key,
                          "extra": {"from_email": "shop@example.com", "from_name": "Shop"}},
                "mobile_push": {"conn_type": "http", "host": self.url,
                                "extra": {"service_account": self.service_account,
                                          "project_id": self.service_account["project_id"]}}}

    def counts(self) -> dict:
        import requests
        return requests.get(f"{self.url}/bench/counts", timeout=30).json()

    def cpu_seconds(self) -> float:
        """CPU time of the servers' process so far (Linux /proc; 0 elsewhere)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- database

def create_database(server: str, prefix: str = "bench_dispatch") -> tuple[str, str, str]:
    import psycopg
    import sqlalchemy as sa

    from retention import db

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = sa.engine.make_url(server).set(database="postgres").render_as_string(
        hide_password=False)
    with psycopg.connect(db.libpq_dsn(admin), autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    url = sa.engine.make_url(server).set(database=name).render_as_string(hide_password=False)
    return admin, name, url


def drop_database(admin: str, name: str) -> None:
    import psycopg

    from retention import db
    with psycopg.connect(db.libpq_dsn(admin), autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


def populate(url: str, n: int) -> float:
    from retention import db
    from retention.db.schema import ensure_schemas
    from retention_dev.samples import insert_subscribed_customers

    t = time.perf_counter()
    with db.connect(url) as conn:
        ensure_schemas(conn)
        insert_subscribed_customers(conn, n, digits=8, token_prefix="fcm-token-",
                                    subscribed_at="2024-01-01Z", created_at="2024-01-01Z")
        conn.commit()
    with db.connect(url, autocommit=True) as conn:
        conn.execute("vacuum analyze raw.customers")
        conn.execute("vacuum analyze raw.channel_subscriptions")
    return time.perf_counter() - t


# --------------------------------------------------------------------------- waves

def policy():
    from retention.campaigns.policy import Policy
    return Policy(global_cap=100, global_cap_days=7, channel_cap=100, channel_cap_days=7,
                  quiet_start=dtime(21), quiet_end=dtime(9), default_timezone="Europe/Kyiv",
                  global_holdout=0.0)


def campaign(campaign_id: str, channel: str, customer_ids: list[str] | None = None):
    from retention.campaigns.spec import parse_campaign

    audience = ({"include_any": [{"customer_ids": customer_ids}]} if customer_ids
                else {"include_any": [{"all_customers": True}]})
    return parse_campaign(textwrap.dedent(f"""\
        id: {campaign_id}
        kind: promo
        audience: {json.dumps(audience)}
        steps:
          - {{name: wave, channel: {channel}, template: weekly_promo}}
        holdout: 0
        """), f"{campaign_id}.yaml")


class AirflowStyleSendGrid:
    """What `airflow.providers.sendgrid.utils.emailer.send_email` does for one recipient
    (without Airflow): a Mail with one personalization, a new SendGridAPIClient, one Mail
    Send; the dispatcher's batches are sent one message after the other."""

    name = "email"
    max_batch = 1000

    def __init__(self, api_key: str, base_url: str) -> None:
        self.api_key, self.base_url = api_key, base_url

    def send_batch(self, messages):
        from sendgrid import SendGridAPIClient
        from sendgrid.helpers.mail import (Content, CustomArg, Email, Mail, MailSettings,
                                           Personalization)

        from retention.channels.base import SendResult
        results = []
        for m in messages:
            mail = Mail()
            mail.from_email = Email("shop@example.com", "Shop")
            mail.subject = m.subject
            mail.mail_settings = MailSettings()
            personalization = Personalization()
            personalization.add_to(Email(m.address))
            personalization.add_custom_arg(CustomArg("message_id", m.message_id))
            mail.add_personalization(personalization)
            mail.add_content(Content("text/html", m.body_html))
            client = SendGridAPIClient(api_key=self.api_key, host=self.base_url)
            try:
                response = client.client.mail.send.post(request_body=mail.get())
                results.append(SendResult.sent(m.message_id, response.headers.get("X-Message-Id")))
            except Exception as exc:  # noqa: BLE001 - the provider logs and moves on too
                results.append(SendResult.failed(m.message_id, f"{type(exc).__name__}"))
        return results


def run_wave(url: str, servers: Servers, label: str, c, channels: dict, *, processes: int,
             workers: int, connections: dict | None) -> dict:
    from retention import db
    from retention.campaigns.dispatch import dispatch_step
    from retention.campaigns.engine import plan_step, start_run

    import resource

    def own_cpu() -> float:  # this process and its reaped children (the dispatch workers)
        return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                   for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))

    before = servers.counts()
    load = os.getloadavg()
    server_cpu0 = servers.cpu_seconds()
    t0 = time.perf_counter()
    run = start_run(c, AS_OF, url, policy())
    t1 = time.perf_counter()
    planned = plan_step(c, run, "wave", url, policy())
    t2 = time.perf_counter()
    cpu0 = own_cpu()
    counts = dispatch_step(c, run, "wave", channels, url, processes=processes, workers=workers,
                           connections=connections)
    t3 = time.perf_counter()
    dispatch_cpu = own_cpu() - cpu0
    server_cpu = servers.cpu_seconds() - server_cpu0
    after = servers.counts()
    with db.connect(url) as conn:
        rows, sent = conn.execute(
            "select count(*), count(*) filter (where status = 'sent') from ops.messages "
            "where run_id = %s", (run.run_id,)).fetchone()
    provider = "fcm" if c.steps[0].channels[0] == "mobile_push" else "sendgrid"
    accepted = after[provider]["messages"] - before[provider]["messages"]
    requests = sum(after[provider]["requests"].values()) - sum(before[provider]["requests"].values())
    ok = rows == sent == accepted == run.audience_size == planned["planned"]
    return {"label": label, "recipients": run.audience_size, "start_s": t1 - t0,
            "plan_s": t2 - t0, "send_s": t3 - t2, "total_s": t3 - t0, "rows": rows, "sent": sent,
            "accepted": accepted, "requests": requests, "ok": ok, "load": load,
            "timings": counts.get("timings", {}), "plan_only_s": t2 - t1,
            "dispatch_cpu_s": dispatch_cpu, "server_cpu_s": server_cpu}


# --------------------------------------------------------------------------- comparisons

def compare_recording(url: str, run_label: str, batches: int = 20) -> dict:
    """Record 1,000 outcomes per batch on a sent wave's rows, inside a rolled-back
    transaction: executemany (one UPDATE per message) against one UPDATE from arrays."""
    from retention import db
    out = {}
    with db.connect(url) as conn:
        rows = conn.execute("select message_id, provider_message_id, sent_at from ops.messages "
                            "where campaign_id = %s limit %s", (run_label, batches * 1000)
                            ).fetchall()
        chunks = [rows[i:i + 1000] for i in range(0, len(rows), 1000)]
        for how in ("executemany", "unnest", "executemany", "unnest"):
            t = time.perf_counter()
            for chunk in chunks:
                with conn.cursor() as cur:
                    if how == "executemany":
                        cur.executemany(
                            "update ops.messages set status = 'sent', provider_message_id = %s, "
                            "sent_at = %s, claim_token = null where message_id = %s",
                            [(pid, at, mid) for mid, pid, at in chunk])
                    else:
                        cur.execute(
                            "update ops.messages m set status = 'sent', "
                            "provider_message_id = v.provider_id, sent_at = v.sent_at, "
                            "claim_token = null from unnest(%s::text[], %s::text[], "
                            "%s::timestamptz[]) as v(message_id, provider_id, sent_at) "
                            "where m.message_id = v.message_id",
                            ([r[0] for r in chunk], [r[1] for r in chunk], [r[2] for r in chunk]))
            out[how] = (time.perf_counter() - t) * 1000 / max(len(chunks), 1)  # ms per batch
            conn.rollback()
    return out


# --------------------------------------------------------------------------- main

def main() -> int:
    if sys.argv[1:2] == ["--serve"]:
        return serve_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=WAVE)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="threads per channel per process")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--per-message-sample", type=int, default=20_000)
    parser.add_argument("--skip-email", action="store_true")
    parser.add_argument("--skip-push", action="store_true")
    parser.add_argument("--skip-per-message", action="store_true")
    parser.add_argument("--compare-recording", action="store_true")
    parser.add_argument("--keep-database", action="store_true")
    args = parser.parse_args()

    os.environ.setdefault("RETENTION_PROMO_SECRET", "bench-" + secrets.token_hex(8))
    from retention import db
    from retention.connections import build_channel

    server = (os.environ.get("RETENTION_TEST_DATABASE_URL")
              or os.environ.get("RETENTION_DATABASE_URL") or db.database_url())
    n = args.recipients
    results = []
    notes = [f"load average before the benchmark: "
             f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"]
    admin, name, url = create_database(server)
    workdir = tempfile.mkdtemp(prefix="bench-dispatch-")
    servers = None
    try:
        print(f"database {name}: {n:,} customers, e-mail + push each ...", flush=True)
        notes.append(f"data: {n:,} customers with e-mail and push inserted in "
                     f"{populate(url, n):.1f} s")
        servers = Servers(args.latency_ms, workdir)
        conns = servers.connections()
        if not args.skip_email:
            print("e-mail wave ...", flush=True)
            results.append(run_wave(url, servers, "e-mail (SendGrid, 1,000/request)",
                                    campaign("bench_email", "email"),
                                    {"email": build_channel("email", conns["email"])},
                                    processes=args.processes, workers=args.workers,
                                    connections=conns))
            if args.compare_recording:
                notes.append("recording 1,000 outcomes (ms per batch): " + ", ".join(
                    f"{k} {v:.0f}" for k, v in compare_recording(url, "bench_email").items()))
        if not args.skip_push:
            print("push wave ...", flush=True)
            push = build_channel("mobile_push", conns["mobile_push"])
            try:
                results.append(run_wave(url, servers, "push (FCM HTTP v1, 500/call)",
                                        campaign("bench_push", "mobile_push"),
                                        {"mobile_push": push}, processes=args.processes,
                                        workers=args.workers, connections=conns))
            finally:
                push.close()
        if not args.skip_per_message:
            sample = min(args.per_message_sample, n)
            print(f"e-mail one request per message, {sample:,} recipients ...", flush=True)
            ids = [f"c{i:08d}" for i in range(1, sample + 1)]
            measured = run_wave(url, servers, "e-mail, 1 request/message (Airflow provider)",
                                campaign("bench_single", "email", ids),
                                {"email": AirflowStyleSendGrid(servers.api_key, servers.url)},
                                processes=1, workers=1, connections=None)
            results.append(measured)
            if sample < n:
                # the ledger work of N recipients is the e-mail wave's; the sending scales
                scale = n / sample
                email = next((r for r in results if r["label"].startswith("e-mail (")), None)
                plan_s = email["plan_s"] if email else measured["plan_s"] * scale
                send_s = measured["send_s"] * scale
                results.append(dict(
                    measured, recipients=n, plan_s=plan_s, send_s=send_s, total_s=plan_s + send_s,
                    extrapolated=True,
                    label=(f"  the same extrapolated to {n:,}: send {sample:,} measured x "
                           f"{scale:g}, plan " + ("of the e-mail wave" if email else f"x {scale:g}"))))
    finally:
        if servers:
            servers.stop()
        if not args.keep_database:
            drop_database(admin, name)
        else:
            notes.append(f"database kept: {url}")

    print(f"\n{args.latency_ms:g} ms latency per provider request; {args.processes} dispatch "
          f"process(es) x {args.workers} thread(s) per channel; {os.cpu_count()} cores shared "
          "with PostgreSQL and the provider servers\n")
    print("| wave | recipients | plan s | send s | total s | msgs/s | 1M in < 10 min | "
          "ledger rows sent = accepted by servers | load avg at start |")
    print("|---|---:|---:|---:|---:|---:|---|---|---|")
    for r in results:
        rate = r["recipients"] / r["total_s"]
        million = r["total_s"] * WAVE / r["recipients"]
        meets = ("yes" if million < BUDGET_S else "no") + (
            "" if r["recipients"] == WAVE else f" ({million / 60:.1f} min for 1M)")
        check = ("extrapolated" if r.get("extrapolated") else
                 ("yes" if r["ok"] else "NO") + f" ({r['sent']:,} / {r['accepted']:,})")
        print(f"| {r['label']} | {r['recipients']:,} | {r['plan_s']:.1f} | {r['send_s']:.1f} | "
              f"{r['total_s']:.1f} | {rate:,.0f} | {meets} | {check} | "
              f"{r['load'][0]:.2f} |")
    print()
    for r in results:
        if r.get("extrapolated"):
            continue
        t = r["timings"]
        if t:
            print(f"{r['label']}: start_run {r['start_s']:.1f} s, plan_step {r['plan_only_s']:.1f} s; "
                  f"{r['requests']:,} provider requests; in the send loop (seconds summed over "
                  f"workers) claim {t['claim_s']:.1f}, render {t['render_s']:.1f}, send "
                  f"{t['send_s']:.1f}, record {t['record_s']:.1f}; CPU while sending: "
                  f"dispatcher {r['dispatch_cpu_s']:.0f} s "
                  f"({r['dispatch_cpu_s'] * 1e6 / r['recipients']:,.0f} us/message), provider "
                  f"servers {r['server_cpu_s']:.0f} s")
    for note in notes:
        print(note)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
