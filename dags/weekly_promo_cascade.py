"""
### Weekly promo cascade

Every Monday the `weekly_promo` campaign (`include/campaigns/weekly_promo.yaml`) selects its
audience as of the run's data interval end, freezes it, and sends in waves: e-mail first
(the largest base), then mobile push, web push and Telegram, a day apart. A later wave
goes only to members who have that channel and whom no earlier wave reached or who did not
engage (open, click); a member who purchased leaves the cascade. Waits are reschedule-mode
sensors (no worker slot held); each provider has a pool that caps concurrent senders.
Every decision is in `ops.messages`: re-running a day sends nothing twice.
"""

from retention_airflow.campaign_dag import campaign_dag

# the DAG object is what the Airflow dag processor picks up
weekly_promo_cascade = campaign_dag("weekly_promo", dag_id="weekly_promo_cascade",
                                    tags=("cascade",))
