-- depends_on: {{ ref('int_purchases_customers_changed') }}
-- One row per line of a purchase (online order line or matched receipt line), with the
-- product's category. Item revenue = quantity * unit_price; it feeds category revenue
-- (preferred category, affinity), not LTV, which is the purchases' total_amount.
-- Incremental per customer (strategy replace_partitions): a build recomputes the lines
-- of the customers of int_purchases_customers_changed (their purchases come from
-- int_purchases_numbered, already rewritten for them in this build).
with

purchases as (

    select * from {{ ref('int_purchases_numbered') }}
    {% if is_incremental() %}
    where customer_id in (select customer_id from {{ ref('int_purchases_customers_changed') }})
    {% endif %}

),

order_items as (

    select * from {{ ref('stg_order_items') }}

),

receipt_items as (

    select * from {{ ref('stg_offline_receipt_items') }}

),

products as (

    select * from {{ ref('stg_products') }}

),

online_items as (

    select
        purchases.purchase_id,
        purchases.source,
        order_items.line_no,
        purchases.customer_id,
        purchases.purchased_at,
        purchases.purchase_number,
        order_items.product_id,
        order_items.quantity,
        order_items.unit_price

    from order_items
    inner join purchases
        on purchases.purchase_id = order_items.order_id
        and purchases.source = 'online'

),

offline_items as (

    select
        purchases.purchase_id,
        purchases.source,
        receipt_items.line_no,
        purchases.customer_id,
        purchases.purchased_at,
        purchases.purchase_number,
        receipt_items.product_id,
        receipt_items.quantity,
        receipt_items.unit_price

    from receipt_items
    inner join purchases
        on purchases.purchase_id = receipt_items.receipt_id
        and purchases.source = 'offline'

),

items_unioned as (

    select * from online_items
    union all
    select * from offline_items

),

categorized as (

    select
        items_unioned.purchase_id,
        items_unioned.source,
        items_unioned.line_no,
        items_unioned.customer_id,
        items_unioned.purchased_at,
        items_unioned.purchase_number,
        items_unioned.product_id,
        products.category_path,
        products.top_category,
        items_unioned.quantity,
        items_unioned.unit_price,
        items_unioned.quantity * items_unioned.unit_price as item_revenue

    from items_unioned
    left join products
        on products.product_id = items_unioned.product_id

)

{% if is_incremental() %}
-- every recomputed customer is listed, with a NULL row for one who has no line any more
{{ replace_partitions_select('categorized', ['purchase_id', 'source', 'line_no', 'customer_id', 'purchased_at', 'purchase_number', 'product_id', 'category_path', 'top_category', 'quantity', 'unit_price', 'item_revenue'], ref('int_purchases_customers_changed')) }}
{% else %}
select * from categorized
{% endif %}
