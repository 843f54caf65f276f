{#-
    customer_channel_engagement: per customer and channel, how often the customer engaged
    with the messages they received there in the var best_channel_window_days before
    as_of, and which channel engages them best.

    messages: sent messages (status sent, sent_at in the window); engaged: those of them
    with an open (not flagged as a machine open) or a click by as_of. engagement_rate =
    engaged / messages. A channel is eligible with at least var
    best_channel_min_messages messages; the best channel is the eligible one with the
    highest rate, ties going to the channel with more messages, then to the earlier one in
    var best_channel_order. A customer without an eligible channel has no best channel.
-#}
{%- set order = var('best_channel_order') -%}

with

received as (
    select m.customer_id, m.channel, m.message_id
    from {{ ref('stg_ops_messages') }} as m
    where m.status = 'sent'
      and m.sent_at <= {{ as_of() }}
      and m.sent_at > {{ as_of() }} - interval '{{ var("best_channel_window_days") }} days'
),

engaged as (
    select distinct e.message_id
    from {{ ref('stg_ops_message_events') }} as e
    where e.event_type in ('open', 'click')
      and not e.is_machine_open
      and e.occurred_at <= {{ as_of() }}
),

per_channel as (
    select
        r.customer_id,
        r.channel,
        count(*)::int as messages,
        count(g.message_id)::int as engaged
    from received as r
    left join engaged as g on g.message_id = r.message_id
    group by r.customer_id, r.channel
),

ranked as (
    select
        *,
        engaged::float8 / messages as engagement_rate,
        messages >= {{ var('best_channel_min_messages') }} as is_eligible,
        row_number() over (
            partition by customer_id
            order by
                messages >= {{ var('best_channel_min_messages') }} desc,
                engaged::float8 / messages desc,
                messages desc,
                coalesce(array_position(
                    array[{% for c in order %}'{{ c }}'{{ ", " if not loop.last }}{% endfor %}]::text[],
                    channel), {{ order | length + 1 }}),
                channel
        ) as channel_rank
    from per_channel
)

select
    customer_id,
    channel,
    messages,
    engaged,
    engagement_rate,
    is_eligible,
    channel_rank,
    channel_rank = 1 and is_eligible as is_best,
    {{ as_of() }} as as_of
from ranked
