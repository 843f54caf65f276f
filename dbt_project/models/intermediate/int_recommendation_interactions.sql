-- depends_on: {{ ref('int_events_aggregated_daily') }}
-- One row per customer, product X they bought and product Y they then viewed or bought
-- within var recommendations_window_days of their first purchase of X (row_kind 'pair'),
-- plus one row per buying customer (row_kind 'purchases') with a fingerprint of their
-- purchase lines. marts.product_recommendations counts the pairs. Rules in
-- int_recommendation_interactions.yml.
--
-- Incremental per customer (strategy replace_partitions): a build recomputes only the
-- customers whose clickstream days were re-aggregated in this build or whose purchase
-- lines differ from the stored fingerprint; a build for an earlier as_of than the last
-- one (or the first build, or --full-refresh) recomputes everyone.
{{ config(
    materialized='incremental',
    incremental_strategy='replace_partitions',
    meta={'partition_column': 'customer_id', 'row_key_column': 'row_kind'},
    on_schema_change='fail',
    tags=['intermediate', 'incremental'],
    post_hook=["analyze {{ this }}", "{{ record_incremental_state() }}"],
    indexes=[{'columns': ['customer_id']}],
) }}
{%- set window_days = var('recommendations_window_days', 90) %}
{%- set incremental = is_incremental() %}
{%- set everyone = true %}
{%- if execute and incremental %}
    {%- set state = adapter.get_relation(database=target.database, schema=incremental_state_relation().schema, identifier=incremental_state_relation().identifier) %}
    {%- if state is not none %}
        {#- the previous build's as_of: at or before this one, only changes are recomputed #}
        {%- set recorded = run_query(
            "select count(*) from " ~ state ~ " where model_name = '" ~ this.identifier
            ~ "' and as_of <= " ~ as_of()) %}
        {%- set everyone = recorded.rows[0][0] == 0 %}
    {%- endif %}
{%- endif %}
with

items as (

    select customer_id, product_id, purchased_at
    from {{ ref('int_purchase_items_categorized') }}
    where customer_id is not null and product_id is not null

),

fingerprints as (

    -- the purchase lines that matter here, summed as 64-bit hashes (order-free): a new,
    -- cancelled, returned or re-matched line changes it
    select
        customer_id,
        count(*) as purchase_lines,
        sum(hashtextextended(product_id || '@' || extract(epoch from purchased_at)::text, 0))
            as purchases_fingerprint

    from items
    group by customer_id

),

{% if everyone %}
recomputed as (

    select customer_id from fingerprints
    {% if incremental %}
    -- and everyone stored, so that those without purchases as of as_of are emptied
    union
    select customer_id from {{ this }}
    {% endif %}

),
{% else %}
recomputed as (

    -- clickstream days (re)aggregated by this build: new and late events
    select customer_id
    from {{ ref('int_events_aggregated_daily') }}
    where aggregated_in = '{{ invocation_id }}'
      and views > 0 and product_id is not null
      and customer_id is not null

    union

    -- purchase lines added, removed or changed since the stored fingerprint
    select coalesce(now_.customer_id, stored.customer_id)
    from fingerprints as now_
    full outer join (
        select customer_id, purchase_lines, purchases_fingerprint
        from {{ this }}
        where row_kind = 'purchases'
    ) as stored
        on stored.customer_id = now_.customer_id
    where now_.customer_id is null
       or stored.customer_id is null
       or (now_.purchase_lines, now_.purchases_fingerprint)
          is distinct from (stored.purchase_lines, stored.purchases_fingerprint)

),
{% endif %}

first_purchases_of_product as (

    select customer_id, product_id, min(purchased_at) as first_bought_at
    from items
    {% if not everyone %}
    where customer_id in (select customer_id from recomputed)
    {% endif %}
    group by customer_id, product_id

),

product_views_daily as (

    -- the clickstream through its one pass (int_events_aggregated_daily): per customer,
    -- UTC day and product, the first and last view of the day
    select customer_id, product_id, first_view_at, last_view_at
    from {{ ref('int_events_aggregated_daily') }}
    where views > 0 and product_id is not null
    {% if not everyone %}
      and customer_id in (select customer_id from recomputed)
    {% endif %}

),

later_interactions as (

    select bought.customer_id, bought.product_id, later.product_id as recommended_product_id,
           true as is_purchase
    from first_purchases_of_product as bought
    inner join items as later
        on later.customer_id = bought.customer_id
        and later.product_id <> bought.product_id
        and later.purchased_at > bought.first_bought_at
        and later.purchased_at <= bought.first_bought_at + {{ days_interval(window_days) }}

    union all

    -- a day with a view in (first_bought_at, first_bought_at + window]: exact at the
    -- second, because the window is longer than a day (its first day needs a view after
    -- the purchase, its last day a view before the end, the days between any view)
    select bought.customer_id, bought.product_id, later.product_id, false
    from first_purchases_of_product as bought
    inner join product_views_daily as later
        on later.customer_id = bought.customer_id
        and later.product_id <> bought.product_id
        and later.last_view_at > bought.first_bought_at
        and later.first_view_at <= bought.first_bought_at + {{ days_interval(window_days) }}

),

pairs as (

    select
        customer_id,
        product_id,
        recommended_product_id,
        bool_or(is_purchase) as bought_after,
        null::bigint as purchase_lines,
        null::numeric as purchases_fingerprint,
        'pair' as row_kind

    from later_interactions
    group by customer_id, product_id, recommended_product_id

),

markers as (

    select
        customer_id,
        null::text as product_id,
        null::text as recommended_product_id,
        null::boolean as bought_after,
        purchase_lines,
        purchases_fingerprint,
        'purchases' as row_kind

    from fingerprints
    {% if not everyone %}
    where customer_id in (select customer_id from recomputed)
    {% endif %}

)

select * from pairs
union all
select * from markers
{% if incremental %}
union all
-- one tombstone per recomputed customer (row_kind NULL: never stored), so the strategy
-- also empties those who have no pairs and no purchases any more
select customer_id, null, null, null, null, null, null from recomputed
{% endif %}
