with

source as (

    select * from {{ source('raw', 'orders') }}
    where ordered_at <= {{ as_of() }}

),

renamed as (

    select
        order_id,
        customer_id,
        ordered_at,
        status,
        total_amount,
        currency,
        payment_method,
        cancel_reason

    from source

)

select * from renamed
