"""Run a whole campaign in logical time, for the command line and the quick start.

The DAG runs the same steps with real waits; here each step happens at its logical time
(the run's as_of plus the waits) and the messages deferred by quiet hours are released
before the next step, as the customers' mornings would come.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime

from retention import db
from retention.campaigns.dispatch import OnPoint, dispatch_step, dispatch_threads
from retention.campaigns.engine import plan_step, start_run, step_counts, step_time
from retention.campaigns.policy import Policy
from retention.campaigns.spec import Campaign
from retention.channels.base import Channel
from retention.progress import progress


def run_campaign(campaign: Campaign, as_of: datetime, channels: Mapping[str, Channel],
                 url: str | None = None, policy: Policy | None = None,
                 after_step: Callable[[str, str], object] | None = None,
                 on_point: OnPoint | None = None) -> dict:
    """Every step of a campaign in order, as the DAG runs them but without waiting: each
    step is planned at its own time (as_of + waits), so a later wave sees what the
    earlier ones reached. `after_step(run_id, step)` runs between steps (the demo feeds
    the readers' webhook events there, as they would arrive during the wait).
    `on_point` is passed to every dispatch (`retention.campaigns.dispatch.OnPoint`).
    Each step shows messages sent (or failed) of those planned, rate and time left
    (`retention.progress`); messages held for the customers' mornings count when released."""
    run = start_run(campaign, as_of, url, policy)
    threads = dispatch_threads()
    waves = []
    for i, step in enumerate(campaign.steps):
        plan_step(campaign, run, step.name, url, policy)
        with db.connect(url) as conn:
            planned = conn.execute(
                "select count(*) from ops.messages where run_id = %s and step = %s "
                "and status = 'planned'", (run.run_id, step.name)).fetchone()[0]
        with progress(f"campaign {campaign.id} step {step.name}", planned,
                      unit="messages") as bar:
            def on_batch(channel: str, n: int) -> None:
                bar.update(n)

            dispatch_step(campaign, run, step.name, channels, url, workers=threads,
                          on_point=on_point, on_batch=on_batch)
            at = step_time(campaign, run, step)
            nxt = (step_time(campaign, run, campaign.steps[i + 1])
                   if i + 1 < len(campaign.steps) else None)
            with db.connect(url) as conn:
                latest = conn.execute(
                    "select max(not_before) from ops.messages where run_id = %s and step = %s "
                    "and status = 'planned'", (run.run_id, step.name)).fetchone()[0]
            if latest is not None and (nxt is None or latest <= nxt):
                dispatch_step(campaign, run, step.name, channels, url,
                              release_at=max(latest, at), workers=threads, on_point=on_point,
                              on_batch=on_batch)
        if after_step is not None:
            after_step(run.run_id, step.name)
        counts = step_counts(run.run_id, step.name, url)
        counts["step"] = step.name
        counts["at"] = at.isoformat()
        waves.append(counts)
    return {"run_id": run.run_id, "audience_size": run.audience_size,
            "holdout_size": run.holdout_size, "reused_frozen_audience": not run.created,
            "waves": waves}


_DUE = ("run_id = %(run_id)s and step = %(step)s and status = 'planned' "
        "and not_before <= %(release_at)s")


@contextmanager
def step_progress(campaign: Campaign, run_id: str, step_name: str, release_at: datetime,
                  label: str = "", url: str | None = None) -> Iterator[Callable[[str, int], None]]:
    """Progress of a step that several dispatchers send together (the DAG's send shards):
    yields an `on_batch` for `dispatch_step`. The line shows the whole step (messages out
    of those due when this dispatcher started, by every dispatcher), so each shard's log
    tells how far the wave is: `campaign weekly_promo step email (shard 1/2): messages
    40,000/100,000 (40%) 1,250 messages/s, 48 s left`. The step is counted at most once
    per progress interval."""
    params = {"run_id": run_id, "step": step_name, "release_at": release_at}

    def left() -> int:
        with db.connect(url) as conn:
            return conn.execute(f"select count(*) from ops.messages where {_DUE}",
                                params).fetchone()[0]

    due = left()
    what = f"campaign {campaign.id} step {step_name}" + (f" ({label})" if label else "")
    with progress(what, due or None, unit="messages") as bar:
        last = [time.monotonic()]
        every = 0.5 if bar.mode == "bar" else getattr(bar, "interval", 30.0)
        counting = threading.Lock()  # one sender thread counts; the others go on

        def on_batch(channel: str, n: int) -> None:
            if bar.mode == "off" or time.monotonic() - last[0] < every \
                    or not counting.acquire(blocking=False):
                return
            try:
                last[0] = time.monotonic()
                bar.set_done(max(due - left(), 0))
            finally:
                counting.release()

        yield on_batch
        bar.set_done(max(due - left(), 0))


def format_waves(result: dict) -> str:
    lines = [f"run {result['run_id']}: audience {result['audience_size']:,} "
             f"(holdout {result['holdout_size']:,})"
             + (" [frozen audience reused]" if result["reused_frozen_audience"] else "")]
    lines.append(f"  {'wave':<14}{'audience':>10}{'sent':>9}{'failed':>8}{'unknown':>9}"
                 f"{'holdout':>9}{'waiting':>9}{'suppressed':>12}  by reason")
    for w in result["waves"]:
        reasons = ", ".join(f"{k}: {v:,}" for k, v in sorted(w["suppressed_by_reason"].items()))
        lines.append(f"  {w['step']:<14}{w['audience']:>10,}{w['sent']:>9,}{w['failed']:>8,}"
                     f"{w['unknown']:>9,}{w['holdout']:>9,}{w['planned']:>9,}"
                     f"{w['suppressed']:>12,}  {reasons}")
        if w["unknown"]:
            lines.append(f"  {'':<14}unknown: {w['unknown']:,} messages went out without an "
                         "answer from the provider; they are not resent (check the "
                         "provider's log)")
        if w["failed_by_reason"]:
            lines.append(f"  {'':<14}failed: " + ", ".join(
                f"{k}: {v:,}" for k, v in w["failed_by_reason"].items()))
    return "\n".join(lines)
