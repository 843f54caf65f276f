-- The one pass over raw.events: one row per customer, UTC day, product and category_path
-- with the customer's events of that product on that day. Everything downstream that
-- needs clickstream (affinity, ROPO) reads this table, never the events.
-- Incremental with strategy replace_window (macros/incremental_replace_window.sql): a run
-- recomputes the days from least(newest day - lookback, as_of day) on.
with

events as (

    select * from {{ ref('stg_events') }}
    where customer_id is not null
      and (product_id is not null or category_path is not null)
    {% if is_incremental() %}
      and occurred_at >= {{ utc_midnight(incremental_window_start(this, 'event_date')) }}
    {% endif %}

),

products as (

    select * from {{ ref('stg_products') }}

),

events_categorized as (

    select
        events.customer_id,
        {{ utc_date('events.occurred_at') }} as event_date,
        events.product_id,
        -- the event's own category, else the catalogue's
        coalesce(events.category_path, products.category_path) as category_path,
        events.event_type,
        events.occurred_at

    from events
    left join products
        on products.product_id = events.product_id

),

aggregated as (

    select
        customer_id,
        event_date,
        product_id,
        category_path,
        count(*) as events,
        count(*) filter (where event_type = 'view') as views,
        count(*) filter (where event_type = 'cart') as carts,
        count(*) filter (where event_type = 'remove_from_cart') as removes_from_cart,
        count(*) filter (where event_type = 'wishlist') as wishlists,
        count(*) filter (where event_type = 'purchase') as purchase_events,
        min(occurred_at) filter (where event_type = 'view') as first_view_at,
        max(occurred_at) filter (where event_type = 'view') as last_view_at,
        -- every view's time, so windows that end inside a day ("90 days before as_of",
        -- "30 days before a receipt") stay exact at the second
        array_agg(occurred_at order by occurred_at) filter (where event_type = 'view') as view_times,
        array_agg(occurred_at order by occurred_at) filter (where event_type = 'cart') as cart_times,
        array_agg(occurred_at order by occurred_at) filter (where event_type = 'wishlist') as wishlist_times,
        min(occurred_at) as first_event_at,
        max(occurred_at) as last_event_at

    from events_categorized
    group by customer_id, event_date, product_id, category_path

),

{% if is_incremental() %}
previous as (

    select * from {{ this }}
    where event_date >= {{ incremental_window_start(this, 'event_date') }}

),
{% endif %}

marked as (

    select
        aggregated.*,
        -- the dbt invocation that last changed the row: tells later models which
        -- customers' clickstream this build changed (int_affinity_customers_changed).
        -- A recomputed row equal to the stored one keeps its mark. Bookkeeping, the only
        -- column that differs between two builds for the same as_of.
        {% if is_incremental() %}
        case
            when (aggregated.events, aggregated.views, aggregated.carts,
                  aggregated.removes_from_cart, aggregated.wishlists, aggregated.purchase_events,
                  aggregated.first_event_at, aggregated.last_event_at, aggregated.view_times,
                  aggregated.cart_times, aggregated.wishlist_times)
                 is not distinct from
                 (previous.events, previous.views, previous.carts,
                  previous.removes_from_cart, previous.wishlists, previous.purchase_events,
                  previous.first_event_at, previous.last_event_at, previous.view_times,
                  previous.cart_times, previous.wishlist_times)
                then previous.aggregated_in
            else '{{ invocation_id }}'
        end::text as aggregated_in
        {% else %}
        '{{ invocation_id }}'::text as aggregated_in
        {% endif %}

    from aggregated
    {% if is_incremental() %}
    left join previous
        on previous.customer_id = aggregated.customer_id
        and previous.event_date = aggregated.event_date
        and coalesce(previous.product_id, '') = coalesce(aggregated.product_id, '')
        and coalesce(previous.category_path, '') = coalesce(aggregated.category_path, '')
    {% endif %}

)

select * from marked
