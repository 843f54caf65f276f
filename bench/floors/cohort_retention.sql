-- Floor of marts.cohort_retention (bench/bench_floors.py): one statement from raw.
-- Purchases as in int_purchases_unified (paid or delivered orders, receipts matched by
-- loyalty card, else phone, each identifying exactly one customer existing as of
-- as_of); a customer's first and second purchase in the order purchased_at, source,
-- purchase_id; categories = distinct non-empty category_path of raw.products over the
-- purchase's lines. Windows 30/60/90 days of 24 hours, months UTC.
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

purchases as (

    select order_id as purchase_id, 'online' as source, customer_id, ordered_at as purchased_at
    from raw.orders
    where ordered_at <= {as_of} and status in ('paid', 'delivered')
    union all
    select r.receipt_id, 'offline', coalesce(card_owner.customer_id, phone_owner.customer_id),
           r.purchased_at
    from raw.offline_receipts as r
    left join card_owner on card_owner.loyalty_card_id = nullif(trim(r.loyalty_card_id), '')
    left join phone_owner on phone_owner.phone_digits = substring(regexp_replace(regexp_replace(
        regexp_replace(coalesce(nullif(trim(r.phone), ''), ''), '[^0-9]', '', 'g'), '^00', ''),
        '^8?0([1-9][0-9]{{8}})$', '380\1') from '^[0-9]{{8,15}}$')
    where r.purchased_at <= {as_of}
      and coalesce(card_owner.customer_id, phone_owner.customer_id) is not null

),

first_two as (

    -- a customer's first and second purchase
    select customer_id, purchase_id, source, purchased_at, n
    from (
        select purchases.*,
               row_number() over (partition by customer_id
                                  order by purchased_at, source, purchase_id) as n
        from purchases
    ) as numbered
    where n <= 2

),

early_categories as (

    select f.customer_id,
           nullif(count(distinct p.category_path) filter (where f.n = 1), 0) as first_categories,
           nullif(count(distinct p.category_path) filter (where f.n = 2), 0) as second_categories
    from first_two as f
    join (select order_id as purchase_id, 'online' as source, product_id from raw.order_items
          union all
          select receipt_id, 'offline', product_id from raw.offline_receipt_items) as i
      on i.purchase_id = f.purchase_id and i.source = f.source
    join (select product_id, nullif(trim(category_path), '') as category_path from raw.products) as p
      on p.product_id = i.product_id and p.category_path is not null
    group by f.customer_id

),

per_customer as (

    select
        f.customer_id,
        min(f.purchased_at) as first_purchase_at,
        min(f.purchased_at) filter (where f.n = 2) as second_purchase_at
    from first_two as f
    group by f.customer_id

),

timed as (

    select
        p.*,
        date_trunc('month', p.first_purchase_at at time zone 'UTC')::date as cohort_month,
        (extract(epoch from p.second_purchase_at - p.first_purchase_at) / 86400)::float8
            as days_to_second_purchase,
        e.first_categories, e.second_categories
    from per_customer as p
    left join early_categories as e on e.customer_id = p.customer_id

),

cohorts as (

    select
        cohort_month,
        count(*) as customers,
        count(*) filter (where days_to_second_purchase <= 30) as second_purchase_30d_customers,
        count(*) filter (where days_to_second_purchase <= 60) as second_purchase_60d_customers,
        count(*) filter (where days_to_second_purchase <= 90) as second_purchase_90d_customers,
        count(second_purchase_at) as second_purchase_customers,
        avg(first_categories)::float8 as avg_first_purchase_categories,
        avg(second_categories)::float8 as avg_second_purchase_categories,
        percentile_cont(0.5) within group (order by days_to_second_purchase)
            as median_days_to_second_purchase,
        (avg(extract(epoch from second_purchase_at - first_purchase_at)) / 86400)::float8
            as mean_days_to_second_purchase
    from timed
    group by cohort_month

)

select
    cohort_month,
    customers,
    second_purchase_30d_customers::float8 / customers as second_purchase_30d_rate,
    second_purchase_60d_customers::float8 / customers as second_purchase_60d_rate,
    second_purchase_90d_customers::float8 / customers as second_purchase_90d_rate,
    ((cohort_month + interval '1 month')::timestamp at time zone 'UTC') + 30 * interval '24 hours'
        <= {as_of} as is_complete_30d,
    ((cohort_month + interval '1 month')::timestamp at time zone 'UTC') + 60 * interval '24 hours'
        <= {as_of} as is_complete_60d,
    ((cohort_month + interval '1 month')::timestamp at time zone 'UTC') + 90 * interval '24 hours'
        <= {as_of} as is_complete_90d,
    second_purchase_30d_customers,
    second_purchase_60d_customers,
    second_purchase_90d_customers,
    second_purchase_customers,
    avg_first_purchase_categories,
    avg_second_purchase_categories,
    median_days_to_second_purchase,
    mean_days_to_second_purchase
from cohorts
