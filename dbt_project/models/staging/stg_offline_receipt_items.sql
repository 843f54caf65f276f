with

source as (

    -- receipt lines carry no time of their own: they count from their receipt's purchased_at
    select items.*
    from {{ source('raw', 'offline_receipt_items') }} as items
    where exists (
        select 1
        from {{ source('raw', 'offline_receipts') }} as receipts
        where receipts.receipt_id = items.receipt_id
          and receipts.purchased_at <= {{ as_of() }}
    )

),

renamed as (

    select
        receipt_id,
        line_no,
        product_id,
        quantity,
        unit_price

    from source

)

select * from renamed
