with

source as (

    {{ raw_rows_as_of('events', 'occurred_at') }}

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
        search_query,
        -- a JSON object of the event's own properties (custom event types, declared in
        -- include/events.yaml), NULL when it has none
        properties

    from source

)

select * from renamed
