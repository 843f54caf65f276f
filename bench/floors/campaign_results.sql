-- Floor of marts.campaign_results (bench/bench_floors.py): one statement. "From raw"
-- here means the ledger ops.messages (rows planned by as_of), the provider events
-- ops.message_events (occurred by as_of) and, for conversions, the purchases of raw
-- (orders, offline receipts matched through raw.customers) attributed as in
-- bench/floors/message_attribution.sql (its CTEs are repeated here). Opened = an open
-- or a click; unsubscribed = unsubscribe, group_unsubscribe or spamreport.
-- {as_of} is replaced by a timestamptz literal. Every column is compared exactly.
with

-- include: _attribution.sql

conversions as (

    select message_id,
           count(*) as conversions,
           count(*) filter (where conversion_source = 'offline') as offline_conversions,
           sum(revenue) as revenue,
           coalesce(sum(revenue) filter (where conversion_source = 'offline'), 0) as offline_revenue
    from credited
    group by message_id

),

events as (

    select message_id,
           bool_or(event_type = 'delivered') as is_delivered,
           bool_or(event_type in ('open', 'click')) as is_opened,
           bool_or(event_type = 'click') as is_clicked,
           bool_or(event_type in ('unsubscribe', 'group_unsubscribe', 'spamreport')) as is_unsubscribed,
           bool_or(event_type = 'bounce') as is_bounced
    from ops.message_events
    where occurred_at <= {as_of} and message_id is not null
    group by message_id

)

select
    m.run_id || '|' || m.step || '|' || m.channel || '|' || m.variant as result_key,
    m.campaign_id, m.run_id, m.step, m.channel, m.variant,
    count(*) as audience,
    count(*) filter (where m.status = 'sent') as sent,
    count(*) filter (where e.is_delivered) as delivered,
    count(*) filter (where e.is_opened) as opened,
    count(*) filter (where e.is_clicked) as clicked,
    count(*) filter (where c.conversions > 0) as converted,
    sum(coalesce(c.revenue, 0)) as revenue,
    sum(coalesce(c.offline_revenue, 0)) as offline_revenue,
    min(m.step_index) as step_index,
    min(m.cap_class) as cap_class,
    min(m.planned_at) as first_planned_at,
    count(*) filter (where m.status = 'failed') as failed,
    count(*) filter (where m.status = 'unknown') as unknown,
    count(*) filter (where m.status = 'suppressed') as suppressed,
    count(*) filter (where m.status = 'planned') as waiting,
    count(*) filter (where e.is_unsubscribed) as unsubscribed,
    count(*) filter (where e.is_bounced) as bounced,
    sum(coalesce(c.conversions, 0)) as conversions,
    sum(coalesce(c.offline_conversions, 0)) as offline_conversions,
    {as_of} as as_of
from ops.messages as m
left join events as e on e.message_id = m.message_id
left join conversions as c on c.message_id = m.message_id
where m.planned_at <= {as_of}
group by m.campaign_id, m.run_id, m.step, m.channel, m.variant
