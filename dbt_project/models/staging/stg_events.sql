with

source as (

    select * from {{ source('raw', 'events') }}
    where occurred_at <= {{ as_of() }}

),

renamed as (

    select
        event_id,
        occurred_at,
        event_type,
        customer_id,
        session_id,
        product_id,
        nullif(trim(category_path), '') as category_path,
        price,
        search_query

    from source

)

select * from renamed
