-- One row per customer and category_path the customer viewed (logged in) as of as_of:
-- all-time views and the last view. Built from int_events_aggregated_daily.
-- Incremental (strategy replace_partitions, one partition per customer): a run
-- recomputes, from all their daily rows, only the customers whose daily rows may have
-- changed, i.e. who have views on or after the window start (the same rule as the daily
-- model: least(newest view day here - incremental_lookback_days, as_of's day)), or whose
-- stored last view is on or after it (an earlier as_of removes those views).
with

daily_views as (

    select * from {{ ref('int_events_aggregated_daily') }}
    where category_path is not null
      and views > 0

),

{% if is_incremental() %}
window_start as (

    select least(
        coalesce(max({{ utc_date('last_view_at') }}) - {{ var('incremental_lookback_days') | int }}, date '0001-01-01'),
        {{ utc_date(as_of()) }}
    ) as first_day
    from {{ this }}

),

changed_customers as (

    select distinct daily_views.customer_id
    from daily_views
    cross join window_start
    where daily_views.event_date >= window_start.first_day

    union

    select stored.customer_id
    from {{ this }} as stored
    cross join window_start
    where stored.last_view_at >= {{ utc_midnight('window_start.first_day') }}

),

daily_views_of_changed_customers as (

    select daily_views.*
    from daily_views
    inner join changed_customers
        on changed_customers.customer_id = daily_views.customer_id

),
{% endif %}

aggregated as (

    select
        customer_id,
        category_path,
        sum(views) as views,
        max(last_view_at) as last_view_at

    {% if is_incremental() %}
    from daily_views_of_changed_customers
    {% else %}
    from daily_views
    {% endif %}
    group by customer_id, category_path

)

{% if is_incremental() %}
-- one tombstone per recomputed customer: the strategy replaces all their rows
select customer_id, null::text as category_path, null::bigint as views, null::timestamptz as last_view_at
from changed_customers
union all
{% endif %}
select * from aggregated
