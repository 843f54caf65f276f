-- One row per offline receipt matched to a customer (CONTRACT.md section 2, ROPO):
-- is_ropo when at least one item's product, or its category_path, was viewed online by
-- the customer in the ropo_window_days (30) before purchased_at. Rules in ropo_purchases.yml.
-- Indexed by customer and time: the dispatcher's claim asks whether a claimed customer
-- bought offline since the message was planned (the purchase exit).
{{ config(indexes=[{'columns': ['customer_id', 'purchased_at']}]) }}
{%- set window = days_interval(var('ropo_window_days')) %}
with

receipts as (

    select * from {{ ref('int_receipts_matched') }}
    where customer_id is not null

),

items as (

    select * from {{ ref('int_purchase_items_categorized') }}
    where source = 'offline'

),

daily_views as (

    select * from {{ ref('int_events_aggregated_daily') }}
    where views > 0

),

view_days_of_receipt_items as (

    -- the customer's view-days of a product on the receipt, or of its category, that
    -- overlap the window; exact times are checked below
    select
        receipts.receipt_id,
        receipts.purchased_at,
        daily_views.view_times

    from receipts
    inner join daily_views
        on daily_views.customer_id = receipts.customer_id
        and daily_views.event_date between {{ utc_date('receipts.purchased_at - ' ~ window) }}
                                       and {{ utc_date('receipts.purchased_at') }}
    where exists (
        select 1
        from items
        where items.purchase_id = receipts.receipt_id
          and (items.product_id = daily_views.product_id
               or items.category_path = daily_views.category_path)
    )

),

views_in_window as (

    select
        view_days_of_receipt_items.receipt_id,
        max(viewed.at) as last_online_view_at

    from view_days_of_receipt_items
    cross join lateral unnest(view_days_of_receipt_items.view_times) as viewed(at)
    where viewed.at >= view_days_of_receipt_items.purchased_at - {{ window }}
      and viewed.at < view_days_of_receipt_items.purchased_at
    group by view_days_of_receipt_items.receipt_id

),

final as (

    select
        receipts.receipt_id,
        receipts.customer_id,
        receipts.matched_by,
        receipts.purchased_at,
        receipts.total_amount,
        views_in_window.receipt_id is not null as is_ropo,
        views_in_window.last_online_view_at,
        receipts.store_id

    from receipts
    left join views_in_window
        on views_in_window.receipt_id = receipts.receipt_id

)

select * from final
