-- Floor of marts.customer_category_affinity (bench/bench_floors.py): one statement from
-- raw. Rows: customers existing as of as_of x category_path (non-empty) they bought
-- (purchases as in int_purchases_unified: paid or delivered orders, receipts matched by
-- loyalty card, else phone; category of the line's product in raw.products) or viewed
-- (raw.events up to as_of; the event's own category_path, else the catalogue's).
-- Window counts over (as_of - 90 x 24 hours, as_of]; score weights 5/3/2/1 and a 90-day
-- half-life (dbt_project.yml vars, macros/affinity.sql), rounded to 6 decimals as there.
-- {as_of} is replaced by a timestamptz literal. Every column is compared exactly.
with

-- include: _affinity.sql

scored as (

    select *,
        round(((5 * purchases + 3 * carts_90d + 2 * wishlists_90d + views_90d)::float8
               * power(0.5::float8, ((extract(epoch from
                     max(last_interaction_at) over (partition by customer_id) - last_interaction_at)
                     / 86400)::float8) / 90::float8))::numeric, 6)::float8 as affinity_score
    from joined
    where purchases > 0 or views > 0

)

select
    customer_id, category_path, purchase_revenue, purchases, views_90d, last_interaction_at,
    affinity_score,
    row_number() over (partition by customer_id
                       order by affinity_score desc, last_interaction_at desc, category_path)
        as affinity_rank,
    split_part(category_path, '.', 1) as top_category,
    carts_90d, wishlists_90d, views, last_purchased_at, last_view_at, last_event_at
from scored
