-- Floor of marts.campaign_results (bench/bench_floors.py): one statement. "From raw"
-- here means the ledger ops.messages (rows planned by as_of), the provider events
-- ops.message_events (occurred by as_of) and, for conversions, the purchases of raw
-- (orders, offline receipts matched through raw.customers) attributed as in
-- bench/floors/message_attribution.sql (its CTEs are repeated here). Opened = an open
-- or a click; unsubscribed = unsubscribe, group_unsubscribe or spamreport.
-- {as_of} is replaced by a timestamptz literal. Every column is compared exactly.
with

customers as (

    select
        c.customer_id,
        nullif(trim(c.loyalty_card_id), '') as loyalty_card_id,
        substring(regexp_replace(regexp_replace(regexp_replace(coalesce(nullif(trim(c.phone), ''), ''),
            '[^0-9]', '', 'g'), '^00', ''), '^8?0([1-9][0-9]{{8}})$', '380\1')
            from '^[0-9]{{8,15}}$') as phone_digits
    from raw.customers as c
    where c.created_at is null or c.created_at <= {as_of}
       or exists (select 1 from raw.orders as o
                  where o.customer_id = c.customer_id and o.ordered_at <= {as_of})

),

card_owner as (

    select loyalty_card_id, min(customer_id) as customer_id
    from customers where loyalty_card_id is not null
    group by loyalty_card_id having count(*) = 1

),

phone_owner as (

    select phone_digits, min(customer_id) as customer_id
    from customers where phone_digits is not null
    group by phone_digits having count(*) = 1

),

purchases as (

    select order_id as conversion_id, 'online' as conversion_source, customer_id,
           ordered_at as converted_at, total_amount as revenue
    from raw.orders
    where ordered_at <= {as_of} and status in ('paid', 'delivered')
    union all
    select r.receipt_id, 'offline', coalesce(card_owner.customer_id, phone_owner.customer_id),
           r.purchased_at, r.total_amount
    from raw.offline_receipts as r
    left join card_owner on card_owner.loyalty_card_id = nullif(trim(r.loyalty_card_id), '')
    left join phone_owner on phone_owner.phone_digits = substring(regexp_replace(regexp_replace(
        regexp_replace(coalesce(nullif(trim(r.phone), ''), ''), '[^0-9]', '', 'g'), '^00', ''),
        '^8?0([1-9][0-9]{{8}})$', '380\1') from '^[0-9]{{8,15}}$')
    where r.purchased_at <= {as_of}
      and coalesce(card_owner.customer_id, phone_owner.customer_id) is not null

),

touches as (

    select message_id, campaign_id, run_id, step, channel, variant, customer_id,
           status = 'holdout' as is_holdout, touched_at,
           case channel when 'email' then 72 when 'telegram' then 48 else 24 end::float8
               as window_hours
    from (
        select *, case when status = 'sent' then sent_at else planned_at end as touched_at
        from ops.messages
        where status in ('sent', 'holdout')
    ) as m
    where touched_at <= {as_of}

),

in_window as materialized (

    select t.*, p.conversion_id, p.conversion_source, p.converted_at, p.revenue
    from touches as t
    join purchases as p
      on p.customer_id = t.customer_id
     and p.converted_at > t.touched_at
     and p.converted_at <= t.touched_at + t.window_hours * interval '1 hour'

),

last_sent as (

    select distinct on (conversion_source, conversion_id) *
    from in_window
    where not is_holdout
    order by conversion_source, conversion_id, touched_at desc, message_id desc

),

credited as (

    select * from last_sent
    union all
    select h.*
    from in_window as h
    left join last_sent as s
      on s.conversion_source = h.conversion_source and s.conversion_id = h.conversion_id
    where h.is_holdout
      and (s.message_id is null or not ((s.touched_at, s.message_id) > (h.touched_at, h.message_id)))

),

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
