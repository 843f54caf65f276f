-- One row per product X and product Y that customers who bought X went on to view or buy
-- (within var recommendations_window_days of their first purchase of X): "customers who
-- bought X then viewed or bought Y". Every trigger chain that shows products reads it
-- (plugins/retention/triggers/recommend.py), best rank first. Rules in
-- product_recommendations.yml. The per-customer pairs come from
-- int_recommendation_interactions (maintained per changed customer); this model counts them.
{%- set min_customers = var('recommendations_min_customers', 1) %}
{%- set per_product = var('recommendations_per_product', 20) %}
{%- set purchase_weight = var('recommendations_purchase_weight', 2) %}
with

buyers_counted as (

    select product_id, count(*) as buyers
    from (
        select distinct customer_id, product_id
        from {{ ref('int_purchase_items_categorized') }}
        where customer_id is not null and product_id is not null
    ) as bought
    group by product_id

),

pairs_aggregated as (

    select
        product_id,
        recommended_product_id,
        count(*) as customers,
        count(*) filter (where bought_after) as customers_bought

    from {{ ref('int_recommendation_interactions') }}
    where row_kind = 'pair'
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
