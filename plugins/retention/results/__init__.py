"""Results back: provider events into the ledger, consent flowback, uplift, the weekly report.

* `webhook`: SendGrid Event Webhook batches (signature, durable landing, normalisation into
  `ops.message_events`, deduplicated on `sg_event_id`, unsubscribes and hard bounces into
  `ops.consent_changes`), and the push/Telegram/SMS send results as events.
* `receiver`: the small HTTP receiver (`python -m retention.results.receiver --port N`).
* `uplift`: holdout uplift and A/B differences with confidence intervals.
* `report`: the weekly marketer report (self-contained HTML, inline SVG charts).

No Airflow import here: the DAGs call these functions.
"""
