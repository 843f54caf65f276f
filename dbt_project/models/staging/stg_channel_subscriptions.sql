with

source as (

    select * from {{ source('raw', 'channel_subscriptions') }}
    where subscribed_at is null or subscribed_at <= {{ as_of() }}

),

renamed as (

    select
        customer_id,
        channel,
        address,
        subscribed_at,
        -- an unsubscribe after as_of has not happened yet as of as_of
        case when unsubscribed_at <= {{ as_of() }} then unsubscribed_at end as unsubscribed_at,
        coalesce(unsubscribed_at > {{ as_of() }}, true) as is_subscribed

    from source

)

select * from renamed
