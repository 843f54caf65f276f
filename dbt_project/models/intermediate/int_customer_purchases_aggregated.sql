-- One row per customer with at least one purchase as of as_of: counts, LTV and the
-- timing of first, second and last purchase (CONTRACT.md section 2).
with

purchases as (

    select * from {{ ref('int_purchases_numbered') }}

),

items as (

    select * from {{ ref('int_purchase_items_categorized') }}

),

categories_in_early_purchases as (

    select
        customer_id,
        count(distinct category_path) filter (where purchase_number = 1) as first_purchase_categories,
        count(distinct category_path) filter (where purchase_number = 2) as second_purchase_categories

    from items
    where purchase_number <= 2
      and category_path is not null
    group by customer_id

),

purchases_aggregated as (

    select
        customer_id,
        count(*) as purchases,
        count(*) filter (where source = 'online') as online_purchases,
        count(*) filter (where source = 'offline') as offline_purchases,
        sum(revenue) as ltv,
        min(purchased_at) as first_purchase_at,
        min(purchased_at) filter (where purchase_number = 2) as second_purchase_at,
        max(purchased_at) as last_purchase_at

    from purchases
    group by customer_id

),

timing_added as (

    select
        purchases_aggregated.*,
        {{ days_between('first_purchase_at', 'second_purchase_at') }} as days_to_second_purchase,
        case
            when purchases > 1
                then {{ days_between('first_purchase_at', 'last_purchase_at') }} / (purchases - 1)
        end as avg_days_between_purchases,
        -- NULL when the purchase has no line with a known category
        nullif(categories_in_early_purchases.first_purchase_categories, 0) as first_purchase_categories,
        nullif(categories_in_early_purchases.second_purchase_categories, 0) as second_purchase_categories

    from purchases_aggregated
    left join categories_in_early_purchases
        on categories_in_early_purchases.customer_id = purchases_aggregated.customer_id

)

select * from timing_added
