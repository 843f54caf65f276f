{#-
    customer_send_time: each customer's preferred hour of the week (and of the day) in their
    own time zone, per channel, learned from their engagement history as of as_of.

    Signals (the var send_time_history_days before as_of): opens and clicks of the
    customer's messages (ops.message_events; opens a provider flags as made by a machine
    left out), and the starts of their site sessions (raw.events, first event of a
    session). Each signal counts once in the hour of the week (Monday 00:00-00:59 local =
    0, ..., Sunday 23:00-23:59 = 167) and in the hour of the day it fell in, in the
    customer's time zone (raw.customers.timezone; a missing or unknown zone: var
    send_time_default_timezone). int_send_time_signals counts them per customer, channel
    row and hour of the week (maintained per changed customer); this model scores those
    counts for every customer, since the profiles below move with as_of for everyone.

    Rows: channel `any` for every customer (all signals), and one row per channel whose
    messages the customer engaged with (that channel's opens and clicks, plus the site
    sessions).

    Shrinkage: the customer's counts n_h are pulled towards their RFM segment's profile,
    itself pulled towards the shop's:
        p_shop(h) = (shop_h + 1) / (shop_total + H)                      (H = 168 or 24)
        p_seg(h)  = (seg_h + b * p_shop(h)) / (seg_total + b)      b = send_time_segment_prior_events
        score(h)  = n_h + a * p_seg(h)                              a = send_time_prior_events
    and the preferred hour is the one with the highest score (ties: the earlier hour). A
    customer without history gets the segment's hour; one with many signals their own.
    Only the customer's own hours and the segment's best hour can win (an hour the
    customer never used scores a * p_seg(h), at most the segment's best), so the model
    scores those candidates instead of every hour.
-#}
{%- set prior = var('send_time_prior_events') | float -%}
{%- set segment_prior = var('send_time_segment_prior_events') | float -%}

with

customers as (
    select
        c.customer_id,
        -- a zone the server knows, else the default (a hashed lookup: a join with the
        -- function's guessed 1,000 rows would skew every estimate after it)
        case when c.timezone in (select name from pg_catalog.pg_timezone_names) then c.timezone
             else '{{ var("send_time_default_timezone") }}' end as timezone,
        coalesce(l.rfm_segment, 'none') as segment
    from {{ ref('stg_customers') }} as c
    left join {{ ref('customer_lifetime') }} as l on l.customer_id = c.customer_id
),

own_week as (
    -- the signals counted per customer, channel row and local hour of the week
    -- (int_send_time_signals, maintained per changed customer; the `any` rows count every
    -- signal once)
    select s.customer_id, c.segment, s.channel, s.hour_of_week as hour, s.signals as k,
           s.signals::float8 as n
    from {{ ref('int_send_time_signals') }} as s
    join customers as c on c.customer_id = s.customer_id
),

own_day as (
    select customer_id, segment, channel, hour % 24 as hour, sum(k)::bigint as k,
           sum(k)::float8 as n
    from own_week
    group by customer_id, segment, channel, hour % 24
),

keys as (
    select customer_id, segment, 'any' as channel from customers
    union all
    select distinct customer_id, segment, channel from own_week where channel <> 'any'
),

{%- for grain, bins in [('week', 168), ('day', 24)] %}

-- hour of the {{ grain }}: {{ bins }} bins

shop_{{ grain }} as (
    select
        h.hour,
        (coalesce(sum(s.k), 0)::bigint + 1.0)
          / (sum(coalesce(sum(s.k), 0)::bigint) over () + {{ bins }}) as p_shop
    from generate_series(0, {{ bins - 1 }}) as h (hour)
    left join own_{{ grain }} as s on s.hour = h.hour and s.channel = 'any'
    group by h.hour
),

segment_counts_{{ grain }} as (
    select segment, hour, sum(k)::bigint as n
    from own_{{ grain }}
    where channel = 'any'
    group by segment, hour
),

segment_{{ grain }} as (
    select
        g.segment,
        shop.hour,
        (coalesce(n.n, 0) + {{ segment_prior }} * shop.p_shop)
          / (sum(coalesce(n.n, 0)) over (partition by g.segment) + {{ segment_prior }})
            as p_segment
    from (select distinct segment from customers) as g
    cross join shop_{{ grain }} as shop
    left join segment_counts_{{ grain }} as n on n.segment = g.segment and n.hour = shop.hour
),

segment_top_{{ grain }} as (
    select distinct on (segment) segment, hour
    from segment_{{ grain }}
    order by segment, p_segment desc, hour
),

best_{{ grain }} as (
    -- the candidates: the customer's own hours, and the segment's best hour (n = 0; when
    -- it is also their own, that row scores higher and has the same hour). The highest
    -- score wins, ties the earlier hour: the greatest [score, -hour]
    select
        x.customer_id,
        x.channel,
        -(max(array[x.n + {{ prior }} * g.p_segment, -x.hour::float8]))[2]::int as hour
    from (
        select customer_id, segment, channel, hour, n from own_{{ grain }}
        union all
        select k.customer_id, k.segment, k.channel, t.hour, 0::float8
        from keys as k
        join segment_top_{{ grain }} as t on t.segment = k.segment
    ) as x
    join segment_{{ grain }} as g on g.segment = x.segment and g.hour = x.hour
    group by x.customer_id, x.channel
),

{%- endfor %}

history as (
    select customer_id, channel, sum(n) as signals
    from own_week
    group by customer_id, channel
)

select
    k.customer_id,
    k.channel,
    c.timezone,
    k.segment,
    w.hour as preferred_hour_of_week,
    d.hour as preferred_hour_of_day,
    coalesce(h.signals, 0)::int as signals,
    coalesce(h.signals, 0) / (coalesce(h.signals, 0) + {{ prior }}) as own_weight,
    {{ as_of() }} as as_of
from keys as k
join customers as c on c.customer_id = k.customer_id
join best_week as w on w.customer_id = k.customer_id and w.channel = k.channel
join best_day as d on d.customer_id = k.customer_id and d.channel = k.channel
left join history as h on h.customer_id = k.customer_id and h.channel = k.channel
