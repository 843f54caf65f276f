"""Build an Airflow DAG from a campaign file: one wait, plan, send and deferred-delivery
task per step, so a marketer's YAML becomes a schedule without Python.

Per step:

* `wait_<step>`: a DateTimeSensor in reschedule mode until the step's time (the run's
  data interval end plus the waits so far): no worker slot is held while waiting;
* `plan_<step>`: eligibility into the ledger (idempotent);
* `send_<step>`: dispatch, a task mapped over RETENTION_SEND_SHARDS shards in the
  provider's pool (`sendgrid`, `fcm`, `telegram`, `sms_gateway`, `viber_gateway`), which
  caps concurrent senders per provider. Each shard is a dispatcher of the whole step with
  its own claims and lease (`retention.campaigns.dispatch`): the shards claim disjoint
  batches, so as many workers as are free (Celery workers on several machines, or the
  slots of one) send one wave together; a shard that ends early waits for the others'
  claims, and the claims of a shard whose worker died are settled by the survivors or by
  its own retry (after RETENTION_SEND_RETRY_DELAY_SECONDS);
* `deliver_deferred_<step>`: a reschedule-mode sensor, after every shard, that sends the
  messages that waited for the end of quiet hours, as each customer's morning arrives.

Parsing reads only the YAML file: no database, no network.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

import pendulum
from airflow.providers.standard.sensors.date_time import DateTimeSensor
from airflow.sdk import chain, task
from airflow.sdk.bases.sensor import PokeReturnValue

from retention.campaigns.spec import Campaign, load_campaign
from retention.config import settings
from retention_airflow.dags import retention_dag
from retention_airflow.run_context import run_as_of

PROVIDER_POOLS = {"email": "sendgrid", "mobile_push": "fcm", "web_push": "fcm",
                  "telegram": "telegram", "sms": "sms_gateway", "viber": "viber_gateway"}


def _run_info(run: dict):
    from retention.campaigns.engine import RunInfo

    return RunInfo(run["run_id"], run["campaign_id"], datetime.fromisoformat(run["as_of"]),
                   run["audience_size"], run["holdout_size"], run["created"])


def _pool(campaign: Campaign, step_index: int) -> dict:
    if not settings().use_pools:
        return {}
    return {"pool": PROVIDER_POOLS[campaign.steps[step_index].channels[0]]}


def campaign_dag(campaign_id: str, *, dag_id: str | None = None, tags: tuple[str, ...] = ()):
    campaign = load_campaign(campaign_id)
    shards = settings().send_shards
    send_retry_delay = timedelta(seconds=settings().send_retry_delay_seconds)
    steps_md = ", ".join(f"{s.name} ({'/'.join(s.channels)}, after {s.wait})" for s in campaign.steps)

    @retention_dag(
        dag_id or f"campaign_{campaign.id}",
        schedule=campaign.schedule,
        retry_delay=timedelta(minutes=2),
        tags=["campaign", campaign.kind, *tags],
        doc_md=f"### Campaign `{campaign.id}`: {campaign.name}\n\n"
               f"Steps: {steps_md}."
               f"\n\nDefined in `{os.path.relpath(campaign.source)}`.\n\n{__doc__}",
    )
    def _campaign():
        @task(task_id="start_run")
        def start_run() -> dict:
            from retention.campaigns.engine import start_run as start

            info = start(load_campaign(campaign_id), run_as_of())
            return {"run_id": info.run_id, "campaign_id": info.campaign_id,
                    "as_of": info.as_of.isoformat(), "audience_size": info.audience_size,
                    "holdout_size": info.holdout_size, "created": info.created}

        run = start_run()
        previous = run
        for step in campaign.steps:
            offset = campaign.step_offset(step).total_seconds()
            wait = None
            if offset > 0:
                wait = DateTimeSensor(
                    task_id=f"wait_{step.name}",
                    target_time="{{ (data_interval_end + macros.timedelta(seconds=%r)).isoformat() }}"
                                % offset,
                    mode="reschedule", poke_interval=60, timeout=offset + 86400)

            @task(task_id=f"plan_{step.name}")
            def plan(run: dict, step_name: str) -> dict:
                from retention.campaigns.engine import plan_step

                return plan_step(load_campaign(campaign_id), _run_info(run), step_name)

            @task(task_id=f"send_{step.name}", retry_delay=send_retry_delay,
                  **_pool(campaign, step.index))
            def send(run: dict, step_name: str, planned: dict, shard: int) -> dict:
                from retention.campaigns.dispatch import dispatch_step, dispatch_threads
                from retention.campaigns.engine import step_time
                from retention.campaigns.runner import step_progress
                from retention_airflow.hooks import channels_for

                c = load_campaign(campaign_id)
                info = _run_info(run)
                at = step_time(c, info, c.step(step_name))
                with step_progress(c, info.run_id, step_name, at,
                                   f"shard {shard + 1}/{shards}") as on_batch:
                    counts = dispatch_step(c, info, step_name,
                                           channels_for(c.step(step_name).channels),
                                           workers=dispatch_threads(), on_batch=on_batch)
                counts["shard"] = shard
                return counts

            @task.sensor(task_id=f"deliver_deferred_{step.name}", mode="reschedule",
                         poke_interval=300, timeout=2 * 86400, **_pool(campaign, step.index))
            def deliver_deferred(run: dict, step_name: str, sent: list) -> PokeReturnValue:
                from retention.campaigns.dispatch import (dispatch_step, dispatch_threads,
                                                          pending_releases)
                from retention_airflow.hooks import channels_for

                c = load_campaign(campaign_id)
                info = _run_info(run)
                # the one clock read of a campaign: has a customer's morning arrived yet?
                left, due, settling = pending_releases(info.run_id, step_name,
                                                       pendulum.now("UTC"))
                if left == 0:
                    return PokeReturnValue(is_done=True, xcom_value={"waiting": 0})
                if due is None and not settling:
                    return PokeReturnValue(is_done=False)
                # a release, or claims and unknown e-mail outcomes to settle (release_at
                # None: the step's own time, which releases nothing new)
                counts = dispatch_step(c, info, step_name, channels_for(c.step(step_name).channels),
                                       release_at=due, workers=dispatch_threads())
                done = not (counts["waiting"] or counts["claimed_elsewhere"]
                            or counts["awaiting_lookup"])
                return PokeReturnValue(is_done=done, xcom_value=counts)

            planned = plan(run, step.name)
            sent = send.partial(run=run, step_name=step.name, planned=planned).expand(
                shard=list(range(shards)))
            deliver_deferred(run, step.name, sent)
            chain(*[t for t in (previous, wait, planned) if t is not None])
            previous = sent

    return _campaign()
