{#-
    customer_send_time: each customer's preferred hour of the week (and of the day) in their
    own time zone, per channel, learned from their engagement history as of as_of.

    Signals (the var send_time_history_days before as_of): opens and clicks of the
    customer's messages (ops.message_events; opens a provider flags as made by a machine
    left out), and the starts of their site sessions (raw.events, first event of a
    session). Each signal counts once in the hour of the week (Monday 00:00-00:59 local =
    0, ..., Sunday 23:00-23:59 = 167) and in the hour of the day it fell in, in the
    customer's time zone (raw.customers.timezone; a missing or unknown zone: var
    send_time_default_timezone).

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
{%- set history_days = var('send_time_history_days') -%}
{%- set prior = var('send_time_prior_events') | float -%}
{%- set segment_prior = var('send_time_segment_prior_events') | float -%}

with

customers as (
    select
        c.customer_id,
        coalesce(z.name, '{{ var("send_time_default_timezone") }}') as timezone,
        coalesce(l.rfm_segment, 'none') as segment
    from {{ ref('stg_customers') }} as c
    left join pg_catalog.pg_timezone_names as z on z.name = c.timezone
    left join {{ ref('customer_lifetime') }} as l on l.customer_id = c.customer_id
),

engagements as (
    -- one signal per message and hour: an open and a click in the same hour count once
    select distinct
        m.customer_id,
        m.channel,
        m.message_id,
        date_trunc('hour', e.occurred_at) as signal_hour
    from {{ ref('stg_ops_message_events') }} as e
    join {{ ref('stg_ops_messages') }} as m on m.message_id = e.message_id
    where e.event_type in ('open', 'click')
      and not e.is_machine_open
      and e.occurred_at <= {{ as_of() }}
      and e.occurred_at > {{ as_of() }} - interval '{{ history_days }} days'
),

sessions as (
    select customer_id, session_id, min(occurred_at) as started_at
    from {{ ref('stg_events') }}
    where customer_id is not null
      and session_id is not null
      and occurred_at <= {{ as_of() }}
      and occurred_at > {{ as_of() }} - interval '{{ history_days }} days'
    group by customer_id, session_id
),

signals as (
    select customer_id, channel, signal_hour as signal_at from engagements
    union all
    select customer_id, 'site' as channel, started_at as signal_at from sessions
),

local_signals as (
    select
        s.customer_id,
        s.channel,
        c.segment,
        (extract(isodow from s.signal_at at time zone c.timezone)::int - 1) * 24
          + extract(hour from s.signal_at at time zone c.timezone)::int as hour_of_week
    from signals as s
    join customers as c on c.customer_id = s.customer_id
),

keys as (
    select customer_id, 'any' as channel from customers
    union
    select customer_id, channel from local_signals where channel <> 'site'
),

{%- for grain, bins in [('week', 168), ('day', 24)] %}

-- hour of the {{ grain }}: {{ bins }} bins
{%- set hour = 'hour_of_week' if grain == 'week' else 'hour_of_week % 24' %}

own_{{ grain }} as (
    select k.customer_id, k.channel, s.{{ hour }} as hour, count(*)::float8 as n
    from keys as k
    join local_signals as s
        on s.customer_id = k.customer_id
        and (k.channel = 'any' or s.channel in (k.channel, 'site'))
    group by k.customer_id, k.channel, s.{{ hour }}
),

shop_{{ grain }} as (
    select
        h.hour,
        (count(s.customer_id) + 1.0) / (sum(count(s.customer_id)) over () + {{ bins }})
            as p_shop
    from generate_series(0, {{ bins - 1 }}) as h (hour)
    left join local_signals as s on s.{{ hour }} = h.hour
    group by h.hour
),

segment_{{ grain }} as (
    select
        g.segment,
        shop.hour,
        (count(s.customer_id) + {{ segment_prior }} * shop.p_shop)
          / (sum(count(s.customer_id)) over (partition by g.segment) + {{ segment_prior }})
            as p_segment
    from (select distinct segment from customers) as g
    cross join shop_{{ grain }} as shop
    left join local_signals as s on s.segment = g.segment and s.{{ hour }} = shop.hour
    group by g.segment, shop.hour, shop.p_shop
),

segment_top_{{ grain }} as (
    select distinct on (segment) segment, hour
    from segment_{{ grain }}
    order by segment, p_segment desc, hour
),

candidates_{{ grain }} as (
    select customer_id, channel, hour from own_{{ grain }}
    union
    select k.customer_id, k.channel, t.hour
    from keys as k
    join customers as c on c.customer_id = k.customer_id
    join segment_top_{{ grain }} as t on t.segment = c.segment
),

best_{{ grain }} as (
    select distinct on (x.customer_id, x.channel)
        x.customer_id,
        x.channel,
        x.hour,
        coalesce(o.n, 0) + {{ prior }} * g.p_segment as score
    from candidates_{{ grain }} as x
    join customers as c on c.customer_id = x.customer_id
    join segment_{{ grain }} as g on g.segment = c.segment and g.hour = x.hour
    left join own_{{ grain }} as o
        on o.customer_id = x.customer_id and o.channel = x.channel and o.hour = x.hour
    order by x.customer_id, x.channel, score desc, x.hour
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
    c.segment,
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
