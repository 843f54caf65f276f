with

source as (

    -- raw.products is the current state of the catalogue: every product is kept whatever
    -- its updated_at, because category_path (what the models use) does not change over
    -- time; the price and stock history as of as_of is stg_product_changes
    select * from {{ source('raw', 'products') }}

),

renamed as (

    select
        product_id,
        name as product_name,
        nullif(trim(category_path), '') as category_path,
        split_part(nullif(trim(category_path), ''), '.', 1) as top_category,
        brand,
        price,
        in_stock,
        updated_at

    from source

)

select * from renamed
