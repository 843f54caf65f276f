-- Identity resolution of offline receipts (ROPO match, CONTRACT.md section 2).
-- The rules, in order, are documented in int_receipts_matched.yml.
with

receipts as (

    select * from {{ ref('stg_offline_receipts') }}

),

customers as (

    select * from {{ ref('stg_customers') }}

),

card_holders as (

    select
        loyalty_card_id,
        min(customer_id) as customer_id,
        count(*) as holders

    from customers
    where loyalty_card_id is not null
    group by loyalty_card_id

),

phone_owners as (

    select
        phone_digits,
        min(customer_id) as customer_id,
        count(*) as owners

    from customers
    where phone_digits is not null
    group by phone_digits

),

receipts_and_candidates_joined as (

    select
        receipts.receipt_id,
        receipts.store_id,
        receipts.purchased_at,
        receipts.total_amount,
        receipts.currency,
        receipts.loyalty_card_id is not null as has_loyalty_card,
        receipts.phone_digits is not null as has_phone,
        coalesce(card_holders.holders, 0) as loyalty_card_holders,
        coalesce(phone_owners.owners, 0) as phone_owners,
        -- a card or a phone shared by two customers identifies nobody
        case when card_holders.holders = 1 then card_holders.customer_id end as card_customer_id,
        case when phone_owners.owners = 1 then phone_owners.customer_id end as phone_customer_id

    from receipts
    left join card_holders
        on card_holders.loyalty_card_id = receipts.loyalty_card_id
    left join phone_owners
        on phone_owners.phone_digits = receipts.phone_digits

),

matched as (

    select
        receipt_id,
        store_id,
        purchased_at,
        total_amount,
        currency,
        -- the loyalty card wins over the phone, also when they point to different customers
        coalesce(card_customer_id, phone_customer_id) as customer_id,
        case
            when card_customer_id is not null then 'loyalty_card'
            when phone_customer_id is not null then 'phone'
        end as matched_by,
        case
            when card_customer_id is not null then 'loyalty_card'
            when phone_customer_id is not null then 'phone'
            when phone_owners > 1 then 'ambiguous_phone'
            when loyalty_card_holders > 1 then 'ambiguous_loyalty_card'
            else 'unmatched'
        end as match_status,
        card_customer_id,
        phone_customer_id,
        loyalty_card_holders,
        phone_owners,
        coalesce(card_customer_id <> phone_customer_id, false) as card_and_phone_disagree,
        has_loyalty_card,
        has_phone

    from receipts_and_candidates_joined

)

select * from matched
