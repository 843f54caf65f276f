with

source as (

    {{ raw_rows_as_of('product_changes', 'changed_at') }}

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
