-- Floor of marts.customer_top_category_affinity (bench/bench_floors.py): one statement
-- from raw. The per-category rows of customer_category_affinity (bought or viewed; see
-- bench/floors/customer_category_affinity.sql for what "from raw" means there) rolled up
-- per top category (the first segment of category_path); purchases counted once per
-- purchase and top category; score weights 5/3/2/1, 90-day half-life, 6 decimals.
-- {as_of} is replaced by a timestamptz literal. Every column is compared exactly.
with

-- include: _affinity.sql

top_purchases as (

    -- a purchase with two categories of one top category counts once
    select customer_id, top_category, count(*) as purchases
    from (select distinct customer_id, split_part(category_path, '.', 1) as top_category, source, purchase_id
          from purchase_categories) as t
    group by 1, 2

),

rolled_up as (

    select
        customer_id,
        split_part(category_path, '.', 1) as top_category,
        count(*) as categories,
        sum(purchase_revenue) as purchase_revenue,
        sum(views_90d) as views_90d,
        sum(carts_90d) as carts_90d,
        sum(wishlists_90d) as wishlists_90d,
        sum(views) as views,
        max(last_purchased_at) as last_purchased_at,
        max(last_view_at) as last_view_at,
        max(last_interaction_at) as last_interaction_at
    from joined
    where purchases > 0 or views > 0
    group by 1, 2

),

scored as (

    select r.*, coalesce(t.purchases, 0) as purchases,
        round(((5 * coalesce(t.purchases, 0) + 3 * r.carts_90d + 2 * r.wishlists_90d + r.views_90d)::float8
               * power(0.5::float8, ((extract(epoch from
                     max(r.last_interaction_at) over (partition by r.customer_id) - r.last_interaction_at)
                     / 86400)::float8) / 90::float8))::numeric, 6)::float8 as affinity_score
    from rolled_up as r
    left join top_purchases as t using (customer_id, top_category)

)

select
    customer_id, top_category, purchase_revenue, purchases, views_90d, last_interaction_at,
    affinity_score,
    row_number() over (partition by customer_id
                       order by affinity_score desc, last_interaction_at desc, top_category)
        as affinity_rank,
    categories, carts_90d, wishlists_90d, views, last_purchased_at, last_view_at
from scored
