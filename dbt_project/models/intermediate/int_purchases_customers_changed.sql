-- depends_on: {{ ref('int_purchases_unified') }}
-- depends_on: {{ ref('stg_products') }}
-- One row per customer whose rows in the per-customer purchase tables
-- (int_purchases_numbered, int_purchase_items_categorized,
-- int_customer_purchases_aggregated, int_customer_category_purchases) this build must
-- recompute. Rules in int_purchases_customers_changed.yml. The previous tables are read
-- as plain relations, not ref()s: this model runs before them and compares with what
-- they hold.
{%- set chain = ['int_purchases_numbered', 'int_purchase_items_categorized', 'int_customer_product_interactions',
                 'int_customer_purchases_aggregated', 'int_customer_category_purchases'] %}
{%- set schema = generate_schema_name('intermediate', none) | trim %}
{%- set numbered = none %}
{%- set items = none %}
{%- set consistent = false %}
{%- if execute %}
    {%- set numbered = adapter.get_relation(database=target.database, schema=schema, identifier='int_purchases_numbered') %}
    {%- set items = adapter.get_relation(database=target.database, schema=schema, identifier='int_purchase_items_categorized') %}
    {%- set consistent = numbered is not none and items is not none
                         and recorded_incremental_as_of(chain) is not none %}
{%- endif %}
with

purchases as (

    select * from {{ ref('int_purchases_unified') }}

),

{% if not consistent %}
-- no consistent previous build of the four tables: every customer is recomputed
changed as (

    select distinct customer_id, 'no previous build' as reason from purchases
    {% if numbered is not none %}
    union
    select customer_id, 'no previous build' from {{ numbered }}
    {% endif %}

)
{% else %}
purchases_changed as (

    -- new purchases, purchases gone (order cancelled or returned, receipt no longer
    -- matched, or after an earlier as_of), and purchases whose customer, time or revenue
    -- changed: the customers on both sides
    select customers.customer_id, 'purchases changed' as reason
    from purchases
    full outer join {{ numbered }} as stored
        on stored.purchase_id = purchases.purchase_id
        and stored.source = purchases.source
    cross join lateral (
        values (purchases.customer_id), (stored.customer_id)
    ) as customers (customer_id)
    where customers.customer_id is not null
      and (purchases.purchase_id is null
           or stored.purchase_id is null
           or (purchases.customer_id, purchases.purchased_at, purchases.revenue)
              is distinct from (stored.customer_id, stored.purchased_at, stored.revenue))

),

categories_changed as (

    -- a product moved to another category (or left the catalogue) since the lines were
    -- categorized
    select stored.customer_id, 'product category changed' as reason
    from {{ items }} as stored
    left join {{ ref('stg_products') }} as products
        on products.product_id = stored.product_id
    where (stored.category_path, stored.top_category)
          is distinct from (products.category_path, products.top_category)

),

changed as (

    select customer_id, min(reason) as reason
    from (
        select * from purchases_changed
        union all
        select * from categories_changed
    ) as reasons
    group by customer_id

)
{% endif %}

select * from changed
