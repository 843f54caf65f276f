-- One row per purchase (CONTRACT.md section 2): online orders that are paid or delivered,
-- and offline receipts matched to a customer. Read by the BG/NBD model: keep the
-- relation name and the columns purchase_id, source, customer_id, purchased_at, revenue.
with

orders as (

    select * from {{ ref('stg_orders') }}

),

receipts as (

    select * from {{ ref('int_receipts_matched') }}

),

online_purchases as (

    select
        order_id as purchase_id,
        'online' as source,
        customer_id,
        ordered_at as purchased_at,
        total_amount as revenue

    from orders
    -- placed, cancelled and returned orders are not purchases and carry no revenue
    where status in ('paid', 'delivered')

),

offline_purchases as (

    select
        receipt_id as purchase_id,
        'offline' as source,
        customer_id,
        purchased_at,
        total_amount as revenue

    from receipts
    where customer_id is not null

),

unioned as (

    select * from online_purchases
    union all
    select * from offline_purchases

)

select * from unioned
