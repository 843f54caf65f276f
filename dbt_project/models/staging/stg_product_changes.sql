with

source as (

    select * from {{ source('raw', 'product_changes') }}
    where changed_at <= {{ as_of() }}

),

renamed as (

    select
        product_id,
        changed_at,
        price,
        in_stock

    from source

)

select * from renamed
