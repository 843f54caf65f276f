with

source as (

    -- order lines carry no time of their own: they count from their order's ordered_at
    select items.*
    from {{ source('raw', 'order_items') }} as items
    where exists (
        select 1
        from {{ source('raw', 'orders') }} as orders
        where orders.order_id = items.order_id
          and orders.ordered_at <= {{ as_of() }}
    )

),

renamed as (

    select
        order_id,
        line_no,
        product_id,
        quantity,
        unit_price

    from source

)

select * from renamed
