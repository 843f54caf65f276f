-- Provider events as the results marts read them, without the address (PII) and the raw
-- payload. Every row is kept: campaign_results applies as_of to occurred_at.
with

source as (

    select * from {{ source('ops', 'message_events') }}

),

renamed as (

    select
        provider,
        provider_event_id,
        message_id,
        event_type,
        occurred_at,
        received_at,
        -- an open the provider flags as made by a machine (SendGrid's sg_machine_open:
        -- Apple Mail Privacy Protection fetches every image), not by the reader
        coalesce(payload ->> 'sg_machine_open' in ('true', '1'), false) as is_machine_open

    from source

)

select * from renamed
