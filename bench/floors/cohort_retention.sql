-- Floor of marts.cohort_retention (bench/bench_floors.py): one statement from raw.
-- Purchases as in int_purchases_unified (paid or delivered orders, receipts matched by
-- loyalty card, else phone, each identifying exactly one customer existing as of
-- as_of); a customer's first and second purchase in the order purchased_at, source,
-- purchase_id; categories = distinct non-empty category_path of raw.products over the
-- purchase's lines. Windows 30/60/90 days of 24 hours, months UTC.
-- {as_of} is replaced by a timestamptz literal. Every column is compared exactly.
with

-- include: _purchases.sql

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
