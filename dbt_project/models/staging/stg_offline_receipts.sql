with

source as (

    {{ raw_rows_as_of('offline_receipts', 'purchased_at') }}

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
