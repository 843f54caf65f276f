-- Fragment of the floors of customer_category_affinity and customer_top_category_affinity
-- (bench/bench_floors.py expands `-- include: _affinity.sql`): per customer existing as of
-- as_of and non-empty category_path, what they bought and viewed. purchase_lines: the lines
-- of the purchases of int_purchases_unified (paid or delivered orders, receipts matched by
-- loyalty card, else phone); purchase_categories: one row per purchase and category of the
-- line's product in raw.products; purchased: purchases, revenue and the last purchase per
-- customer and category; clickstream: raw.events up to as_of per customer and category
-- (the event's own category_path, else the catalogue's), all views and the views, carts
-- and wishlists of (as_of - 90 x 24 hours, as_of]; joined: both, for existing customers.
-- {as_of} is replaced by a timestamptz literal.
-- include: _customers.sql

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
