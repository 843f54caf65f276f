-- Floor of marts.message_attribution (bench/bench_floors.py): one statement. "From raw"
-- here means raw.orders, raw.offline_receipts and raw.customers (the purchases of
-- int_purchases_unified: paid or delivered orders, receipts matched by loyalty card,
-- else phone, to a customer existing as of as_of) and the ledger ops.messages. A sent
-- message touches at sent_at, a holdout row at planned_at (touch <= as_of); windows in
-- hours: email 72, telegram 48, mobile_push / web_push / sms / viber 24, any other 24
-- (the model's defaults; the bench runs dbt without RETENTION_ATTRIBUTION_WINDOWS).
-- Last sent touch (ties: larger message_id) wins; a holdout row earns a purchase when no
-- sent touch of it is later. {as_of} is replaced by a timestamptz literal. Every column
-- is compared exactly.
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

)

select
    message_id || ':' || conversion_source || ':' || conversion_id as attribution_id,
    message_id, customer_id, conversion_id, conversion_source, converted_at, revenue,
    campaign_id, run_id, step, channel, variant, is_holdout,
    touched_at as message_at,
    window_hours,
    (extract(epoch from converted_at - touched_at) / 86400)::float8 * 24 as hours_to_conversion,
    conversion_source || ':' || conversion_id as conversion_key,
    {as_of} as as_of
from credited
