{#-
    campaign_results: what each campaign run, step, channel and variant sent and earned
    (CONTRACT.md section 5), holdout included.

    From the ledger (audience: every row, whatever its status; sent, failed, unknown,
    suppressed),
    the provider events (delivered; opened = an open or a click, since a click without an
    open is an e-mail whose images were blocked; clicked; unsubscribed; bounced) and
    message_attribution (converted: messages that earned at least one purchase; revenue,
    online plus offline, and the offline part of it). The holdout row's conversions are
    the counterfactual ones of message_attribution. Trigger chains appear once per chain
    instance (its run_id), with cap_class `trigger`.

    Comparing a variant row with the holdout row is not an experiment readout: the holdout
    row counts every holdout member, a variant row only the members that step concerned.
    The uplift section of the weekly report compares the frozen audiences (intention to
    treat).
-#}

with

ledger as (
    select * from {{ ref('stg_ops_messages') }}
    where planned_at <= {{ as_of() }}
),

events as (
    select * from {{ ref('stg_ops_message_events') }}
    where occurred_at <= {{ as_of() }} and message_id is not null
),

events_per_message as (
    select
        message_id,
        bool_or(event_type = 'delivered') as is_delivered,
        bool_or(event_type in ('open', 'click')) as is_opened,
        bool_or(event_type = 'click') as is_clicked,
        bool_or(event_type in ('unsubscribe', 'group_unsubscribe', 'spamreport'))
            as is_unsubscribed,
        bool_or(event_type = 'bounce') as is_bounced
    from events
    group by message_id
),

conversions_per_message as (
    select
        message_id,
        count(*) as conversions,
        count(*) filter (where conversion_source = 'offline') as offline_conversions,
        sum(revenue) as revenue,
        coalesce(sum(revenue) filter (where conversion_source = 'offline'), 0)
            as offline_revenue
    from {{ ref('message_attribution') }}
    group by message_id
),

messages_with_results as (
    select
        ledger.*,
        coalesce(events_per_message.is_delivered, false) as is_delivered,
        coalesce(events_per_message.is_opened, false) as is_opened,
        coalesce(events_per_message.is_clicked, false) as is_clicked,
        coalesce(events_per_message.is_unsubscribed, false) as is_unsubscribed,
        coalesce(events_per_message.is_bounced, false) as is_bounced,
        coalesce(conversions_per_message.conversions, 0) as conversions,
        coalesce(conversions_per_message.offline_conversions, 0) as offline_conversions,
        coalesce(conversions_per_message.revenue, 0) as revenue,
        coalesce(conversions_per_message.offline_revenue, 0) as offline_revenue
    from ledger
    left join events_per_message using (message_id)
    left join conversions_per_message using (message_id)
)

select
    run_id || '|' || step || '|' || channel || '|' || variant as result_key,
    campaign_id,
    run_id,
    step,
    channel,
    variant,
    count(*) as audience,
    count(*) filter (where status = 'sent') as sent,
    count(*) filter (where is_delivered) as delivered,
    count(*) filter (where is_opened) as opened,
    count(*) filter (where is_clicked) as clicked,
    count(*) filter (where conversions > 0) as converted,
    sum(revenue) as revenue,
    sum(offline_revenue) as offline_revenue,
    -- extensions
    min(step_index) as step_index,
    min(cap_class) as cap_class,
    min(planned_at) as first_planned_at,
    count(*) filter (where status = 'failed') as failed,
    count(*) filter (where status = 'unknown') as unknown,
    count(*) filter (where status = 'suppressed') as suppressed,
    count(*) filter (where status = 'planned') as waiting,
    count(*) filter (where is_unsubscribed) as unsubscribed,
    count(*) filter (where is_bounced) as bounced,
    sum(conversions) as conversions,
    sum(offline_conversions) as offline_conversions,
    {{ as_of() }} as as_of
from messages_with_results
group by campaign_id, run_id, step, channel, variant
