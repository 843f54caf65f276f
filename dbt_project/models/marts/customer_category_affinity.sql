-- One row per customer and category_path the customer bought or viewed, as of as_of,
-- with an affinity score (macros/affinity.sql) and its rank among the customer's
-- categories (1 = strongest). Rules in customer_category_affinity.yml.
-- Incremental per customer (strategy replace_partitions): a build recomputes the
-- customers of int_affinity_customers_changed, from all their purchases and daily
-- clickstream rows.
-- depends_on: {{ ref('int_affinity_customers_changed') }}
{%- set window_start = as_of() ~ ' - ' ~ days_interval(var('affinity_views_window_days')) %}
with

customers as (

    select customer_id from {{ ref('stg_customers') }}
    {% if is_incremental() %}
    where customer_id in (select customer_id from {{ ref('int_affinity_customers_changed') }})
    {% endif %}

),

purchased as (

    select * from {{ ref('int_customer_category_purchases') }}
    where customer_id in (select customer_id from customers)

),

daily_events as (

    select * from {{ ref('int_events_aggregated_daily') }}
    where category_path is not null
      and customer_id in (select customer_id from customers)

),

clickstream as (

    select
        customer_id,
        category_path,
        sum(views) as views,
        -- (as_of - N days, as_of], exact to the second
        sum({{ count_after('views', 'view_times', window_start) }}) as views_90d,
        sum({{ count_after('carts', 'cart_times', window_start) }}) as carts_90d,
        sum({{ count_after('wishlists', 'wishlist_times', window_start) }}) as wishlists_90d,
        max(last_view_at) as last_view_at,
        max(last_event_at) as last_event_at

    from daily_events
    group by customer_id, category_path

),

joined as (

    select
        customer_id,
        category_path,
        split_part(category_path, '.', 1) as top_category,
        coalesce(purchased.purchase_revenue, 0) as purchase_revenue,
        coalesce(purchased.purchases, 0) as purchases,
        coalesce(clickstream.views, 0) as views,
        coalesce(clickstream.views_90d, 0) as views_90d,
        coalesce(clickstream.carts_90d, 0) as carts_90d,
        coalesce(clickstream.wishlists_90d, 0) as wishlists_90d,
        purchased.last_purchased_at,
        clickstream.last_view_at,
        clickstream.last_event_at,
        greatest(purchased.last_purchased_at, clickstream.last_view_at) as last_interaction_at

    from purchased
    full outer join clickstream using (customer_id, category_path)

),

bought_or_viewed as (

    -- categories only carted or wishlisted are not rows
    select
        *,
        max(last_interaction_at) over (partition by customer_id) as latest_interaction_at
    from joined
    where purchases > 0 or views > 0

),

scored as (

    select
        *,
        {{ affinity_score('purchases', 'carts_90d', 'wishlists_90d', 'views_90d', 'last_interaction_at', 'latest_interaction_at') }}
            as affinity_score

    from bought_or_viewed

),

ranked as (

    select
        customer_id,
        category_path,
        purchase_revenue,
        purchases,
        views_90d,
        last_interaction_at,
        affinity_score,
        row_number() over (
            partition by customer_id
            order by affinity_score desc, last_interaction_at desc, category_path
        ) as affinity_rank,
        top_category,
        carts_90d,
        wishlists_90d,
        views,
        last_purchased_at,
        last_view_at,
        last_event_at

    from scored

)

{% if is_incremental() %}
-- every recomputed customer is listed, with NULL rows for those who have none any more,
-- so the strategy replaces (or removes) all their rows
{{ replace_partitions_select('ranked', ['customer_id', 'category_path', 'purchase_revenue', 'purchases', 'views_90d', 'last_interaction_at', 'affinity_score', 'affinity_rank', 'top_category', 'carts_90d', 'wishlists_90d', 'views', 'last_purchased_at', 'last_view_at', 'last_event_at'], ref('int_affinity_customers_changed')) }}
{% else %}
select * from ranked
{% endif %}
