-- Floor of marts.customer_send_time (bench/bench_floors.py): one statement. "From raw"
-- here means raw.customers (time zone; existence as of as_of), raw.orders,
-- raw.offline_receipts (the RFM segment of customer_lifetime, computed here from the
-- purchases: quintiles of recency and monetary among buyers, frequency thresholds 2, 3,
-- 4, 6), raw.events (site sessions: first event of a session) and the pipeline's own
-- ops.messages and ops.message_events (opens and clicks, machine opens left out).
-- Constants (dbt_project.yml vars): 180 days of history, prior 4.0 events, segment
-- prior 50.0 events, default zone Europe/Kyiv. The literals keep the model's types
-- (4.0 and 50.0 are numeric as the model renders them), so the double precision
-- own_weight and the chosen hours are compared exactly. Runs with timezone=UTC like the
-- build (date_trunc('hour', ...) and "180 days" depend on the session's zone).
-- {as_of} is replaced by a timestamptz literal.
with

customers_raw as (

    select
        c.customer_id, c.timezone,
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
    from customers_raw where loyalty_card_id is not null
    group by loyalty_card_id having count(*) = 1

),

phone_owner as (

    select phone_digits, min(customer_id) as customer_id
    from customers_raw where phone_digits is not null
    group by phone_digits having count(*) = 1

),

purchases as (

    select customer_id, ordered_at as purchased_at, total_amount as revenue
    from raw.orders
    where ordered_at <= {as_of} and status in ('paid', 'delivered')
    union all
    select coalesce(card_owner.customer_id, phone_owner.customer_id), r.purchased_at, r.total_amount
    from raw.offline_receipts as r
    left join card_owner on card_owner.loyalty_card_id = nullif(trim(r.loyalty_card_id), '')
    left join phone_owner on phone_owner.phone_digits = substring(regexp_replace(regexp_replace(
        regexp_replace(coalesce(nullif(trim(r.phone), ''), ''), '[^0-9]', '', 'g'), '^00', ''),
        '^8?0([1-9][0-9]{{8}})$', '380\1') from '^[0-9]{{8,15}}$')
    where r.purchased_at <= {as_of}
      and coalesce(card_owner.customer_id, phone_owner.customer_id) is not null

),

buyers as (

    select p.customer_id, count(*) as purchases, sum(p.revenue) as ltv,
           max(p.purchased_at) as last_purchase_at
    from purchases as p
    join customers_raw as c on c.customer_id = p.customer_id
    group by p.customer_id

),

scored as (

    select customer_id, purchases,
           6 - (5 * count(*) over (order by last_purchase_at desc) + count(*) over () - 1)
               / count(*) over () as r_score,
           (5 * count(*) over (order by ltv) + count(*) over () - 1) / count(*) over () as m_score
    from buyers

),

segments as (

    select customer_id,
        case
            when r_score >= 4 and f_score >= 4 then 'champions'
            when r_score >= 3 and f_score >= 3 then 'loyal'
            when r_score >= 3 and f_score = 2 then 'potential_loyalist'
            when r_score >= 4 and f_score = 1 then 'new'
            when r_score = 3 and f_score = 1 then 'promising'
            when f_score >= 4 and m_score >= 4 then 'cant_lose'
            when f_score >= 3 then 'at_risk'
            when r_score = 2 then 'hibernating'
            else 'lost'
        end as segment
    from (select *, 1 + (purchases >= 2)::int + (purchases >= 3)::int + (purchases >= 4)::int
                       + (purchases >= 6)::int as f_score
          from scored) as s

),

customers as materialized (

    select c.customer_id,
           coalesce(z.name, 'Europe/Kyiv') as timezone,
           coalesce(s.segment, 'no_purchase') as segment
    from customers_raw as c
    left join (select name from pg_catalog.pg_timezone_names) as z on z.name = c.timezone
    left join segments as s on s.customer_id = c.customer_id

),

signals as (

    -- one signal per message and hour of an open or click; one per site session start
    select distinct m.customer_id, m.channel, m.message_id, date_trunc('hour', e.occurred_at) as signal_at
    from ops.message_events as e
    join ops.messages as m on m.message_id = e.message_id
    where e.event_type in ('open', 'click')
      and not coalesce(e.payload ->> 'sg_machine_open' in ('true', '1'), false)
      and e.occurred_at <= {as_of} and e.occurred_at > {as_of} - interval '180 days'
    union all
    select customer_id, 'site', session_id, min(occurred_at)
    from raw.events
    where customer_id is not null and session_id is not null
      and occurred_at <= {as_of} and occurred_at > {as_of} - interval '180 days'
    group by customer_id, session_id

),

local_signals as materialized (

    -- the local time computed once per signal
    select customer_id, channel, segment,
           (extract(isodow from local_at)::int - 1) * 24 + extract(hour from local_at)::int as hour_of_week,
           extract(hour from local_at)::int as hour_of_day
    from (select s.customer_id, s.channel, c.segment, s.signal_at at time zone c.timezone as local_at
          from signals as s
          join customers as c on c.customer_id = s.customer_id) as l

),

channel_keys as (

    select distinct customer_id, segment, channel from local_signals where channel <> 'site'

),

keys as materialized (

    select customer_id, segment, 'any' as channel from customers
    union all
    select customer_id, segment, channel from channel_keys

),

key_signals as materialized (

    select customer_id, segment, 'any' as channel, hour_of_week, hour_of_day from local_signals
    union all
    select k.customer_id, k.segment, k.channel, s.hour_of_week, s.hour_of_day
    from channel_keys as k
    join local_signals as s
      on s.customer_id = k.customer_id and (s.channel = k.channel or s.channel = 'site')

),

own_week as (
    select customer_id, segment, channel, hour_of_week as hour, count(*)::float8 as n
    from key_signals group by customer_id, segment, channel, hour_of_week
),

shop_week as (
    select h.hour, (count(s.customer_id) + 1.0) / (sum(count(s.customer_id)) over () + 168) as p_shop
    from generate_series(0, 167) as h (hour)
    left join local_signals as s on s.hour_of_week = h.hour
    group by h.hour
),

segment_week as (
    select g.segment, shop.hour,
           (coalesce(n.n, 0) + 50.0 * shop.p_shop)
             / (sum(coalesce(n.n, 0)) over (partition by g.segment) + 50.0) as p_segment
    from (select distinct segment from customers) as g
    cross join shop_week as shop
    left join (select segment, hour_of_week as hour, count(*) as n from local_signals group by 1, 2) as n
      on n.segment = g.segment and n.hour = shop.hour
),

best_week as (
    -- candidates: the customer's own hours, and the segment's best hour with n = 0. No
    -- sum per hour as in the model: when the segment's best hour is also the customer's
    -- own, its own row scores n more than the n = 0 row and wins over it anyway
    select distinct on (x.customer_id, x.channel) x.customer_id, x.channel, x.hour
    from (
        select customer_id, segment, channel, hour, n from own_week
        union all
        select k.customer_id, k.segment, k.channel, t.hour, 0
        from keys as k
        join (select distinct on (segment) segment, hour from segment_week
              order by segment, p_segment desc, hour) as t on t.segment = k.segment
    ) as x
    join segment_week as g on g.segment = x.segment and g.hour = x.hour
    order by x.customer_id, x.channel, x.n + 4.0 * g.p_segment desc, x.hour
),

own_day as (
    select customer_id, segment, channel, hour_of_day as hour, count(*)::float8 as n
    from key_signals group by customer_id, segment, channel, hour_of_day
),

shop_day as (
    select h.hour, (count(s.customer_id) + 1.0) / (sum(count(s.customer_id)) over () + 24) as p_shop
    from generate_series(0, 23) as h (hour)
    left join local_signals as s on s.hour_of_day = h.hour
    group by h.hour
),

segment_day as (
    select g.segment, shop.hour,
           (coalesce(n.n, 0) + 50.0 * shop.p_shop)
             / (sum(coalesce(n.n, 0)) over (partition by g.segment) + 50.0) as p_segment
    from (select distinct segment from customers) as g
    cross join shop_day as shop
    left join (select segment, hour_of_day as hour, count(*) as n from local_signals group by 1, 2) as n
      on n.segment = g.segment and n.hour = shop.hour
),

best_day as (
    -- candidates: the customer's own hours, and the segment's best hour with n = 0. No
    -- sum per hour as in the model: when the segment's best hour is also the customer's
    -- own, its own row scores n more than the n = 0 row and wins over it anyway
    select distinct on (x.customer_id, x.channel) x.customer_id, x.channel, x.hour
    from (
        select customer_id, segment, channel, hour, n from own_day
        union all
        select k.customer_id, k.segment, k.channel, t.hour, 0
        from keys as k
        join (select distinct on (segment) segment, hour from segment_day
              order by segment, p_segment desc, hour) as t on t.segment = k.segment
    ) as x
    join segment_day as g on g.segment = x.segment and g.hour = x.hour
    order by x.customer_id, x.channel, x.n + 4.0 * g.p_segment desc, x.hour
),

history as (
    select customer_id, channel, sum(n) as signals from own_week group by customer_id, channel
)

select
    k.customer_id, k.channel, c.timezone, k.segment,
    w.hour as preferred_hour_of_week,
    d.hour as preferred_hour_of_day,
    coalesce(h.signals, 0)::int as signals,
    coalesce(h.signals, 0) / (coalesce(h.signals, 0) + 4.0) as own_weight,
    {as_of} as as_of
from keys as k
join customers as c on c.customer_id = k.customer_id
join best_week as w on w.customer_id = k.customer_id and w.channel = k.channel
join best_day as d on d.customer_id = k.customer_id and d.channel = k.channel
left join history as h on h.customer_id = k.customer_id and h.channel = k.channel
