-- One row per product X and product Y that customers who bought X went on to view or buy
-- (within var recommendations_window_days of their first purchase of X): "customers who
-- bought X then viewed or bought Y". Every trigger chain that shows products reads it
-- (plugins/retention/triggers/recommend.py), best rank first. Rules in
-- product_recommendations.yml.
--
-- A weekly snapshot: computed as of `recommendations_as_of` (as_of rounded down to the
-- grid of var recommendations_refresh_days, default 7: Mondays 00:00 UTC), from the data
-- up to that moment. An incremental build whose snapshot moment is the one already
-- stored (intermediate.incremental_state) computes nothing; any other replaces the table
-- (strategy replace_all, macros/incremental_replace_all.sql).
{%- set window_days = var('recommendations_window_days', 90) %}
{%- set min_customers = var('recommendations_min_customers', 1) %}
{%- set per_product = var('recommendations_per_product', 20) %}
{%- set purchase_weight = var('recommendations_purchase_weight', 2) %}
{%- set snapshot = recommendations_as_of() %}
{%- set snapshot_date = utc_date(snapshot) %}
-- millions of (X, Y, customer) rows to group and rank: work_mem for this statement only
{{ config(pre_hook="set local work_mem = '256MB'",
          post_hook="{{ record_incremental_state(recommendations_as_of()) }}") }}
with

purchase_items as (

    select * from {{ ref('int_purchase_items_categorized') }}
    where purchased_at <= {{ snapshot }}

),

product_views_daily as (

    -- the clickstream through its one pass (int_events_aggregated_daily), never the
    -- events: per customer, UTC day and product, the first and last view of the day up
    -- to the snapshot moment (on its own day, the last view at or before it)
    select
        customer_id,
        product_id,
        first_view_at,
        case
            when event_date < {{ snapshot_date }} then last_view_at
            else (select max(v.at) from unnest(view_times) as v(at) where v.at <= {{ snapshot }})
        end as last_view_at

    from {{ ref('int_events_aggregated_daily') }}
    where views > 0 and product_id is not null
      and event_date <= {{ snapshot_date }}
      and first_view_at <= {{ snapshot }}

),

first_purchases_of_product as (

    select
        customer_id,
        product_id,
        min(purchased_at) as first_bought_at,
        -- the window's end, computed once per first purchase, not once per pair
        min(purchased_at) + {{ days_interval(window_days) }} as window_ends_at

    from purchase_items
    where customer_id is not null and product_id is not null
    group by customer_id, product_id

),

later_interactions as (

    select bought.product_id, later.product_id as recommended_product_id, bought.customer_id,
           true as is_purchase
    from first_purchases_of_product as bought
    inner join purchase_items as later
        on later.customer_id = bought.customer_id
        and later.product_id <> bought.product_id
        and later.purchased_at > bought.first_bought_at
        and later.purchased_at <= bought.window_ends_at

    union all

    -- a day with a view in (first_bought_at, first_bought_at + window]: exact at the
    -- second, because the window is longer than a day (its first day needs a view after
    -- the purchase, its last day a view before the end, the days between any view)
    select bought.product_id, later.product_id, bought.customer_id, false
    from first_purchases_of_product as bought
    inner join product_views_daily as later
        on later.customer_id = bought.customer_id
        and later.product_id <> bought.product_id
        and later.last_view_at > bought.first_bought_at
        and later.first_view_at <= bought.window_ends_at

),

purchases_and_later_interactions_joined as (

    select
        product_id,
        recommended_product_id,
        customer_id,
        bool_or(is_purchase) as bought_after

    from later_interactions
    group by product_id, recommended_product_id, customer_id

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

),

final as (

    select
        ranked.product_id,
        ranked.recommended_product_id,
        ranked.rank,
        -- a later purchase weighs more than a later view; +1 damps products bought once
        (ranked.customers + {{ purchase_weight }} * ranked.customers_bought)::numeric
            / (buyers_counted.buyers + 1) as score,
        ranked.customers,
        ranked.customers_bought,
        buyers_counted.buyers,
        {{ snapshot }} as as_of

    from ranked
    inner join buyers_counted
        on buyers_counted.product_id = ranked.product_id
    where ranked.rank <= {{ per_product }}

)

{% if is_incremental() %}
-- computed only when the snapshot moment moved; then one extra all-NULL row makes the
-- strategy replace the table even when there are no pairs at all. The gate is one
-- uncorrelated condition: PostgreSQL checks it once and never starts the plan below
-- when it is false.
{%- set snapshot_moved %}
not exists (
    select 1 from {{ incremental_state_relation() }}
    where model_name = '{{ this.identifier }}' and as_of = {{ snapshot }}
)
{%- endset %}
select * from final
where {{ snapshot_moved }}
union all
select null, null, null, null, null, null, null, null
where {{ snapshot_moved }}
{% else %}
select * from final
{% endif %}
