-- One row per purchase with its number in the customer's history (1 = first purchase).
-- Two purchases at the same moment are ordered by source ('offline' before 'online'),
-- then by purchase_id, so the numbering never depends on the query plan.
with

purchases as (

    select * from {{ ref('int_purchases_unified') }}

),

numbered as (

    select
        purchase_id,
        source,
        customer_id,
        purchased_at,
        revenue,
        row_number() over customer_history as purchase_number,
        lag(purchased_at) over customer_history as previous_purchased_at

    from purchases
    window customer_history as (
        partition by customer_id
        order by purchased_at, source, purchase_id
    )

),

gaps_added as (

    select
        *,
        {{ days_between('previous_purchased_at', 'purchased_at') }} as days_since_previous_purchase

    from numbered

)

select * from gaps_added
