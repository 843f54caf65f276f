-- One row per customer and category_path the customer bought or viewed as of as_of:
-- what they spent on it, how often they bought it, and their recent clickstream in it.
-- The two affinity marts rank these rows.
{%- set views_boundary = as_of() ~ ' - ' ~ days_interval(var('affinity_views_window_days')) %}
with

customers as (

    select * from {{ ref('stg_customers') }}

),

items as (

    select * from {{ ref('int_purchase_items_categorized') }}
    where category_path is not null

),

daily_events as (

    select * from {{ ref('int_events_aggregated_daily') }}
    where category_path is not null

),

purchased as (

    select
        customer_id,
        category_path,
        sum(item_revenue) as purchase_revenue,
        count(distinct (source, purchase_id)) as purchases,
        max(purchased_at) as last_purchased_at

    from items
    group by customer_id, category_path

),

clickstream as (

    select
        customer_id,
        category_path,
        sum(views) as views,
        -- (as_of - N days, as_of], exact to the second
        sum({{ count_after('views', 'view_times', views_boundary) }}) as views_90d,
        sum({{ count_after('carts', 'cart_times', views_boundary) }}) as carts_90d,
        sum({{ count_after('wishlists', 'wishlist_times', views_boundary) }}) as wishlists_90d,
        max(last_view_at) as last_view_at

    from daily_events
    group by customer_id, category_path

),

joined as (

    select
        coalesce(purchased.customer_id, clickstream.customer_id) as customer_id,
        coalesce(purchased.category_path, clickstream.category_path) as category_path,
        split_part(coalesce(purchased.category_path, clickstream.category_path), '.', 1) as top_category,
        coalesce(purchased.purchase_revenue, 0) as purchase_revenue,
        coalesce(purchased.purchases, 0) as purchases,
        coalesce(clickstream.views, 0) as views,
        coalesce(clickstream.views_90d, 0) as views_90d,
        coalesce(clickstream.carts_90d, 0) as carts_90d,
        coalesce(clickstream.wishlists_90d, 0) as wishlists_90d,
        purchased.last_purchased_at,
        clickstream.last_view_at,
        greatest(purchased.last_purchased_at, clickstream.last_view_at) as last_interaction_at

    from purchased
    full outer join clickstream
        on clickstream.customer_id = purchased.customer_id
        and clickstream.category_path = purchased.category_path

),

bought_or_viewed as (

    -- clickstream of ids that are not (yet) customers as of as_of is left out, and so
    -- are categories only carted or wishlisted, never viewed or bought
    select joined.*
    from joined
    inner join customers
        on customers.customer_id = joined.customer_id
    where joined.purchases > 0 or joined.views > 0

)

select * from bought_or_viewed
