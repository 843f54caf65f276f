-- depends_on: {{ ref('int_events_aggregated_daily') }}
-- depends_on: {{ ref('int_customer_category_purchases') }}
-- One row per customer whose rows in the affinity marts (customer_category_affinity,
-- customer_top_category_affinity) this build must recompute. Rules in
-- int_affinity_customers_changed.yml. The previous marts are read as plain relations,
-- not ref()s: this model runs before them and compares with what they hold.
{%- set marts_schema = generate_schema_name('marts', none) | trim %}
{%- set affinity = none %}
{%- set previous_as_of = none %}
{%- if execute %}
    {%- set affinity = adapter.get_relation(database=target.database, schema=marts_schema, identifier='customer_category_affinity') %}
    {%- set top = adapter.get_relation(database=target.database, schema=marts_schema, identifier='customer_top_category_affinity') %}
    {%- if affinity is not none and top is not none %}
        {%- set previous_as_of = recorded_incremental_as_of(['customer_category_affinity', 'customer_top_category_affinity']) %}
    {%- endif %}
{%- endif %}
{%- set window_days = days_interval(var('affinity_views_window_days')) %}
with

customers as (

    select customer_id from {{ ref('stg_customers') }}

),

{% if previous_as_of is none %}
-- no consistent previous build of both marts: every customer is recomputed
changed as (

    select customer_id, 'no previous build' as reason from customers
    {% if affinity is not none %}
    union
    select customer_id, 'no previous build' from {{ affinity }}
    {% endif %}

)
{% else %}
purchased as (

    select * from {{ ref('int_customer_category_purchases') }}

),

clickstream_rewritten as (

    -- days the daily model (re)aggregated in this build: new, late or removed events
    select distinct customer_id, 'clickstream changed' as reason
    from {{ ref('int_events_aggregated_daily') }}
    where aggregated_in = '{{ invocation_id }}'

),

clickstream_after_as_of as (

    -- an earlier as_of than the previous build: their later events no longer count
    -- (a constant condition first: a build going forward does not scan the mart)
    select distinct customer_id, 'activity after as_of' as reason
    from {{ affinity }}
    where {{ as_of() }} < {{ previous_as_of }}
      and last_event_at > {{ as_of() }}

),

purchases_changed as (

    -- new purchases, and old ones whose order was cancelled or returned since, or whose
    -- receipt now matches someone else: compared with what the mart holds
    select distinct coalesce(purchased.customer_id, bought.customer_id) as customer_id,
           'purchases changed' as reason
    from purchased
    full outer join (select * from {{ affinity }} where purchases > 0) as bought
        on bought.customer_id = purchased.customer_id
        and bought.category_path = purchased.category_path
    where purchased.customer_id is null
       or bought.customer_id is null
       or (purchased.purchase_revenue, purchased.purchases, purchased.last_purchased_at)
          is distinct from (bought.purchase_revenue, bought.purchases, bought.last_purchased_at)

),

window_moved as (

    -- clickstream on the days between the previous and this window start: their
    -- 90-day counts change although nothing new happened
    select distinct customer_id, '90-day window moved' as reason
    from {{ ref('int_events_aggregated_daily') }}
    where category_path is not null
      and event_date between {{ utc_date('least(' ~ previous_as_of ~ ', ' ~ as_of() ~ ') - ' ~ window_days) }}
                         and {{ utc_date('greatest(' ~ previous_as_of ~ ', ' ~ as_of() ~ ') - ' ~ window_days) }}

),

no_longer_customers as (

    select distinct customer_id, 'not a customer as of as_of' as reason
    from {{ affinity }} as stored
    where not exists (
        select 1 from customers where customers.customer_id = stored.customer_id
    )

),

changed as (

    select customer_id, min(reason) as reason
    from (
        select * from clickstream_rewritten
        union all select * from clickstream_after_as_of
        union all select * from purchases_changed
        union all select * from window_moved
        union all select * from no_longer_customers
    ) as reasons
    group by customer_id

)
{% endif %}

select * from changed
