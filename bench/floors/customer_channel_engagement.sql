-- Floor of marts.customer_channel_engagement (bench/bench_floors.py): one statement.
-- "From raw" here means from the pipeline's own tables ops.messages (the ledger) and
-- ops.message_events (provider events), which is all the mart reads: sent messages with
-- sent_at in (as_of - 90 days, as_of], engaged when an open (not flagged
-- sg_machine_open) or a click occurred by as_of; eligible from 3 messages; ties: more
-- messages, then the order mobile_push, email, web_push, telegram, viber, sms
-- (dbt_project.yml vars). {as_of} is replaced by a timestamptz literal. Every column is
-- compared exactly (engagement_rate: the same double precision division).
with

per_channel as (

    select m.customer_id, m.channel, count(*)::int as messages,
           count(*) filter (where exists (
               select 1 from ops.message_events as e
               where e.message_id = m.message_id and e.event_type in ('open', 'click')
                 and not coalesce(e.payload ->> 'sg_machine_open' in ('true', '1'), false)
                 and e.occurred_at <= {as_of}))::int as engaged
    from ops.messages as m
    where m.status = 'sent' and m.sent_at <= {as_of} and m.sent_at > {as_of} - interval '90 days'
    group by m.customer_id, m.channel

),

ranked as (

    select *,
        engaged::float8 / messages as engagement_rate,
        messages >= 3 as is_eligible,
        row_number() over (
            partition by customer_id
            order by messages >= 3 desc, engaged::float8 / messages desc, messages desc,
                     coalesce(array_position(array['mobile_push', 'email', 'web_push', 'telegram',
                                                   'viber', 'sms']::text[], channel), 7),
                     channel) as channel_rank
    from per_channel

)

select customer_id, channel, messages, engaged, engagement_rate, is_eligible, channel_rank,
       channel_rank = 1 and is_eligible as is_best, {as_of} as as_of
from ranked
