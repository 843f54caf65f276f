-- One row per customer and category_path the customer bought or viewed as of as_of:
-- what they spent on it, how often they bought it, and their clickstream in it. The two
-- affinity marts rank these rows. The 90-day counts read only the daily rows of the
-- window's days (index on event_date), never the whole clickstream.
{%- set window_start = as_of() ~ ' - ' ~ days_interval(var('affinity_views_window_days')) %}
with

customers as (

    select * from {{ ref('stg_customers') }}

),

purchased as (

    select * from {{ ref('int_customer_category_purchases') }}

),

viewed as (

    select * from {{ ref('int_customer_category_views') }}

),

recent_daily_events as (

    select * from {{ ref('int_events_aggregated_daily') }}
    where category_path is not null
      and event_date >= {{ utc_date(window_start) }}

),

recent as (

    select
        customer_id,
        category_path,
        -- (as_of - N days, as_of], exact to the second
        sum({{ count_after('views', 'view_times', window_start) }}) as views_90d,
        sum({{ count_after('carts', 'cart_times', window_start) }}) as carts_90d,
        sum({{ count_after('wishlists', 'wishlist_times', window_start) }}) as wishlists_90d

    from recent_daily_events
    group by customer_id, category_path

),

joined as (

    select
        customer_id,
        category_path,
        split_part(category_path, '.', 1) as top_category,
        coalesce(purchased.purchase_revenue, 0) as purchase_revenue,
        coalesce(purchased.purchases, 0) as purchases,
        coalesce(viewed.views, 0) as views,
        coalesce(recent.views_90d, 0) as views_90d,
        coalesce(recent.carts_90d, 0) as carts_90d,
        coalesce(recent.wishlists_90d, 0) as wishlists_90d,
        purchased.last_purchased_at,
        viewed.last_view_at,
        greatest(purchased.last_purchased_at, viewed.last_view_at) as last_interaction_at

    from purchased
    full outer join viewed using (customer_id, category_path)
    left join recent using (customer_id, category_path)

),

bought_or_viewed as (

    -- clickstream of ids that are not (yet) customers as of as_of is left out
    select joined.*
    from joined
    inner join customers
        on customers.customer_id = joined.customer_id

)

select * from bought_or_viewed
