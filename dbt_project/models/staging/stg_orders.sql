with

source as (

    {{ raw_rows_as_of('orders', 'ordered_at') }}

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
