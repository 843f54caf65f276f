-- A table, not a view like the rest of staging: a dozen models and tests read the
-- customers, and as a view each of them would normalise every phone again (regular
-- expressions over every customer) and re-check the migrated accounts against orders.
{{ config(materialized='table', post_hook='analyze {{ this }}') }}
with

source as (

    select * from {{ source('raw', 'customers') }} as customers
    -- a customer exists as of as_of from sign-up (created_at) or from their first online
    -- order, whichever is earlier: an account migrated with older orders still counts
    where customers.created_at is null
       or customers.created_at <= {{ as_of() }}
       or exists (
           select 1
           from {{ source('raw', 'orders') }} as orders
           where orders.customer_id = customers.customer_id
             and orders.ordered_at <= {{ as_of() }}
       )

),

renamed as (

    select
        customer_id,
        nullif(trim(email), '') as email,
        nullif(trim(phone), '') as phone,
        {{ normalize_phone('phone') }} as phone_digits,
        nullif(trim(loyalty_card_id), '') as loyalty_card_id,
        created_at,
        timezone,
        city,
        upper(country) as country,
        birth_date

    from source

)

select * from renamed
