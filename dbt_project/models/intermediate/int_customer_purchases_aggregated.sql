-- depends_on: {{ ref('int_purchases_customers_changed') }}
-- One row per customer with at least one purchase as of as_of: counts, LTV and the
-- timing of first, second and last purchase (CONTRACT.md section 2), and the preferred
-- category. Incremental per customer (strategy replace_partitions): a build recomputes
-- the customers of int_purchases_customers_changed.
{%- set changed_only %}
    {% if is_incremental() %}
    where customer_id in (select customer_id from {{ ref('int_purchases_customers_changed') }})
    {% endif %}
{%- endset %}
with

purchases as (

    select * from {{ ref('int_purchases_numbered') }}
    {{ changed_only }}

),

items as (

    select * from {{ ref('int_purchase_items_categorized') }}
    {{ changed_only }}

),

categories as (

    select * from {{ ref('int_customer_category_purchases') }}
    {{ changed_only }}

),

preferred_categories as (

    -- the category of the most purchase-line revenue; ties: the latest purchase, then
    -- the category_path
    select distinct on (customer_id)
        customer_id,
        category_path as preferred_category

    from categories
    order by customer_id, purchase_revenue desc, last_purchased_at desc, category_path

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
        nullif(categories_in_early_purchases.second_purchase_categories, 0) as second_purchase_categories,
        preferred_categories.preferred_category

    from purchases_aggregated
    left join categories_in_early_purchases
        on categories_in_early_purchases.customer_id = purchases_aggregated.customer_id
    left join preferred_categories
        on preferred_categories.customer_id = purchases_aggregated.customer_id

)

{% if is_incremental() %}
-- every recomputed customer is listed, with a NULL row for one who has no purchase any more
{{ replace_partitions_select('timing_added', ['customer_id', 'purchases', 'online_purchases', 'offline_purchases', 'ltv', 'first_purchase_at', 'second_purchase_at', 'last_purchase_at', 'days_to_second_purchase', 'avg_days_between_purchases', 'first_purchase_categories', 'second_purchase_categories', 'preferred_category'], ref('int_purchases_customers_changed')) }}
{% else %}
select * from timing_added
{% endif %}
