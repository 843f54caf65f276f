-- Floor of marts.customer_top_category_affinity (bench/bench_floors.py): one statement
-- from raw. The per-category rows of customer_category_affinity (bought or viewed; see
-- bench/floors/customer_category_affinity.sql for what "from raw" means there) rolled up
-- per top category (the first segment of category_path); purchases counted once per
-- purchase and top category; score weights 5/3/2/1, 90-day half-life, 6 decimals.
-- {as_of} is replaced by a timestamptz literal. Every column is compared exactly.
with

customers as (

    select
        c.customer_id,
        nullif(trim(c.loyalty_card_id), '') as loyalty_card_id,
        substring(regexp_replace(regexp_replace(regexp_replace(coalesce(nullif(trim(c.phone), ''), ''),
            '[^0-9]', '', 'g'), '^00', ''), '^8?0([1-9][0-9]{{8}})$', '380\1')
            from '^[0-9]{{8,15}}$') as phone_digits
    from raw.customers as c
    where c.created_at is null or c.created_at <= {as_of}
       or exists (select 1 from raw.orders as o
                  where o.customer_id = c.customer_id and o.ordered_at <= {as_of})

),

card_owner as (

    select loyalty_card_id, min(customer_id) as customer_id
    from customers where loyalty_card_id is not null
    group by loyalty_card_id having count(*) = 1

),

phone_owner as (

    select phone_digits, min(customer_id) as customer_id
    from customers where phone_digits is not null
    group by phone_digits having count(*) = 1

),

purchase_lines as (

    select 'online' as source, o.order_id as purchase_id, o.customer_id, o.ordered_at as purchased_at,
           i.product_id, i.quantity * i.unit_price as revenue
    from raw.orders as o
    join raw.order_items as i on i.order_id = o.order_id
    where o.ordered_at <= {as_of} and o.status in ('paid', 'delivered')
    union all
    select 'offline', r.receipt_id, coalesce(card_owner.customer_id, phone_owner.customer_id),
           r.purchased_at, i.product_id, i.quantity * i.unit_price
    from raw.offline_receipts as r
    join raw.offline_receipt_items as i on i.receipt_id = r.receipt_id
    left join card_owner on card_owner.loyalty_card_id = nullif(trim(r.loyalty_card_id), '')
    left join phone_owner on phone_owner.phone_digits = substring(regexp_replace(regexp_replace(
        regexp_replace(coalesce(nullif(trim(r.phone), ''), ''), '[^0-9]', '', 'g'), '^00', ''),
        '^8?0([1-9][0-9]{{8}})$', '380\1') from '^[0-9]{{8,15}}$')
    where r.purchased_at <= {as_of}
      and coalesce(card_owner.customer_id, phone_owner.customer_id) is not null

),

purchase_categories as materialized (

    -- one row per purchase and category, so a purchase counts once per category
    select l.customer_id, nullif(trim(p.category_path), '') as category_path, l.source, l.purchase_id,
           sum(l.revenue) as revenue, max(l.purchased_at) as purchased_at
    from purchase_lines as l
    join raw.products as p on p.product_id = l.product_id
    where nullif(trim(p.category_path), '') is not null
    group by 1, 2, 3, 4

),

purchased as (

    select customer_id, category_path, sum(revenue) as purchase_revenue, count(*) as purchases,
           max(purchased_at) as last_purchased_at
    from purchase_categories
    group by 1, 2

),

clickstream as (

    select e.customer_id,
           coalesce(nullif(trim(e.category_path), ''), nullif(trim(p.category_path), '')) as category_path,
           count(*) filter (where e.event_type = 'view') as views,
           count(*) filter (where e.event_type = 'view' and e.occurred_at > {as_of} - 90 * interval '24 hours') as views_90d,
           count(*) filter (where e.event_type = 'cart' and e.occurred_at > {as_of} - 90 * interval '24 hours') as carts_90d,
           count(*) filter (where e.event_type = 'wishlist' and e.occurred_at > {as_of} - 90 * interval '24 hours') as wishlists_90d,
           max(e.occurred_at) filter (where e.event_type = 'view') as last_view_at,
           max(e.occurred_at) as last_event_at
    from raw.events as e
    left join raw.products as p on p.product_id = e.product_id
    where e.occurred_at <= {as_of} and e.customer_id is not null
      and coalesce(nullif(trim(e.category_path), ''), nullif(trim(p.category_path), '')) is not null
    group by 1, 2

),

joined as (

    select
        customer_id, category_path,
        coalesce(b.purchase_revenue, 0) as purchase_revenue,
        coalesce(b.purchases, 0) as purchases,
        coalesce(c.views, 0) as views,
        coalesce(c.views_90d, 0) as views_90d,
        coalesce(c.carts_90d, 0) as carts_90d,
        coalesce(c.wishlists_90d, 0) as wishlists_90d,
        b.last_purchased_at, c.last_view_at, c.last_event_at,
        greatest(b.last_purchased_at, c.last_view_at) as last_interaction_at
    from purchased as b
    full join clickstream as c using (customer_id, category_path)
    -- customers existing as of as_of (a join, not an IN over the CTE: hashes)
    join customers using (customer_id)

),

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
