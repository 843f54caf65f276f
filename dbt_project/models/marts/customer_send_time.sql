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
          + extract(hour from s.signal_at at time zone c.timezone)::int as hour_of_week,
        extract(hour from s.signal_at at time zone c.timezone)::int as hour_of_day
    from signals as s
    join customers as c on c.customer_id = s.customer_id
),

channel_keys as (
    select distinct customer_id, segment, channel
    from local_signals
    where channel <> 'site'
),

keys as (
    select customer_id, segment, 'any' as channel from customers
    union all
    select customer_id, segment, channel from channel_keys
),

key_signals as (
    -- the `any` row counts every signal, a channel's row that channel's and the sessions
    select customer_id, segment, 'any' as channel, hour_of_week, hour_of_day
    from local_signals
    union all
    select k.customer_id, k.segment, k.channel, s.hour_of_week, s.hour_of_day
    from channel_keys as k
    join local_signals as s
        on s.customer_id = k.customer_id
        and (s.channel = k.channel or s.channel = 'site')
),

{%- for grain, bins in [('week', 168), ('day', 24)] %}

-- hour of the {{ grain }}: {{ bins }} bins
{%- set hour = 'hour_of_' ~ grain %}

own_{{ grain }} as (
    select customer_id, segment, channel, {{ hour }} as hour, count(*)::float8 as n
    from key_signals
    group by customer_id, segment, channel, {{ hour }}
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

segment_counts_{{ grain }} as (
    select segment, {{ hour }} as hour, count(*) as n
    from local_signals
    group by segment, {{ hour }}
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

candidates_{{ grain }} as (
    -- the customer's own hours, and the segment's best hour (n = 0 unless also their own)
    select customer_id, segment, channel, hour, sum(n) as n
    from (
        select customer_id, segment, channel, hour, n from own_{{ grain }}
        union all
        select k.customer_id, k.segment, k.channel, t.hour, 0
        from keys as k
        join segment_top_{{ grain }} as t on t.segment = k.segment
    ) as x
    group by customer_id, segment, channel, hour
),

best_{{ grain }} as (
    select distinct on (x.customer_id, x.channel)
        x.customer_id,
        x.channel,
        x.hour,
        x.n + {{ prior }} * g.p_segment as score
    from candidates_{{ grain }} as x
    join segment_{{ grain }} as g on g.segment = x.segment and g.hour = x.hour
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
