-- depends_on: {{ ref('int_purchases_customers_changed') }}
-- One row per customer and category_path the customer bought as of as_of: revenue of
-- their lines in it (quantity * unit_price), how many purchases had such a line, and the
-- last of them. Feeds the preferred category and the affinity marts.
-- Incremental per customer (strategy replace_partitions): a build recomputes the
-- customers of int_purchases_customers_changed.
with

items as (

    select * from {{ ref('int_purchase_items_categorized') }}
    where category_path is not null
    {% if is_incremental() %}
      and customer_id in (select customer_id from {{ ref('int_purchases_customers_changed') }})
    {% endif %}

),

purchase_categories as (

    -- one row per purchase and category, so purchases count once per category
    select
        customer_id,
        category_path,
        source,
        purchase_id,
        sum(item_revenue) as revenue,
        max(purchased_at) as purchased_at

    from items
    group by customer_id, category_path, source, purchase_id

),

aggregated as (

    select
        customer_id,
        category_path,
        sum(revenue) as purchase_revenue,
        count(*) as purchases,
        max(purchased_at) as last_purchased_at

    from purchase_categories
    group by customer_id, category_path

)

{% if is_incremental() %}
-- every recomputed customer is listed, with a NULL row for one who has no category any more
{{ replace_partitions_select('aggregated', ['customer_id', 'category_path', 'purchase_revenue', 'purchases', 'last_purchased_at'], ref('int_purchases_customers_changed')) }}
{% else %}
select * from aggregated
{% endif %}
