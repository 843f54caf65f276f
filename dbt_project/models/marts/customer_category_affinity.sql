-- One row per customer and category_path the customer bought or viewed, as of as_of,
-- with an affinity score (macros/affinity.sql) and its rank among the customer's
-- categories (1 = strongest). Rules in customer_category_affinity.yml.
with

categories as (

    select * from {{ ref('int_customer_categories_aggregated') }}

),

scored as (

    select
        customer_id,
        category_path,
        top_category,
        purchase_revenue,
        purchases,
        views_90d,
        carts_90d,
        wishlists_90d,
        views,
        last_purchased_at,
        last_view_at,
        last_interaction_at,
        {{ affinity_score('purchases', 'carts_90d', 'wishlists_90d', 'views_90d', 'last_interaction_at') }}
            as affinity_score

    from categories

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
        {{ as_of() }} as as_of

    from scored

)

select * from ranked
