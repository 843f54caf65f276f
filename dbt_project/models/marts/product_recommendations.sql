-- One row per product X and product Y that customers who bought X went on to view or buy
-- (within var recommendations_window_days of their first purchase of X): "customers who
-- bought X then viewed or bought Y". Every trigger chain that shows products reads it
-- (plugins/retention/triggers/recommend.py), best rank first. Rules in
-- product_recommendations.yml.
{%- set window_days = var('recommendations_window_days', 90) %}
{%- set min_customers = var('recommendations_min_customers', 1) %}
{%- set per_product = var('recommendations_per_product', 20) %}
{%- set purchase_weight = var('recommendations_purchase_weight', 2) %}
with

purchase_items as (

    select * from {{ ref('int_purchase_items_categorized') }}

),

events as (

    select * from {{ ref('stg_events') }}

),

first_purchases_of_product as (

    select
        customer_id,
        product_id,
        min(purchased_at) as first_bought_at

    from purchase_items
    where customer_id is not null and product_id is not null
    group by customer_id, product_id

),

interactions_unioned as (

    select customer_id, product_id, purchased_at as interacted_at, true as is_purchase
    from purchase_items
    where customer_id is not null and product_id is not null

    union all

    select customer_id, product_id, occurred_at as interacted_at, false as is_purchase
    from events
    where event_type = 'view' and customer_id is not null and product_id is not null

),

purchases_and_later_interactions_joined as (

    select
        bought.product_id,
        later.product_id as recommended_product_id,
        bought.customer_id,
        bool_or(later.is_purchase) as bought_after

    from first_purchases_of_product as bought
    inner join interactions_unioned as later
        on later.customer_id = bought.customer_id
        and later.product_id <> bought.product_id
        and later.interacted_at > bought.first_bought_at
        and later.interacted_at <= bought.first_bought_at + {{ days_interval(window_days) }}
    group by bought.product_id, later.product_id, bought.customer_id

),

buyers_counted as (

    select product_id, count(*) as buyers
    from first_purchases_of_product
    group by product_id

),

pairs_aggregated as (

    select
        product_id,
        recommended_product_id,
        count(*) as customers,
        count(*) filter (where bought_after) as customers_bought

    from purchases_and_later_interactions_joined
    group by product_id, recommended_product_id

),

pairs_scored as (

    select
        pairs_aggregated.*,
        buyers_counted.buyers,
        -- a later purchase weighs more than a later view; +1 damps products bought once
        (pairs_aggregated.customers + {{ purchase_weight }} * pairs_aggregated.customers_bought)::numeric
            / (buyers_counted.buyers + 1) as score

    from pairs_aggregated
    inner join buyers_counted
        on buyers_counted.product_id = pairs_aggregated.product_id
    where pairs_aggregated.customers >= {{ min_customers }}

),

ranked as (

    select
        product_id,
        recommended_product_id,
        row_number() over (
            partition by product_id
            order by score desc, customers desc, recommended_product_id
        ) as rank,
        score,
        customers,
        customers_bought,
        buyers

    from pairs_scored

)

select * from ranked
where rank <= {{ per_product }}
