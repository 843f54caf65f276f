-- Fragment of the floors of message_attribution and campaign_results (bench/bench_floors.py
-- expands `-- include: _attribution.sql`): the purchases (_purchases.sql) credited to the
-- messages of the ledger ops.messages. A sent message touches at sent_at, a holdout row at
-- planned_at (touch <= as_of); windows in hours: email 72, telegram 48, mobile_push /
-- web_push / sms / viber 24, any other 24 (the model's defaults; the bench runs dbt
-- without RETENTION_ATTRIBUTION_WINDOWS). in_window: every purchase in a touch's window,
-- as a conversion (conversion_id, conversion_source, converted_at, revenue). Last sent
-- touch (ties: larger message_id) wins; a holdout row earns a purchase when no sent touch
-- of it is later. credited: one row per message and the conversion it earns.
-- {as_of} is replaced by a timestamptz literal.
-- include: _purchases.sql

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

    select t.*, p.purchase_id as conversion_id, p.source as conversion_source,
           p.purchased_at as converted_at, p.revenue
    from touches as t
    join purchases as p
      on p.customer_id = t.customer_id
     and p.purchased_at > t.touched_at
     and p.purchased_at <= t.touched_at + t.window_hours * interval '1 hour'

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
