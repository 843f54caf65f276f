-- The ledger as the results marts read it: what was decided and sent. The recipient's
-- address (PII) and the dispatcher's own bookkeeping (claims, attempts, retry times) stay
-- in ops.messages. Every row is kept: each mart applies as_of to the time it counts by
-- (planned, sent).
with

source as (

    select * from {{ source('ops', 'messages') }}

),

renamed as (

    select
        message_id,
        campaign_id,
        run_id,
        step,
        step_index,
        channel,
        customer_id,
        variant,
        status,
        reason,
        cap_class,
        planned_at,
        sent_at

    from source

)

select * from renamed
