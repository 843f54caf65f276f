-- One row per customer and top category (the first segment of category_path) the
-- customer bought or viewed, as of as_of: customer_category_affinity rolled up, scored
-- with the same formula and ranked (1 = strongest). Incremental per customer like it.
-- depends_on: {{ ref('int_affinity_customers_changed') }}
with

categories as (

    select * from {{ ref('customer_category_affinity') }}
    {% if is_incremental() %}
    where customer_id in (select customer_id from {{ ref('int_affinity_customers_changed') }})
    {% endif %}

),

items as (

    select * from {{ ref('int_purchase_items_categorized') }}
    where top_category is not null
    {% if is_incremental() %}
      and customer_id in (select customer_id from {{ ref('int_affinity_customers_changed') }})
    {% endif %}

),

purchases_per_top_category as (

    -- a purchase with two categories of one top category counts once
    select customer_id, top_category, count(*) as purchases
    from (
        select distinct customer_id, top_category, source, purchase_id
        from items
    ) as purchase_top_categories
    group by customer_id, top_category

),

rolled_up as (

    select
        customer_id,
        top_category,
        count(*) as categories,
        sum(purchase_revenue) as purchase_revenue,
        sum(views_90d) as views_90d,
        sum(carts_90d) as carts_90d,
        sum(wishlists_90d) as wishlists_90d,
        sum(views) as views,
        max(last_purchased_at) as last_purchased_at,
        max(last_view_at) as last_view_at,
        max(last_interaction_at) as last_interaction_at

    from categories
    group by customer_id, top_category

),

purchases_joined as (

    select
        rolled_up.*,
        coalesce(purchases_per_top_category.purchases, 0) as purchases,
        max(rolled_up.last_interaction_at) over (partition by rolled_up.customer_id)
            as latest_interaction_at

    from rolled_up
    left join purchases_per_top_category
        on purchases_per_top_category.customer_id = rolled_up.customer_id
        and purchases_per_top_category.top_category = rolled_up.top_category

),

scored as (

    select
        *,
        {{ affinity_score('purchases', 'carts_90d', 'wishlists_90d', 'views_90d', 'last_interaction_at', 'latest_interaction_at') }}
            as affinity_score

    from purchases_joined

),

ranked as (

    select
        customer_id,
        top_category,
        purchase_revenue,
        purchases,
        views_90d,
        last_interaction_at,
        affinity_score,
        row_number() over (
            partition by customer_id
            order by affinity_score desc, last_interaction_at desc, top_category
        ) as affinity_rank,
        categories,
        carts_90d,
        wishlists_90d,
        views,
        last_purchased_at,
        last_view_at

    from scored

)

{% if is_incremental() %}
{{ replace_partitions_select('ranked', ['customer_id', 'top_category', 'purchase_revenue', 'purchases', 'views_90d', 'last_interaction_at', 'affinity_score', 'affinity_rank', 'categories', 'carts_90d', 'wishlists_90d', 'views', 'last_purchased_at', 'last_view_at'], ref('int_affinity_customers_changed')) }}
{% else %}
select * from ranked
{% endif %}
