-- depends_on: {{ ref('int_purchases_customers_changed') }}
-- One row per customer who bought something as of as_of and product the customer
-- bought or viewed: the bounds of the interactions with the product and every one of
-- them. product_recommendations reads this table (clipped to its weekly snapshot)
-- instead of the purchase lines and the clickstream. Rules in
-- int_customer_product_interactions.yml.
--
-- Incremental per customer and product (strategy replace_rows,
-- macros/incremental_replace_rows.sql): a build recomputes the products of the
-- customers of int_purchases_customers_changed (their purchases changed, so every
-- product of theirs: stored, bought or viewed), the customer and product of every clickstream day
-- int_events_aggregated_daily rewrote in this build (aggregated_in), and, for a build
-- for an earlier as_of, the rows holding interactions after it.
{%- set previous_as_of = none %}
{%- set by_customer = false %}
{%- if is_incremental() %}
    {%- set previous_as_of = recorded_incremental_as_of([this.identifier]) %}
    {%- if previous_as_of is not none and execute %}
        {#- a daily build reads the clickstream of the few recomputed customers through
            the index on customer_id; when int_purchases_customers_changed lists every
            customer (no consistent previous build of the purchase tables) one scan is
            cheaper than an index lookup per customer -#}
        {%- set everyone = run_query("select exists (select 1 from " ~ ref('int_purchases_customers_changed')
                                     ~ " where reason = 'no previous build')") %}
        {%- set by_customer = not everyone.rows[0][0] %}
    {%- endif %}
{%- endif %}
{%- set columns = ['customer_id', 'product_id', 'starts_min', 'ends_max', 'first_bought_at',
                   'last_bought_at', 'starts', 'ends', 'bought'] %}
with

{% if previous_as_of is not none %}
purchases_changed as (

    select customer_id from {{ ref('int_purchases_customers_changed') }}

),

changed as (

    -- clickstream days the daily model (re)aggregated in this build
    select customer_id collate "C" as customer_id, product_id collate "C" as product_id
    from {{ ref('int_events_aggregated_daily') }}
    where aggregated_in = '{{ invocation_id }}'
      and product_id is not null

    union

    -- every product of a customer whose purchases changed: stored, bought, or viewed
    -- (a first purchase makes every product the customer viewed count)
    select customer_id, product_id
    from {{ this }}
    where customer_id in (select customer_id from purchases_changed)

    union

    select customer_id collate "C", product_id collate "C"
    from {{ ref('int_purchase_items_categorized') }}
    where customer_id in (select customer_id from purchases_changed)
      and product_id is not null

    union

    select customer_id collate "C", product_id collate "C"
    from {{ ref('int_events_aggregated_daily') }}
    where customer_id in (select customer_id from purchases_changed)
      and views > 0 and product_id is not null

    union

    -- an earlier as_of than the previous build: later interactions no longer count
    -- (a constant condition first: a build going forward does not scan the table)
    select customer_id, product_id
    from {{ this }}
    where {{ as_of() }} < {{ previous_as_of }}
      and ends_max > {{ as_of() }}

),
{% endif %}

purchase_items as (

    select customer_id collate "C" as customer_id, product_id collate "C" as product_id,
           purchased_at
    from {{ ref('int_purchase_items_categorized') }}
    where customer_id is not null and product_id is not null
    {% if previous_as_of is not none %}
      and customer_id in (select customer_id collate "default" from changed)
    {% endif %}

),

buyers as (

    select distinct customer_id from purchase_items

),

interactions as (

    -- a purchase is the moment purchased_at; a day of views the span from its first to
    -- its last view (all within one UTC day)
    select customer_id, product_id, purchased_at as starts_at, purchased_at as ends_at,
           purchased_at
    from purchase_items
    {% if previous_as_of is not none %}
    where (customer_id, product_id) in (select customer_id, product_id from changed)
    {% endif %}

    union all

    {% if by_customer %}
    -- each recomputed buyer's days through the index on customer_id, not a scan of the
    -- whole clickstream (the ids compared in the index's collation)
    select views.customer_id, views.product_id, views.first_view_at, views.last_view_at, null
    from buyers
    cross join lateral (
        select daily.customer_id collate "C" as customer_id,
               daily.product_id collate "C" as product_id,
               daily.first_view_at, daily.last_view_at
        from {{ ref('int_events_aggregated_daily') }} as daily
        where daily.customer_id = buyers.customer_id collate "default"
          and daily.views > 0 and daily.product_id is not null
    ) as views
    where (views.customer_id, views.product_id) in (select customer_id, product_id from changed)
    {% else %}
    select views.customer_id collate "C", views.product_id collate "C",
           views.first_view_at, views.last_view_at, null
    from {{ ref('int_events_aggregated_daily') }} as views
    where views.views > 0 and views.product_id is not null
      and views.customer_id in (select customer_id from buyers)
      {% if previous_as_of is not none %}
      and (views.customer_id collate "C", views.product_id collate "C")
          in (select customer_id, product_id from changed)
      {% endif %}
    {% endif %}

),

products_per_customer as (

    select
        customer_id,
        product_id,
        min(starts_at) as starts_min,
        max(ends_at) as ends_max,
        min(purchased_at) as first_bought_at,
        max(purchased_at) as last_bought_at,
        -- in time order, so that a recomputed row equals a full build's
        array_agg(starts_at order by starts_at, ends_at) as starts,
        array_agg(ends_at order by starts_at, ends_at) as ends,
        array_agg(purchased_at order by purchased_at)
            filter (where purchased_at is not null) as bought

    from interactions
    group by customer_id, product_id

)

{% if previous_as_of is not none %}
-- every recomputed key, with a NULL row for one that has no row any more
select
    changed.customer_id,
    changed.product_id,
    {%- for column in columns[2:] %}
    products_per_customer.{{ column }}{{ ',' if not loop.last }}
    {%- endfor %}
from changed
left join products_per_customer
    on products_per_customer.customer_id = changed.customer_id
    and products_per_customer.product_id = changed.product_id
{% else %}
select * from products_per_customer
{% endif %}
