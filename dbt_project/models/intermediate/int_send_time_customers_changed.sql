-- depends_on: {{ ref('stg_events') }}
-- depends_on: {{ ref('stg_ops_messages') }}
-- depends_on: {{ ref('stg_ops_message_events') }}
-- One row per customer whose rows in int_send_time_signals this build must recompute.
-- Rules in int_send_time_customers_changed.yml. The previous table is read as a plain
-- relation, not a ref(): this model runs before it and compares with what it holds.
{%- set schema = generate_schema_name('intermediate', none) | trim %}
{%- set signals = none %}
{%- set previous_as_of = none %}
{%- if execute %}
    {%- set signals = adapter.get_relation(database=target.database, schema=schema, identifier='int_send_time_signals') %}
    {%- if signals is not none %}
        {%- set previous_as_of = recorded_incremental_as_of(['int_send_time_signals']) %}
    {%- endif %}
{%- endif %}
{%- set history = "interval '" ~ var('send_time_history_days') ~ " days'" %}
{%- set lookback = days_interval(var('incremental_lookback_days') | int) %}
with

customers as (

    select
        c.customer_id,
        -- a zone the server knows, else the default (a hashed lookup: a join with the
        -- function's guessed 1,000 rows would skew every estimate after it)
        case when c.timezone in (select name from pg_catalog.pg_timezone_names) then c.timezone
             else '{{ var("send_time_default_timezone") }}' end as timezone
    from {{ ref('stg_customers') }} as c

),

{% if previous_as_of is none %}
-- no previous build of the signals: every customer is recomputed
changed as (

    select customer_id, 'no previous build' as reason from customers
    {% if signals is not none %}
    union
    select customer_id, 'no previous build' from {{ signals }}
    {% endif %}

)
{% else %}
{#- the moments whose signals enter or leave a customer's history between the previous
    build and this one: (earlier as_of - lookback, later as_of] (new signals, signals up
    to incremental_lookback_days late; a build for an earlier as_of drops the ones after
    it) and the stretch the history's start moved over. `@` stands for the column. -#}
{%- set earlier = 'least(' ~ previous_as_of ~ ', ' ~ as_of() ~ ')' %}
{%- set later = 'greatest(' ~ previous_as_of ~ ', ' ~ as_of() ~ ')' %}
{%- set moved = '((@ > ' ~ earlier ~ ' - ' ~ lookback ~ ' and @ <= ' ~ later ~ ')'
                ~ ' or (@ > ' ~ earlier ~ ' - ' ~ history ~ ' and @ <= ' ~ later ~ ' - ' ~ history ~ '))' %}
sessions_moved as (

    -- stg_events stops at this as_of; the later sessions of a build for an earlier
    -- as_of are found in the stored signals (signals_after_as_of)
    select distinct customer_id, 'sessions changed' as reason
    from {{ ref('stg_events') }}
    where customer_id is not null
      and session_id is not null
      and {{ moved | replace('@', 'occurred_at') }}

),

engagements_moved as (

    select distinct m.customer_id, 'engagements changed' as reason
    from {{ ref('stg_ops_message_events') }} as e
    join {{ ref('stg_ops_messages') }} as m on m.message_id = e.message_id
    where e.event_type in ('open', 'click')
      and m.customer_id is not null
      and {{ moved | replace('@', 'e.occurred_at') }}

),

signals_after_as_of as (

    -- an earlier as_of than the previous build: their later signals no longer count
    -- (a constant condition first: a build going forward does not scan the table)
    select distinct customer_id, 'signals after as_of' as reason
    from {{ signals }}
    where {{ as_of() }} < {{ previous_as_of }}
      and last_signal_at > {{ as_of() }}

),

new_customers as (

    -- a customer who did not exist as of the previous build (signed up since, or whose
    -- first order is recent) may have older signals that counted for nobody then
    select customer_id, 'new customer' as reason
    from {{ ref('stg_customers') }}
    where created_at > {{ earlier }} - {{ lookback }}

),

stored_customers_changed as (

    -- the hours are local: a customer whose time zone changed since has every signal in
    -- another hour; and a stored customer may no longer be one (a build for an earlier
    -- as_of). One pass over the stored `any` rows (every customer with signals has them)
    select distinct
        stored.customer_id,
        case when customers.customer_id is null then 'not a customer as of as_of'
             else 'time zone changed' end as reason
    from {{ signals }} as stored
    left join customers on customers.customer_id = stored.customer_id
    where stored.channel = 'any'
      and (customers.customer_id is null or customers.timezone <> stored.timezone)

),

changed as (

    select customer_id, min(reason) as reason
    from (
        select * from sessions_moved
        union all select * from engagements_moved
        union all select * from signals_after_as_of
        union all select * from new_customers
        union all select * from stored_customers_changed
    ) as reasons
    group by customer_id

)
{% endif %}

select * from changed
