-- One row per line of a purchase (online order line or matched receipt line), with the
-- product's category. Item revenue = quantity * unit_price; it feeds category revenue
-- (preferred category, affinity), not LTV, which is the purchases' total_amount.
with

purchases as (

    select * from {{ ref('int_purchases_numbered') }}

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

items_unioned as (

    select order_id as purchase_id, 'online' as source, line_no, product_id, quantity, unit_price
    from order_items
    union all
    select receipt_id as purchase_id, 'offline' as source, line_no, product_id, quantity, unit_price
    from receipt_items

),

items_and_purchases_joined as (

    select
        purchases.purchase_id,
        purchases.source,
        items_unioned.line_no,
        purchases.customer_id,
        purchases.purchased_at,
        purchases.purchase_number,
        items_unioned.product_id,
        products.category_path,
        products.top_category,
        items_unioned.quantity,
        items_unioned.unit_price,
        items_unioned.quantity * items_unioned.unit_price as item_revenue

    from items_unioned
    inner join purchases
        on purchases.purchase_id = items_unioned.purchase_id
        and purchases.source = items_unioned.source
    left join products
        on products.product_id = items_unioned.product_id

)

select * from items_and_purchases_joined
