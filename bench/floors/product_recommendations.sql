-- The independent computation of bench/bench_recommendations.py: marts.product_recommendations
-- by its definition (dbt_project/models/marts/product_recommendations.yml), written by hand
-- from raw, without the model's SQL or any intermediate table. Purchases (CONTRACT.md
-- section 2, as bench/floors/_purchases.sql resolves them): online orders that are
-- paid or delivered, and offline receipts matched to one customer by loyalty card, else
-- by phone, each with its lines; the customers and the orders' statuses are those of the
-- build's {as_of}. Views are the raw events of type 'view', one row each, not per day.
-- For product X and product Y: the customers who bought X and, after their first
-- purchase of X and at most {window_days} days later, bought or viewed Y (Y <> X);
-- customers_bought those of them who bought Y in that window; buyers the customers who
-- bought X. score = (customers + {weight} * customers_bought) / (buyers + 1); rank by
-- score, customers, then Y in code-point order; top {per_product} per X with at least
-- {min_customers} customers. Only purchases and views at or before the weekly {snapshot}
-- count. The bench times `create temp table ... as` of this statement and compares it
-- with the mart row for row. {as_of} and {snapshot} are replaced by timestamptz literals.
with

customers as (

    -- a customer exists from sign-up or from their first online order, whichever is earlier
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

purchases as (

    select o.customer_id, i.product_id, o.ordered_at as at
    from raw.orders as o
    join raw.order_items as i on i.order_id = o.order_id
    where o.ordered_at <= {snapshot} and o.status in ('paid', 'delivered')
      and o.customer_id is not null and i.product_id is not null
    union all
    select coalesce(card_owner.customer_id, phone_owner.customer_id), i.product_id, r.purchased_at
    from raw.offline_receipts as r
    join raw.offline_receipt_items as i on i.receipt_id = r.receipt_id
    left join card_owner on card_owner.loyalty_card_id = nullif(trim(r.loyalty_card_id), '')
    left join phone_owner on phone_owner.phone_digits = substring(regexp_replace(regexp_replace(
        regexp_replace(coalesce(nullif(trim(r.phone), ''), ''), '[^0-9]', '', 'g'), '^00', ''),
        '^8?0([1-9][0-9]{{8}})$', '380\1') from '^[0-9]{{8,15}}$')
    where r.purchased_at <= {snapshot}
      and coalesce(card_owner.customer_id, phone_owner.customer_id) is not null
      and i.product_id is not null

),

views as (

    select customer_id, product_id, occurred_at as at
    from raw.events
    where event_type = 'view' and customer_id is not null and product_id is not null
      and occurred_at <= {snapshot}

),

first_bought as (

    select customer_id, product_id, min(at) as at
    from purchases
    group by customer_id, product_id

),

afterwards as (

    select customer_id, product_id, at, true as is_purchase from purchases
    union all
    select customer_id, product_id, at, false from views

),

per_customer as (

    select x.product_id as x, y.product_id as y, x.customer_id, bool_or(y.is_purchase) as bought
    from first_bought as x
    join afterwards as y
      on y.customer_id = x.customer_id
     and y.product_id <> x.product_id
     and y.at > x.at
     and y.at <= x.at + interval '{window_days} days'
    group by x.product_id, y.product_id, x.customer_id

),

pairs as (

    select x, y, count(*) as customers, count(*) filter (where bought) as customers_bought
    from per_customer
    group by x, y
    having count(*) >= {min_customers}

),

buyers as (

    select product_id as x, count(*) as buyers
    from first_bought
    group by product_id

),

scored as (

    select pairs.x, pairs.y, pairs.customers, pairs.customers_bought, buyers.buyers,
           (pairs.customers + {weight} * pairs.customers_bought)::numeric / (buyers.buyers + 1) as score
    from pairs
    join buyers on buyers.x = pairs.x

),

ranked as (

    select *, row_number() over (partition by x
                                 order by score desc, customers desc, y collate "C") as rank
    from scored

)

select x as product_id, y as recommended_product_id, rank, score, customers, customers_bought,
       buyers, {snapshot} as as_of
from ranked
where rank <= {per_product}
