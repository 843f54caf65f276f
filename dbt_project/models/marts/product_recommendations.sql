-- One row per product X and product Y that customers who bought X went on to view or buy
-- (within var recommendations_window_days of their first purchase of X): "customers who
-- bought X then viewed or bought Y". Every trigger chain that shows products reads it
-- (plugins/retention/triggers/recommend.py), best rank first. Rules in
-- product_recommendations.yml. The per-customer pairs come from
-- int_recommendation_interactions (maintained per changed customer); this model counts them.
{%- set min_customers = var('recommendations_min_customers', 1) %}
{%- set per_product = var('recommendations_per_product', 20) %}
{%- set purchase_weight = var('recommendations_purchase_weight', 2) %}
-- about 1.5 pairs per customer to count and rank: room to do it in memory
{{ config(pre_hook="set local work_mem = '256MB'") }}
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

ranked as (

    -- within one X, buyers is the same on every row, so ordering by the integer
    -- numerator orders by score (and sorts far faster than numeric); ids compare by
    -- code point (collate "C"), whatever the database's locale. Only the keys are
    -- sorted; the score is computed for the rows kept.
    select
        product_id,
        recommended_product_id,
        customers,
        customers_bought,
        row_number() over (
            partition by product_id collate "C"
            order by customers + {{ purchase_weight }} * customers_bought desc,
                     customers desc,
                     recommended_product_id collate "C"
        ) as rank

    from pairs_aggregated
    where customers >= {{ min_customers }}

)

select
    ranked.product_id,
    ranked.recommended_product_id,
    ranked.rank,
    -- a later purchase weighs more than a later view; +1 damps products bought once
    (ranked.customers + {{ purchase_weight }} * ranked.customers_bought)::numeric
        / (buyers_counted.buyers + 1) as score,
    ranked.customers,
    ranked.customers_bought,
    buyers_counted.buyers

from ranked
inner join buyers_counted
    on buyers_counted.product_id = ranked.product_id
where ranked.rank <= {{ per_product }}
