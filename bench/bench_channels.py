"""Channel throughput against the local provider servers with a per-request latency.

The servers run in their own process (`python -m retention_dev.servers`),
so this process's time is the channel's: SDK, JSON, HTTP. E-mail goes through
SendGridChannel (1,000 personalizations a request), push through FirebaseChannel
(FCM HTTP v1 over libcurl through pycurl, 500 messages a call, each its own HTTP
request); several `send_batch` calls are kept in flight by a thread pool, as the
dispatcher's workers do.

    .venv/bin/python bench/bench_channels.py                      # 100,000 of each
    .venv/bin/python bench/bench_channels.py --messages 20000 --latency-ms 20 \
        --email-inflight 1,2,4 --push-inflight 1,4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from retention.channels import (FirebaseChannel, OutboundMessage, RetryPolicy,  # noqa: E402
                                SendGridChannel)

WAVE = 1_000_000
WAVE_BUDGET_S = 600


def emails(n: int) -> list[OutboundMessage]:
    out = []
    for i in range(n):
        link = f"https://shop.example/unsubscribe?m=m{i:07d}&t=Zk3{i:07d}q"
        picks = "".join(f'<tr><td><a href="https://shop.example/p/{(i + k) % 997}">Product '
                        f'{(i + k) % 997}</a></td><td align="right">{19 + k}.99</td></tr>'
                        for k in range(4))
        html = ('<!doctype html><html lang="en"><body style="font-family:Arial,sans-serif;'
                'max-width:600px;margin:auto"><h1 style="font-size:22px">Hello again</h1>'
                f'<p>We picked these from <strong>category {i % 40}</strong> for you:</p>'
                f'<table role="presentation" width="100%">{picks}</table>'
                f'<p style="font-size:18px">Your personal code <strong>WK{i:07d}</strong>: 10% off '
                'until 2026-12-01.</p><p style="font-size:11px;color:#888">'
                f'<a href="{link}">Unsubscribe</a></p></body></html>')
        text = f"Hello again\nYour personal code WK{i:07d}: 10% off until 2026-12-01.\nUnsubscribe: {link}"
        out.append(OutboundMessage(f"m{i:07d}", f"c{i}", "email", f"customer{i}@example.com",
                                   f"New in category {i % 40}: 10% off for you", text, html,
                                   {"campaign_id": "weekly", "step": "email", "claim": "bench"},
                                   link))
    return out


def pushes(n: int) -> list[OutboundMessage]:
    return [OutboundMessage(f"p{i:07d}", f"c{i}", "mobile_push", f"fcm-token-{i:07d}",
                            "10% off in phones", f"Code WK{i:07d} until 2026-12-01", None,
                            {"campaign_id": "weekly", "step": "push"}, None) for i in range(n)]


def run(channel, messages: list[OutboundMessage], inflight: int) -> dict:
    batches = [messages[i:i + channel.max_batch] for i in range(0, len(messages), channel.max_batch)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=inflight) as pool:
        results = [r for batch in pool.map(channel.send_batch, batches) for r in batch]
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    sent = sum(r.status == "sent" for r in results)
    return {"sent": sent, "failed": len(results) - sent, "requests": channel.stats.requests,
            "seconds": seconds, "rate": sent / seconds, "cpu_ms_per_1k": cpu * 1e6 / max(sent, 1)}


def start_servers(latency_ms: float, workdir: str) -> tuple[subprocess.Popen, str, str]:
    account = os.path.join(workdir, "service-account.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "retention_dev.servers", "--port", "0",
         "--providers", "sendgrid,fcm", "--latency-ms", str(latency_ms), "--no-record-bodies",
         "--write-service-account", account],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "plugins")})
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        raise RuntimeError(f"local servers did not start: {line!r}")
    return proc, line.rsplit(" on ", 1)[1].strip(), account


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--email-inflight", default="1,4", help="send_batch calls in flight")
    parser.add_argument("--push-inflight", default="1,2")
    parser.add_argument("--no-proxy-env", action="store_true",
                        help="FirebaseChannel(proxies_from_env=False): no proxy from the environment")
    parser.add_argument("--skip-email", action="store_true")
    parser.add_argument("--skip-push", action="store_true")
    args = parser.parse_args()

    import json
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        proc, url, account = start_servers(args.latency_ms, workdir)
        try:
            with open(account) as f:
                info = json.load(f)
            retry = RetryPolicy(max_attempts=5)
            if not args.skip_email:
                messages = emails(args.messages)
                for inflight in [int(x) for x in args.email_inflight.split(",")]:
                    channel = SendGridChannel("SG.bench", "shop@example.com", base_url=url,
                                              retry=retry)
                    rows.append(("e-mail (SendGrid, 1000/request)", inflight,
                                 run(channel, messages, inflight)))
            if not args.skip_push:
                messages = pushes(args.messages)
                for inflight in [int(x) for x in args.push_inflight.split(",")]:
                    with FirebaseChannel(info, base_url=url, retry=retry,
                                         proxies_from_env=not args.no_proxy_env) as channel:
                        rows.append(("push (FCM v1, 500/call)", inflight,
                                     run(channel, messages, inflight)))
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    print(f"\n{args.messages:,} messages per row, {args.latency_ms:g} ms latency per request, "
          f"{os.cpu_count()} cores shared by client and server\n")
    print(f"| channel | batches in flight | sent | failed | requests | seconds | msgs/s | "
          f"client CPU ms / 1k msgs | 1M at this rate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, inflight, r in rows:
        wave = WAVE / r["rate"] if r["rate"] else float("inf")
        print(f"| {name} | {inflight} | {r['sent']:,} | {r['failed']:,} | {r['requests']:,} | "
              f"{r['seconds']:.1f} | {r['rate']:,.0f} | {r['cpu_ms_per_1k']:.0f} | "
              f"{wave / 60:.1f} min{' (over the 10 min budget)' if wave > WAVE_BUDGET_S else ''} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
