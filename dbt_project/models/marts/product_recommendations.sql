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
-- One statement that groups twice and sorts instead of hashing (the planner settings
-- below hold for this statement only, `set local`): the interactions are sorted by
-- customer and product and grouped into one row per customer and product; each
-- customer's first purchases then meet that customer's rows by hash, which gives each
-- (X, Y, customer) once, with no grouping of the pairs per customer; the pairs are
-- sorted by X and Y and counted, and come out in X order, so the ranking sorts only
-- within each X (incremental sort). Ids compare by code point (collate "C"), whatever
-- the database's locale: sorting short ids so is a byte comparison.
{{ config(pre_hook=["set local work_mem = '512MB'",
                    "set local enable_mergejoin = off",
                    "set local enable_hashagg = off",
                    "{{ record_rewrite(recommendations_as_of()) }}"],
          post_hook="{{ record_incremental_state(recommendations_as_of()) }}") }}
with

purchase_items as (

    select customer_id collate "C" as customer_id, product_id collate "C" as product_id,
           purchased_at
    from {{ ref('int_purchase_items_categorized') }}
    where purchased_at <= {{ snapshot }}
      and customer_id is not null and product_id is not null

),

product_views_daily as (

    -- the clickstream through its one pass (int_events_aggregated_daily), never the
    -- events: per customer, UTC day and product, the first and last view of the day up
    -- to the snapshot moment (on its own day, the last view at or before it)
    select
        customer_id collate "C" as customer_id,
        product_id collate "C" as product_id,
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

interactions as (

    -- a purchase is the moment purchased_at; a day of views the span from its first to
    -- its last view (all within one UTC day)
    select customer_id, product_id, purchased_at as starts_at, purchased_at as ends_at,
           purchased_at
    from purchase_items

    union all

    select customer_id, product_id, first_view_at, last_view_at, null
    from product_views_daily

),

products_per_customer as materialized (

    -- per customer and product: the bounds of the spans, the first and last purchase,
    -- and every span and purchase (read only when the bounds cannot decide, below)
    select
        customer_id,
        product_id,
        min(starts_at) as starts_min,
        max(ends_at) as ends_max,
        min(purchased_at) as first_bought_at,
        max(purchased_at) as last_bought_at,
        array_agg(starts_at) as starts,
        array_agg(ends_at) as ends,
        array_agg(purchased_at) filter (where purchased_at is not null) as bought

    from interactions
    group by customer_id, product_id

),

first_purchases_of_product as (

    select
        customer_id,
        product_id,
        first_bought_at,
        -- the window's end, computed once per first purchase, not once per pair
        first_bought_at + {{ days_interval(window_days) }} as window_ends_at

    from products_per_customer
    where first_bought_at is not null

),

purchases_and_later_interactions_joined as (

    -- X bought at b, window (b, e]: Y counts when one of its spans [s, t] (a purchase:
    -- s = t) has t > b and s <= e (exact at the second: a day's views lie within the
    -- day, the window is longer than a day). When every span starts after b, that is
    -- "the earliest start <= e"; when every span ends by e, "the latest end > b";
    -- otherwise the spans are looked at one by one. The same for Y's purchases
    -- (bought_after). One row per (X, Y, customer).
    select
        bought.product_id,
        later.product_id as recommended_product_id,
        case
            when later.first_bought_at is null then false
            when later.first_bought_at > bought.first_bought_at
                then later.first_bought_at <= bought.window_ends_at
            when later.last_bought_at <= bought.window_ends_at
                then later.last_bought_at > bought.first_bought_at
            else exists (
                select from unnest(later.bought) as p(at)
                where p.at > bought.first_bought_at and p.at <= bought.window_ends_at)
        end as bought_after

    from first_purchases_of_product as bought
    inner join products_per_customer as later
        on later.customer_id = bought.customer_id
        and later.product_id <> bought.product_id
        and later.ends_max > bought.first_bought_at
        and later.starts_min <= bought.window_ends_at
    where
        case
            when later.starts_min > bought.first_bought_at then true
            when later.ends_max <= bought.window_ends_at then true
            else exists (
                select from unnest(later.starts, later.ends) as span(starts_at, ends_at)
                where span.ends_at > bought.first_bought_at
                  and span.starts_at <= bought.window_ends_at)
        end

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
    -- numerator orders by score (and sorts far faster than numeric); the score is
    -- computed for the rows kept
    select
        product_id,
        recommended_product_id,
        customers,
        customers_bought,
        row_number() over (
            partition by product_id
            order by customers + {{ purchase_weight }} * customers_bought desc,
                     customers desc,
                     recommended_product_id
        ) as rank

    from pairs_aggregated
    where customers >= {{ min_customers }}

),

final as (

    select
        ranked.product_id collate "default" as product_id,
        ranked.recommended_product_id collate "default" as recommended_product_id,
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
