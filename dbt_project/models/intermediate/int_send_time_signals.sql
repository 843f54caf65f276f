-- One row per customer, channel row of customer_send_time (`any`, or a channel whose
-- messages they engaged with) and local hour of the week: how many of the row's
-- engagement signals of the send_time_history_days before as_of fell in that hour.
-- customer_send_time scores the hours from these counts. Rules in
-- int_send_time_signals.yml.
-- Incremental per customer (strategy replace_partitions): a build recomputes the
-- customers of int_send_time_customers_changed from their whole history: their sessions
-- from int_send_time_sessions (maintained per session), their opens and clicks from
-- the messages.
-- depends_on: {{ ref('int_send_time_customers_changed') }}
{%- set history_days = var('send_time_history_days') %}
with

customers as (

    select
        c.customer_id,
        -- a zone the server knows, else the default (a hashed lookup: a join with the
        -- function's guessed 1,000 rows would skew every estimate after it)
        case when c.timezone in (select name from pg_catalog.pg_timezone_names) then c.timezone
             else '{{ var("send_time_default_timezone") }}' end as timezone
    from {{ ref('stg_customers') }} as c
    {% if is_incremental() %}
    where c.customer_id in (select customer_id from {{ ref('int_send_time_customers_changed') }})
    {% endif %}

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
      and m.customer_id in (select customer_id from customers)

),

sessions as (

    -- a session counts at its first event in the history (int_send_time_sessions)
    select s.customer_id, s.started_at
    from {{ ref('int_send_time_sessions') }} as s
    where s.customer_id in (select customer_id from customers)

),

signals as (

    select customer_id, channel, signal_hour as signal_at from engagements
    union all
    select customer_id, 'site' as channel, started_at as signal_at from sessions

),

by_source as (

    select
        s.customer_id,
        s.channel,
        (extract(isodow from s.signal_at at time zone c.timezone)::int - 1) * 24
          + extract(hour from s.signal_at at time zone c.timezone)::int as hour_of_week,
        count(*) as signals,
        max(s.signal_at) as last_signal_at,
        c.timezone
    from signals as s
    join customers as c on c.customer_id = s.customer_id
    group by s.customer_id, s.channel, 3, c.timezone

),

engaged_channels as (

    select distinct customer_id, channel from by_source where channel <> 'site'

),

binned as (

    -- the `any` row counts every signal, a channel's row that channel's and the sessions
    select customer_id, channel, hour_of_week, sum(signals)::bigint as signals,
           max(last_signal_at) as last_signal_at, timezone
    from (
        select customer_id, 'any' as channel, hour_of_week, signals, last_signal_at, timezone
        from by_source
        union all
        select k.customer_id, k.channel, s.hour_of_week, s.signals, s.last_signal_at, s.timezone
        from engaged_channels as k
        join by_source as s
            on s.customer_id = k.customer_id
            and (s.channel = k.channel or s.channel = 'site')
    ) as keyed
    group by customer_id, channel, hour_of_week, timezone

)

{% if is_incremental() %}
-- every recomputed customer is listed, with a NULL row for those who have no signals
-- any more, so the strategy replaces (or removes) all their rows
{{ replace_partitions_select('binned', ['customer_id', 'channel', 'hour_of_week', 'signals', 'last_signal_at', 'timezone'], ref('int_send_time_customers_changed')) }}
{% else %}
select * from binned
{% endif %}
