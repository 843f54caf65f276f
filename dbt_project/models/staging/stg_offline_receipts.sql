with

source as (

    select * from {{ source('raw', 'offline_receipts') }}
    where purchased_at <= {{ as_of() }}

),

renamed as (

    select
        receipt_id,
        store_id,
        purchased_at,
        nullif(trim(loyalty_card_id), '') as loyalty_card_id,
        nullif(trim(phone), '') as phone,
        {{ normalize_phone('phone') }} as phone_digits,
        total_amount,
        currency

    from source

)

select * from renamed
